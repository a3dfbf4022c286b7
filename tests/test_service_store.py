"""The server's database without the server: schema versions, API keys (the `keys` command), futures
left pending by a dead server. A real SQLite file each time; no JAX."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from service import migrations
from service import store as st

REPO = Path(__file__).resolve().parents[1]


def test_migrated_schema_is_the_mapped_schema(tmp_path):
    store = st.Store(f"sqlite:///{tmp_path / 'state.db'}")
    inspector = sa.inspect(store.engine)
    for table in st.Base.metadata.sorted_tables:
        migrated = {c["name"]: c for c in inspector.get_columns(table.name)}
        assert set(migrated) == {c.name for c in table.columns}, table.name
        for column in table.columns:
            assert migrated[column.name]["nullable"] == column.nullable, f"{table.name}.{column.name}"
            assert type(migrated[column.name]["type"]).__name__.upper() in str(column.type).upper() or \
                str(column.type).upper() in str(migrated[column.name]["type"]).upper(), f"{table.name}.{column.name}"
        assert {tuple(u["column_names"]) for u in inspector.get_unique_constraints(table.name)} >= {
            tuple(c.name for c in u.columns) for u in table.constraints if isinstance(u, sa.UniqueConstraint)}
    store.close()


def test_upgrade_is_idempotent_and_refuses_a_newer_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    engine = st.make_engine(url)
    assert migrations.upgrade(engine) == [m[0] for m in migrations.MIGRATIONS]
    assert migrations.upgrade(engine) == []
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO schema_version VALUES (:v, 'from the future', 'now')"),
                     {"v": migrations.LATEST + 1})
    with pytest.raises(migrations.SchemaTooNew, match=f"schema version {migrations.LATEST + 1}"):
        migrations.upgrade(engine)
    engine.dispose()


def test_keys_command_prints_a_key_stored_only_as_a_hash(tmp_path):
    db = tmp_path / "state.db"
    url = f"sqlite:///{db}"
    made = subprocess.run([sys.executable, "-m", "service", "keys", "create", "--name", "alice", "--db", url],
                          capture_output=True, text=True, timeout=120, check=True)
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("tml-") and len(key) > 40
    store = st.Store(url)
    assert store.owner_of_key(key) == "alice" and store.owner_of_key(key + "x") is None
    listed = subprocess.run([sys.executable, "-m", "service", "keys", "list", "--db", url], capture_output=True,
                            text=True, timeout=120, check=True).stdout
    assert listed.startswith("alice\t") and "active" in listed
    subprocess.run([sys.executable, "-m", "service", "keys", "revoke", "--name", "alice", "--db", url], check=True,
                   capture_output=True, timeout=120)
    assert store.owner_of_key(key) is None
    store.close()
    # read the files only once no connection is open (closing any descriptor of a SQLite file drops the
    # process's locks on it): the raw key is nowhere, its digest is
    files = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
    assert key.encode() not in files and st.hash_key(key).encode() in files


def test_futures_pending_at_a_restart_fail_and_old_ones_are_purged(tmp_path):
    store = st.Store(f"sqlite:///{tmp_path / 'state.db'}")
    old = st.utcnow() - dt.timedelta(days=30)
    store.add(st.FutureRow(id="a", owner="o", kind="optim_step", model_id="m", seq_id=1, status="pending",
                           created_at=st.utcnow()))
    store.add(st.FutureRow(id="b", owner="o", kind="optim_step", model_id="m", seq_id=2, status="done",
                           created_at=old))
    assert store.fail_pending_futures("the server restarted") == 1
    row = store.get(st.FutureRow, "a")
    assert (row.status, row.error, row.error_category) == ("failed", "the server restarted", "server")
    assert store.max_seq("m") == 2
    assert store.purge_futures(st.utcnow() - dt.timedelta(days=7)) == 1
    assert store.get(st.FutureRow, "b") is None and store.get(st.FutureRow, "a") is not None
    store.close()


@pytest.mark.parametrize(("mesh", "message"), [("tp=x", "expected AXIS=N"), ("pp=2", "one of data, fsdp, tp"),
                                                ("tp=0", "MeshConfig.tp must be a positive integer")])
def test_a_bad_mesh_flag_is_refused_with_what_to_write(mesh, message, tmp_path):
    done = subprocess.run([sys.executable, "-m", "service", "--base-model", str(tmp_path), "--mesh", mesh],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "argument --mesh" in done.stderr and message in done.stderr, done.stderr


def test_the_mesh_flag_reads_every_axis():
    from framework.sharding import MeshConfig
    from service.__main__ import parse_mesh

    assert parse_mesh("fsdp=-1") == MeshConfig()
    assert parse_mesh("fsdp=4, tp=2") == MeshConfig(fsdp=4, tp=2)
    assert parse_mesh("tp=-1") == MeshConfig(fsdp=1, tp=-1)  # the rest goes to tp, not also to fsdp
    assert parse_mesh("data=2,tp=-1") == MeshConfig(data=2, fsdp=1, tp=-1)


def test_every_engine_setting_has_a_flag():
    from framework import EngineConfig
    from service.__main__ import server_config

    config, cache = server_config(["--base-model", "m", "--max-batch-tokens", "8192", "--no-pack", "--decode-rows",
                                   "128", "--prefix-cache-mb", "0", "--remat", "dots", "--compilation-cache", "",
                                   "--min-decode-rows", "16"])
    engine = config.engine
    assert (engine.max_batch_tokens, engine.pack, engine.decode_rows, engine.prefix_cache_mb, engine.remat,
            engine.min_decode_rows) == (8192, False, 128, 0.0, "dots", 16)
    with pytest.raises(ValueError, match=r"min_prefill_tokens must be >= 0 \(0: by backend\), got -1"):
        EngineConfig(min_prefill_tokens=-1)
    assert cache == ""
    config, cache = server_config(["--base-model", "m"])
    assert config.engine == EngineConfig(dtype=config.engine.dtype) and cache.endswith("tinker-jax/xla")


def test_a_bad_engine_setting_is_refused_naming_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "service", "--base-model", str(tmp_path), "--decode-rows", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "decode_rows must be >= 1" in done.stderr, done.stderr


def test_the_compilation_cache_keeps_compiled_programs(tmp_path):
    """What `--compilation-cache` (and the launcher's `compilation_cache`) turn on: programs land on disk."""
    code = ("import sys; from framework.compilation_cache import enable_compilation_cache as enable; "
            "enable(sys.argv[1]); import jax, jax.numpy as jnp; "
            "jax.jit(lambda x: x * 3)(jnp.ones(5)).block_until_ready()")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "xla")], check=True, env=env, cwd=REPO)
    assert any((tmp_path / "xla").iterdir())
