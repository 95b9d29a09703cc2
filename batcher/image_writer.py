"""Image writes from the event loop, run in batches on worker threads.

Verifying and writing an image is blocking work; handing each to a thread of its own
costs a thread hop, a wake-up of the loop and a folder fsync per image, and many
threads decoding at once fight the event loop for the GIL. Here fetches queue their
images, and lanes take whatever is queued, write it in one worker-thread call with one
folder fsync for the batch, and answer every waiter. The first lane takes any work; the
others (1 more by default) join only when a backlog of ``spill`` images builds up (large
images, a slow disk), so at ordinary rates one thread does it all in fewer, larger
batches: each thread hand-off costs the event loop more than the write itself.
"""

from __future__ import annotations

import asyncio
from collections import deque
from pathlib import Path

import anyio

from batcher.sink import SavedImage, write_images

_Item = tuple[str, int, bytes, "asyncio.Future[SavedImage]"]


class ImageWriter:
    """``await writer.write(row_id, index, data)`` while :meth:`run` runs in a task group."""

    def __init__(
        self, out_dir: Path, *, lanes: int = 2, max_batch: int = 64, spill: int = 8
    ) -> None:
        if lanes < 1 or max_batch < 1 or spill < 1:
            raise ValueError("ImageWriter needs lanes >= 1, max_batch >= 1 and spill >= 1")
        self._out = out_dir
        self._lanes = lanes
        self._max_batch = max_batch
        self._spill = spill
        self._pending: deque[_Item] = deque()
        self._wake = asyncio.Event()
        #: Worker-thread calls made (for tests and benchmarks: images per call).
        self.batches = 0
        #: Most worker-thread calls running at once (for tests).
        self.peak_busy = 0
        self._busy = 0

    async def write(self, row_id: str, index: int, data: bytes) -> SavedImage:
        """Verify and write one image atomically; its record, or the error that refused it."""
        future: asyncio.Future[SavedImage] = asyncio.get_running_loop().create_future()
        self._pending.append((row_id, index, data, future))
        self._wake.set()
        return await future

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            for lane in range(self._lanes):
                tg.start_soon(self._lane, 1 if lane == 0 else self._spill)

    async def _lane(self, backlog: int) -> None:
        """Write batches whenever at least ``backlog`` images wait."""
        while True:
            while len(self._pending) < backlog:
                self._wake.clear()  # every lane wakes on a set; each rechecks its own bar
                await self._wake.wait()
            take = min(len(self._pending), self._max_batch)
            batch = [self._pending.popleft() for _ in range(take)]
            live = [item for item in batch if not item[3].done()]  # waiter not cancelled
            if not live:
                continue
            self.batches += 1
            self._busy += 1
            self.peak_busy = max(self.peak_busy, self._busy)
            # Not abandoned on cancel: the thread finishes its batch, so no file is left
            # half-written (an image written for a row not yet COMPLETED is rewritten on
            # resume: writes are idempotent).
            items = [(row_id, index, data) for row_id, index, data, _ in live]
            try:
                results: list[SavedImage | Exception] = await anyio.to_thread.run_sync(
                    write_images, self._out, items
                )
            except Exception as exc:  # the folder itself (mkdir, fsync): every waiter hears
                results = [exc] * len(live)
            finally:
                self._busy -= 1
            for (*_, future), result in zip(live, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
