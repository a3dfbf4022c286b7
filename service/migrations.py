"""Explicit, ordered schema versions of the server's database.

The database records its version in `schema_version`. At start-up `upgrade` applies, in order and
each in its own transaction, every migration above it; a database newer than this server is
refused (an older server must not write a schema it does not know). A migration is frozen once
released: it holds its own table definitions rather than importing `service.store`'s, so changing
the current models never rewrites history. `tests/test_service_store.py` checks that the migrated
schema equals the one `service.store` maps.

To change the schema: edit the models in `service/store.py`, then append a migration here (e.g.
`op.add_column`-style `ALTER TABLE` through SQLAlchemy) and bump nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine


def _v1_initial(conn: Connection) -> None:
    md = sa.MetaData()
    tz = sa.DateTime(timezone=True)
    sa.Table(
        "api_keys", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False, index=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", tz, nullable=False),
        sa.Column("revoked_at", tz, nullable=True),
    )
    sa.Table(
        "sessions", md,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False, index=True),
        sa.Column("created_at", tz, nullable=False),
        sa.Column("last_heartbeat_at", tz, nullable=False),
        sa.Column("finished_at", tz, nullable=True),
        sa.Column("finish_reason", sa.String(32), nullable=True),
        sa.Column("sdk_version", sa.String(64), nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("user_metadata", sa.JSON, nullable=False),
        sa.Column("display_name", sa.String(512), nullable=True),
        sa.Column("project_id", sa.String(256), nullable=True),
    )
    sa.Table(
        "models", md,
        sa.Column("id", sa.String(160), primary_key=True),
        sa.Column("session_id", sa.String(64), nullable=False, index=True),
        sa.Column("owner", sa.String(200), nullable=False, index=True),
        sa.Column("base_model", sa.String(1024), nullable=False),
        sa.Column("lora_rank", sa.Integer, nullable=False),
        sa.Column("lora_seed", sa.BigInteger, nullable=False),
        sa.Column("train_mlp", sa.Boolean, nullable=False),
        sa.Column("train_attn", sa.Boolean, nullable=False),
        sa.Column("train_unembed", sa.Boolean, nullable=False),
        sa.Column("user_metadata", sa.JSON, nullable=False),
        sa.Column("created_at", tz, nullable=False),
        sa.Column("last_request_at", tz, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("source_path", sa.String(2048), nullable=True),
        sa.Column("released_at", tz, nullable=True),
    )
    sa.Table(
        "samplers", md,
        sa.Column("id", sa.String(160), primary_key=True),
        sa.Column("session_id", sa.String(64), nullable=False, index=True),
        sa.Column("owner", sa.String(200), nullable=False, index=True),
        sa.Column("base_model", sa.String(1024), nullable=False),
        sa.Column("model_path", sa.String(2048), nullable=True),
        sa.Column("source_model_id", sa.String(160), nullable=True),
        sa.Column("source_version", sa.Integer, nullable=True),
        sa.Column("created_at", tz, nullable=False),
    )
    sa.Table(
        "futures", md,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False, index=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("model_id", sa.String(160), nullable=True, index=True),
        sa.Column("sampler_id", sa.String(160), nullable=True),
        sa.Column("seq_id", sa.BigInteger, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("result_format", sa.String(8), nullable=True),
        sa.Column("result", sa.LargeBinary, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("error_category", sa.String(16), nullable=True),
        sa.Column("created_at", tz, nullable=False, index=True),
        sa.Column("finished_at", tz, nullable=True),
        sa.UniqueConstraint("model_id", "seq_id", name="uq_futures_model_seq"),
        sa.UniqueConstraint("sampler_id", "seq_id", name="uq_futures_sampler_seq"),
    )
    sa.Table(
        "checkpoints", md,
        sa.Column("tinker_path", sa.String(2048), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False, index=True),
        sa.Column("model_id", sa.String(160), nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("disk_path", sa.String(4096), nullable=False),
        sa.Column("base_model", sa.String(1024), nullable=False),
        sa.Column("lora_rank", sa.Integer, nullable=False),
        sa.Column("step", sa.Integer, nullable=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=True),
        sa.Column("public", sa.Boolean, nullable=False),
        sa.Column("user_metadata", sa.JSON, nullable=True),
        sa.Column("created_at", tz, nullable=False),
        sa.Column("expires_at", tz, nullable=True),
    )
    md.create_all(conn)


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "api keys, sessions, models, samplers, futures, checkpoints", _v1_initial),
]
LATEST = MIGRATIONS[-1][0]


class SchemaTooNew(RuntimeError):
    pass


def current_version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    version = conn.execute(sa.text("SELECT max(version) FROM schema_version")).scalar()
    return int(version or 0)


def upgrade(engine: Engine) -> list[int]:
    """Bring the database to `LATEST`; returns the versions applied (empty when already current)."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, "
                             "description VARCHAR(200) NOT NULL, applied_at VARCHAR(40) NOT NULL)"))
        version = current_version(conn)
    if version > LATEST:
        raise SchemaTooNew(f"the database is at schema version {version}; this server knows up to {LATEST}. "
                           "Upgrade the server (never point an older server at a newer database).")
    applied = []
    for number, description, migrate in MIGRATIONS:
        if number <= version:
            continue
        with engine.begin() as conn:
            migrate(conn)
            conn.execute(sa.text("INSERT INTO schema_version (version, description, applied_at) "
                                 "VALUES (:v, :d, CURRENT_TIMESTAMP)"), {"v": number, "d": description})
        applied.append(number)
    return applied
