"""Helpers shared by the route modules: the server state dependency, the SDK version check, body
parsing that reports every problem as a 400 naming the field, and the answer to a queued request."""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

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


async def parse_json(request: Request, model: type[M]) -> M:
    """The JSON body as `model`; malformed JSON, a wrong shape or a bad value is a 400 naming the field."""
    raw = await request.body()
    try:
        data: Any = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"body: not valid JSON ({error})") from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise from_validation_error(error) from None
    except (ValueError, TypeError, OverflowError) as error:
        raise BadRequest(f"body: {error}") from None


def queued(entry: Entry, *, model_id: str | None = None, sample_sequence_ids: list[str] | None = None
           ) -> UntypedAPIFuture:
    return UntypedAPIFuture(request_id=entry.id, model_id=model_id, sample_sequence_ids=sample_sequence_ids)


def json_payload(value: BaseModel | dict[str, Any]) -> bytes:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    return json.dumps(value).encode()
