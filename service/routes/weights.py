"""Saving and loading weights: the ordered checkpoint requests.

- `save_weights` (`save_state`): weights + AdamW state + step, an Orbax checkpoint, at
  `tinker://<model>/weights/<name>`.
- `save_weights_for_sampler` with a name: a PEFT adapter at `tinker://<model>/sampler_weights/<name>`;
  without one (`save_weights_and_get_sampling_client`): an in-memory snapshot of the current
  weights, answered with a new sampling session id (`kind` inflight is served as a snapshot, which
  meets its contract: samples use the weights saved when the client was made).
- `load_weights` into an existing model (with or without optimizer state), or, with `session_id` +
  `model_seq_id`, into a new model (`ServiceClient.create_training_client_from_state*`).

Checkpoint records go to the store when the files are written, so a listed checkpoint is always
loadable; `ttl_seconds` sets an expiry after which maintenance deletes it.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from service import store as st
from service.api_types import LoadWeightsRequest, SaveWeightsForSamplerRequest, SaveWeightsRequest, UntypedAPIFuture
from service.auth import Owner
from service.errors import BadRequest
from service.futures import Entry, Payload
from service.routes.common import State, json_body, json_payload, parse_ordered, queued
from service.routes.models import create_from_checkpoint
from service.state import ServerState

router = APIRouter(prefix="/api/v1")


def _size(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _record(state: ServerState, owner: str, model: st.ModelRow, kind: str, name: str, disk_path: str,
            ttl_seconds: int | None, user_metadata: dict[str, str] | None) -> str:
    segment = "weights" if kind == "training" else "sampler_weights"
    tinker_path = f"tinker://{model.id}/{segment}/{name}"
    previous = state.store.get(st.CheckpointRow, tinker_path)
    meta = state.bridge.read_checkpoint(disk_path)
    now = st.utcnow()
    state.store.put_checkpoint(st.CheckpointRow(
        tinker_path=tinker_path, owner=owner, model_id=model.id, kind=kind, name=name, disk_path=disk_path,
        base_model=model.base_model, lora_rank=model.lora_rank, step=meta.step, size_bytes=_size(disk_path),
        public=bool(previous and previous.public), user_metadata=user_metadata, created_at=now,
        expires_at=now + dt.timedelta(seconds=ttl_seconds) if ttl_seconds else None))
    if previous is not None and os.path.abspath(previous.disk_path) != os.path.abspath(disk_path):
        state.bridge.pool.submit(_remove_tree, previous.disk_path)  # an overwrite written elsewhere
    return tinker_path


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _check_new(state: ServerState, model: st.ModelRow, segment: str, name: str, overwrite: bool) -> None:
    tinker_path = f"tinker://{model.id}/{segment}/{name}"
    if not overwrite and state.store.get(st.CheckpointRow, tinker_path) is not None:
        raise BadRequest(f"path: checkpoint {tinker_path!r} already exists; pass overwrite=True to replace it")


def _save(state: ServerState, owner: str, model: st.ModelRow, req: SaveWeightsRequest | SaveWeightsForSamplerRequest,
          future_type: str, save: Callable[[], Any], *, kind: str, name: str) -> Entry:
    """Queue a checkpoint write in the model's request order: `save()` starts it on the engine's I/O pool;
    once written, the checkpoint is recorded as `kind` (training | sampler) under `name`."""

    async def start(entry: Entry) -> None:
        api = save()

        async def work() -> Payload:
            out = await state.bridge.result(api)
            path = _record(state, owner, model, kind, name, out.path, req.ttl_seconds, req.user_metadata)
            return Payload("json", json_payload({"path": path, "type": future_type}))

        state.futures.run(entry, work)

    return state.enqueue(owner, future_type, model, req.seq_id, start)


@router.post("/save_weights", openapi_extra=json_body(SaveWeightsRequest))
async def save_weights(request: Request, owner: Owner, state: State) -> UntypedAPIFuture:
    req = await parse_ordered(request, SaveWeightsRequest, state, owner)
    model = state.model(owner, req.model_id)
    name = req.path or f"seq-{req.seq_id or 0:06d}"
    with state.numbered(model, req.seq_id):
        _check_new(state, model, "weights", name, req.overwrite)

    entry = _save(state, owner, model, req, "save_weights", lambda: state.bridge.save_state(model.id, name, True),
                  kind="training", name=name)
    return queued(entry, model_id=model.id)


@router.post("/save_weights_for_sampler", openapi_extra=json_body(SaveWeightsForSamplerRequest))
async def save_weights_for_sampler(request: Request, owner: Owner, state: State) -> UntypedAPIFuture:
    req = await parse_ordered(request, SaveWeightsForSamplerRequest, state, owner)
    model = state.model(owner, req.model_id)
    with state.numbered(model, req.seq_id):
        if req.path is not None and req.sampling_session_seq_id is not None:
            raise BadRequest("path: give a name (a saved checkpoint) or sampling_session_seq_id (an in-memory "
                             "sampler), not both")
        if req.path is None and req.sampling_session_seq_id is None:
            raise BadRequest("path: required (or sampling_session_seq_id for an in-memory sampler)")
    if req.path is not None:
        name = req.path
        entry = _save(state, owner, model, req, "save_weights_for_sampler",
                      lambda: state.bridge.save_sampler_weights(model.id, name), kind="sampler", name=name)
        return queued(entry, model_id=model.id)

    sampler_id = f"{model.session_id}:sample:{req.sampling_session_seq_id}"
    retry = req.seq_id is not None and state.store.future_for_seq(model_id=model.id, seq_id=req.seq_id) is not None
    with state.numbered(model, req.seq_id):
        if not retry and state.store.get(st.SamplerRow, sampler_id) is not None:
            raise BadRequest(f"sampling_session_seq_id: sampling session {sampler_id!r} already exists")

    async def start_snapshot(entry: Entry) -> None:
        async def work() -> Payload:
            version = await state.bridge.blocking(state.bridge.publish, sampler_id, model.id)
            state.store.add(st.SamplerRow(id=sampler_id, session_id=model.session_id, owner=owner,
                                          base_model=model.base_model, source_model_id=model.id,
                                          source_version=version, created_at=st.utcnow()))
            return Payload("json", json_payload({"sampling_session_id": sampler_id,
                                                 "type": "save_weights_for_sampler"}))

        state.futures.run(entry, work)
        await entry.event.wait()  # the snapshot must be taken before the model's next request runs

    return queued(state.enqueue(owner, "save_weights_for_sampler", model, req.seq_id, start_snapshot),
                  model_id=model.id)


@router.post("/load_weights", openapi_extra=json_body(LoadWeightsRequest))
async def load_weights(request: Request, owner: Owner, state: State) -> UntypedAPIFuture:
    req = await parse_ordered(request, LoadWeightsRequest, state, owner)
    if req.session_id is not None:
        if req.model_id is not None:
            raise BadRequest("model_id: give model_id + seq_id (load into a model) or session_id + model_seq_id "
                             "(create a model from the checkpoint), not both")
        return await create_from_checkpoint(state, owner, req)
    if req.model_id is None:
        raise BadRequest("model_id: required (or session_id + model_seq_id to create a model from the checkpoint)")
    model = state.model(owner, req.model_id)
    with state.numbered(model, req.seq_id):
        checkpoint = state.checkpoint(owner, req.path, kind="training")
        meta = await state.bridge.blocking(state.bridge.read_checkpoint, checkpoint.disk_path)
        if (meta.rank, meta.train_mlp, meta.train_attn, meta.train_unembed) != (
                model.lora_rank, model.train_mlp, model.train_attn, model.train_unembed):
            raise BadRequest(f"path: checkpoint {req.path!r} is a rank-{meta.rank} adapter over other layers than "
                             f"model {model.id!r} (rank {model.lora_rank}); create a new model from it instead")

    async def start(entry: Entry) -> None:
        api = state.bridge.load_state(model.id, checkpoint.disk_path, req.optimizer)

        async def work() -> Payload:
            await state.bridge.result(api)
            return Payload("json", json_payload({"path": req.path, "model_id": model.id, "type": "load_weights"}))

        state.futures.run(entry, work)

    return queued(state.enqueue(owner, "load_weights", model, req.seq_id, start), model_id=model.id)
