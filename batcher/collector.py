"""The cyclic garbage collector, run less often while batcher works through rows."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

#: Net allocations between two young-generation passes of the collector while batcher
#: works (CPython's default: 700). Each request, and each manifest row, allocates and
#: frees objects by the hundred; at 700 the collector ran ~0.2 times per request, 0.3-0.4
#: ms of the event loop's ~2.7 ms of CPU per job at full speed, and 7% of `batcher
#: validate`'s CPU. At 10,000 it runs ~30 times less often: what a request leaves is
#: freed by reference counting, not by it, and the few cycles wait a little longer
#: (memory and loop lag with 100,000 jobs in flight: benchmarks/, scale scenario).
YOUNG_THRESHOLD = 10_000


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """The young-generation threshold raised to YOUNG_THRESHOLD inside the block, and set
    back as it was after it (batcher may run inside a larger program). A threshold of 0
    (the program turned automatic collection off that way) stays 0."""
    before = gc.get_threshold()
    young = max(before[0], YOUNG_THRESHOLD) if before[0] else 0
    gc.set_threshold(young, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
