"""Training runs and checkpoints (what the SDK's `RestClient` reads and manages).

A training run is a model; its checkpoints are `tinker://<run>/weights/<name>` (training state) and
`tinker://<run>/sampler_weights/<name>` (sampler weights). Only the owner lists, deletes, publishes
or sets a TTL; anyone may read a published checkpoint (`weights_info`, loading it, sampling from it,
and `get_training_run(..., access_scope="accessible")` for its run).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import tarfile
import tempfile
from typing import Annotated, Literal

from fastapi import APIRouter, BackgroundTasks, Query
from fastapi.responses import FileResponse

from framework import types
from service import store as st
from service.api_types import TtlRequest, WeightsInfoRequest
from service.auth import Owner
from service.errors import NotFound
from service.routes.common import State
from service.state import ServerState

router = APIRouter(prefix="/api/v1")

Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=2**31)]
Segment = Literal["weights", "sampler_weights"]
Scope = Literal["owned", "accessible"]


def checkpoint_view(row: st.CheckpointRow) -> types.Checkpoint:
    segment = "weights" if row.kind == "training" else "sampler_weights"
    return types.Checkpoint(checkpoint_id=f"{segment}/{row.name}", checkpoint_type=row.kind,
                            time=st.aware(row.created_at), tinker_path=row.tinker_path, size_bytes=row.size_bytes,
                            public=row.public, user_metadata=row.user_metadata,
                            expires_at=st.aware(row.expires_at))


def run_view(state: ServerState, row: st.ModelRow) -> types.TrainingRun:
    last_training = state.store.last_checkpoint(row.id, "training")
    last_sampler = state.store.last_checkpoint(row.id, "sampler")
    return types.TrainingRun(
        training_run_id=row.id, base_model=row.base_model, model_owner=row.owner, is_lora=True,
        corrupted=row.status == "failed", lora_rank=row.lora_rank, last_request_time=st.aware(row.last_request_at),
        last_checkpoint=checkpoint_view(last_training) if last_training else None,
        last_sampler_checkpoint=checkpoint_view(last_sampler) if last_sampler else None,
        user_metadata={str(k): str(v) for k, v in (row.user_metadata or {}).items()})


def _readable_run(state: ServerState, owner: str, run_id: str, scope: Scope) -> st.ModelRow:
    row = state.store.get(st.ModelRow, run_id)
    if row is not None and row.owner == owner:
        return row
    if row is not None and scope == "accessible":
        checkpoints, _ = state.store.checkpoints(model_id=run_id)
        if any(c.public for c in checkpoints):
            return row
    raise NotFound(f"training run {run_id!r} not found")


@router.get("/training_runs")
async def list_training_runs(owner: Owner, state: State, limit: Limit = 20, offset: Offset = 0
                             ) -> types.TrainingRunsResponse:
    rows, total = state.store.models_of(owner, limit, offset)
    return types.TrainingRunsResponse(training_runs=[run_view(state, r) for r in rows],
                                      cursor=types.Cursor(offset=offset, limit=limit, total_count=total))


@router.get("/training_runs/{run_id}")
async def get_training_run(run_id: str, owner: Owner, state: State, access_scope: Scope = "owned"
                           ) -> types.TrainingRun:
    return run_view(state, _readable_run(state, owner, run_id, access_scope))


@router.get("/training_runs/{run_id}/checkpoints")
async def list_run_checkpoints(run_id: str, owner: Owner, state: State) -> types.CheckpointsListResponse:
    state.model(owner, run_id)
    rows, _ = state.store.checkpoints(owner=owner, model_id=run_id)
    return types.CheckpointsListResponse(checkpoints=[checkpoint_view(r) for r in rows])


@router.get("/checkpoints")
async def list_user_checkpoints(owner: Owner, state: State, limit: Limit = 100, offset: Offset = 0
                                ) -> types.CheckpointsListResponse:
    rows, total = state.store.checkpoints(owner=owner, limit=limit, offset=offset)
    return types.CheckpointsListResponse(checkpoints=[checkpoint_view(r) for r in rows],
                                         cursor=types.Cursor(offset=offset, limit=limit, total_count=total))


def _own(state: ServerState, owner: str, run_id: str, segment: str, name: str) -> st.CheckpointRow:
    return state.checkpoint(owner, f"tinker://{run_id}/{segment}/{name}", write=True)


@router.post("/training_runs/{run_id}/checkpoints/{segment}/{name}/publish")
async def publish(run_id: str, segment: Segment, name: str, owner: Owner, state: State) -> dict[str, bool]:
    row = _own(state, owner, run_id, segment, name)
    state.store.update(st.CheckpointRow, row.tinker_path, public=True)
    return {"public": True}


@router.delete("/training_runs/{run_id}/checkpoints/{segment}/{name}/publish")
async def unpublish(run_id: str, segment: Segment, name: str, owner: Owner, state: State) -> dict[str, bool]:
    row = _own(state, owner, run_id, segment, name)
    state.store.update(st.CheckpointRow, row.tinker_path, public=False)
    return {"public": False}


@router.put("/training_runs/{run_id}/checkpoints/{segment}/{name}/ttl")
async def set_ttl(run_id: str, segment: Segment, name: str, req: TtlRequest, owner: Owner, state: State
                  ) -> dict[str, str | None]:
    row = _own(state, owner, run_id, segment, name)
    expires = st.utcnow() + dt.timedelta(seconds=req.ttl_seconds) if req.ttl_seconds else None
    state.store.update(st.CheckpointRow, row.tinker_path, expires_at=expires)
    return {"expires_at": expires.isoformat() if expires else None}


@router.get("/training_runs/{run_id}/checkpoints/{segment}/{name}/archive", response_class=FileResponse)
async def archive(run_id: str, segment: Segment, name: str, owner: Owner, state: State) -> FileResponse:
    """The checkpoint's files as a .tar.gz (our extension: how `framework.remote` fetches a trained
    adapter); the owner's, or a published one."""
    row = state.checkpoint(owner, f"tinker://{run_id}/{segment}/{name}")
    path = await asyncio.get_running_loop().run_in_executor(state.bridge.pool, _tar, row.disk_path)
    cleanup = BackgroundTasks()
    cleanup.add_task(os.unlink, path)
    return FileResponse(path, media_type="application/gzip", filename=f"{name}.tar.gz", background=cleanup)


