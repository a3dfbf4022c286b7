"""ASGI middleware around every request: a request id, one structured log line, metrics, the body
size limit and zstd request bodies.

- `X-Request-ID`: taken from the request when the client sends one, else made up; echoed in the
  response and in the log line, so a user's report can be matched to the server's log.
- The body is read here, up to `max_body` bytes (413 beyond, before anything is parsed); a body with
  `Content-Encoding: zstd` (the SDK's `proto_compress_fwdbwd`) is decompressed here with the same
  limit on its decompressed size, so a small bomb cannot expand without bound.
- The log line is JSON: time, request id, method, path, route template, status, milliseconds, owner.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import zstandard

from service.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("service.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                               "logger": record.name, "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s %(fields)s", defaults={"fields": ""}))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("jax._src.xla_bridge", "absl", "orbax", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def _reply(send: Send, status: int, detail: str, request_id: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-request-id", request_id.encode())]})
    await send({"type": "http.response.body", "body": body})


def _decompress(body: bytes, limit: int) -> bytes | None:
    """The zstd frame(s) in `body`, or None when the result would exceed `limit` bytes."""
    reader = zstandard.ZstdDecompressor().stream_reader(body)
    out, size = [], 0
    while True:
        chunk = reader.read(1 << 20)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            return None
        out.append(chunk)
    return b"".join(out)


class RequestMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body: int):
        self.app = app
        self.metrics = metrics
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id", "")[:64] or uuid.uuid4().hex[:16]
        status_box = [500]

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            body = await self._read_body(headers, receive, send_wrapped, request_id)
            if body is not None:
                scope = self._with_body_headers(scope, body, headers)
                await self.app(scope, self._replay(body, receive), send_wrapped)
        finally:
            self._record(scope, headers, status_box[0], time.perf_counter() - t0, request_id)

    async def _read_body(self, headers: dict[str, str], receive: Receive, send: Send, request_id: str
                         ) -> bytes | None:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _reply(send, 413, f"request body of {declared} bytes exceeds the limit of {self.max_body}",
                         request_id)
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _reply(send, 413, f"request body exceeds the limit of {self.max_body} bytes", request_id)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        encoding = headers.get("content-encoding", "").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding != "zstd":
            await _reply(send, 415, f"Content-Encoding {encoding!r} is not supported (send zstd or none)", request_id)
            return None
        try:
            decoded = _decompress(body, self.max_body)
        except zstandard.ZstdError as error:
            await _reply(send, 400, f"body: invalid zstd data ({error})", request_id)
            return None
        if decoded is None:
            await _reply(send, 413, f"decompressed request body exceeds the limit of {self.max_body} bytes",
                         request_id)
            return None
        return decoded

    @staticmethod
    def _with_body_headers(scope: Scope, body: bytes, headers: dict[str, str]) -> Scope:
        if "content-encoding" not in headers:
            return scope
        kept = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-encoding", b"content-length")]
        return {**scope, "headers": [*kept, (b"content-length", str(len(body)).encode())]}

    @staticmethod
    def _replay(body: bytes, receive: Receive) -> Receive:
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    def _record(self, scope: Scope, headers: dict[str, str], status: int, seconds: float, request_id: str) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope.get("method", "")
        self.metrics.requests.labels(method, route, str(status)).inc()
        self.metrics.request_seconds.labels(route).observe(seconds)
        if route in ("/api/v1/healthz", "/api/v1/metrics"):
            return
        state = scope.get("state") or {}
        fields = {"request_id": request_id, "method": method, "path": scope.get("path"), "route": route,
                  "status": status, "ms": round(seconds * 1000, 2), "owner": state.get("owner"),
                  "sdk": headers.get("x-stainless-package-version")}
        access_log.log(logging.WARNING if status >= 500 else logging.INFO, "request", extra={"fields": fields})
