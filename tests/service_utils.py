"""A real `python -m service` server on 127.0.0.1 for the service tests, and helpers to drive it.

The server is a subprocess with its own SQLite file and checkpoint directory under the test's tmp
dir; `ready()` waits for `/api/v1/healthz` (which answers only once the base models are loaded)
and fails fast, with the server's log, if the process dies. The SDK retries a dead port for
minutes, so no test talks to a server that is not known to be up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "launcher" / "assets" / "tiny-arith"
ENGINE_ARGS = ["--max-adapters", "20", "--max-rank", "8", "--sampler-slots", "8", "--max-seq-len", "128",
               "--dtype", "float32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sdk_env() -> dict[str, str]:
    """Environment for processes running the official SDK / cookbook offline."""
    return {**os.environ, "TINKER_TELEMETRY": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost", "JAX_PLATFORMS": "cpu"}


class Server:
    def __init__(self, root: Path, base_models: list[str], *extra: str, xla_cache: Path | None = None):
        self.root = root
        self.db_url = f"sqlite:///{root / 'state.db'}"
        self.checkpoint_dir = root / "checkpoints"
        self.base_models = base_models
        self.extra = list(extra)
        self.xla_cache = xla_cache
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = root / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        args = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port), "--db", self.db_url,
                "--checkpoint-dir", str(self.checkpoint_dir), *ENGINE_ARGS, *self.extra]
        for model in self.base_models:
            args += ["--base-model", model]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
        if self.xla_cache is not None:
            env["JAX_COMPILATION_CACHE_DIR"] = str(self.xla_cache)
            env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
            env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
        log = open(self.log_path, "a")  # noqa: SIM115 (kept open for the process's life)
        self.process = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self.ready()

    def ready(self, timeout: float = 300) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/api/v1/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"the server did not come up in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def key(self, name: str) -> str:
        """A new API key for `name`, made the way `python -m service keys create` makes it."""
        from service.store import Store

        store = Store(self.db_url)
        try:
            return store.create_key(name)
        finally:
            store.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=60)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def get(self, path: str, key: str | None = None, **kwargs) -> httpx.Response:
        headers = {"X-API-Key": key} if key else {}
        return httpx.get(self.url + path, headers=headers, timeout=60, **kwargs)

    def post(self, path: str, key: str | None = None, json=None, **kwargs) -> httpx.Response:
        headers = {"X-API-Key": key, **kwargs.pop("headers", {})} if key else kwargs.pop("headers", {})
        return httpx.post(self.url + path, headers=headers, json=json, timeout=60, **kwargs)


def share_compilation_cache(directory: Path | None):
    """Point this process's JAX at the server's persistent compilation cache: an in-process reference
    client compiles the same programs as the server, so it reuses them instead of compiling twice.
    Returns a function restoring the previous settings."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    if directory is not None:
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    def restore() -> None:
        for name, value in saved.items():
            jax.config.update(name, value)

    return restore
