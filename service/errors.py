"""Errors the API answers with, and the handlers that turn them into JSON.

Every refusal is a 4xx with a JSON body `{"detail": "<what is wrong, naming the field>"}`; request
validation errors add `"errors"` (pydantic's list). Status codes are chosen with the SDK's retry
rules in mind: it retries 408, 409, 429 and every 5xx for minutes, so bad input is never answered
with those. 400 (bad input), 401 (no or bad key), 404 (not found, or not yours), 410 (a finished
session), 413 (too large) and 415 (wrong content type) all make the SDK raise at once.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A refusal with an HTTP status and a message for the user."""

    status = 400

    def __init__(self, message: str, *, status: int | None = None, errors: list[Any] | None = None):
        super().__init__(message)
        self.message = message
        self.errors = errors
        self.numbered: tuple[str, int] | None = None  # (model_id, seq_id) of a refused numbered request
        if status is not None:
            self.status = status


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class NotFound(ApiError):
    status = 404


class Gone(ApiError):
    status = 410


class TooLarge(ApiError):
    status = 413


class UnsupportedMediaType(ApiError):
    status = 415


class Busy(ApiError):
    """Too much queued work: the SDK backs off and resubmits (sampling's backpressure)."""

    status = 429


def describe_validation(errors: list[dict[str, Any]], prefix: str = "") -> str:
    """One line per error: `<dotted field path>: <message>`, e.g. `lora_config.rank: Value error, ...`."""
    lines = []
    for error in errors[:10]:
        loc = [str(part) for part in error.get("loc", ()) if part not in ("body",)]
        field = ".".join([p for p in [prefix, *loc] if p]) or "body"
        lines.append(f"{field}: {error.get('msg', 'invalid')}")
    if len(errors) > 10:
        lines.append(f"... and {len(errors) - 10} more")
    return "; ".join(lines)


def from_validation_error(error: ValidationError, prefix: str = "") -> BadRequest:
    details = error.errors(include_url=False, include_context=False, include_input=False)
    return BadRequest(describe_validation(details, prefix), errors=_jsonable(details))


def _jsonable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")), "type": str(e.get("type"))}
            for e in errors[:50]]


def error_response(status: int, message: str, errors: list[Any] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"detail": message}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.errors)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        details = list(error.errors())
        return error_response(400, describe_validation(details), _jsonable(details))
