"""The scheduler: one worker thread that owns the engine and batches requests from every client.

Rules (written down because correctness depends on them):
1. Requests of one adapter run in submission order. A request may be batched with earlier-queued
   requests of *other* adapters, but never jumps over an earlier pending request of its own adapter:
   an `optim_step` or a weight load is a barrier for its adapter only.
2. Requests whose `batch_key` is equal (e.g. `("forward_backward", "ppo")`) and that are all at the
   head of their adapter's queue run as one engine call; everything else runs alone.
3. Sampling and logprob requests read immutable snapshots, so they carry no adapter and never wait
   for training.
4. If a batched call fails, each request is retried alone, so one tenant's bad request cannot fail
   another tenant's work. Failures are delivered on the request's own future.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Any

logger = logging.getLogger(__name__)

BatchFn = Callable[[Sequence[Any]], Sequence[Any]]
"""Runs a batch of payloads on the engine and returns one result per payload."""


@dataclasses.dataclass
class _Request:
    adapter_id: str | None
    batch_key: Hashable | None
    run: BatchFn
    payload: Any
    future: Future
    rows: int


class Scheduler:
    """FIFO-per-adapter batching over a single worker thread."""

    def __init__(self, *, max_batch_rows: int = 64, name: str = "engine"):
        self.max_batch_rows = max_batch_rows
        self._pending: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches_run = 0
        self._thread = threading.Thread(target=self._loop, name=f"{name}-scheduler", daemon=True)
        self._thread.start()

    def submit(self, run: BatchFn, payload: Any, *, adapter_id: str | None = None,
               batch_key: Hashable | None = None, rows: int = 1) -> Future:
        """Queue `payload` for `run`. Requests with equal `batch_key` may run as one `run` call (the first
        request's), so a key must imply the function: e.g. `("forward_backward", loss_name)`."""
        request = _Request(adapter_id, batch_key, run, payload, Future(), rows)
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is shut down")
            self._pending.append(request)
            self._cond.notify()
        return request.future

    @property
    def queued(self) -> int:
        """Requests waiting for the worker (not counting the batch it is running)."""
        return len(self._pending)

    def call(self, fn: Callable[[], Any], *, adapter_id: str | None = None) -> Future:
        """Run `fn()` alone on the worker, in order with the adapter's other requests."""
        return self.submit(lambda payloads: [payloads[0]()], fn, adapter_id=adapter_id)

    def shutdown(self, wait: bool = True) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if wait:
            self._thread.join()

    def _next_batch(self) -> list[_Request]:
        head = self._pending[0]
        batch = [head]
        if head.batch_key is not None:
            blocked: set[str | None] = set()
            rows = head.rows
            for r in list(self._pending)[1:]:
                fits = rows + r.rows <= self.max_batch_rows
                if r.batch_key == head.batch_key and r.adapter_id not in blocked and fits:
                    batch.append(r)
                    rows += r.rows
                elif r.adapter_id is not None:
                    blocked.add(r.adapter_id)
        for r in batch:
            self._pending.remove(r)
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = self._next_batch()
            self._run(batch)
            self.batches_run += 1

    @staticmethod
    def _run(batch: list[_Request]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = batch[0].run([r.payload for r in live])
        except Exception as error:
            if len(live) == 1:
                live[0].future.set_exception(error)
                return
            logger.warning("batch of %d failed (%s); retrying each request alone", len(live), error)
            for r in live:
                try:
                    r.future.set_result(r.run([r.payload])[0])
                except Exception as single_error:
                    r.future.set_exception(single_error)
            return
        for r, result in zip(live, results, strict=True):
            r.future.set_result(result)