def _tar(directory: str) -> str:
    handle, path = tempfile.mkstemp(suffix=".tar.gz")
    with os.fdopen(handle, "wb") as out, tarfile.open(fileobj=out, mode="w:gz") as archive:
        archive.add(directory, arcname=".")
    return path


@router.delete("/training_runs/{run_id}/checkpoints/{segment}/{name}")
async def delete_checkpoint(run_id: str, segment: Segment, name: str, owner: Owner, state: State) -> dict[str, str]:
    row = _own(state, owner, run_id, segment, name)
    delete_files(state, row)
    return {"deleted": row.tinker_path}


def delete_files(state: ServerState, row: st.CheckpointRow) -> None:
    """Forget a checkpoint, then remove its files (in the background)."""
    state.store.delete_checkpoint(row.tinker_path)
    state.bridge.pool.submit(shutil.rmtree, row.disk_path, True)


@router.post("/weights_info")
async def weights_info(req: WeightsInfoRequest, owner: Owner, state: State) -> types.WeightsInfoResponse:
    row = state.checkpoint(owner, req.tinker_path)
    meta = await state.bridge.blocking(state.bridge.read_checkpoint, row.disk_path)
    return types.WeightsInfoResponse(base_model=row.base_model, is_lora=True, lora_rank=meta.rank,
                                     train_unembed=meta.train_unembed, train_mlp=meta.train_mlp,
                                     train_attn=meta.train_attn)

