"""The server's settings: what `python -m service` parses, with the defaults a first user needs.

Importing this module must stay cheap (no JAX): `python -m service keys` reads its defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the `keys` command must not pay for importing JAX
    from framework import EngineConfig

WIRE_SDK = "0.38"  # the tinker SDK minor version whose wire this server speaks


@dataclasses.dataclass
class ServerConfig:
    base_models: list[str]  # PATH or NAME=PATH, one per served model
    db_url: str = "sqlite:///tinker-jax-state.db"
    checkpoint_dir: Path = Path("tinker-jax-checkpoints")
    host: str = "127.0.0.1"
    port: int = 8000
    engine: EngineConfig | None = None  # None: the framework's defaults
    poll_hold_s: float = 30.0  # how long a retrieve_future poll is held before answering try_again (SDK timeout: 45 s)
    seq_gap_timeout_s: float = 120.0  # how long requests wait for a missing lower seq_id
    max_body_bytes: int = 64 << 20
    max_pending_samples: int = 4096  # beyond this, asample answers 429 and the SDK backs off
    future_keep_s: float = 300.0  # finished futures kept in memory for their retrieval
    future_ttl_s: float = 7 * 24 * 3600.0  # finished futures kept in the database
    maintenance_every_s: float = 10.0
    session_timeout_s: float = 900.0  # a session without heartbeats this long is finished and its adapters freed
    snapshots_per_model: int = 8  # in-memory samplers kept per model (`save_weights_and_get_sampling_client`)
    compress_fwdbwd: bool = False  # ask the SDK to zstd its forward/backward bodies
    sample_use_retrieve_futures: bool = False  # ask the SDK to poll samples through /retrieve_futures
    log_level: str = "INFO"
    log_format: str = "json"
