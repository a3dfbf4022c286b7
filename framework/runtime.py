"""The in-process runtime behind a `ServiceClient`: one engine and one scheduler per base model,
created on first use, and each model's tokenizer."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from framework.engine import Engine, EngineConfig
from framework.scheduler import Scheduler
from models import load_tokenizer, read_config


class _SamplingWork:
    """The engine's decode loop as the scheduler's background work."""

    def __init__(self, engine: Engine):
        self._engine = engine

    def has_work(self) -> bool:
        return self._engine.decoder.has_work()

    def step(self) -> None:
        self._engine.step_sampling()

    def fail_all(self, error: BaseException) -> None:
        self._engine.decoder.fail_all(error)


def model_key(base_model: str) -> str:
    """The canonical name of a base model: its absolute directory."""
    return str(Path(base_model).expanduser().absolute())


class Runtime:
    """One engine + scheduler per base model, created on first use."""

    def __init__(self, engine_config: EngineConfig, home: Path):
        self.engine_config = engine_config
        self.home = home
        self._lock = threading.Lock()
        self._engines: dict[str, tuple[Engine, Scheduler]] = {}
        self._tokenizers: dict[str, Any] = {}

    def get(self, base_model: str) -> tuple[Engine, Scheduler]:
        key = model_key(base_model)
        with self._lock:
            if key not in self._engines:
                read_config(key)  # a clear CheckpointError for an unknown or broken path, before any work
                engine = Engine(key, self.engine_config)
                scheduler = Scheduler(name=Path(key).name, background=_SamplingWork(engine),
                                      max_batch_tokens=self.engine_config.max_batch_tokens,
                                      max_batch_adapters=self.engine_config.max_adapters,
                                      resident=engine.adapters.is_resident,
                                      batch_window_s=self.engine_config.batch_window_ms / 1e3)
                self._engines[key] = (engine, scheduler)
            return self._engines[key]

    def engines(self) -> list[tuple[Engine, Scheduler]]:
        with self._lock:
            return list(self._engines.values())

    def tokenizer(self, base_model: str) -> Any:
        key = model_key(base_model)
        with self._lock:
            if key not in self._tokenizers:
                self._tokenizers[key] = load_tokenizer(key)
            return self._tokenizers[key]

    def shutdown(self) -> None:
        for _, scheduler in self.engines():
            scheduler.shutdown()
