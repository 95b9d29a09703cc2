"""Items due at loop times, taken in order when due: the poller's status polls and the
download retries of COMPLETED jobs both wait this way, with one timer, not one a job.

The wait is a bare asyncio future woken by a push or by one ``call_later`` timer: an
anyio Event and ``move_on_after`` scope cost ~15 calls a wait, and the poller waits
about once a job. A cancel (anyio's scopes cancel the task) ends the wait as any
await, and takes its timer down with it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class DueHeap(Generic[T]):
    """A heap of items by due time (``now()``'s clock); :meth:`next_due` waits for the
    earliest, and a :meth:`push` of an earlier one wakes it."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()  # ties in due time: first pushed, first out
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, item: T) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), item))
        _wake(self._waiter)

    def drain(self) -> Iterator[T]:
        """Take every item out, due or not, earliest first."""
        while self._heap:
            yield heapq.heappop(self._heap)[2]

    async def next_due(self) -> tuple[float, T]:
        """The earliest item once it is due (taken off the heap), with its due time."""
        while True:
            wait = None
            if self._heap:
                due = self._heap[0][0]
                wait = due - self._now()
                if wait <= 0:
                    return due, heapq.heappop(self._heap)[2]
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = None if wait is None else loop.call_later(wait, _wake, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
