"""Sessions: created by every `ServiceClient`, kept alive by its heartbeat, finished by `close()`.

Finishing a session releases its models' adapters and its samplers on the engine (their
checkpoints stay); later requests on them are refused, and its heartbeat gets 410, which stops the
SDK's heartbeat loop.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query

from service import store as st
from service.api_types import (
    CreateSessionRequest,
    CreateSessionResponse,
    FinishSessionRequest,
    GetSessionResponse,
    SessionHeartbeatRequest,
)
from service.auth import Owner
from service.errors import Gone
from service.routes.common import State, check_sdk_version

router = APIRouter(prefix="/api/v1")

Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=2**31)]


@router.post("/create_session")
async def create_session(req: CreateSessionRequest, owner: Owner, state: State) -> CreateSessionResponse:
    check_sdk_version(req.sdk_version)
    now = st.utcnow()
    session_id = f"ses-{uuid.uuid4().hex[:16]}"
    state.store.add(st.SessionRow(id=session_id, owner=owner, created_at=now, last_heartbeat_at=now,
                                  sdk_version=req.sdk_version, tags=req.tags, user_metadata=req.user_metadata or {},
                                  display_name=req.display_name, project_id=req.project_id))
    state.metrics.sessions_active.inc()
    return CreateSessionResponse(session_id=session_id)


@router.post("/session_heartbeat")
async def session_heartbeat(req: SessionHeartbeatRequest, owner: Owner, state: State) -> dict[str, str]:
    row = state.session(owner, req.session_id)
    if row.finished_at is not None:
        raise Gone(f"session {req.session_id!r} is finished")
    state.store.update(st.SessionRow, row.id, last_heartbeat_at=st.utcnow())
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, req: FinishSessionRequest, owner: Owner, state: State) -> dict[str, Any]:
    row = state.session(owner, session_id)
    if row.finished_at is None:  # first reason wins
        state.store.update(st.SessionRow, session_id, finished_at=st.utcnow(), finish_reason=req.reason.type)
        state.metrics.sessions_active.dec()
        await state.release_session(session_id)
    return {"session_id": session_id, "finish_reason": row.finish_reason or req.reason.type}


@router.get("/sessions")
async def list_sessions(owner: Owner, state: State, limit: Limit = 20, offset: Offset = 0) -> dict[str, list[str]]:
    rows, _ = state.store.sessions_of(owner, limit, offset)
    return {"sessions": [r.id for r in rows]}


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, owner: Owner, state: State) -> GetSessionResponse:
    row = state.session(owner, session_id)
    models, samplers = state.store.children_of_session(session_id)
    return GetSessionResponse(training_run_ids=[m.id for m in models], sampler_ids=[s.id for s in samplers],
                              user_metadata={k: str(v) for k, v in (row.user_metadata or {}).items()},
                              display_name=row.display_name)
