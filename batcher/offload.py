"""Blocking work sized to the data: in a worker thread when it is heavy, else on the loop.

Decoding or encoding megabytes (an inline image, a result carrying base64 outputs) would
stall the event loop; a thread hop for a few kilobytes costs more than the work itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, TypeVarTuple, Unpack

import anyio.to_thread

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


async def run_sized(heavy: bool, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
    """``fn(*args)``: in a worker thread when ``heavy``, else here on the event loop."""
    if heavy:
        return await anyio.to_thread.run_sync(fn, *args)
    return fn(*args)
