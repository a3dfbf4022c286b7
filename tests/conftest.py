"""Shared fixtures: tiny random Hugging Face checkpoints, built once and cached under the pytest cache.

Everything runs on CPU, offline, in fp32 with jax x64 off.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import hf_checkpoints
import jax
import pytest
from hf_checkpoints import SPECS, SPECS_BY_NAME, build_checkpoint

jax.config.update("jax_enable_x64", False)

# Written after everything else, so a directory without it (an interrupted build) is rebuilt. It
# holds a key of the builder's source and the library versions, so a change to either rebuilds too.
MARKER = ".tiny_checkpoint_complete"


def _cache_key() -> str:
    import tokenizers
    import torch
    import transformers

    source = Path(hf_checkpoints.__file__).read_bytes()
    versions = f"{transformers.__version__} {torch.__version__} {tokenizers.__version__}".encode()
    return hashlib.sha256(source + versions).hexdigest()


def _is_complete(directory: Path, key: str) -> bool:
    marker = directory / MARKER
    return marker.is_file() and marker.read_text() == key


@pytest.fixture(scope="session", autouse=True)
def _x64_stays_off():
    assert not jax.config.jax_enable_x64, "tests must run with jax x64 off"
    yield
    assert not jax.config.jax_enable_x64, "a test turned jax x64 on"


@pytest.fixture(scope="session")
def tiny_checkpoints(request, tmp_path_factory) -> dict[str, Path]:
    """`{spec name: checkpoint directory}` for every `hf_checkpoints.SPECS` entry. Do not modify them."""
    cache = request.config.cache
    root = Path(cache.mkdir("tiny_checkpoints")) if cache is not None else tmp_path_factory.mktemp("tiny_checkpoints")
    key = _cache_key()
    out = {}
    for spec in SPECS:
        directory = root / spec.name
        if not _is_complete(directory, key):
            staging = root / f"{spec.name}.building-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            build_checkpoint(spec, staging)
            (staging / MARKER).write_text(key)
            shutil.rmtree(directory, ignore_errors=True)
            staging.rename(directory)
        out[spec.name] = directory
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoints) -> Callable[[str], Path]:
    """`tiny_checkpoint(name) -> Path` of the cached checkpoint for `SPECS_BY_NAME[name]`."""

    def get(name: str) -> Path:
        if name not in SPECS_BY_NAME:
            raise KeyError(f"no TinySpec named {name!r}; known: {sorted(SPECS_BY_NAME)}")
        return tiny_checkpoints[name]

    return get


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path) -> Callable[[str], Path]:
    """`checkpoint_copy(name) -> Path`: a private copy of a cached checkpoint, free to corrupt."""

    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_checkpoint(name), tmp_path / name))

    return copy


@pytest.fixture(scope="session")
def service_server(request, tmp_path_factory):
    """One real `python -m service` server (embedded tiny model, 20 adapter slots) shared by the service
    tests; each test makes its own API keys, so tests are isolated like separate users."""
    from service_utils import EMBEDDED, Server

    cache = getattr(request.config, "cache", None)
    xla = Path(cache.mkdir("service_xla_cache")) if cache is not None else None
    # The SDK's default sampling path (one retrieve_future long-poll per sample); /retrieve_futures is
    # tested with raw requests (with the SDK polling through it, its close() hung once in ~4 runs of the
    # 16-user test, so it stays off by default).
    server = Server(tmp_path_factory.mktemp("service"), [str(EMBEDDED)], "--maintenance-every", "1",
                    xla_cache=xla).start()
    yield server
    server.stop()
