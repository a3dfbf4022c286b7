"""The in-process client API: `ServiceClient`, `TrainingClient`, `SamplingClient`, as in the tinker SDK.

```python
from framework import ServiceClient, types
service = ServiceClient()
trainer = service.create_lora_training_client(base_model="/ckpt/Qwen3-0.6B", rank=32)
fut = trainer.forward_backward(batch, "cross_entropy")        # a future, at once
trainer.optim_step(types.AdamParams(learning_rate=1e-4)).result()
sampler = trainer.save_weights_and_get_sampling_client()
```

Every primitive validates its input in the caller's thread (so a bad request raises at once and
never reaches the engine), then queues work on the base model's scheduler and returns an
`APIFuture`. `*_async` variants are coroutines returning the same futures, and the futures are
awaitable. One engine and one scheduler per base model are shared by every client of a
`ServiceClient`, so different adapters' requests are batched together.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from framework import checkpoints, types
from framework.engine import Engine, EngineConfig, ForwardResult, SampleJob, SampleResult, TopK
from framework.optim import AdamHyperparams
from framework.scheduler import Scheduler
from framework.validation import check_tokens, datums_to_arrays
from lora import export_peft, import_peft, select_targets
from models import load_tokenizer, read_config

T = TypeVar("T")
U = TypeVar("U")

_IO_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="tinker-jax-io")
DEFAULT_HOME = Path(os.environ.get("TINKER_JAX_HOME", "~/.cache/tinker-jax")).expanduser()
MAX_TOPK_LOGPROBS = 64  # top-k logprobs per position: [rows, positions, k] floats come back to the host


class APIFuture(Generic[T]):
    """The result of a queued request: `.result(timeout)`, `await future`, or `await .result_async()`."""

    def __init__(self, future: concurrent.futures.Future, convert: Callable[[Any], T] | None = None):
        self._future = future
        self._convert = convert
        self._lock = threading.Lock()
        self._value: Any = None
        self._converted = False

    def result(self, timeout: float | None = None) -> T:
        raw = self._future.result(timeout)
        with self._lock:
            if not self._converted:
                self._value = self._convert(raw) if self._convert else raw
                self._converted = True
        return self._value

    async def result_async(self, timeout: float | None = None) -> T:
        await asyncio.wait_for(asyncio.wrap_future(self._future), timeout)
        return self.result()

    def __await__(self):
        return self.result_async().__await__()

    def done(self) -> bool:
        return self._future.done()

    @property
    def future(self) -> concurrent.futures.Future:
        return self._future

    def then(self, fn: Callable[[T], U]) -> APIFuture[U]:
        """A future of `fn(result)`."""
        chained: concurrent.futures.Future = concurrent.futures.Future()

        def on_done(_: concurrent.futures.Future) -> None:
            try:
                chained.set_result(fn(self.result()))
            except Exception as e:
                chained.set_exception(e)

        self._future.add_done_callback(on_done)
        return APIFuture(chained)


def _completed(value: T) -> APIFuture[T]:
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_result(value)
    return APIFuture(f)


class _Runtime:
    """One engine + scheduler per base model, created on first use."""

    def __init__(self, engine_config: EngineConfig, home: Path):
        self.engine_config = engine_config
        self.home = home
        self._lock = threading.Lock()
        self._engines: dict[str, tuple[Engine, Scheduler]] = {}
        self._tokenizers: dict[str, Any] = {}

    def get(self, base_model: str) -> tuple[Engine, Scheduler]:
        key = str(Path(base_model).expanduser().absolute())
        with self._lock:
            if key not in self._engines:
                read_config(key)  # a clear CheckpointError for an unknown or broken path, before any work
                engine = Engine(key, self.engine_config)
                self._engines[key] = (engine, Scheduler(name=Path(key).name))
            return self._engines[key]

    def tokenizer(self, base_model: str) -> Any:
        key = str(Path(base_model).expanduser().absolute())
        with self._lock:
            if key not in self._tokenizers:
                self._tokenizers[key] = load_tokenizer(key)
            return self._tokenizers[key]

    def shutdown(self) -> None:
        with self._lock:
            for _, scheduler in self._engines.values():
                scheduler.shutdown()


class ServiceClient:
    """Entry point: creates training and sampling clients over in-process engines.

    `engine_config` sets the bank sizes (max adapters, max rank, sampler slots) of every engine;
    `home` is where checkpoints are written (default `$TINKER_JAX_HOME` or `~/.cache/tinker-jax`).
    """

    def __init__(self, *, engine_config: EngineConfig | None = None, home: str | os.PathLike[str] | None = None):
        self._runtime = _Runtime(engine_config or EngineConfig(), Path(home).expanduser() if home else DEFAULT_HOME)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._runtime.shutdown()

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        models = [types.SupportedModel(model_name=engine.base_model, max_context_length=engine.max_seq_len,
                                       trainable=True, sampleable=True)
                  for engine, _ in self._runtime._engines.values()]
        return types.GetServerCapabilitiesResponse(supported_models=models)

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
        """Counters of every loaded base model, for monitoring: compilations per op (`compiles/<op>`),
        live adapters, published sampler snapshots, engine batches run and requests queued."""
        out: dict[str, dict[str, float]] = {}
        for key, (engine, scheduler) in list(self._runtime._engines.items()):
            row = {f"compiles/{op}": float(n) for op, n in engine.compile_counts.items()}
            row.update({"adapters": float(len(engine.adapters)), "snapshots": float(len(engine.snapshots) - 1),
                        "batches_run": float(scheduler.batches_run), "queued": float(scheduler.queued)})
            out[key] = row
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
            return SamplingClient(self, base_model, "base", version=None)
        meta = checkpoints.read_meta(model_path)
        base_model = base_model or meta["base_model"]
        engine, scheduler = self._runtime.get(base_model)
        snapshot_id = f"file:{Path(model_path).absolute()}"

        def load() -> None:
            adapter, _, scale, _ = import_peft(model_path, config=engine.model_config, max_rank=engine.config.max_rank,
                                               bank_targets=engine.config.targets)
            engine.add_snapshot(snapshot_id, adapter, scale, meta.get("step", 0))

        scheduler.call(load).result()
        return SamplingClient(self, base_model, snapshot_id, version=meta.get("step", 0))


class TrainingClient:
    """Trains one LoRA adapter. Every method returns a future at once (see `APIFuture`)."""

    def __init__(self, service: ServiceClient, run_id: str, base_model: str, lora_config: types.LoraConfig,
                 user_metadata: dict[str, str]):
        self.service = service
        self.model_id = run_id
        self.base_model = base_model
        self.lora_config = lora_config
        self.user_metadata = user_metadata
        self._engine, self._scheduler = service._runtime.get(base_model)
        self._released = False

    def release(self) -> None:
        """Free this client's adapter on the engine (its slot, gradients and optimizer state) once the
        requests already queued for it have run. Saved checkpoints and sampling clients made from its
        snapshots keep working; this client refuses further requests. Idempotent."""
        if self._released:
            return
        self._released = True
        engine, model_id = self._engine, self.model_id
        self._scheduler.call(lambda: engine.remove_adapter(model_id), adapter_id=model_id).result()

    def _check_live(self) -> None:
        if self._released:
            raise ValueError(f"training client {self.model_id} was released; create a new one")

    def check_forward_inputs(self, data: Sequence[types.Datum], loss_fn: types.LossFnType,
                             loss_fn_config: dict[str, float] | None = None) -> None:
        """Raise the `ValueError` that `forward`/`forward_backward` would raise for this input, without
        queueing anything: lets a caller that delays submission (a server ordering requests by
        sequence number) refuse bad input when it arrives."""
        self._check_live()
        datums_to_arrays(data, loss_fn, loss_fn_config, vocab_size=self._engine.model_config.vocab_size,
                         max_seq_len=self._engine.max_seq_len)

    # --------------------------------------------------------------------------- forward/backward
    def forward(self, data: Sequence[types.Datum], loss_fn: types.LossFnType,
                loss_fn_config: dict[str, float] | None = None) -> APIFuture[types.ForwardBackwardOutput]:
        return self._forward(data, loss_fn, loss_fn_config, backward=False)

    def forward_backward(self, data: Sequence[types.Datum], loss_fn: types.LossFnType,
                         loss_fn_config: dict[str, float] | None = None) -> APIFuture[types.ForwardBackwardOutput]:
        return self._forward(data, loss_fn, loss_fn_config, backward=True)

    def _forward(self, data, loss_fn, loss_fn_config, *, backward: bool) -> APIFuture[types.ForwardBackwardOutput]:
        self._check_live()
        engine = self._engine
        arrays, config = datums_to_arrays(data, loss_fn, loss_fn_config, vocab_size=engine.model_config.vocab_size,
                                          max_seq_len=engine.max_seq_len)
        future = self._scheduler.submit(
            lambda requests: engine.forward(requests, backward=backward), (self.model_id, arrays, loss_fn, config),
            adapter_id=self.model_id, batch_key=("forward_backward" if backward else "forward", loss_fn),
            rows=len(arrays))
        return APIFuture(future, _to_output)

    def forward_backward_custom(
        self, data: Sequence[types.Datum],
        loss_fn: Callable[[list[types.Datum], list[jax.Array]], tuple[jax.Array, dict[str, Any]]],
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Differentiate a user loss of the per-token logprobs of `target_tokens`.

        `loss_fn(data, logprobs)` gets one `[n]` logprob array per datum and returns `(loss, metrics)`.
        If it is JAX-traceable and the same loss structure and sequence lengths recur, it runs inside a
        compiled training step of its own (one forward, one backward; the hosted API needs an extra
        forward pass for this). A first-seen combination, or an untraceable loss, falls back to
        forward → `jax.vjp` of `loss_fn` on the logprobs → a backward pass weighted by the cotangents
        (the linear surrogate `-Σ c·logp` has the same gradient as the user's loss).
        """
        data = list(data)
        arrays, _ = datums_to_arrays(data, "cross_entropy", None, vocab_size=self._engine.model_config.vocab_size,
                                     max_seq_len=self._engine.max_seq_len, required_keys=("target_tokens",))
        shapes = [jax.ShapeDtypeStruct((len(a.tokens),), jnp.float32) for a in arrays]
        try:
            traced, out_shape = jax.make_jaxpr(lambda lps: loss_fn(data, lps), return_shape=True)(shapes)
        except (jax.errors.JAXTypeError, jax.errors.ConcretizationTypeError, TypeError):
            return self._forward_backward_custom_vjp(data, loss_fn)
        if not self._engine.wants_custom_step(traced, [len(a.tokens) for a in arrays]):
            return self._forward_backward_custom_vjp(data, loss_fn)
        out_tree = jax.tree.structure(out_shape)
        engine = self._engine

        def run(payloads: Sequence[Any]) -> list[types.ForwardBackwardOutput]:
            logprobs, value, metrics = engine.forward_backward_custom(self.model_id, arrays, traced, out_tree)
            return [types.ForwardBackwardOutput(
                loss_fn_output_type="ArrayRecord",
                loss_fn_outputs=[{"logprobs": types.TensorData.from_numpy(lp)} for lp in logprobs],
                metrics={**metrics, "loss:sum": value})]

        return APIFuture(self._scheduler.submit(run, None, adapter_id=self.model_id, rows=len(arrays)))

    def _forward_backward_custom_vjp(self, data: list[types.Datum], loss_fn: Callable
                                     ) -> APIFuture[types.ForwardBackwardOutput]:
        probe = [types.Datum(model_input=d.model_input, loss_fn_inputs={
            "target_tokens": d.loss_fn_inputs["target_tokens"], "weights": np.zeros(d.model_input.length, np.float32)})
            for d in data]
        forward = self.forward(probe, "cross_entropy").result()
        logprobs = [o["logprobs"].to_numpy().astype(np.float32) for o in forward.loss_fn_outputs]
        loss, metrics, cotangents = _loss_cotangents(loss_fn, data, logprobs)
        weighted = [types.Datum(model_input=d.model_input,
                                loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"], "weights": -c})
                    for d, c in zip(data, cotangents, strict=True)]

        def finish(out: types.ForwardBackwardOutput) -> types.ForwardBackwardOutput:
            return out.model_copy(update={"metrics": {**out.metrics, **metrics, "loss:sum": loss}})

        return self.forward_backward(weighted, "cross_entropy").then(finish)

    # ---------------------------------------------------------------------------------- optimizer
    def optim_step(self, adam_params: types.AdamParams | None = None) -> APIFuture[types.OptimStepResponse]:
        self._check_live()
        adam = adam_params or types.AdamParams()
        if not isinstance(adam, types.AdamParams):
            raise ValueError(f"adam_params must be AdamParams, got {type(adam).__name__}")
        hp = AdamHyperparams.make(adam.learning_rate, adam.beta1, adam.beta2, adam.eps, adam.weight_decay,
                                  adam.grad_clip_norm)
        engine = self._engine
        future = self._scheduler.call(lambda: engine.optim_step(self.model_id, hp), adapter_id=self.model_id)
        return APIFuture(future, lambda m: types.OptimStepResponse(metrics={f"{k}:mean": v for k, v in m.items()}))

    # ------------------------------------------------------------------------------- checkpoints
    def _path(self, kind: str, name: str) -> Path:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"checkpoint name {name!r} must be a non-empty name without '/'")
        return self.service._runtime.home / self.model_id / kind / name

    def _meta(self) -> dict[str, Any]:
        adapter = self._engine.adapters[self.model_id]
        return {"base_model": str(Path(self.base_model).expanduser().absolute()), "rank": adapter.rank,
                "alpha": adapter.alpha, "targets": list(adapter.targets), "seed": adapter.seed,
                "max_rank": self._engine.config.max_rank, "bank_targets": list(self._engine.config.targets),
                "model_id": self.model_id}

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                   user_metadata: dict[str, str] | None = None) -> APIFuture[types.SaveWeightsResponse]:
        """Save adapter weights + optimizer state + step (Orbax) under the client's home."""
        self._check_live()
        path = self._path("weights", name)
        if path.exists() and not overwrite:
            raise FileExistsError(f"checkpoint {name!r} already exists at {path}; pass overwrite=True")
        engine = self._engine

        def snapshot() -> dict[str, Any]:  # on the worker: only the device-to-host copy
            adapter = engine.adapters[self.model_id]
            return {"weights": jax.device_get(engine.adapter_weights(self.model_id)),
                    "opt_state": jax.device_get(adapter.opt_state), "step": adapter.step, "meta": self._meta()}

        def write(state: dict[str, Any]) -> types.SaveWeightsResponse:  # off the worker
            checkpoints.save_training_state(path, **state)
            return types.SaveWeightsResponse(path=str(path))

        return APIFuture(self._scheduler.call(snapshot, adapter_id=self.model_id)).then(write)

    def load_state(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        """Load weights from a `save_state` checkpoint; the optimizer state starts fresh."""
        return self._load(path, with_optimizer=False)

    def load_state_with_optimizer(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        """Load weights and optimizer state (and step) from a `save_state` checkpoint."""
        return self._load(path, with_optimizer=True)

    def _load(self, path: str, *, with_optimizer: bool) -> APIFuture[types.LoadWeightsResponse]:
        self._check_live()
        meta = checkpoints.read_meta(path)
        engine = self._engine
        for key, ours in (("max_rank", engine.config.max_rank), ("bank_targets", list(engine.config.targets))):
            if meta[key] != ours:
                raise ValueError(f"checkpoint {path} has {key}={meta[key]!r}; this engine has {ours!r}")
        adapter = engine.adapters[self.model_id]
        if (meta["rank"], meta["targets"]) != (adapter.rank, list(adapter.targets)):
            raise ValueError(f"checkpoint {path} is rank {meta['rank']} over {meta['targets']}; this client is "
                             f"rank {adapter.rank} over {list(adapter.targets)}")

        def load() -> types.LoadWeightsResponse:
            adapter = engine.adapters[self.model_id]
            weights, opt_state, step = checkpoints.load_training_state(
                path, weights_like=engine.adapter_weights(self.model_id), opt_state_like=adapter.opt_state)
            engine.set_adapter_state(self.model_id, weights, opt_state if with_optimizer else None,
                                     step if with_optimizer else adapter.step)
            return types.LoadWeightsResponse(path=str(path), model_id=self.model_id)

        return APIFuture(self._scheduler.call(load, adapter_id=self.model_id))

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None,
                                 user_metadata: dict[str, str] | None = None
                                 ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Write the adapter as a PEFT directory (loadable by `peft`, vLLM, `create_sampling_client`)."""
        self._check_live()
        path = self._path("sampler_weights", name)
        engine = self._engine

        def snapshot() -> tuple[Any, int]:
            return jax.device_get(engine.adapter_weights(self.model_id)), engine.adapters[self.model_id].step

        def write(state: tuple[Any, int]) -> types.SaveWeightsForSamplerResponse:
            weights, step = state
            adapter = engine.adapters[self.model_id]
            export_peft(weights, config=engine.model_config, rank=adapter.rank, alpha=adapter.alpha,
                        targets=adapter.targets, out_dir=path, base_model=self.base_model)
            (path / checkpoints.ADAPTER_META).write_text(json.dumps({**self._meta(), "step": step}))
            return types.SaveWeightsForSamplerResponse(path=str(path))

        return APIFuture(self._scheduler.call(snapshot, adapter_id=self.model_id)).then(write)

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SamplingClient:
        """Publish the current weights as an in-memory snapshot and sample from it (no disk round trip)."""
        self._check_live()
        if name is not None:
            self.save_weights_for_sampler(name).result()
        engine = self._engine
        snapshot = self._scheduler.call(lambda: engine.publish(self.model_id), adapter_id=self.model_id).result()
        return SamplingClient(self.service, self.base_model, snapshot.snapshot_id, version=snapshot.version)

    def create_sampling_client(self, model_path: str) -> SamplingClient:
        return self.service.create_sampling_client(model_path=model_path, base_model=self.base_model)

    # ------------------------------------------------------------------------------------- info
    def get_info(self) -> types.GetInfoResponse:
        return types.GetInfoResponse(
            model_id=self.model_id, is_lora=True, lora_rank=self.lora_config.rank,
            model_data=types.ModelData(arch=self._engine.model_config.model_type, model_name=self.base_model,
                                       tokenizer_id=self.base_model))

    def get_tokenizer(self) -> Any:
        return self.service._runtime.tokenizer(self.base_model)

    # ------------------------------------------------------------------------------ async twins
    async def forward_async(self, *args: Any, **kwargs: Any) -> APIFuture[types.ForwardBackwardOutput]:
        return self.forward(*args, **kwargs)

    async def forward_backward_async(self, *args: Any, **kwargs: Any) -> APIFuture[types.ForwardBackwardOutput]:
        return self.forward_backward(*args, **kwargs)

    async def forward_backward_custom_async(self, *args: Any, **kwargs: Any
                                            ) -> APIFuture[types.ForwardBackwardOutput]:
        return await asyncio.to_thread(self.forward_backward_custom, *args, **kwargs)

    async def optim_step_async(self, *args: Any, **kwargs: Any) -> APIFuture[types.OptimStepResponse]:
        return self.optim_step(*args, **kwargs)

    async def save_state_async(self, *args: Any, **kwargs: Any) -> APIFuture[types.SaveWeightsResponse]:
        return self.save_state(*args, **kwargs)

    async def load_state_async(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        return self.load_state(path)

    async def load_state_with_optimizer_async(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        return self.load_state_with_optimizer(path)

    async def save_weights_for_sampler_async(self, *args: Any, **kwargs: Any
                                             ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        return self.save_weights_for_sampler(*args, **kwargs)

    async def save_weights_and_get_sampling_client_async(self, name: str | None = None) -> SamplingClient:
        return await asyncio.to_thread(self.save_weights_and_get_sampling_client, name)

    async def get_info_async(self) -> types.GetInfoResponse:
        return self.get_info()


class SamplingClient:
    """Samples from one immutable snapshot (an adapter version, saved weights, or the base model)."""

    def __init__(self, service: ServiceClient, base_model: str, snapshot_id: str, *, version: int | None):
        self.service = service
        self.base_model = base_model
        self.snapshot_id = snapshot_id
        self.version = version
        self._engine, self._scheduler = service._runtime.get(base_model)

    def sample(self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, topk_sample_logprobs: int = 0
               ) -> APIFuture[types.SampleResponse]:
        """`num_samples` continuations of `prompt`, each with its tokens' logprobs; with
        `topk_sample_logprobs=k` also the k most likely tokens at each sampled position, with
        `include_prompt_logprobs` / `topk_prompt_logprobs=k` the same for the prompt's tokens."""
        job = self._job(prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs,
                        topk_sample_logprobs)
        future = self._scheduler.submit(self._engine.sample, job, batch_key=("sample",), rows=num_samples)
        return APIFuture(future, _to_sample_response)

    def _job(self, prompt, num_samples, params, include_prompt_logprobs, topk_prompt_logprobs, topk_sample_logprobs
             ) -> SampleJob:
        engine = self._engine
        if not isinstance(prompt, types.ModelInput):
            raise ValueError(f"prompt must be a ModelInput, got {type(prompt).__name__}")
        if not isinstance(params, types.SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        for name, k in (("topk_prompt_logprobs", topk_prompt_logprobs), ("topk_sample_logprobs", topk_sample_logprobs)):
            if not isinstance(k, int | np.integer) or isinstance(k, bool) or not 0 <= k <= MAX_TOPK_LOGPROBS:
                raise ValueError(f"{name} must be an integer in [0, {MAX_TOPK_LOGPROBS}], got {k!r}")
        tokens = np.asarray(prompt.to_ints(), np.int64)
        check_tokens("prompt", tokens, engine.model_config.vocab_size)
        room = engine.max_seq_len - len(tokens)
        max_tokens = params.max_tokens if params.max_tokens is not None else min(room, 512)
        if max_tokens > room:
            raise ValueError(f"sampling_params.max_tokens={max_tokens}: the prompt has {len(tokens)} tokens and the "
                             f"context is {engine.max_seq_len}, so at most {room} can be sampled")
        stop = params.stop
        stop_strings = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]
        stop_tokens = [s for s in stop or [] if isinstance(s, int)] if not isinstance(stop, str) else []
        if stop is None:
            stop_tokens = list(engine.model_config.eos_token_ids)
        for t in stop_tokens:
            if t >= engine.model_config.vocab_size:
                raise ValueError(f"sampling_params.stop token {t} is outside the vocabulary")
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        return SampleJob(snapshot_id=self.snapshot_id, prompt=tokens.astype(np.int32), num_samples=num_samples,
                         max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
                         top_k=params.top_k, seed=seed, stop_tokens=tuple(stop_tokens),
                         stop_strings=tuple(stop_strings), prompt_logprobs=include_prompt_logprobs,
                         topk_prompt=min(topk_prompt_logprobs, engine.model_config.vocab_size),
                         topk_sample=min(topk_sample_logprobs, engine.model_config.vocab_size),
                         decode=self._decoder() if stop_strings else None)

    def _decoder(self) -> Callable[[list[int]], str]:
        tokenizer = self.service._runtime.tokenizer(self.base_model)
        return lambda ids: tokenizer.decode(ids)

    def compute_logprobs(self, prompt: types.ModelInput) -> APIFuture[list[float | None]]:
        tokens = np.asarray(prompt.to_ints(), np.int64)
        check_tokens("prompt", tokens, self._engine.model_config.vocab_size)
        if len(tokens) > self._engine.max_seq_len:
            raise ValueError(f"prompt has {len(tokens)} tokens; the maximum is {self._engine.max_seq_len}")
        engine = self._engine
        future = self._scheduler.submit(lambda reqs: engine.snapshot_logprobs(reqs),
                                        (self.snapshot_id, tokens.astype(np.int32)), batch_key=("logprobs",))
        return APIFuture(future, lambda lp: [None if np.isnan(x) else float(x) for x in lp])

    def get_tokenizer(self) -> Any:
        return self.service._runtime.tokenizer(self.base_model)

    def get_base_model(self) -> str:
        return self.base_model

    async def sample_async(self, *args: Any, **kwargs: Any) -> types.SampleResponse:
        return await self.sample(*args, **kwargs)

    async def compute_logprobs_async(self, prompt: types.ModelInput) -> list[float | None]:
        return await self.compute_logprobs(prompt)


# ------------------------------------------------------------------------------------- helpers
def _loss_cotangents(loss_fn: Callable, data: list[types.Datum], logprobs: list[np.ndarray]
                     ) -> tuple[float, dict[str, float], list[np.ndarray]]:
    """`(loss, metrics, d loss / d logprobs)` of a loss that cannot be traced by JAX.

    Tried with `jax.vjp` first; a loss written for the tinker SDK with torch ops (when the caller has
    imported torch: this module never imports it itself) is differentiated with torch autograd.
    """
    try:
        loss, vjp, metrics = jax.vjp(lambda lps: loss_fn(data, lps), [jnp.asarray(x) for x in logprobs], has_aux=True)
        (cotangents,) = vjp(jnp.ones_like(loss))
        return float(loss), {k: float(v) for k, v in metrics.items()}, [np.asarray(c, np.float32) for c in cotangents]
    except (jax.errors.JAXTypeError, jax.errors.ConcretizationTypeError, TypeError) as jax_error:
        torch = sys.modules.get("torch")
        if torch is None:
            raise ValueError(f"custom loss_fn is not JAX-differentiable (torch not loaded): {jax_error}") from None
        tensors = [torch.tensor(x, requires_grad=True) for x in logprobs]
        loss, metrics = loss_fn(data, tensors)
        loss.backward()
        return (float(loss), {k: float(v) for k, v in metrics.items()},
                [t.grad.numpy().astype(np.float32) if t.grad is not None else np.zeros_like(x)
                 for t, x in zip(tensors, logprobs, strict=True)])


def _to_output(result: ForwardResult) -> types.ForwardBackwardOutput:
    return types.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[{"logprobs": types.TensorData.from_numpy(lp)} for lp in result.logprobs],
        metrics=result.metrics)


def _to_sample_response(result: SampleResult) -> types.SampleResponse:
    sequences = [types.SampledSequence(stop_reason=s.stop_reason, tokens=s.tokens, logprobs=s.logprobs,
                                       topk_logprobs=None if s.topk is None else _topk_lists(s.topk),
                                       weights_version=result.version) for s in result.sequences]
    prompt_lp = None if result.prompt_logprobs is None else [
        None if np.isnan(x) else float(x) for x in result.prompt_logprobs]
    prompt_topk = None
    if result.prompt_topk is not None:
        prompt_topk = _topk_lists(result.prompt_topk)
        prompt_topk[0] = None  # nothing predicts the first token
    return types.SampleResponse(sequences=sequences, prompt_logprobs=prompt_lp, topk_prompt_logprobs=prompt_topk)


def _topk_lists(topk: TopK) -> list[list[tuple[int, float]] | None]:
    return [list(zip(ids, lps, strict=True)) for ids, lps in zip(topk.ids.tolist(), topk.logprobs.tolist(),
                                                                 strict=True)]
