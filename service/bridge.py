"""The one module that talks to the framework: wire ids → in-process clients, off the event loop.

The server drives the engine only through the public client API (`framework.ServiceClient`,
`TrainingClient`, `SamplingClient`), like any in-process user. Wire ids map to clients here:
`<session>:train:<n>` → a `TrainingClient`, `<session>:sample:<n>` → a `SamplingClient`. Calls
that queue work return the framework's `APIFuture` at once; calls that block (creating an adapter,
loading a checkpoint, publishing a snapshot) run in a thread pool of their own so the event loop
never waits on JAX. Input the framework refuses (`ValueError`, and the `OverflowError` /
`TypeError` numpy raises for absurd numbers) becomes `BadInput`, which the routes answer with 400.

Base models are served under a name: the path given on the command line, or `NAME=PATH` to serve a
local checkpoint under a hub name (so recipes that look models up by name work unchanged). A
client's `base_model` matches a name exactly or a served path once resolved.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from framework import APIFuture, EngineConfig, SamplingClient, ServiceClient, TrainingClient, checkpoints, types
from service.futures import RequestFailed

log = logging.getLogger(__name__)
T = TypeVar("T")
INPUT_ERRORS = (ValueError, TypeError, OverflowError, FileExistsError, FileNotFoundError)


class BadInput(RequestFailed):
    """The framework refused a request's input; the message names what is wrong."""

    def __init__(self, message: str):
        super().__init__(message, "user")


