"""Training models (LoRA adapters): creation, from scratch or from a checkpoint; info; unloading.

A model's id is `<session>:train:<model_seq_id>`, the form the SDK derives itself when it creates
a model by loading a checkpoint. Creation returns a future (it allocates and initialises an
adapter on the engine); a retried `create_model` for the same id gets the same future.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from fastapi import APIRouter

from framework import types
from service import store as st
from service.api_types import CreateModelRequest, LoadWeightsRequest, ModelIdRequest, UntypedAPIFuture
from service.auth import Owner
from service.bridge import BadInput
from service.errors import BadRequest
from service.futures import Entry, Payload, RequestFailed
from service.routes.common import State, json_payload, queued
from service.state import ServerState

router = APIRouter(prefix="/api/v1")
MAX_SEED = 2**63


def _existing_creation(state: ServerState, owner: str, model_id: str) -> Entry | None:
    """A retried creation: the future of the model's first creation (seq_id 0)."""
    row = state.store.get(st.ModelRow, model_id)
    if row is None:
        return None
    state.model(owner, model_id)  # 404 unless it is the caller's
    future = state.store.future_for_seq(model_id=model_id, seq_id=0)
    return None if future is None else state.futures.get(future.id, owner)


async def _create(state: ServerState, owner: str, row: st.ModelRow, kind: str, build: Callable[[], None]) -> Entry:
    """Record `row`, then run `build()` (blocking, creates the adapter) as the creation future.

    The model's lock is taken before returning, so a request that races the creation waits for it.
    """
    state.store.add(row)
    entry = state.futures.create(owner, kind, model_id=row.id, seq_id=0)
    lock = state.lock(row.id)
    await lock.acquire()

    async def work() -> Payload:
        try:
            await state.bridge.blocking(build)
        except BadInput as error:
            state.store.update(st.ModelRow, row.id, status="failed", error=error.message)
            raise
        except RuntimeError as error:  # e.g. every adapter slot is taken
            state.store.update(st.ModelRow, row.id, status="failed", error=str(error))
            raise RequestFailed(str(error), "server") from None
        finally:
            lock.release()
        state.store.update(st.ModelRow, row.id, status="ready")
        state.metrics.models_live.inc()
        if kind == "load_weights":
            return Payload("json", json_payload({"path": row.source_path, "model_id": row.id, "type": "load_weights"}))
        return Payload("json", json_payload({"model_id": row.id, "type": "create_model"}))

    state.futures.run(entry, work)
    return entry


def _claim_model_id(state: ServerState, owner: str, session_id: str,
                    model_seq_id: int) -> tuple[st.SessionRow, str, Entry | None]:
    """The session, the id its new model `model_seq_id` gets, and the creation already under way for that id
    (a retried request), if any; an id taken by a finished creation is refused."""
    session = state.open_session(owner, session_id)
    model_id = f"{session.id}:train:{model_seq_id}"
    existing = _existing_creation(state, owner, model_id)
    if existing is None and state.store.get(st.ModelRow, model_id) is not None:
        raise BadRequest(f"model_seq_id: model {model_id!r} already exists")
    return session, model_id, existing


@router.post("/create_model")
async def create_model(req: CreateModelRequest, owner: Owner, state: State) -> UntypedAPIFuture:
    session, model_id, existing = _claim_model_id(state, owner, req.session_id, req.model_seq_id)
    if existing is not None:
        return queued(existing, model_id=model_id)
    base = state.base_model(req.base_model)
    if req.lora_config is None:
        raise BadRequest("lora_config: required; this server trains LoRA adapters only")
    lora = req.lora_config
    if lora.seed is not None and not 0 <= lora.seed < MAX_SEED:
        raise BadRequest(f"lora_config.seed: must be in [0, 2^63), got {lora.seed}")
    max_rank = state.bridge.engine_config.max_rank
    if lora.rank > max_rank:
        raise BadRequest(f"lora_config.rank: {lora.rank} is above this server's max_rank {max_rank}")
    seed = lora.seed if lora.seed is not None else int.from_bytes(os.urandom(4), "little")
    lora = lora.model_copy(update={"seed": seed})
    now = st.utcnow()
    row = st.ModelRow(id=model_id, session_id=session.id, owner=owner, base_model=req.base_model,
                      lora_rank=lora.rank, lora_seed=seed, train_mlp=lora.train_mlp, train_attn=lora.train_attn,
                      train_unembed=lora.train_unembed, user_metadata=req.user_metadata or {}, created_at=now,
                      last_request_at=now, status="creating")
    entry = await _create(state, owner, row, "create_model",
                          lambda: state.bridge.create_trainer(model_id, base, lora))
    return queued(entry, model_id=model_id)


