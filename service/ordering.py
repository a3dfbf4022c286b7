"""Per-model execution order by `seq_id`.

The SDK numbers every training request of a model (forward/backward chunks, optim_step, saves,
loads) with a strictly increasing `seq_id` and expects them to run in that order, but sends them
over separate connections: the chunks of one `forward_backward` arrive in any order (the first
one deliberately last). So each model has a queue: a request is *started* (handed to the engine,
whose scheduler keeps per-adapter FIFO order from there) only when every lower `seq_id` has been.

- A request without `seq_id` (a client that does not number) goes after everything accepted.
- A `seq_id` that was already started is refused (the caller first answers exact retries with the
  original future, so this is a client bug).
- A gap that never fills (a client died between two sends) would block the model forever: after
  `gap_timeout_s` the requests waiting behind it fail with a message naming the missing seq_id,
  and the queue moves past them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from service.errors import BadRequest

log = logging.getLogger(__name__)

Start = Callable[[], Awaitable[None]]
Expire = Callable[[str], None]


@dataclasses.dataclass
class _Held:
    start: Start
    expire: Expire
    arrived: float


@dataclasses.dataclass
class _Queue:
    next_seq: int
    top: int
    held: dict[int, _Held] = dataclasses.field(default_factory=dict)
    drain: asyncio.Task | None = None


class SeqQueues:
    def __init__(self, *, gap_timeout_s: float, first_seq: Callable[[str], int]):
        """`first_seq(key)`: the seq_id a model's queue expects first (1 for a new model; after a
        restart, one past the highest the store has seen)."""
        self.gap_timeout_s = gap_timeout_s
        self._first_seq = first_seq
        self._queues: dict[str, _Queue] = {}

    def _queue(self, key: str) -> _Queue:
        queue = self._queues.get(key)
        if queue is None:
            first = self._first_seq(key)
            queue = self._queues[key] = _Queue(next_seq=first, top=first - 1)
        return queue

    def assign(self, key: str, seq_id: int | None) -> int:
        """The seq_id a new request will run at; refuses one that already ran or is waiting."""
        queue = self._queue(key)
        if seq_id is None:
            return queue.top + 1
        if seq_id < queue.next_seq or seq_id in queue.held:
            raise BadRequest(f"seq_id: {seq_id} was already used for model {key} (the next expected is "
                             f"{queue.next_seq}); seq_ids must strictly increase")
        return seq_id

    def submit(self, key: str, seq_id: int, start: Start, expire: Expire) -> None:
        """Start `start()` once every lower seq_id of `key` has started (call `assign` first)."""
        queue = self._queue(key)
        queue.held[seq_id] = _Held(start, expire, time.monotonic())
        queue.top = max(queue.top, seq_id)
        if queue.drain is None and queue.next_seq in queue.held:
            queue.drain = asyncio.create_task(self._drain(key, queue), name=f"seq-{key}")

    async def _drain(self, key: str, queue: _Queue) -> None:
        try:
            while queue.next_seq in queue.held:
                held = queue.held.pop(queue.next_seq)
                queue.next_seq += 1
                try:
                    await held.start()
                except Exception:  # a start reports its own failure on its future; never stop the queue
                    log.exception("starting request %d of %s failed", queue.next_seq - 1, key)
        finally:
            queue.drain = None
        if queue.next_seq in queue.held:  # arrived while the last start was finishing
            queue.drain = asyncio.create_task(self._drain(key, queue), name=f"seq-{key}")

    def waiting(self) -> int:
        """Requests held back behind a missing seq_id."""
        return sum(len(q.held) for q in self._queues.values() if q.next_seq not in q.held)

    def expire(self) -> int:
        """Fail requests that waited longer than `gap_timeout_s` for a missing seq_id; returns how many."""
        now, failed = time.monotonic(), 0
        for key, queue in self._queues.items():
            if not queue.held or queue.next_seq in queue.held or queue.drain is not None:
                continue
            oldest = min(h.arrived for h in queue.held.values())
            if now - oldest < self.gap_timeout_s:
                continue
            missing = queue.next_seq
            for seq_id, held in sorted(queue.held.items()):
                held.expire(f"seq_id {seq_id} of model {key} waited {self.gap_timeout_s:.0f}s for seq_id {missing}, "
                            "which never arrived; the requests behind the gap were dropped")
                failed += 1
            queue.next_seq = max(queue.held) + 1
            queue.held.clear()
        return failed

    def forget(self, key: str) -> None:
        queue = self._queues.pop(key, None)
        if queue is not None:
            for held in queue.held.values():
                held.expire(f"model {key} was released before this request could run")
