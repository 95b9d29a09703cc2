"""Hand-offs between stages: a bounded channel on bare asyncio futures.

Stage workers (submit, fetch) wait for nearly every item at high rates. An anyio memory
stream's receive that must wait costs ~30 us of CPU more than a future does (a
cancellation checkpoint, an anyio Event, task lookups to skip cancelled receivers), and
its send and receive yield to the loop even when the item can pass at once. Here an item
passes at once when it can; a receive waits on a future, a send on a future when the
buffer is full.

Cancellation loses nothing: a receiver cancelled just after an item was handed to it
gives the item back to the next receiver (it may sit in the buffer one over its size);
the item of a sender cancelled while it waited is never taken. The senders' side closes
with :meth:`Channel.close`: receivers drain what is buffered, then get
``anyio.EndOfStream``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class Channel(Generic[T]):
    """Items from senders to receivers in order; ``size`` items wait in it at most (0: a
    send completes only when a receiver takes the item)."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"a channel's size must be >= 0, got {size}")
        self._size = size
        self._items: deque[T] = deque()
        self._receivers: deque[asyncio.Future[T]] = deque()
        self._senders: deque[tuple[asyncio.Future[None], T]] = deque()
        self._closed = False

    @property
    def buffered(self) -> int:
        """Items waiting in the buffer."""
        return len(self._items)

    @property
    def receivers_waiting(self) -> int:
        return sum(1 for waiter in self._receivers if not waiter.done())

    def close(self) -> None:
        """No more sends: receivers take what is buffered, then get EndOfStream."""
        self._closed = True
        for waiter in self._receivers:
            if not waiter.done():
                waiter.set_exception(anyio.EndOfStream())
        self._receivers.clear()

    def send_nowait(self, item: T) -> bool:
        """Hand ``item`` to a waiting receiver or the buffer; False if neither has room."""
        if self._closed:
            raise anyio.ClosedResourceError
        if self._to_receiver(item):
            return True
        if len(self._items) < self._size:
            self._items.append(item)
            return True
        return False

    async def send(self, item: T) -> None:
        """Hand ``item`` over, waiting for room if there is none."""
        if self.send_nowait(item):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._senders.append((waiter, item))
        await waiter  # cancelled, the future is done: receivers pass the item over

    def __aiter__(self) -> Channel[T]:
        return self

    async def __anext__(self) -> T:
        """``async for item in channel``: every item until the channel is closed and
        drained."""
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def receive(self) -> T:
        """The next item, waiting for one if there is none; ``anyio.EndOfStream`` once
        the channel is closed and drained."""
        if self._items:
            item = self._items.popleft()
            sender = self._live_sender()
            if sender is not None:  # room came free in the buffer: its item takes it
                self._items.append(sender[1])
            return item
        sender = self._live_sender()  # a rendezvous (size 0)
        if sender is not None:
            return sender[1]
        if self._closed:
            raise anyio.EndOfStream
        receiver: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._receivers.append(receiver)
        try:
            return await receiver
        except asyncio.CancelledError:
            if receiver.done() and not receiver.cancelled() and receiver.exception() is None:
                self._give_back(receiver.result())  # handed over as we were cancelled
            raise

    def _to_receiver(self, item: T) -> bool:
        while self._receivers:
            receiver = self._receivers.popleft()
            if not receiver.done():  # a cancelled receiver's future is done: skipped
                receiver.set_result(item)
                return True
        return False

    def _live_sender(self) -> tuple[asyncio.Future[None], T] | None:
        """The first waiting sender not cancelled, released: its send is done."""
        while self._senders:
            sender = self._senders.popleft()
            if not sender[0].done():
                sender[0].set_result(None)
                return sender
        return None

    def _give_back(self, item: T) -> None:
        if not self._to_receiver(item):
            self._items.appendleft(item)