async def create_from_checkpoint(state: ServerState, owner: str, req: LoadWeightsRequest) -> UntypedAPIFuture:
    """`load_weights` with `session_id` + `model_seq_id`: a new model holding a checkpoint's weights."""
    if req.model_seq_id is None:
        raise BadRequest("model_seq_id: required with session_id (create a model by loading a checkpoint)")
    session, model_id, existing = _claim_model_id(state, owner, req.session_id or "", req.model_seq_id)
    if existing is not None:
        return queued(existing, model_id=model_id)
    if req.optimizer_config is not None and req.optimizer:
        raise BadRequest("optimizer_config: cannot be set when restoring the checkpoint's optimizer state")
    checkpoint = state.checkpoint(owner, req.path, kind="training")
    meta = await state.bridge.blocking(state.bridge.read_checkpoint, checkpoint.disk_path)
    base = state.bridge.by_path(meta.base_path)
    if base is None:
        raise BadRequest(f"path: checkpoint {req.path!r} was trained on {meta.base_path}, which this server "
                         "no longer serves")
    if req.base_model is not None and state.base_model(req.base_model).path != base.path:
        raise BadRequest(f"base_model: {req.base_model!r} differs from the checkpoint's base model {base.name!r}")
    now = st.utcnow()
    row = st.ModelRow(id=model_id, session_id=session.id, owner=owner, base_model=req.base_model or base.name,
                      lora_rank=meta.rank, lora_seed=meta.seed, train_mlp=meta.train_mlp, train_attn=meta.train_attn,
                      train_unembed=meta.train_unembed, user_metadata=req.user_metadata or {}, created_at=now,
                      last_request_at=now, status="creating", source_path=req.path)
    entry = await _create(state, owner, row, "load_weights",
                          lambda: state.bridge.create_trainer_from_state(model_id, checkpoint.disk_path, req.optimizer))
    return queued(entry, model_id=model_id)


@router.post("/get_info")
async def get_info(req: ModelIdRequest, owner: Owner, state: State) -> types.GetInfoResponse:
    model = state.model(owner, req.model_id)
    base = state.base_model(model.base_model)
    return types.GetInfoResponse(
        type="get_info", model_id=model.id, is_lora=True, lora_rank=model.lora_rank, model_name=model.base_model,
        model_data=types.ModelData(arch=base.arch, model_name=model.base_model, tokenizer_id=base.path))


@router.post("/unload_model")
async def unload_model(req: ModelIdRequest, owner: Owner, state: State) -> UntypedAPIFuture:
    """Free the model's adapter now (its checkpoints stay); the model refuses later requests."""
    model = state.model(owner, req.model_id)
    entry = state.futures.create(owner, "unload_model", model_id=None)

    async def work() -> Payload:
        async with state.lock(model.id):
            state.queues.forget(model.id)
            if state.bridge.trainer(model.id) is not None:
                await state.bridge.blocking(state.bridge.release, model.id)
                state.metrics.models_live.dec()
            state.store.update(st.ModelRow, model.id, released_at=st.utcnow())
        return Payload("json", json_payload({"model_id": model.id, "type": "unload_model"}))

    state.futures.run(entry, work)
    return queued(entry, model_id=model.id)
