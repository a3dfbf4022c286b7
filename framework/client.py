"""The in-process client API: `ServiceClient`, `TrainingClient`, `SamplingClient`, as in the tinker SDK.

```python
from framework import ServiceClient, types
service = ServiceClient()
trainer = service.create_lora_training_client(base_model="/ckpt/Qwen3-0.6B", rank=32)
fut = trainer.forward_backward(batch, "cross_entropy")        # a future, at once
trainer.optim_step(types.AdamParams(learning_rate=1e-4)).result()
sampler = trainer.save_weights_and_get_sampling_client()
```

One engine and one scheduler per base model are shared by every client of a `ServiceClient`, so
different adapters' requests are batched together. `TrainingClient` lives in
`framework.training_client`, `SamplingClient` in `framework.sampling_client`, `APIFuture` in
`framework.futures`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from framework import checkpoints, types
from framework.engine import EngineConfig
from framework.futures import IO_POOL, APIFuture
from framework.runtime import Runtime
from framework.sampling_client import SamplingClient
from framework.training_client import TrainingClient
from lora import import_peft, select_targets

DEFAULT_HOME = Path(os.environ.get("TINKER_JAX_HOME", "~/.cache/tinker-jax")).expanduser()

__all__ = ["APIFuture", "SamplingClient", "ServiceClient", "TrainingClient"]


class ServiceClient:
    """Entry point: creates training and sampling clients over in-process engines.

    `engine_config` sets the sizes of every engine (resident adapters, max rank, sampler slots, ...);
    `home` is where checkpoints are written (default `$TINKER_JAX_HOME` or `~/.cache/tinker-jax`).
    """

    def __init__(self, *, engine_config: EngineConfig | None = None, home: str | os.PathLike[str] | None = None):
        self._runtime = Runtime(engine_config or EngineConfig(), Path(home).expanduser() if home else DEFAULT_HOME)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Shut the engines down; requests still queued fail with `SchedulerClosed`."""
        self._runtime.shutdown()

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        models = [types.SupportedModel(model_name=engine.base_model, max_context_length=engine.max_seq_len,
                                       trainable=True, sampleable=True)
                  for engine, _ in self._runtime.engines()]
        return types.GetServerCapabilitiesResponse(supported_models=models)

    def engine_metrics(self) -> dict[str, dict]:
        """Each engine's `metrics()` and its scheduler's queue figures, by base model."""
        return {engine.base_model: {**engine.metrics(), "queue": scheduler.stats()}
                for engine, scheduler in self._runtime.engines()}

    def load_base_model(self, base_model: str) -> types.SupportedModel:
        """Load `base_model` now (weights, engine, scheduler) rather than on first use, and describe it.

        A server calls this at start-up for every model it serves, so the first user does not wait
        for the weights and a bad path fails before anyone connects.
        """
        engine, _ = self._runtime.get(base_model)
        return types.SupportedModel(model_name=engine.base_model, max_context_length=engine.max_seq_len,
                                    trainable=True, sampleable=True)

    def model_info(self, base_model: str) -> types.ModelData:
        """Architecture and tokenizer of a (loaded or loadable) base model, as `get_info` reports them."""
        engine, _ = self._runtime.get(base_model)
        return types.ModelData(arch=engine.model_config.model_type, model_name=base_model, tokenizer_id=base_model)

    def metrics(self) -> dict[str, dict[str, float]]:
        """Flat counters of every loaded base model, for monitoring: compilations per op
        (`compiles/<op>`), live adapters, published sampler snapshots, engine batches run and requests
        queued, plus the numeric leaves of `engine_metrics()` as `<section>/<name>`."""
        out: dict[str, dict[str, float]] = {}
        for engine, scheduler in self._runtime.engines():
            full = {**engine.metrics(), "queue": scheduler.stats()}
            row = {f"compiles/{op}": float(n) for op, n in full.pop("compiles").items()}
            for section, values in full.items():
                for name, value in values.items():
                    if isinstance(value, int | float):
                        row[f"{section}/{name}"] = float(value)
            row.update({"adapters": float(len(engine.adapters)), "snapshots": float(len(engine.snapshots) - 1),
                        "batches_run": float(scheduler.batches_run), "queued": float(scheduler.queued)})
            out[engine.base_model] = row
        return out

    def create_lora_training_client(
        self, base_model: str, rank: int = 32, seed: int | None = None, train_mlp: bool = True,
        train_attn: bool = True, train_unembed: bool = True, user_metadata: dict[str, str] | None = None,
    ) -> TrainingClient:
        lora_config = types.LoraConfig(rank=rank, seed=seed, train_mlp=train_mlp, train_attn=train_attn,
                                       train_unembed=train_unembed)
        engine, scheduler = self._runtime.get(base_model)
        if rank > engine.config.max_rank:
            raise ValueError(f"rank {rank} is above this engine's max_rank {engine.config.max_rank}")
        seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        targets = select_targets(train_attn=train_attn, train_mlp=train_mlp, train_unembed=train_unembed)
        run_id = f"run-{uuid.uuid4().hex[:12]}"
        scheduler.call(lambda: engine.create_adapter(rank=rank, seed=seed, targets=targets, adapter_id=run_id),
                       adapter_id=run_id).result()
        return TrainingClient(self, run_id, base_model, lora_config, user_metadata or {})

    def create_training_client_from_state(self, path: str, user_metadata: dict[str, str] | None = None
                                          ) -> TrainingClient:
        """A new training client with the weights of a `save_state` checkpoint (fresh optimizer)."""
        return self._from_state(path, with_optimizer=False, user_metadata=user_metadata)

    def create_training_client_from_state_with_optimizer(self, path: str, user_metadata: dict[str, str] | None = None
                                                         ) -> TrainingClient:
        """A new training client with the weights and optimizer state of a `save_state` checkpoint."""
        return self._from_state(path, with_optimizer=True, user_metadata=user_metadata)

    def _from_state(self, path: str, *, with_optimizer: bool, user_metadata: dict[str, str] | None) -> TrainingClient:
        meta = checkpoints.read_meta(path)
        client = self.create_lora_training_client(
            meta["base_model"], rank=meta["rank"], seed=meta["seed"], train_mlp="gate" in meta["targets"],
            train_attn="q" in meta["targets"], train_unembed="unembed" in meta["targets"], user_metadata=user_metadata)
        loader = client.load_state_with_optimizer if with_optimizer else client.load_state
        loader(path).result()
        return client

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None) -> SamplingClient:
        """Sample from saved sampler weights (`model_path`, a PEFT adapter directory) or a base model."""
        if model_path is None and base_model is None:
            raise ValueError("create_sampling_client needs model_path or base_model")
        if model_path is None:
            engine, _ = self._runtime.get(base_model)
            return SamplingClient(self, base_model, engine.acquire_snapshot("base").snapshot_id, version=None)
        meta = checkpoints.read_meta(model_path)
        base_model = base_model or meta["base_model"]
        engine, scheduler = self._runtime.get(base_model)
        directory = Path(model_path).absolute()
        # Keyed by the files' identity too: a directory written again under the same name is a new snapshot.
        stamp = max((f.stat().st_mtime_ns for f in directory.iterdir() if f.is_file()), default=0)
        snapshot_id = f"file:{directory}@{stamp}"
        version = meta.get("version", meta.get("step", 0))
        read = IO_POOL.submit(import_peft, model_path, config=engine.model_config, max_rank=engine.config.max_rank,
                              bank_targets=engine.config.targets)

        def install() -> str:
            adapter, _, scale, _ = read.result()
            return engine.add_snapshot(snapshot_id, adapter, scale, version).snapshot_id

        scheduler.call(install, ready=read).result()
        return SamplingClient(self, base_model, snapshot_id, version=version)
