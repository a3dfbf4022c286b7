"""`python -m service`: run the server, or manage API keys.

    python -m service --base-model /ckpt/Qwen3-0.6B --db sqlite:///state.db --checkpoint-dir ckpts
    python -m service --base-model Qwen/Qwen3-0.6B=/ckpt/Qwen3-0.6B ...   # serve a local dir under a hub name
    python -m service keys create --name alice --db sqlite:///state.db    # prints the key (last line)
    python -m service keys list --db sqlite:///state.db
    python -m service keys revoke --name alice --db sqlite:///state.db
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from service.config import ServerConfig

DEFAULT_DB = ServerConfig.db_url
DEFAULT_XLA_CACHE = "~/.cache/tinker-jax/xla"  # framework.compilation_cache.DEFAULT_DIR (importing it is not free)


def parse_mesh(text: str):  # -> framework.sharding.MeshConfig
    """`"fsdp=4,tp=2"` → `MeshConfig(fsdp=4, tp=2)` (axes not named keep their defaults)."""
    from framework.sharding import MESH_AXES, MeshConfig

    sizes: dict[str, int] = {}
    for part in filter(None, text.replace(" ", "").split(",")):
        name, _, value = part.partition("=")
        if name not in MESH_AXES or not value.lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"{part!r}: expected AXIS=N with AXIS one of {', '.join(MESH_AXES)}")
        sizes[name] = int(value)
    if "fsdp" not in sizes and -1 in sizes.values():
        sizes["fsdp"] = 1  # another axis takes the rest
    try:
        return MeshConfig(**sizes)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service", description="Serve the tinker API for local base models.",
                                epilog="Manage API keys with: python -m service keys {create,list,revoke} --help")
    p.add_argument("--base-model", action="append", required=True, metavar="[NAME=]PATH",
                   help="a local Hugging Face checkpoint to serve (repeatable); NAME=PATH serves it under NAME")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", default=DEFAULT_DB, help="SQLAlchemy URL of the state database (default: %(default)s)")
    p.add_argument("--checkpoint-dir", type=Path, default=ServerConfig.checkpoint_dir,
                   help="where checkpoints are written (default: %(default)s)")
    e = p.add_argument_group("engine")
    e.add_argument("--max-adapters", type=int, default=8, help="training adapters held on the device at once")
    e.add_argument("--max-rank", type=int, default=32, help="the largest LoRA rank clients may ask for")
    e.add_argument("--sampler-slots", type=int, default=8, help="sampler snapshots held on the device at once")
    e.add_argument("--dtype", default="auto", help="parameter dtype: auto (float32 on CPU, else bfloat16), "
                                                  "float32 or bfloat16")
    e.add_argument("--min-seq-bucket", type=int, default=32)
    e.add_argument("--max-seq-len", type=int, default=0, help="0: the model's max_position_embeddings")
    e.add_argument("--mesh", type=parse_mesh, default="fsdp=-1", metavar="AXIS=N[,AXIS=N]",
                   help="device mesh over data / fsdp / tp, one of them -1 for the rest (default: %(default)s, "
                        "every visible device along fsdp)")
    e.add_argument("--compilation-cache", default=DEFAULT_XLA_CACHE, metavar="DIR",
                   help="persist compiled programs here, so a restart reloads them ('' turns it off; "
                        "JAX_COMPILATION_CACHE_DIR wins; default: %(default)s)")
    _add_engine_settings(e)
    s = p.add_argument_group("service")
    s.add_argument("--poll-hold", type=float, default=ServerConfig.poll_hold_s,
                   help="seconds a retrieve_future poll is held before answering try_again")
    s.add_argument("--seq-gap-timeout", type=float, default=ServerConfig.seq_gap_timeout_s)
    s.add_argument("--max-body-mb", type=float, default=ServerConfig.max_body_bytes / (1 << 20))
    s.add_argument("--max-pending-samples", type=int, default=ServerConfig.max_pending_samples)
    s.add_argument("--session-timeout", type=float, default=ServerConfig.session_timeout_s,
                   help="seconds without a heartbeat after which a session is finished and its adapters freed")
    s.add_argument("--maintenance-every", type=float, default=ServerConfig.maintenance_every_s,
                   help="seconds between housekeeping passes (expiries, purges)")
    s.add_argument("--snapshots-per-model", type=int, default=ServerConfig.snapshots_per_model,
                   help="in-memory samplers kept per model; older ones are freed (default: %(default)s)")
    s.add_argument("--compress-fwdbwd", action="store_true", help="ask the SDK to zstd forward/backward bodies")
    s.add_argument("--sample-use-retrieve-futures", action="store_true",
                   help="ask the SDK to poll samples through /retrieve_futures (experimental: with it on, the "
                        "SDK's ServiceClient.close() hung once in ~4 runs of our 16-client test)")
    s.add_argument("--log-level", default="INFO")
    s.add_argument("--log-format", choices=["json", "text"], default="json")
    return p


_NAMED_ENGINE_SETTINGS = ("max_adapters", "max_rank", "sampler_slots", "dtype", "min_seq_bucket", "max_seq_len",
                          "mesh")
_SCALARS = {"int": int, "float": float, "str": str}


def _add_engine_settings(group: argparse._ArgumentGroup) -> None:
    """A flag for every other scalar `EngineConfig` field (`--max-batch-tokens`, `--no-pack`, ...)."""
    from framework.engine.config import EngineConfig

    for field in dataclasses.fields(EngineConfig):
        if field.name in _NAMED_ENGINE_SETTINGS:
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                               help=f"EngineConfig.{field.name} (default: %(default)s)")
        elif field.type in _SCALARS:
            group.add_argument(flag, type=_SCALARS[field.type], default=field.default,
                               help=f"EngineConfig.{field.name} (default: %(default)s)")


def server_config(argv: list[str]) -> tuple[ServerConfig, str]:
    """The server's settings from the command line, and the compilation cache directory ('' for none)."""
    args = _serve_parser().parse_args(argv)
    from framework import EngineConfig

    dtype = args.dtype
    if dtype == "auto":
        import jax

        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    try:
        engine = EngineConfig(**{**settings, "dtype": dtype})
    except ValueError as error:
        _serve_parser().error(str(error))
    config = ServerConfig(base_models=args.base_model, db_url=args.db, checkpoint_dir=args.checkpoint_dir,
                          host=args.host, port=args.port, engine=engine, poll_hold_s=args.poll_hold,
                          seq_gap_timeout_s=args.seq_gap_timeout, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                          max_pending_samples=args.max_pending_samples, compress_fwdbwd=args.compress_fwdbwd,
                          session_timeout_s=args.session_timeout, maintenance_every_s=args.maintenance_every,
                          snapshots_per_model=args.snapshots_per_model,
                          sample_use_retrieve_futures=args.sample_use_retrieve_futures,
                          log_level=args.log_level, log_format=args.log_format)
    return config, args.compilation_cache


