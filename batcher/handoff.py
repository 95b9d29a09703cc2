"""Hand-offs between stages that wait only when they must.

anyio's ``send`` and ``receive`` on a memory stream always yield to the event loop
first (a cancellation checkpoint), even when the item can pass at once. With thousands
of jobs a second that is one more turn of the loop per hand-off, and every turn
releases the GIL, which the image and checkpoint threads then hold while the loop
waits. These pass the item at once when they can, and wait through anyio (checkpoint
included) only when they must. A task that never waits here still meets cancellation
at its next await: every stage awaits the network right after a hand-off.
"""

from __future__ import annotations

from typing import TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

T = TypeVar("T")


async def send(stream: MemoryObjectSendStream[T], item: T) -> None:
    """``stream.send(item)``, without a trip round the loop when a receiver or buffer
    space is ready."""
    try:
        stream.send_nowait(item)
    except anyio.WouldBlock:
        await stream.send(item)


async def receive(stream: MemoryObjectReceiveStream[T]) -> T:
    """``stream.receive()``, without a trip round the loop when an item is ready.
    Raises ``anyio.EndOfStream`` once the stream is closed and drained, as it does."""
    try:
        return stream.receive_nowait()
    except anyio.WouldBlock:
        return await stream.receive()
