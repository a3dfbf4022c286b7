"""Retrieving results: `retrieve_future` (long-poll), `retrieve_futures` (a sampling session's
completions by cursor) and `cancel_future`.

`retrieve_future` answers, once the future is done, with its result: protobuf when the client
accepts `application/x-protobuf` and the result is a forward/backward output or a sample (the SDK
decodes those only as protobuf), else JSON; a failure is `{"error", "category"}` with status 200,
which the SDK raises as `RequestFailedError`. While it is not done the poll is held for up to
`poll_hold_s` and only then answered `{"type": "try_again"}` (the SDK re-polls at once).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service import wire
from service.api_types import CancelFutureRequest, FutureRetrieveRequest, FuturesRetrieveRequest
from service.auth import Owner
from service.errors import NotFound
from service.futures import Entry
from service.routes.common import State, json_payload

router = APIRouter(prefix="/api/v1")
PROTOBUF = "application/x-protobuf"


def _answer(entry: Entry, accept: str) -> Response:
    if entry.status == "failed":
        return JSONResponse({"error": entry.error or "failed", "category": entry.category or "unknown",
                             "request_id": entry.id})
    payload = entry.payload
    assert payload is not None
    if payload.format == "proto":
        if PROTOBUF in accept:
            return Response(payload.body, media_type=PROTOBUF)
        decode = wire.decode_sample_response if payload.kind == "sample" else wire.decode_forward_backward_output
        return Response(json_payload(decode(payload.body)), media_type="application/json")
    return Response(payload.body, media_type="application/json")


@router.post("/retrieve_future")
async def retrieve_future(req: FutureRetrieveRequest, request: Request, owner: Owner, state: State) -> Response:
    entry = state.futures.get(req.request_id, owner)
    if entry is None:
        raise NotFound(f"request_id: future {req.request_id!r} not found (unknown, not yours, or expired)")
    if not await state.futures.wait(entry):
        return JSONResponse({"type": "try_again", "request_id": entry.id, "queue_state": "active"})
    return _answer(entry, request.headers.get("accept", ""))


@router.post("/retrieve_futures")
async def retrieve_futures(req: FuturesRetrieveRequest, owner: Owner, state: State) -> dict[str, Any]:
    sampler = state.sampler(owner, req.target.sampling_session_id)
    timeout = state.config.poll_hold_s if req.timeout is None else min(req.timeout, state.config.poll_hold_s)
    completions, cursor = await state.futures.completions(sampler.id, req.target.cloned_sampler_id,
                                                          req.prev_cursor, timeout)
    return {"completions": completions, "cursor": cursor}


@router.post("/cancel_future")
async def cancel_future(req: CancelFutureRequest, owner: Owner, state: State) -> dict[str, Any]:
    entry = state.futures.get(req.request_id, owner)
    if entry is None:
        raise NotFound(f"request_id: future {req.request_id!r} not found")
    cancelled = state.futures.cancel(entry)
    return {"request_id": entry.id, "cancelled": cancelled, "status": entry.status}