def serve(argv: list[str]) -> None:
    config, compilation_cache = server_config(argv)
    import uvicorn

    from framework.compilation_cache import enable_compilation_cache
    from service.app import create_app
    from service.middleware import setup_logging

    setup_logging(config.log_level, config.log_format)
    enable_compilation_cache(compilation_cache)
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_config=None, access_log=False)


def keys(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m service keys", description="Manage API keys (stored hashed).")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("create", "create a key; the key is printed as the last line (shown once)"),
                            ("list", "list key names"), ("revoke", "revoke every key of a name")):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--db", default=DEFAULT_DB)
        if name != "list":
            c.add_argument("--name", required=True, help="the owner: what a key's requests are recorded under")
    args = p.parse_args(argv)
    from service.store import Store

    store = Store(args.db)
    try:
        if args.command == "create":
            key = store.create_key(args.name)
            print(f"API key for {args.name!r} (shown once; the server stores only its hash):", file=sys.stderr)
            print(key)
        elif args.command == "list":
            for row in store.list_keys():
                state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
                print(f"{row.name}\t{row.created_at:%Y-%m-%d %H:%M}\t{state}")
        else:
            print(f"revoked {store.revoke_keys(args.name)} key(s) of {args.name!r}")
    finally:
        store.close()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "keys":
        keys(argv[1:])
    else:
        serve(argv)


if __name__ == "__main__":
    main()
