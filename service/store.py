"""The server's state in a database, through SQLAlchemy: API keys, sessions, models, samplers,
futures (with their results or errors) and checkpoint records.

SQLite file by default (WAL, so the `keys` command can write while the server runs), PostgreSQL or
any SQLAlchemy URL otherwise; the schema is created and upgraded by `service.migrations`. The
server calls the store from its event loop only (each call is one short transaction), so there is
no cross-thread session sharing. Keys are stored as SHA-256 digests: a key is 32 random bytes, so a
fast hash is enough and the raw key is never kept. Times are timezone-aware UTC.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from service import migrations

KEY_PREFIX = "tml-"  # the SDK refuses keys without it


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes; every time we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Base(DeclarativeBase):
    pass


TZ = sa.DateTime(timezone=True)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(sa.String(200), index=True)
    key_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(TZ)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(TZ, nullable=True)


class SessionRow(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(sa.String(200), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(TZ)
    last_heartbeat_at: Mapped[dt.datetime] = mapped_column(TZ)
    finished_at: Mapped[dt.datetime | None] = mapped_column(TZ, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(sa.String(32), nullable=True)
    sdk_version: Mapped[str] = mapped_column(sa.String(64))
    tags: Mapped[Any] = mapped_column(sa.JSON)
    user_metadata: Mapped[Any] = mapped_column(sa.JSON)
    display_name: Mapped[str | None] = mapped_column(sa.String(512), nullable=True)
    project_id: Mapped[str | None] = mapped_column(sa.String(256), nullable=True)


class ModelRow(Base):
    """A training run: one LoRA adapter, `<session>:train:<n>`. `status`: creating | ready | failed."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(sa.String(160), primary_key=True)
    session_id: Mapped[str] = mapped_column(sa.String(64), index=True)
    owner: Mapped[str] = mapped_column(sa.String(200), index=True)
    base_model: Mapped[str] = mapped_column(sa.String(1024))
    lora_rank: Mapped[int] = mapped_column(sa.Integer)
    lora_seed: Mapped[int] = mapped_column(sa.BigInteger)
    train_mlp: Mapped[bool] = mapped_column(sa.Boolean)
    train_attn: Mapped[bool] = mapped_column(sa.Boolean)
    train_unembed: Mapped[bool] = mapped_column(sa.Boolean)
    user_metadata: Mapped[Any] = mapped_column(sa.JSON)
    created_at: Mapped[dt.datetime] = mapped_column(TZ)
    last_request_at: Mapped[dt.datetime] = mapped_column(TZ)
    status: Mapped[str] = mapped_column(sa.String(16))
    error: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    source_path: Mapped[str | None] = mapped_column(sa.String(2048), nullable=True)
    released_at: Mapped[dt.datetime | None] = mapped_column(TZ, nullable=True)


class SamplerRow(Base):
    """A sampling session `<session>:sample:<n>`: the base model, a saved sampler checkpoint
    (`model_path`), or an in-memory snapshot of a model (`source_model_id` at `source_version`)."""

    __tablename__ = "samplers"
    id: Mapped[str] = mapped_column(sa.String(160), primary_key=True)
    session_id: Mapped[str] = mapped_column(sa.String(64), index=True)
    owner: Mapped[str] = mapped_column(sa.String(200), index=True)
    base_model: Mapped[str] = mapped_column(sa.String(1024))
    model_path: Mapped[str | None] = mapped_column(sa.String(2048), nullable=True)
    source_model_id: Mapped[str | None] = mapped_column(sa.String(160), nullable=True)
    source_version: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(TZ)


