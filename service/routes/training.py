"""forward / forward_backward and optim_step: the ordered training requests.

`forward_backward` arrives as protobuf (`Content-Type: application/x-protobuf`, the SDK 0.38) or
as JSON (older SDKs); `forward_only` makes it a forward. Its input is checked against the model
(vocabulary, context length, the loss's inputs) when it arrives, so a bad request is a 400 even
when it would only run later, behind lower seq_ids. Results are protobuf `ForwardBackwardOutput`s
with metric keys `name:reduction` (always `loss:sum`), which the SDK needs to combine chunks.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from framework import types
from framework.losses import LOSSES
from service import wire
from service.api_types import ForwardBackwardJsonRequest, OptimStepRequest, UntypedAPIFuture
from service.auth import Owner
from service.errors import BadRequest, UnsupportedMediaType
from service.futures import Entry, Payload
from service.routes.common import State, json_body, json_payload, parse_ordered, queued, skip_numbered
from service.state import ServerState

router = APIRouter(prefix="/api/v1")

PROTOBUF = "application/x-protobuf"


async def _decode(request: Request, state: ServerState, owner: str) -> wire.ForwardBackwardCall:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if content_type == PROTOBUF:
        try:  # decoding a large batch takes a while: off the event loop
            return await asyncio.get_running_loop().run_in_executor(state.bridge.pool, wire.decode_forward_backward,
                                                                    body)
        except BadRequest as error:
            if error.numbered is not None:
                skip_numbered(state, owner, *error.numbered)
            raise
    if content_type in ("application/json", ""):
        req = await parse_ordered(request, ForwardBackwardJsonRequest, state, owner)
        fb = req.forward_backward_input
        return wire.ForwardBackwardCall(model_id=req.model_id, seq_id=req.seq_id, forward_only=req.type == "forward",
                                        loss_fn=fb.loss_fn, loss_fn_config=fb.loss_fn_config, data=fb.data)
    raise UnsupportedMediaType(f"Content-Type {content_type!r}: send {PROTOBUF} (or application/json)")


@router.post("/forward_backward", openapi_extra=json_body(
    ForwardBackwardJsonRequest, **{PROTOBUF: {"schema": {"type": "string", "format": "binary"}}}))
async def forward_backward(request: Request, owner: Owner, state: State) -> UntypedAPIFuture:
    call = await _decode(request, state, owner)
    model = state.model(owner, call.model_id)
    with state.numbered(model, call.seq_id):
        if call.loss_fn not in LOSSES:
            raise BadRequest(f"loss_fn: {call.loss_fn!r} is not implemented here; the losses are "
                             f"{', '.join(sorted(LOSSES))} (and forward_backward_custom, run client-side)")
        if not call.data:
            raise BadRequest("data: empty; forward_backward needs at least one Datum")
        await state.ensure_trainer(model)
        await state.bridge.blocking(state.bridge.check_forward, model.id, call.data, call.loss_fn,
                                    call.loss_fn_config)
    kind = "forward" if call.forward_only else "forward_backward"

    async def start(entry: Entry) -> None:
        api = state.bridge.forward(model.id, call.data, call.loss_fn, call.loss_fn_config,
                                   backward=not call.forward_only)

        async def work() -> Payload:
            out = await state.bridge.result(api)
            body = await state.bridge.blocking(wire.encode_forward_backward_output, out)
            return Payload("proto", body, kind="forward_backward")

        state.futures.run(entry, work)

    return queued(state.enqueue(owner, kind, model, call.seq_id, start), model_id=model.id)


@router.post("/optim_step", openapi_extra=json_body(OptimStepRequest))
async def optim_step(request: Request, owner: Owner, state: State) -> UntypedAPIFuture:
    req = await parse_ordered(request, OptimStepRequest, state, owner)
    model = state.model(owner, req.model_id)
    with state.numbered(model, req.seq_id):
        if req.optimizer_params is not None:
            raise BadRequest("optimizer_params: only AdamW is supported here; send adam_params")
        if req.adam_params is not None and req.optim_params is not None:
            raise BadRequest("adam_params: send adam_params or optim_params, not both")
    adam = req.adam_params or req.optim_params or types.AdamParams()

    async def start(entry: Entry) -> None:
        api = state.bridge.optim_step(model.id, adam)

        async def work() -> Payload:
            out = await state.bridge.result(api)
            return Payload("json", json_payload(out))

        state.futures.run(entry, work)

    return queued(state.enqueue(owner, "optim_step", model, req.seq_id, start), model_id=model.id)
