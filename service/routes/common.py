"""Helpers shared by the route modules: the server state dependency, the SDK version check, body
parsing that reports every problem as a 400 naming the field, and the answer to a queued request."""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from service import store as st
from service.api_types import UntypedAPIFuture
from service.config import WIRE_SDK
from service.errors import BadRequest, from_validation_error
from service.futures import Entry
from service.state import ServerState

M = TypeVar("M", bound=BaseModel)


def get_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]


def check_sdk_version(version: str) -> None:
    """Refuse an SDK whose wire we do not speak (any 0.38.x is fine; no version sent is fine)."""
    if not version:
        return
    parts = version.split(".")
    if ".".join(parts[:2]) != WIRE_SDK:
        raise BadRequest(f"sdk_version: tinker SDK {version} is not supported; this server speaks the wire of "
                         f"tinker {WIRE_SDK}.x. Install it with: pip install 'tinker=={WIRE_SDK}.*'")


OPENAPI_MODELS: list[type[BaseModel]] = []
"""Body models of routes that parse their body themselves; `service.app` adds them to the OpenAPI schema."""


def json_body(model: type[BaseModel], **other_content: Any) -> dict[str, Any]:
    """`openapi_extra` declaring a JSON body of `model` (for a route that parses its body itself)."""
    OPENAPI_MODELS.append(model)
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}, **other_content}
    return {"requestBody": {"required": True, "content": content}}


async def read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"body: not valid JSON ({error})") from None


def validate(model: type[M], data: Any) -> M:
    """`data` as `model`; a wrong shape or a bad value is a 400 naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise from_validation_error(error) from None
    except (ValueError, TypeError, OverflowError) as error:
        raise BadRequest(f"body: {error}") from None


async def parse_json(request: Request, model: type[M]) -> M:
    return validate(model, await read_json(request))


async def parse_ordered(request: Request, model: type[M], state: ServerState, owner: str) -> M:
    """Like `parse_json`, for a request numbered by seq_id: when it is refused but names a model of the
    caller's and a seq_id, that seq_id is marked used (see `ServerState.numbered`)."""
    data = await read_json(request)
    try:
        return validate(model, data)
    except BadRequest:
        if isinstance(data, dict):
            skip_numbered(state, owner, data.get("model_id"), data.get("seq_id"))
        raise


def skip_numbered(state: ServerState, owner: str, model_id: Any, seq_id: Any) -> None:
    if isinstance(model_id, str) and isinstance(seq_id, int) and not isinstance(seq_id, bool) and 0 < seq_id < 2**62:
        row = state.store.get(st.ModelRow, model_id[:160])
        if row is not None and row.owner == owner:
            state.skip(row.id, seq_id)


def queued(entry: Entry, *, model_id: str | None = None, sample_sequence_ids: list[str] | None = None
           ) -> UntypedAPIFuture:
    return UntypedAPIFuture(request_id=entry.id, model_id=model_id, sample_sequence_ids=sample_sequence_ids)


def json_payload(value: BaseModel | dict[str, Any]) -> bytes:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    return json.dumps(value).encode()