class FutureRow(Base):
    """One request's outcome. `status`: pending | done | failed. `result_format`: json | proto."""

    __tablename__ = "futures"
    __table_args__ = (sa.UniqueConstraint("model_id", "seq_id", name="uq_futures_model_seq"),
                      sa.UniqueConstraint("sampler_id", "seq_id", name="uq_futures_sampler_seq"))
    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(sa.String(200), index=True)
    kind: Mapped[str] = mapped_column(sa.String(32))
    model_id: Mapped[str | None] = mapped_column(sa.String(160), nullable=True, index=True)
    sampler_id: Mapped[str | None] = mapped_column(sa.String(160), nullable=True)
    seq_id: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    status: Mapped[str] = mapped_column(sa.String(16))
    result_format: Mapped[str | None] = mapped_column(sa.String(8), nullable=True)
    result: Mapped[bytes | None] = mapped_column(sa.LargeBinary, nullable=True)
    error: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    error_category: Mapped[str | None] = mapped_column(sa.String(16), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(TZ, index=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(TZ, nullable=True)


class CheckpointRow(Base):
    """A saved checkpoint: `kind` training (Orbax state) or sampler (PEFT), at `disk_path`."""

    __tablename__ = "checkpoints"
    tinker_path: Mapped[str] = mapped_column(sa.String(2048), primary_key=True)
    owner: Mapped[str] = mapped_column(sa.String(200), index=True)
    model_id: Mapped[str] = mapped_column(sa.String(160), index=True)
    kind: Mapped[str] = mapped_column(sa.String(16))
    name: Mapped[str] = mapped_column(sa.String(256))
    disk_path: Mapped[str] = mapped_column(sa.String(4096))
    base_model: Mapped[str] = mapped_column(sa.String(1024))
    lora_rank: Mapped[int] = mapped_column(sa.Integer)
    step: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    size_bytes: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    public: Mapped[bool] = mapped_column(sa.Boolean)
    user_metadata: Mapped[Any] = mapped_column(sa.JSON, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(TZ)
    expires_at: Mapped[dt.datetime | None] = mapped_column(TZ, nullable=True)


def make_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


class Store:
    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        migrations.upgrade(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # ------------------------------------------------------------------------------------- keys
    def create_key(self, name: str) -> str:
        """A new random key for `name` (its owner identity); only its digest is stored."""
        if not name or len(name) > 200:
            raise ValueError("a key name must have 1 to 200 characters")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.tx() as s:
            s.add(ApiKey(name=name, key_hash=hash_key(key), created_at=utcnow()))
        return key

    def owner_of_key(self, key: str) -> str | None:
        with self.tx() as s:
            row = s.scalars(sa.select(ApiKey).where(ApiKey.key_hash == hash_key(key))).first()
            return row.name if row is not None and row.revoked_at is None else None

    def list_keys(self) -> list[ApiKey]:
        with self.tx() as s:
            return list(s.scalars(sa.select(ApiKey).order_by(ApiKey.id)))

    def revoke_keys(self, name: str) -> int:
        with self.tx() as s:
            rows = list(s.scalars(sa.select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))))
            for row in rows:
                row.revoked_at = utcnow()
            return len(rows)

    # --------------------------------------------------------------------------------- sessions
    def add(self, row: Base) -> Any:
        with self.tx() as s:
            s.add(row)
        return row

    def get(self, cls: type[Any], key: str) -> Any:
        with self.tx() as s:
            return s.get(cls, key)

    def update(self, cls: type[Any], key: str, **values: Any) -> None:
        with self.tx() as s:
            row = s.get(cls, key)
            if row is not None:
                for name, value in values.items():
                    setattr(row, name, value)

    def sessions_of(self, owner: str, limit: int, offset: int) -> tuple[list[SessionRow], int]:
        with self.tx() as s:
            q = sa.select(SessionRow).where(SessionRow.owner == owner)
            total = s.scalar(sa.select(sa.func.count()).select_from(q.subquery())) or 0
            rows = list(s.scalars(q.order_by(SessionRow.created_at.desc()).limit(limit).offset(offset)))
            return rows, total

    def stale_sessions(self, before: dt.datetime) -> list[SessionRow]:
        """Open sessions whose last heartbeat is older than `before`."""
        with self.tx() as s:
            return list(s.scalars(sa.select(SessionRow).where(SessionRow.finished_at.is_(None),
                                                             SessionRow.last_heartbeat_at < before)))

    def children_of_session(self, session_id: str) -> tuple[list[ModelRow], list[SamplerRow]]:
        with self.tx() as s:
            models = list(s.scalars(sa.select(ModelRow).where(ModelRow.session_id == session_id)))
            samplers = list(s.scalars(sa.select(SamplerRow).where(SamplerRow.session_id == session_id)))
            return models, samplers

    def models_of(self, owner: str, limit: int, offset: int) -> tuple[list[ModelRow], int]:
        with self.tx() as s:
            q = sa.select(ModelRow).where(ModelRow.owner == owner)
            total = s.scalar(sa.select(sa.func.count()).select_from(q.subquery())) or 0
            rows = list(s.scalars(q.order_by(ModelRow.created_at.desc()).limit(limit).offset(offset)))
            return rows, total

    def delete_sampler(self, sampler_id: str) -> None:
        with self.tx() as s:
            s.execute(sa.delete(SamplerRow).where(SamplerRow.id == sampler_id))

    # ---------------------------------------------------------------------------------- futures
    def future_for_seq(self, *, model_id: str | None = None, sampler_id: str | None = None,
                       seq_id: int) -> FutureRow | None:
        with self.tx() as s:
            q = sa.select(FutureRow).where(FutureRow.seq_id == seq_id)
            q = q.where(FutureRow.model_id == model_id) if model_id else q.where(FutureRow.sampler_id == sampler_id)
            return s.scalars(q).first()

    def max_seq(self, model_id: str) -> int | None:
        with self.tx() as s:
            return s.scalar(sa.select(sa.func.max(FutureRow.seq_id)).where(FutureRow.model_id == model_id))

    def finish_future(self, future_id: str, *, status: str, result_format: str | None = None,
                      result: bytes | None = None, error: str | None = None, category: str | None = None) -> None:
        self.update(FutureRow, future_id, status=status, result_format=result_format, result=result, error=error,
                    error_category=category, finished_at=utcnow())

    def fail_pending_futures(self, message: str) -> int:
        """Mark every future still pending (the server died while it ran) as failed with `message`."""
        with self.tx() as s:
            result = s.execute(sa.update(FutureRow).where(FutureRow.status == "pending").values(
                status="failed", error=message, error_category="server", finished_at=utcnow()))
            return int(result.rowcount or 0)

    def purge_futures(self, before: dt.datetime) -> int:
        with self.tx() as s:
            result = s.execute(sa.delete(FutureRow).where(FutureRow.status != "pending",
                                                          FutureRow.created_at < before))
            return int(result.rowcount or 0)

    # ------------------------------------------------------------------------------ checkpoints
    def put_checkpoint(self, row: CheckpointRow) -> None:
        with self.tx() as s:
            s.merge(row)

    def checkpoints(self, *, owner: str | None = None, model_id: str | None = None, limit: int | None = None,
                    offset: int = 0) -> tuple[list[CheckpointRow], int]:
        with self.tx() as s:
            q = sa.select(CheckpointRow)
            if owner is not None:
                q = q.where(CheckpointRow.owner == owner)
            if model_id is not None:
                q = q.where(CheckpointRow.model_id == model_id)
            total = s.scalar(sa.select(sa.func.count()).select_from(q.subquery())) or 0
            q = q.order_by(CheckpointRow.created_at.desc(), CheckpointRow.tinker_path).offset(offset)
            if limit is not None:
                q = q.limit(limit)
            return list(s.scalars(q)), total

    def last_checkpoint(self, model_id: str, kind: str) -> CheckpointRow | None:
        with self.tx() as s:
            return s.scalars(sa.select(CheckpointRow).where(CheckpointRow.model_id == model_id,
                                                             CheckpointRow.kind == kind)
                             .order_by(CheckpointRow.created_at.desc())).first()

    def delete_checkpoint(self, tinker_path: str) -> None:
        with self.tx() as s:
            s.execute(sa.delete(CheckpointRow).where(CheckpointRow.tinker_path == tinker_path))

    def expired_checkpoints(self, now: dt.datetime) -> Sequence[CheckpointRow]:
        with self.tx() as s:
            return list(s.scalars(sa.select(CheckpointRow).where(CheckpointRow.expires_at.is_not(None),
                                                                  CheckpointRow.expires_at < now)))
