"""Futures: one per long request, retrieved by long-polling.

Every training or sampling request gets a `request_id` at once and a row in the store (`pending`).
Its work runs as an asyncio task; when it ends the result (protobuf bytes for forward/backward and
sampling, JSON for the rest) or the error goes to the row and wakes the pollers. `wait` holds a
`retrieve_future` poll until the future is done or `hold_s` passes: the SDK re-polls a `try_again`
at once, so answering immediately would spin it.

Memory: pending futures and recently finished ones (their payloads, for the poll that comes right
after) live here; `evict` drops finished ones older than `keep_s`, after which a retrieve reads the
row from the store. `service.maintenance` purges old rows. Nothing here grows with requests served.

Sampling futures also feed `/retrieve_futures`: each finished sample is appended to its sampling
session's completion log (per clone id, `seq_id // 1e9`), which a poller reads by cursor and trims
by acknowledgement.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from service import store as st

log = logging.getLogger(__name__)

CLONE_BLOCK = 1_000_000_000  # the SDK numbers a cloned sampler's requests from clone_id * 1e9
MAX_LOGGED = 4096  # completions kept per sampling session clone until a poller acknowledges them


class RequestFailed(Exception):
    """A request's work failed; `category` is "user" (bad input found late) or "server"."""

    def __init__(self, message: str, category: str = "user"):
        super().__init__(message)
        self.message, self.category = message, category


@dataclasses.dataclass
class Payload:
    format: str  # "json" | "proto"
    body: bytes
    kind: str = ""  # what the proto holds ("forward_backward" | "sample"), for JSON re-encoding


@dataclasses.dataclass
class Entry:
    id: str
    owner: str
    kind: str
    sampler_id: str | None
    seq_id: int | None
    created: float
    event: asyncio.Event
    status: str = "pending"
    payload: Payload | None = None
    error: str | None = None
    category: str | None = None
    finished: float | None = None
    task: asyncio.Task | None = None
    cancel: Callable[[], bool] | None = None


