"""Items due at loop times, taken in order when due: the poller's status polls and the
download retries of COMPLETED jobs both wait this way, with one timer, not one a job."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class DueHeap(Generic[T]):
    """A heap of items by due time (``now()``'s clock); :meth:`next_due` waits for the
    earliest, and a :meth:`push` of an earlier one wakes it."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()  # ties in due time: first pushed, first out
        self._wake = anyio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, item: T) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), item))
        self._wake.set()

    def drain(self) -> Iterator[T]:
        """Take every item out, due or not, earliest first."""
        while self._heap:
            yield heapq.heappop(self._heap)[2]

    async def next_due(self) -> tuple[float, T]:
        """The earliest item once it is due (taken off the heap), with its due time."""
        while True:
            if not self._heap:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            due = self._heap[0][0]
            wait = due - self._now()
            if wait <= 0:
                return due, heapq.heappop(self._heap)[2]
            self._wake = anyio.Event()
            with anyio.move_on_after(wait):
                await self._wake.wait()
