"""What the routes share: the store, the bridge, futures, ordering, metrics, and the rules that
tie them together.

- Ownership: `session`, `model`, `sampler`, `checkpoint` return the row when the caller owns it
  (or, for reading a checkpoint, when it is published) and raise 404 otherwise.
- Model lifetime: a model's adapter lives on the engine while its session is open. After a server
  restart the adapter is restored on first use (`ensure_trainer`) from its newest training
  checkpoint (weights and optimizer state), else from the checkpoint it was created from, else
  recreated from its seed; a finished session's models are released and only their checkpoints
  remain.
- Ordered requests: `enqueue` answers an exact retry (same model and seq_id) with the original
  future and otherwise queues the request's start behind lower seq_ids (`service.ordering`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Iterator

from framework import types
from service import store as st
from service.bridge import BadInput, BaseModel, Bridge
from service.config import ServerConfig
from service.errors import ApiError, BadRequest, NotFound
from service.futures import Entry, FutureRegistry
from service.metrics import Metrics
from service.ordering import SeqQueues

log = logging.getLogger(__name__)

Start = Callable[[Entry], Awaitable[None]]


@dataclasses.dataclass
class ServerState:
    config: ServerConfig
    store: st.Store
    bridge: Bridge
    futures: FutureRegistry
    queues: SeqQueues
    metrics: Metrics
    model_locks: dict[str, asyncio.Lock] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------------------ ownership
    def session(self, owner: str, session_id: str) -> st.SessionRow:
        row = self.store.get(st.SessionRow, session_id)
        if row is None or row.owner != owner:
            raise NotFound(f"session {session_id!r} not found")
        return row

    def open_session(self, owner: str, session_id: str) -> st.SessionRow:
        row = self.session(owner, session_id)
        if row.finished_at is not None:
            raise BadRequest(f"session {session_id!r} is finished ({row.finish_reason}); start a new ServiceClient")
        return row

    def model(self, owner: str, model_id: str) -> st.ModelRow:
        row = self.store.get(st.ModelRow, model_id)
        if row is None or row.owner != owner:
            raise NotFound(f"model {model_id!r} not found")
        return row

    def sampler(self, owner: str, sampler_id: str) -> st.SamplerRow:
        row = self.store.get(st.SamplerRow, sampler_id)
        if row is None or row.owner != owner:
            raise NotFound(f"sampling session {sampler_id!r} not found")
        return row

    def checkpoint(self, owner: str, tinker_path: str, *, write: bool = False,
                   kind: str | None = None) -> st.CheckpointRow:
        """The checkpoint at `tinker_path` if the caller owns it, or may read it (published)."""
        try:
            parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        except ValueError as error:
            raise BadRequest(f"path: {error}") from None
        row = self.store.get(st.CheckpointRow, tinker_path)
        if row is None or not (row.owner == owner or (row.public and not write)):
            raise NotFound(f"checkpoint {tinker_path!r} not found")
        if kind is not None and parsed.checkpoint_type != kind:
            want = {"training": "tinker://<run>/weights/<name> (from save_state)",
                    "sampler": "tinker://<run>/sampler_weights/<name> (from save_weights_for_sampler)"}[kind]
            raise BadRequest(f"path: {tinker_path!r} is a {parsed.checkpoint_type} checkpoint; this needs {want}")
        if not os.path.isdir(row.disk_path):
            raise NotFound(f"checkpoint {tinker_path!r} is recorded but its files are gone from the server")
        return row

    def base_model(self, name: str) -> BaseModel:
        base = self.bridge.resolve(name)
        if base is None:
            served = ", ".join(sorted(self.bridge.models)) or "none"
            raise BadRequest(f"base_model: {name!r} is not served here; this server serves: {served}")
        return base

    # ---------------------------------------------------------------------------- model lifetime
    def lock(self, model_id: str) -> asyncio.Lock:
        return self.model_locks.setdefault(model_id, asyncio.Lock())

    async def ensure_trainer(self, model: st.ModelRow) -> None:
        """Make sure the model's adapter is on the engine (restoring it after a restart)."""
        if self.bridge.trainer(model.id) is not None:
            return
        async with self.lock(model.id):
            if self.bridge.trainer(model.id) is not None:
                return
            model = self.store.get(st.ModelRow, model.id)
            if model.status == "failed":
                raise BadRequest(f"model {model.id!r} could not be created: {model.error}")
            if model.released_at is not None:
                raise BadRequest(f"model {model.id!r} was released when its session finished; load one of its "
                                 "checkpoints into a new training client")
            base = self.base_model(model.base_model)
            saved = self.store.last_checkpoint(model.id, "training")
            if saved is None and model.source_path is not None:  # made from a checkpoint, never saved since
                saved = self.store.get(st.CheckpointRow, model.source_path)
            if saved is not None and os.path.isdir(saved.disk_path):
                log.warning("restoring model %s from its checkpoint %s", model.id, saved.tinker_path)
                await self.bridge.blocking(self.bridge.create_trainer_from_state, model.id, saved.disk_path, True)
            else:
                log.warning("restoring model %s from its seed (no checkpoint was saved)", model.id)
                lora = types.LoraConfig(rank=model.lora_rank, seed=model.lora_seed, train_mlp=model.train_mlp,
                                        train_attn=model.train_attn, train_unembed=model.train_unembed)
                await self.bridge.blocking(self.bridge.create_trainer, model.id, base, lora)
            self.metrics.models_live.inc()

    async def release_session(self, session_id: str) -> None:
        """Free the adapters and samplers of a finished session (checkpoints stay)."""
        models, samplers = self.store.children_of_session(session_id)
        for model in models:
            async with self.lock(model.id):
                self.queues.forget(model.id)
                if self.bridge.trainer(model.id) is not None:
                    await self.bridge.blocking(self.bridge.release, model.id)
                    self.metrics.models_live.dec()
                self.store.update(st.ModelRow, model.id, released_at=st.utcnow())
            self.model_locks.pop(model.id, None)
        for sampler in samplers:
            self.bridge.forget_sampler(sampler.id)
            self.futures.forget_sampler(sampler.id)

    # --------------------------------------------------------------------------- ordered requests
    @contextlib.contextmanager
    def numbered(self, model: st.ModelRow, seq_id: int | None) -> Iterator[None]:
        """Around the checks of an ordered request: if it is refused (4xx), its seq_id still counts
        as used, since the SDK has moved on to the next one; without this the refusal would leave a
        gap that holds back every later request of the model."""
        try:
            yield
        except ApiError:
            self.skip(model.id, seq_id)
            raise
        except BadInput as error:
            self.skip(model.id, seq_id)
            raise BadRequest(error.message) from None

    def skip(self, model_id: str, seq_id: int | None) -> None:
        if seq_id is None or self.store.future_for_seq(model_id=model_id, seq_id=seq_id) is not None:
            return
        try:
            self.queues.assign(model_id, seq_id)
        except ApiError:
            return
        self.queues.submit(model_id, seq_id, _nothing, lambda message: None)

    def enqueue(self, owner: str, kind: str, model: st.ModelRow, seq_id: int | None, start: Start) -> Entry:
        if seq_id is not None:
            existing = self.store.future_for_seq(model_id=model.id, seq_id=seq_id)
            if existing is not None and existing.kind != kind:
                raise BadRequest(f"seq_id: {seq_id} was already used for a {existing.kind} request of model "
                                 f"{model.id}; seq_ids must strictly increase")
            if existing is not None:
                entry = self.futures.get(existing.id, owner)
                if entry is None:
                    raise NotFound(f"model {model.id!r} not found")
                return entry
        seq = self.queues.assign(model.id, seq_id)
        entry = self.futures.create(owner, kind, model_id=model.id, seq_id=seq)
        self.store.update(st.ModelRow, model.id, last_request_at=st.utcnow())

        async def run() -> None:
            try:
                if entry.status == "pending":
                    await self.ensure_trainer(model)
                    await start(entry)
            except (ApiError, BadInput) as error:
                self.futures.fail(entry, getattr(error, "message", str(error)), "user")

        self.queues.submit(model.id, seq, run, lambda message: self.futures.fail(entry, message, "user"))
        return entry


def first_seq(store: st.Store, model_id: str) -> int:
    """A model's queue starts after every seq_id the store has seen for it (1 for a new model: its
    creation is seq_id 0), so after a restart the requests a client numbers on from there run."""
    top = store.max_seq(model_id)
    return 1 if top is None else top + 1


async def _nothing() -> None:
    """The start of a refused request: its seq_id passes without work."""