@dataclasses.dataclass
class _Log:
    """Completions of one sampling session clone, by cursor."""

    cursor: int = 0
    events: list[tuple[int, dict[str, Any]]] = dataclasses.field(default_factory=list)
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class FutureRegistry:
    def __init__(self, store: st.Store, *, hold_s: float, keep_s: float = 300.0,
                 on_done: Callable[[Entry], None] | None = None):
        self.store = store
        self.hold_s = hold_s
        self.keep_s = keep_s
        self.on_done = on_done
        self._entries: dict[str, Entry] = {}
        self._logs: dict[tuple[str, int], _Log] = {}

    @property
    def pending(self) -> int:
        return sum(1 for e in self._entries.values() if e.status == "pending")

    def pending_of_kind(self, kind: str) -> int:
        return sum(1 for e in self._entries.values() if e.status == "pending" and e.kind == kind)

    # ---------------------------------------------------------------------------------- create
    def create(self, owner: str, kind: str, *, model_id: str | None = None, sampler_id: str | None = None,
               seq_id: int | None = None) -> Entry:
        fid = f"req-{uuid.uuid4().hex}"
        self.store.add(st.FutureRow(id=fid, owner=owner, kind=kind, model_id=model_id, sampler_id=sampler_id,
                                    seq_id=seq_id, status="pending", created_at=st.utcnow()))
        entry = Entry(fid, owner, kind, sampler_id, seq_id, time.monotonic(), asyncio.Event())
        self._entries[fid] = entry
        return entry

    def run(self, entry: Entry, work: Callable[[], Awaitable[Payload]]) -> None:
        """Run `work()` as the future's task; its payload or exception finishes the future."""
        entry.task = asyncio.create_task(self._run(entry, work), name=f"future-{entry.id}")

    async def _run(self, entry: Entry, work: Callable[[], Awaitable[Payload]]) -> None:
        try:
            payload = await work()
        except RequestFailed as error:
            self.fail(entry, error.message, error.category)
        except asyncio.CancelledError:
            self.fail(entry, "cancelled", "user")
        except Exception as error:  # a bug or an engine failure: reported, never swallowed
            log.exception("request %s (%s) failed", entry.id, entry.kind)
            self.fail(entry, f"{type(error).__name__}: {error}", "server")
        else:
            self.succeed(entry, payload)

    # ---------------------------------------------------------------------------------- finish
    def succeed(self, entry: Entry, payload: Payload) -> None:
        if entry.status != "pending":
            return
        entry.status, entry.payload, entry.finished = "done", payload, time.monotonic()
        self.store.finish_future(entry.id, status="done", result_format=payload.format, result=payload.body)
        self._finished(entry)

    def fail(self, entry: Entry, message: str, category: str = "user") -> None:
        if entry.status != "pending":
            return
        entry.status, entry.error, entry.category, entry.finished = "failed", message, category, time.monotonic()
        self.store.finish_future(entry.id, status="failed", error=message, category=category)
        self._finished(entry)

    def _finished(self, entry: Entry) -> None:
        entry.event.set()
        if entry.sampler_id is not None and entry.seq_id is not None:
            self._append_completion(entry)
        if self.on_done is not None:
            self.on_done(entry)

    def cancel(self, entry: Entry) -> bool:
        """Cancel a request whose work has not started; True when it was cancelled."""
        if entry.status != "pending" or entry.cancel is None or not entry.cancel():
            return False
        self.fail(entry, "cancelled by the client", "user")
        return True

    # -------------------------------------------------------------------------------- retrieve
    def get(self, fid: str, owner: str) -> Entry | None:
        """The future if `owner` made it (from memory, else from the store), else None."""
        entry = self._entries.get(fid)
        if entry is not None:
            return entry if entry.owner == owner else None
        row = self.store.get(st.FutureRow, fid)
        if row is None or row.owner != owner:
            return None
        entry = Entry(row.id, row.owner, row.kind, row.sampler_id, row.seq_id, time.monotonic(), asyncio.Event(),
                      status=row.status, error=row.error, category=row.error_category, finished=time.monotonic())
        if row.status == "done":
            entry.payload = Payload(row.result_format or "json", row.result or b"", kind=row.kind)
        entry.event.set()
        return entry

    async def wait(self, entry: Entry, hold_s: float | None = None) -> bool:
        """Wait until `entry` is done (True) or `hold_s` passes (False)."""
        if entry.status != "pending":
            return True
        try:
            await asyncio.wait_for(entry.event.wait(), self.hold_s if hold_s is None else hold_s)
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------------- retrieve_futures
    def _append_completion(self, entry: Entry) -> None:
        assert entry.sampler_id is not None and entry.seq_id is not None
        clog = self._logs.setdefault((entry.sampler_id, entry.seq_id // CLONE_BLOCK), _Log())
        clog.cursor += 1
        if entry.status == "done":
            size = len(entry.payload.body) if entry.payload else 0
            event = {"state": "finished", "request_id": entry.id, "response_payload_uncompressed_size": size}
        else:
            event = {"state": "failed", "request_id": entry.id}
        clog.events.append((clog.cursor, event))
        del clog.events[:-MAX_LOGGED]  # a session nobody polls keeps only its latest completions
        clog.changed.set()

    async def completions(self, sampler_id: str, clone: int, prev_cursor: int, timeout: float
                          ) -> tuple[list[dict[str, Any]], int]:
        """Completions after `prev_cursor` (those at or before it are acknowledged and dropped),
        waiting up to `timeout` for one; returns them and the new cursor."""
        clog = self._logs.setdefault((sampler_id, clone), _Log())
        clog.events = [(c, e) for c, e in clog.events if c > prev_cursor]
        if not clog.events and timeout > 0:
            clog.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(clog.changed.wait(), timeout)
        fresh = [e for c, e in clog.events if c > prev_cursor]
        return fresh, max(clog.cursor, prev_cursor)

    def forget_sampler(self, sampler_id: str) -> None:
        for key in [k for k in self._logs if k[0] == sampler_id]:
            del self._logs[key]

    # ------------------------------------------------------------------------------ housekeeping
    def evict(self) -> int:
        """Drop finished futures older than `keep_s` from memory (the store still has them)."""
        cutoff = time.monotonic() - self.keep_s
        old = [fid for fid, e in self._entries.items() if e.finished is not None and e.finished < cutoff]
        for fid in old:
            del self._entries[fid]
        return len(old)

    def fail_all_pending(self, message: str) -> None:
        for entry in list(self._entries.values()):
            if entry.status == "pending":
                if entry.task is not None:
                    entry.task.cancel()
                self.fail(entry, message, "server")
