"""The scheduler: one worker thread that owns the engine and batches requests from every client.

Rules (written down because correctness depends on them):
1. Requests of one adapter run in submission order. A request may be batched with earlier-queued
   requests of *other* adapters, but never jumps over an earlier pending request of its own adapter:
   an `optim_step` or a weight load is a barrier for its adapter only. A `priority` request (cheap,
   waited on: publishing a snapshot) goes ahead of other adapters' queued work, never of its own;
   `try_now` runs such a thing on the caller's thread at once when nothing of its adapter is queued
   or running.
2. Requests whose `batch_key` is equal (e.g. `("forward_backward", "ppo")`) and that are all at the
   head of their adapter's queue run as one engine call (an idle worker woken by such a request
   waits for the rest of its burst: until none has come for `batch_window_s`, or every adapter active in
   the last `ACTIVE_TENANT_S` with that key, or new, has a request queued; it does not wait when no
   other such adapter is active, nor for a request that fills a batch alone: a lone tenant never pays
   the window; adapter-less requests, e.g. scoring, wait as before), up to `max_batch_rows` rows,
   `max_batch_tokens` tokens (a request that alone fills a batch runs alone: co-batching it would
   cost more than it saves) and `max_batch_adapters` adapters (what the device holds at once);
   everything else runs alone. A batch fills with requests of adapters already on the device
   (`resident`) first, so that fewer page in and out when more adapters wait than a batch holds; the
   oldest request always runs, and one passed over `MAX_PASSED_OVER` times counts as resident, so the
   preference delays nobody by more than a few batches.
3. Sampling goes to the engine's decode loop (`background`), which the worker steps between
   training batches: one chunk of decoding, then one batch, and so on. Snapshots are immutable, so
   sampling never waits for training and training waits at most one chunk for sampling.
4. The worker cannot die. Every exception reaches the futures of the requests it concerns; if a
   batched call fails, each request is retried alone, so one tenant's bad request cannot fail
   another tenant's work.
5. `shutdown` resolves every pending future (with an error), sampling included; a request
   cancelled before it runs is skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

logger = logging.getLogger(__name__)

BURST_WINDOWS = 20
"""The longest an idle worker waits for a burst of requests to end, in batch windows."""

ACTIVE_TENANT_S = 60.0
"""An adapter that submitted anything this recently counts as active: a burst is awaited only while an
active adapter has nothing queued yet (it may be about to submit its part)."""

MAX_PASSED_OVER = 2
"""A request that later requests have joined batches ahead of this many times is offered to a batch as
early as those of resident adapters (in queue order among them)."""

BatchFn = Callable[[Sequence[Any]], Sequence[Any]]
"""Runs a batch of payloads on the engine and returns one result per payload."""


class Background(Protocol):
    """Work the worker interleaves with queued requests (the engine's decode loop)."""

    def has_work(self) -> bool: ...

    def step(self) -> None: ...

    def fail_all(self, error: BaseException) -> None: ...


class SchedulerClosed(RuntimeError):
    """The engine's scheduler is shut down; nothing more runs."""


@dataclasses.dataclass
class _Request:
    adapter_id: str | None
    batch_key: Hashable | None
    run: BatchFn
    payload: Any
    future: Future
    rows: int
    tokens: int
    ready: Future | None = None  # runs only once this is done (e.g. a checkpoint read on the I/O pool)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    passed_over: int = 0  # batches of its kind that later requests joined ahead of it


class Scheduler:
    """FIFO-per-adapter batching over a single worker thread, interleaved with background work."""

    def __init__(self, *, max_batch_rows: int = 64, max_batch_tokens: int | None = None,
                 max_batch_adapters: int | None = None, batch_window_s: float = 0.0, name: str = "engine",
                 background: Background | None = None, resident: Callable[[str], bool] | None = None):
        """`resident(adapter_id)`: whether the adapter is on the device now (asked on the worker thread, which
        owns residency); batches fill with such adapters first."""
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_adapters = max_batch_adapters
        self.batch_window_s = batch_window_s
        self._background = background
        self._resident = resident
        self._pending: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running: set[str | None] = set()  # adapters of the batch the worker is running
        self.batches_run = 0
        self.requests_run = 0
        self.errors = 0
        self.queue_wait_seconds = 0.0
        self.burst_waits = 0  # times an idle worker waited for the rest of a burst
        self._last_seen: dict[str, dict[Hashable, float]] = {}  # adapter -> batch key -> when it last submitted one
        # adapter -> when it first submitted anything, or None once it has submitted a batchable request
        self._first_seen: dict[str, float | None] = {}
        self._seen_after_prune = 64
        self._thread = threading.Thread(target=self._loop, name=f"{name}-scheduler", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the worker (not counting the batch it is running)."""
        with self._cond:
            return len(self._pending)

    queued = queue_depth

    def stats(self) -> dict[str, float]:
        """Queue depth, batches and requests run, errors delivered, and the mean wait in the queue."""
        return {"queue_depth": self.queue_depth, "batches": self.batches_run, "requests": self.requests_run,
                "errors": self.errors, "queue_wait_seconds_mean": self.queue_wait_seconds / max(self.requests_run, 1),
                "burst_waits": self.burst_waits}

    def submit(self, run: BatchFn, payload: Any, *, adapter_id: str | None = None,
               batch_key: Hashable | None = None, rows: int = 1, tokens: int = 0, ready: Future | None = None,
               priority: bool = False) -> Future:
        """Queue `payload` for `run`. Requests with equal `batch_key` may run as one `run` call (the first
        request's), so a key must imply the function: e.g. `("forward_backward", loss_name)`. With
        `ready`, the request (and its adapter's later ones) waits until that future is done, without
        holding up anyone else: disk reads happen off the worker, in the adapter's order. A `priority`
        request (something cheap that a client waits on, e.g. publishing a snapshot) goes ahead of
        other adapters' queued work, never ahead of its own adapter's."""
        request = _Request(adapter_id, batch_key, run, payload, Future(), rows, tokens, ready)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the engine's scheduler is shut down")
            if adapter_id is not None and self.batch_window_s:
                self._first_seen.setdefault(adapter_id, request.submitted)
                if batch_key is not None:
                    self._last_seen.setdefault(adapter_id, {})[batch_key] = request.submitted
                    self._first_seen[adapter_id] = None
                if len(self._last_seen) > 2 * self._seen_after_prune:
                    self._forget_quiet()
            if priority:
                own = [i for i, r in enumerate(self._pending) if r.adapter_id == adapter_id]
                self._pending.insert(own[-1] + 1 if own else 0, request)
            else:
                self._pending.append(request)
            self._cond.notify()
        if ready is not None:
            ready.add_done_callback(lambda _: self._notify())
        return request.future

    def call(self, fn: Callable[[], Any], *, adapter_id: str | None = None, ready: Future | None = None,
             priority: bool = False) -> Future:
        """Run `fn()` alone on the worker, in order with the adapter's other requests."""
        return self.submit(lambda payloads: [payloads[0]()], fn, adapter_id=adapter_id, ready=ready,
                           priority=priority)

    def try_now(self, fn: Callable[[], Any], *, adapter_id: str) -> tuple[bool, Any]:
        """Run `fn()` on the calling thread, at once, if no request of `adapter_id` is queued or running:
        `(True, fn())`; else `(False, None)` (then queue it with `call`). The queue's lock is held while `fn`
        runs, so nothing of the adapter starts meanwhile: `fn` must be quick (publishing a snapshot of a
        resident adapter). What the worker runs for other adapters goes on beside it."""
        with self._cond:
            if self._closed or adapter_id in self._running or any(r.adapter_id == adapter_id for r in self._pending):
                return False, None
            return True, fn()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify()

    def wake(self) -> None:
        """Tell the worker that background work arrived (after `engine.submit_sample`)."""
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the engine's scheduler is shut down")
            self._cond.notify()

    def shutdown(self, wait: bool = True) -> None:
        """Stop the worker; every request not yet run fails with `SchedulerClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    # ------------------------------------------------------------------------------------ worker
    def _next_batch(self) -> list[_Request]:
        """The first runnable request and what may run with it; [] if every queued request waits on a
        `ready` future (or on an earlier request of its adapter that does)."""
        blocked: set[str | None] = set()
        pending = list(self._pending)
        head_index = None
        for i, r in enumerate(pending):
            if r.adapter_id is not None and r.adapter_id in blocked:
                continue
            if r.ready is not None and not r.ready.done():
                if r.adapter_id is not None:
                    blocked.add(r.adapter_id)
                continue
            head_index = i
            break
        if head_index is None:
            return []
        head = pending[head_index]
        batch = [head]
        if head.batch_key is not None:
            adapters = {head.adapter_id}
            rows, tokens = head.rows, head.tokens
            for r in self._fill_order(pending[head_index + 1:]):
                fits = rows + r.rows <= self.max_batch_rows and (
                    self.max_batch_tokens is None or tokens + r.tokens <= self.max_batch_tokens) and (
                    self.max_batch_adapters is None or r.adapter_id in adapters
                    or len(adapters) < self.max_batch_adapters)
                ready = r.ready is None or r.ready.done()
                if r.batch_key == head.batch_key and r.adapter_id not in blocked and fits and ready:
                    batch.append(r)
                    adapters.add(r.adapter_id)
                    rows += r.rows
                    tokens += r.tokens
                elif r.adapter_id is not None:
                    blocked.add(r.adapter_id)
            order = {id(r): i for i, r in enumerate(pending)}
            batch.sort(key=lambda r: order[id(r)])  # the engine sees them in queue order
            chosen = {id(r) for r in batch}
            for r in pending[head_index + 1: order[id(batch[-1])]]:
                if r.batch_key == head.batch_key and id(r) not in chosen:
                    r.passed_over += 1
        for r in batch:
            self._pending.remove(r)
        return batch

    def _fill_order(self, queued: list[_Request]) -> list[_Request]:
        """The order in which queued requests are offered to a batch: requests of resident adapters and
        requests passed over `MAX_PASSED_OVER` times first. An adapter's requests keep their order (all
        that blocking by adapter relies on): once one of them is offered early, so are the later ones."""
        if self._resident is None or self.max_batch_adapters is None:
            return queued
        early: dict[str | None, bool] = {}
        for r in queued:
            if not early.get(r.adapter_id, False):
                early[r.adapter_id] = r.passed_over >= MAX_PASSED_OVER or self._is_resident(r.adapter_id)
        return sorted(queued, key=lambda r: not early[r.adapter_id])  # stable

    def _is_resident(self, adapter_id: str | None) -> bool:
        if adapter_id is None or self._resident is None:
            return False
        try:
            return self._resident(adapter_id)
        except Exception:  # a preference only: never let it end the worker
            logger.exception("resident(%r) failed", adapter_id)
            return False

    def _worth_a_burst_wait(self, head: _Request) -> bool:
        """Whether others could join `head`'s batch: it is batchable, leaves room in a batch, and an
        active adapter has nothing queued yet (or it has no adapter). Called holding the lock."""
        if head.batch_key is None or not self.batch_window_s or head.rows >= self.max_batch_rows or (
                self.max_batch_tokens is not None and head.tokens >= self.max_batch_tokens):
            return False
        if head.adapter_id is None:  # adapter-less requests (scoring) batch with each other: always wait
            return True
        self._forget_quiet()
        return not self._burst_complete(head.batch_key)

    def _forget_quiet(self) -> None:
        """Drop the adapters that have not submitted for `ACTIVE_TENANT_S`. Called holding the lock."""
        now = time.perf_counter()
        for adapter, keys in list(self._last_seen.items()):
            for key in [k for k, t in keys.items() if now - t > ACTIVE_TENANT_S]:
                del keys[key]
            if not keys:
                del self._last_seen[adapter]
        self._seen_after_prune = max(64, len(self._last_seen))

    def forget(self, adapter_id: str) -> None:
        """`adapter_id` is gone (released): nobody waits for it any more."""
        with self._cond:
            self._last_seen.pop(adapter_id, None)
            self._first_seen.pop(adapter_id, None)

    def _burst_complete(self, batch_key: Hashable) -> bool:
        """Every adapter active with `batch_key` has a request queued: nobody is left to wait for. An adapter
        counts when it submitted a request of that key in the last `ACTIVE_TENANT_S`, or when it is new
        (first seen that recently, nothing batchable yet: about to show what it does); one that only
        samples, or trains with another loss, never holds up the batch. Called holding the lock."""
        queued = {r.adapter_id for r in self._pending}
        now = time.perf_counter()
        counted = {adapter for adapter, keys in self._last_seen.items() if batch_key in keys}
        counted |= {adapter for adapter, first in self._first_seen.items()
                    if first is not None and now - first <= ACTIVE_TENANT_S}
        return counted <= queued

    def _has_background(self) -> bool:
        if self._background is None:
            return False
        try:
            return self._background.has_work()
        except Exception:
            logger.exception("background.has_work failed")
            return False

    def _loop(self) -> None:
        idle = False
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        break
                    if idle and self._pending and self._worth_a_burst_wait(self._pending[0]):
                        # Woken from idle by a batchable request: give the rest of its burst (other tenants
                        # submitting at the same moment) time to arrive, so they share one step: wait until
                        # no request has come for `batch_window_s` (at most BURST_WINDOWS of them in all).
                        self.burst_waits += 1
                        key = self._pending[0].batch_key
                        start = time.perf_counter()
                        deadline, seen = start + self.batch_window_s, len(self._pending)
                        while not self._closed and (left := deadline - time.perf_counter()) > 0:
                            self._cond.wait(left)
                            if self._burst_complete(key):
                                break
                            if len(self._pending) != seen:
                                seen = len(self._pending)
                                deadline = min(time.perf_counter() + self.batch_window_s,
                                               start + BURST_WINDOWS * self.batch_window_s)
                    idle = False
                    batch = self._next_batch() if self._pending else []
                    self._running = {r.adapter_id for r in batch}
                    if batch or self._has_background():
                        break
                    idle = True
                    self._cond.wait()
                if self._closed:
                    break
            if batch:
                self._run_safely(batch)
                self.batches_run += 1
                with self._cond:
                    self._running = set()
            if self._has_background():
                try:
                    self._background.step()
                except Exception:  # the decode loop settles its own futures; never let it end the worker
                    self.errors += 1
                    logger.exception("background step failed")
        self._fail_pending()

    def _fail_pending(self) -> None:
        error = SchedulerClosed("the engine's scheduler was shut down before this request ran")
        with self._cond:
            pending, self._pending = list(self._pending), collections.deque()
        for r in pending:
            if r.future.set_running_or_notify_cancel():
                r.future.set_exception(error)
        if self._background is not None:
            try:
                self._background.fail_all(error)
            except Exception:
                logger.exception("failing the background work at shutdown")

    def _run_safely(self, batch: list[_Request]) -> None:
        try:
            self._run(batch)
        except Exception as error:  # a bug in the hand-out itself: still resolve every future
            self.errors += 1
            logger.exception("scheduler failed to run a batch")
            for r in batch:
                if not r.future.done() and (r.future.running() or r.future.set_running_or_notify_cancel()):
                    r.future.set_exception(error)

    def _run(self, batch: list[_Request]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        now = time.perf_counter()
        self.requests_run += len(live)
        self.queue_wait_seconds += sum(now - r.submitted for r in live)
        try:
            results = list(batch[0].run([r.payload for r in live]))
            if len(results) != len(live):
                raise RuntimeError(f"a batch of {len(live)} requests returned {len(results)} results")
        except Exception as error:
            self.errors += 1
            if len(live) == 1:
                live[0].future.set_exception(error)
                return
            logger.warning("batch of %d failed (%s); retrying each request alone", len(live), error)
            for r in live:
                try:
                    result = r.run([r.payload])[0]
                except Exception as single_error:
                    r.future.set_exception(single_error)
                else:
                    r.future.set_result(result)
            return
        for r, result in zip(live, results, strict=True):
            r.future.set_result(result)
