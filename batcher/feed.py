"""The feeder: PENDING rows from the checkpoint, in manifest order (requeued jobs
first), into the bounded stream the submit workers take them from (submit.py).

Each model's rows are read apart, and the next row fed is the first in manifest order
among the models the service's queue has room for (batcher.admission): a model held
because its queue is full does not hold up the rows of the others behind it."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from batcher import handoff
from batcher.checkpoint import Checkpoint
from batcher.jobs import PENDING, Job
from batcher.pipeline import RunContext

_PAGE = 512
#: Longest wait before the feeder looks again when nothing can be fed, seconds.
_RECHECK_S = 0.2


async def feed(ctx: RunContext, send: MemoryObjectSendStream[Job]) -> None:
    """Send jobs to the workers until there is nothing left or submitting stops."""
    try:
        await _feed(ctx, send)
    finally:
        ctx.feed_done = True
        ctx.requeue_signal.set()


class _Rows:
    """One model's PENDING rows, read a page at a time in manifest order."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.page: deque[Job] = deque()
        self._after = (-1, "")
        self._exhausted = False

    @property
    def done(self) -> bool:
        return self._exhausted and not self.page

    async def fill(self, checkpoint: Checkpoint) -> None:
        """Read the next page if this one is used up."""
        if self.page or self._exhausted:
            return
        page = await checkpoint.jobs_in([PENDING], after=self._after, limit=_PAGE, model=self.model)
        self._exhausted = not page
        if page:
            self._after = (page[-1].number, page[-1].id)
            self.page.extend(page)


def first_in_order(heads: Iterable[Job]) -> Job | None:
    """The job first in manifest order, (number, id), of the models' next rows."""
    return min(heads, key=lambda job: (job.number, job.id), default=None)


async def _next_row(
    ctx: RunContext, rows: list[_Rows], admissible: Callable[[str], bool]
) -> Job | None:
    """The next row to feed among the models with room, or None if there is none now."""
    ready = [r for r in rows if not r.done and admissible(r.model)]
    for r in ready:
        await r.fill(ctx.checkpoint)
    job = first_in_order(r.page[0] for r in ready if r.page)
    if job is not None:
        next(r for r in ready if r.model == job.model).page.popleft()
    return job


async def _feed(ctx: RunContext, send: MemoryObjectSendStream[Job]) -> None:
    rows = [_Rows(model) for model in await ctx.checkpoint.models_in(PENDING)]
    async with send:
        while not ctx.stop_submitting.is_set():
            # Cleared before looking, so that what moves meanwhile ends the wait below.
            ctx.requeue_signal.clear()
            job: Job | None = None
            if ctx.requeued:
                job = ctx.requeued.popleft()
            else:
                job = await _next_row(ctx, rows, ctx.admissible)
                if job is not None and job.id in ctx.resumed:
                    continue  # requeued by this run: it is in (or went through) `requeued`
            if job is None:
                if all(r.done for r in rows) and ctx.active == 0:
                    return  # nothing pending, nothing in flight: nothing can be requeued
                # Rows left only of models whose queue is full, or jobs in flight that
                # may be requeued: wait for either to move. The run's watcher clears the
                # same event; the timeout bounds a wake-up it took.
                with anyio.move_on_after(_RECHECK_S):
                    await ctx.requeue_signal.wait()
                continue
            # Counted at the hand-off, not when the worker runs: until then the job would be
            # in no count, and `active == 0` above could end the feed under a job that is
            # about to be submitted (and maybe requeued, with no feeder left to take it).
            ctx.active += 1
            await handoff.send(send, job)
