"""`TrainingClient`: trains one LoRA adapter, as in the tinker SDK. Every method validates its input
in the caller's thread (a bad request raises at once and never reaches the engine), queues the work
on the base model's scheduler in order with the adapter's other requests, and returns an
`APIFuture`.

Disk work never runs on the engine's worker: a save takes a host copy of the state on the worker
(in order with the adapter's requests) and writes it on the I/O pool; a load starts reading on the
I/O pool at once; the load waits in its adapter's queue until the read is done (other tenants' work
runs meanwhile), then the worker only installs what was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from framework import checkpoints, types
from framework.engine import CustomLossRequest, ForwardRequest, ForwardResult, OptimRequest, OptimResult
from framework.futures import IO_POOL, APIFuture, completed
from framework.optim import AdamHyperparams, init_opt_state
from framework.sampling_client import SamplingClient
from framework.validation import datums_to_arrays
from lora import export_peft

if TYPE_CHECKING:
    from framework.client import ServiceClient


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
        adapter = self._engine.adapters.get(run_id)
        self._meta_fixed = {"base_model": str(Path(base_model).expanduser().absolute()), "rank": adapter.rank,
                            "alpha": adapter.alpha, "targets": list(adapter.targets), "seed": adapter.seed,
                            "max_rank": self._engine.config.max_rank,
                            "bank_targets": list(self._engine.config.targets), "model_id": run_id}
        scheduler, engine = self._scheduler, self._engine
        self._released = weakref.finalize(self, _release_adapter, scheduler, engine, run_id)

    def release(self) -> APIFuture[None]:
        """Free the adapter (weights, optimizer state, gradients) after the requests already queued.
        The client refuses requests afterwards; its saved checkpoints and published samplers stay.
        Idempotent: a second call returns a future that is already done."""
        if self._released.detach() is None:
            return completed(None)
        return APIFuture(_remove_adapter(self._scheduler, self._engine, self.model_id))

    def _check_open(self) -> None:
        if not self._released.alive:
            raise ValueError(f"training client {self.model_id} was released; create a new one")

    def check_forward_inputs(self, data: Sequence[types.Datum], loss_fn: types.LossFnType,
                             loss_fn_config: dict[str, float] | None = None) -> None:
        """Raise the `ValueError` that `forward`/`forward_backward` would raise for this input, without
        queueing anything: lets a caller that delays submission (a server ordering requests by
        sequence number) refuse bad input when it arrives."""
        self._check_open()
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
        self._check_open()
        engine = self._engine
        arrays, config = datums_to_arrays(data, loss_fn, loss_fn_config, vocab_size=engine.model_config.vocab_size,
                                          max_seq_len=engine.max_seq_len)
        future = self._scheduler.submit(
            lambda requests: engine.forward(requests, backward=backward),
            ForwardRequest(self.model_id, arrays, loss_fn, config), adapter_id=self.model_id,
            batch_key=("forward_backward" if backward else "forward", loss_fn), rows=len(arrays),
            tokens=sum(len(a.tokens) for a in arrays))
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
        self._check_open()
        data = list(data)
        arrays, _ = datums_to_arrays(data, "cross_entropy", None, vocab_size=self._engine.model_config.vocab_size,
                                     max_seq_len=self._engine.max_seq_len, required_keys=("target_tokens",))
        shapes = [jax.ShapeDtypeStruct((len(a.tokens),), jnp.float32) for a in arrays]
        try:
            traced, out_shape = jax.make_jaxpr(lambda lps: loss_fn(data, lps), return_shape=True)(shapes)
        except (jax.errors.JAXTypeError, jax.errors.ConcretizationTypeError, TypeError):
            return forward_backward_two_pass(self, data, loss_fn)
        out_tree = jax.tree.structure(out_shape)
        if not self._engine.wants_custom_step(traced, out_tree, [len(a.tokens) for a in arrays]):
            return forward_backward_two_pass(self, data, loss_fn)
        request = CustomLossRequest(self.model_id, arrays, traced, out_tree)
        engine = self._engine

        def run(payloads: Sequence[CustomLossRequest]) -> list[types.ForwardBackwardOutput]:
            result = engine.forward_backward_custom(payloads[0])
            return [types.ForwardBackwardOutput(
                loss_fn_output_type="ArrayRecord",
                loss_fn_outputs=[{"logprobs": types.TensorData.from_numpy(lp)} for lp in result.logprobs],
                metrics={**result.metrics, "loss:sum": result.loss})]

        return APIFuture(self._scheduler.submit(run, request, adapter_id=self.model_id, rows=len(arrays)))

    # ---------------------------------------------------------------------------------- optimizer
    def optim_step(self, adam_params: types.AdamParams | None = None) -> APIFuture[types.OptimStepResponse]:
        self._check_open()
        adam = adam_params or types.AdamParams()
        if not isinstance(adam, types.AdamParams):
            raise ValueError(f"adam_params must be AdamParams, got {type(adam).__name__}")
        hp = AdamHyperparams.make(adam.learning_rate, adam.beta1, adam.beta2, adam.eps, adam.weight_decay,
                                  adam.grad_clip_norm)
        future = self._scheduler.submit(self._engine.optim_step, OptimRequest(self.model_id, hp),
                                        adapter_id=self.model_id, batch_key=("optim_step",))
        return APIFuture(future, _to_optim_response)

    # ------------------------------------------------------------------------------- checkpoints
    def _path(self, kind: str, name: str) -> Path:
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise ValueError(f"checkpoint name {name!r} must be a non-empty name without '/'")
        return self.service._runtime.home / self.model_id / kind / name

    def _meta(self) -> dict[str, Any]:
        return dict(self._meta_fixed)

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                   user_metadata: dict[str, str] | None = None) -> APIFuture[types.SaveWeightsResponse]:
        """Save adapter weights + optimizer state + step (Orbax) under the client's home."""
        self._check_open()
        path = self._path("weights", name)
        if path.exists() and not overwrite:
            raise FileExistsError(f"checkpoint {name!r} already exists at {path}; pass overwrite=True")
        engine, meta = self._engine, self._meta()

        def write(state: dict[str, Any]) -> types.SaveWeightsResponse:  # on the I/O pool
            checkpoints.save_training_state(path, weights=state["weights"], opt_state=state["opt_state"],
                                            step=state["step"], meta=meta)
            return types.SaveWeightsResponse(path=str(path))

        return APIFuture(self._scheduler.call(lambda: engine.training_state(self.model_id),
                                              adapter_id=self.model_id)).then(write)

    def load_state(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        """Load weights from a `save_state` checkpoint; the optimizer state starts fresh."""
        return self._load(path, with_optimizer=False)

    def load_state_with_optimizer(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        """Load weights and optimizer state (and step) from a `save_state` checkpoint."""
        return self._load(path, with_optimizer=True)

    def _load(self, path: str, *, with_optimizer: bool) -> APIFuture[types.LoadWeightsResponse]:
        self._check_open()
        meta = checkpoints.read_meta(path)
        engine = self._engine
        for key, ours in (("max_rank", engine.config.max_rank), ("bank_targets", list(engine.config.targets))):
            if meta[key] != ours:
                raise ValueError(f"checkpoint {path} has {key}={meta[key]!r}; this engine has {ours!r}")
        mine = self._meta_fixed
        if (meta["rank"], meta["targets"]) != (mine["rank"], mine["targets"]):
            raise ValueError(f"checkpoint {path} is rank {meta['rank']} over {meta['targets']}; this client is "
                             f"rank {mine['rank']} over {mine['targets']}")
        zero = engine.zero_adapter()
        read = IO_POOL.submit(checkpoints.load_training_state, path, weights_like=zero,
                              opt_state_like=jax.eval_shape(init_opt_state, zero))

        def install() -> types.LoadWeightsResponse:  # on the worker, in order, once the read is done
            weights, opt_state, step = read.result()
            adapter = engine.adapters.get(self.model_id)
            engine.set_adapter_state(self.model_id, weights, opt_state if with_optimizer else None,
                                     step if with_optimizer else adapter.step)
            return types.LoadWeightsResponse(path=str(path), model_id=self.model_id)

        return APIFuture(self._scheduler.call(install, adapter_id=self.model_id, ready=read))

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None,
                                 user_metadata: dict[str, str] | None = None
                                 ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Write the adapter as a PEFT directory (loadable by `peft`, vLLM, `create_sampling_client`)."""
        self._check_open()
        path = self._path("sampler_weights", name)
        engine, meta = self._engine, self._meta()

        def snapshot() -> tuple[Any, int, int]:
            adapter = engine.adapters.get(self.model_id)
            return jax.device_get(adapter.weights), adapter.step, adapter.version

        def write(state: tuple[Any, int, int]) -> types.SaveWeightsForSamplerResponse:  # on the I/O pool
            weights, step, version = state
            export_peft(weights, config=engine.model_config, rank=meta["rank"], alpha=meta["alpha"],
                        targets=tuple(meta["targets"]), out_dir=path, base_model=self.base_model)
            (path / checkpoints.ADAPTER_META).write_text(json.dumps({**meta, "step": step, "version": version}))
            return types.SaveWeightsForSamplerResponse(path=str(path))

        return APIFuture(self._scheduler.call(snapshot, adapter_id=self.model_id)).then(write)

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SamplingClient:
        """Publish the current weights as an in-memory, versioned snapshot and sample from it (no disk
        round trip); with `name`, also write them as a PEFT directory."""
        self._check_open()
        if name is not None:
            self.save_weights_for_sampler(name).result()
        engine = self._engine
        # Publishing copies nothing. With nothing of this adapter queued or running it happens here, at once,
        # beside the worker; else (or when the adapter is paged out) it goes ahead of other tenants' queued
        # work on the worker (never ahead of this adapter's).
        _, snapshot = self._scheduler.try_now(lambda: engine.publish_resident(self.model_id),
                                              adapter_id=self.model_id)
        if snapshot is None:
            snapshot = self._scheduler.call(lambda: engine.publish(self.model_id), adapter_id=self.model_id,
                                            priority=True).result()
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


def _remove_adapter(scheduler: Any, engine: Any, adapter_id: str) -> Any:
    """Free the adapter after its queued requests; the scheduler then stops counting it as active."""
    def remove() -> None:
        if adapter_id in engine.adapters:
            engine.remove_adapter(adapter_id)
        scheduler.forget(adapter_id)

    return scheduler.call(remove, adapter_id=adapter_id)


def _release_adapter(scheduler: Any, engine: Any, adapter_id: str) -> None:
    """Finalizer of a dropped TrainingClient: free its adapter after its queued requests."""
    with contextlib.suppress(RuntimeError):  # a shut-down scheduler: the engine goes with it
        _remove_adapter(scheduler, engine, adapter_id)


def forward_backward_two_pass(client: Any, data: list[types.Datum], loss_fn: Callable
                              ) -> APIFuture[types.ForwardBackwardOutput]:
    """`forward_backward_custom` through two ordinary passes of `client` (ours or the remote one): a
    forward for the per-token logprobs, the loss and its gradient with respect to them here (JAX), then a
    cross-entropy backward weighted by that gradient."""
    probe = [types.Datum(model_input=d.model_input, loss_fn_inputs={
        "target_tokens": d.loss_fn_inputs["target_tokens"], "weights": np.zeros(d.model_input.length, np.float32)})
        for d in data]
    forward = client.forward(probe, "cross_entropy").result()
    logprobs = [o["logprobs"].to_numpy().astype(np.float32) for o in forward.loss_fn_outputs]
    loss, metrics, cotangents = _loss_cotangents(loss_fn, data, logprobs)
    weighted = [types.Datum(model_input=d.model_input,
                            loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"], "weights": -c})
                for d, c in zip(data, cotangents, strict=True)]

    def finish(out: types.ForwardBackwardOutput) -> types.ForwardBackwardOutput:
        return out.model_copy(update={"metrics": {**out.metrics, **metrics, "loss:sum": loss}})

    return client.forward_backward(weighted, "cross_entropy").then(finish)


def _loss_cotangents(loss_fn: Callable, data: list[types.Datum], logprobs: list[np.ndarray]
                     ) -> tuple[float, dict[str, float], list[np.ndarray]]:
    """`(loss, metrics, d loss / d logprobs)` of a loss that cannot be traced by JAX.

    Tried with `jax.vjp` first; a loss written for the tinker SDK with torch ops (when the caller has
    imported torch: this module never imports it itself) is differentiated with torch autograd.
    """
    import sys

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


def _to_optim_response(result: OptimResult) -> types.OptimStepResponse:
    return types.OptimStepResponse(metrics={f"{k}:mean": v for k, v in result.metrics.items()})
