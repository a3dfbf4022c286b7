"""`APIFuture`: what every client call returns at once — `.result(timeout)`, `await future`, or
`.then(fn)` for a continuation.

Continuations run on a small I/O pool, never on the thread that completed the future (the engine's
worker): a checkpoint write or a PEFT export chained with `.then` must not stall every tenant.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")

IO_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="tinker-jax-io")
"""Checkpoint reads/writes, exports and other continuations (never the engine's worker)."""


class APIFuture(Generic[T]):
    """The result of a queued request: `.result(timeout)`, `await future`, or `await .result_async()`."""

    def __init__(self, future: concurrent.futures.Future, convert: Callable[[Any], T] | None = None):
        self._future = future
        self._convert = convert
        self._lock = threading.Lock()
        self._value: Any = None
        self._converted = False

    def result(self, timeout: float | None = None) -> T:
        raw = self._future.result(timeout)
        with self._lock:
            if not self._converted:
                self._value = self._convert(raw) if self._convert else raw
                self._converted = True
        return self._value

    async def result_async(self, timeout: float | None = None) -> T:
        await asyncio.wait_for(asyncio.wrap_future(self._future), timeout)
        return self.result()

    def __await__(self):
        return self.result_async().__await__()

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        """Cancel the request if it has not started (True), else leave it running (False)."""
        return self._future.cancel()

    def cancelled(self) -> bool:
        return self._future.cancelled()

    @property
    def future(self) -> concurrent.futures.Future:
        return self._future

    def then(self, fn: Callable[[T], U]) -> APIFuture[U]:
        """A future of `fn(result)`, computed on the I/O pool."""
        chained: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                value = fn(self.result())
            except BaseException as e:  # delivered on the chained future, not swallowed
                chained.set_exception(e)
            else:
                chained.set_result(value)

        self._future.add_done_callback(lambda _: IO_POOL.submit(run))
        return APIFuture(chained)


def completed(value: T) -> APIFuture[T]:
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_result(value)
    return APIFuture(f)


def failed(error: BaseException) -> APIFuture[Any]:
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_exception(error)
    return APIFuture(f)