def guarded(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except INPUT_ERRORS as error:
            raise BadInput(str(error)) from error
    return call


@dataclasses.dataclass(frozen=True)
class BaseModel:
    name: str  # what clients call it
    path: str  # the local checkpoint directory (absolute)
    info: types.SupportedModel
    arch: str


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    base_path: str
    rank: int
    seed: int
    train_mlp: bool
    train_attn: bool
    train_unembed: bool
    step: int


def parse_base_model(spec: str) -> tuple[str, str]:
    """`PATH` or `NAME=PATH` → (name, absolute path)."""
    name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
    path = str(Path(path).expanduser().resolve())
    return (name or path), path


class Bridge:
    def __init__(self, base_models: list[str], *, home: Path, engine_config: EngineConfig, threads: int = 32,
                 snapshots_per_model: int = 8):
        self.service = ServiceClient(engine_config=engine_config, home=home)
        self.engine_config = engine_config
        self.home = home
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bridge")
        self._specs = [parse_base_model(s) for s in base_models]
        self.models: dict[str, BaseModel] = {}
        self._trainers: dict[str, TrainingClient] = {}
        self._samplers: dict[str, SamplingClient] = {}
        # The in-memory samplers published from each model, oldest first: the SDK never says when it
        # drops one, so a long RL run would otherwise keep every step's snapshot until its session ends.
        self._published: dict[str, collections.deque[str]] = collections.defaultdict(collections.deque)
        self.snapshots_per_model = snapshots_per_model

    # ------------------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Load every served base model (blocking; at start-up, before serving)."""
        for name, path in self._specs:
            info = self.service.load_base_model(path)
            arch = self.service.model_info(path).arch or ""
            self.models[name] = BaseModel(name, path, info.model_copy(update={"model_name": name}), arch)
            log.info("serving %s (%s) from %s", name, arch, path)

    def close(self) -> None:
        self.service.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking framework call in the bridge's threads."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(guarded(fn), *args))

    async def result(self, future: APIFuture[T]) -> T:
        """Await an `APIFuture` from the event loop (input errors found late become `BadInput`); its
        conversion to the client type runs in the bridge's threads, not on the loop."""
        await asyncio.wrap_future(future.future)
        return await self.blocking(future.result)

    # ---------------------------------------------------------------------------- base models
    def resolve(self, name: str) -> BaseModel | None:
        if name in self.models:
            return self.models[name]
        try:
            path = str(Path(name).expanduser().resolve())
        except (OSError, ValueError):
            return None
        return next((m for m in self.models.values() if m.path == path), None)

    def by_path(self, path: str) -> BaseModel | None:
        return next((m for m in self.models.values() if m.path == path), None)

    def supported(self) -> list[types.SupportedModel]:
        return [m.info for m in self.models.values()]

    def metrics(self) -> dict[str, dict[str, float]]:
        return self.service.metrics()

    # -------------------------------------------------------------------------------- trainers
    def trainer(self, model_id: str) -> TrainingClient | None:
        return self._trainers.get(model_id)

    def create_trainer(self, model_id: str, base: BaseModel, lora: types.LoraConfig) -> None:
        """Blocking: a fresh adapter."""
        self._trainers[model_id] = guarded(self.service.create_lora_training_client)(
            base.path, rank=lora.rank, seed=lora.seed, train_mlp=lora.train_mlp, train_attn=lora.train_attn,
            train_unembed=lora.train_unembed)

    def create_trainer_from_state(self, model_id: str, disk_path: str, optimizer: bool) -> None:
        """Blocking: an adapter loaded from a training checkpoint (with its optimizer state, or fresh)."""
        make = (self.service.create_training_client_from_state_with_optimizer if optimizer
                else self.service.create_training_client_from_state)
        self._trainers[model_id] = guarded(make)(disk_path)

    @staticmethod
    @guarded
    def read_checkpoint(disk_path: str) -> CheckpointMeta:
        meta = checkpoints.read_meta(disk_path)
        targets = meta["targets"]
        return CheckpointMeta(base_path=meta["base_model"], rank=int(meta["rank"]), seed=int(meta["seed"]),
                              train_mlp="gate" in targets, train_attn="q" in targets,
                              train_unembed="unembed" in targets, step=int(meta.get("step", 0)))

    def release(self, model_id: str) -> None:
        """Blocking: free the model's adapter (after its queued work)."""
        trainer = self._trainers.pop(model_id, None)
        self._published.pop(model_id, None)  # its samplers live on until their session ends
        if trainer is not None:
            trainer.release().result()

    @guarded
    def check_forward(self, model_id: str, data: list[types.Datum], loss_fn: str,
                      config: dict[str, float] | None) -> None:
        self._trainers[model_id].check_forward_inputs(data, loss_fn, config)  # type: ignore[arg-type]

    @guarded
    def forward(self, model_id: str, data: list[types.Datum], loss_fn: str, config: dict[str, float] | None,
                *, backward: bool) -> APIFuture[types.ForwardBackwardOutput]:
        trainer = self._trainers[model_id]
        run = trainer.forward_backward if backward else trainer.forward
        return run(data, loss_fn, config)  # type: ignore[arg-type]

    @guarded
    def optim_step(self, model_id: str, adam: types.AdamParams) -> APIFuture[types.OptimStepResponse]:
        return self._trainers[model_id].optim_step(adam)

    @guarded
    def save_state(self, model_id: str, name: str, overwrite: bool) -> APIFuture[types.SaveWeightsResponse]:
        return self._trainers[model_id].save_state(name, overwrite=overwrite)

    @guarded
    def save_sampler_weights(self, model_id: str, name: str) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        return self._trainers[model_id].save_weights_for_sampler(name)

    @guarded
    def load_state(self, model_id: str, disk_path: str, optimizer: bool) -> APIFuture[types.LoadWeightsResponse]:
        trainer = self._trainers[model_id]
        return trainer.load_state_with_optimizer(disk_path) if optimizer else trainer.load_state(disk_path)

    # -------------------------------------------------------------------------------- samplers
    def sampler(self, sampler_id: str) -> SamplingClient | None:
        return self._samplers.get(sampler_id)

    def publish(self, sampler_id: str, model_id: str) -> int | None:
        """Blocking: snapshot the model's current weights as sampler `sampler_id`; returns its version.
        Only the model's `snapshots_per_model` most recent such samplers are kept: older ones are
        closed (their queued requests still complete)."""
        sampler = guarded(self._trainers[model_id].save_weights_and_get_sampling_client)()
        self._samplers[sampler_id] = sampler
        published = self._published[model_id]
        published.append(sampler_id)
        while len(published) > self.snapshots_per_model:
            self.forget_sampler(published.popleft())
        return sampler.version

    def sampler_from_weights(self, sampler_id: str, disk_path: str, base: BaseModel) -> None:
        """Blocking: a sampler over saved sampler weights (a PEFT directory)."""
        self._samplers[sampler_id] = guarded(self.service.create_sampling_client)(
            model_path=disk_path, base_model=base.path)

    def sampler_from_state(self, sampler_id: str, disk_path: str) -> None:
        """Blocking: a sampler over a training checkpoint's weights (loaded into a temporary adapter,
        published as a snapshot, and the adapter released)."""
        trainer = guarded(self.service.create_training_client_from_state)(disk_path)
        try:
            self._samplers[sampler_id] = guarded(trainer.save_weights_and_get_sampling_client)()
        finally:
            trainer.release().result()

    def sampler_for_base(self, sampler_id: str, base: BaseModel) -> None:
        self._samplers[sampler_id] = guarded(self.service.create_sampling_client)(base_model=base.path)

    @guarded
    def sample(self, sampler_id: str, prompt: types.ModelInput, num_samples: int, params: types.SamplingParams,
               *, prompt_logprobs: bool, topk_prompt: int, topk_sample: int) -> APIFuture[types.SampleResponse]:
        return self._samplers[sampler_id].sample(prompt, num_samples, params, include_prompt_logprobs=prompt_logprobs,
                                                 topk_prompt_logprobs=topk_prompt, topk_sample_logprobs=topk_sample)

    def forget_sampler(self, sampler_id: str) -> None:
        sampler = self._samplers.pop(sampler_id, None)
        if sampler is not None:
            sampler.close()  # its snapshot is freed once its queued requests are done
