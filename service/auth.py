"""API keys: who is calling.

The SDK sends its key in `X-API-Key` (we also accept `Authorization: Bearer <key>`). A key maps to
its owner name (`python -m service keys create --name NAME`); everything a caller creates is
recorded under that owner, and every lookup filters by it, so another owner's model, future or
checkpoint reads as 404 (not 403: its existence is not revealed), except checkpoints published by
their owner, which anyone may read and load.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import Unauthorized


def key_from_headers(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return None


async def authenticate(request: Request) -> str:
    """The caller's owner name, or 401."""
    key = key_from_headers(request)
    if not key:
        raise Unauthorized("missing API key: send it in the X-API-Key header "
                           "(create one with `python -m service keys create --name NAME`)")
    owner = request.app.state.store.owner_of_key(key)
    if owner is None:
        raise Unauthorized("invalid or revoked API key")
    request.state.owner = owner
    return owner


Owner = Annotated[str, Depends(authenticate)]
