"""The feeder: PENDING rows from the checkpoint, in manifest order (requeued jobs
first), into the bounded stream the submit workers take them from (submit.py).

Each model's rows are read apart, and the next row fed is the first in manifest order
among the models the service's queue has room for (batcher.admission): a model held
because its queue is full does not hold up the rows of the others behind it. Requeued
jobs wait for room the same way (they go first among the models that have it), and the
feeder takes each job's place in its queue as it hands it over: a worker never waits
in admission, and so never holds a slot for a held model."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Set

import anyio

from batcher.checkpoint import Checkpoint
from batcher.handoff import Channel
from batcher.jobs import PENDING, Job
from batcher.pipeline import RunContext

_PAGE = 512
#: Longest wait before the feeder looks again when nothing can be fed, seconds.
_RECHECK_S = 0.2


async def feed(ctx: RunContext, send: Channel[Job]) -> None:
    """Send jobs to the workers until there is nothing left or submitting stops."""
    try:
        await _feed(ctx, send)
    finally:
        ctx.feed_done = True
        ctx.requeue_signal.set()


class _Model:
    """One model's work: its jobs handed back to be sent again, and its PENDING rows,
    read a page at a time in manifest order."""

    def __init__(self, model: str, *, rows: bool = True) -> None:
        self.model = model
        #: Handed back (requeued), with the order they came in: they go before new rows.
        self.again: deque[tuple[int, Job]] = deque()
        self.page: deque[Job] = deque()
        self._after = (-1, "")
        # A model first met among requeued jobs had no PENDING rows when the feed began:
        # the rows it has now are those jobs, which must not be read (and sent) twice.
        self._exhausted = not rows

    @property
    def done(self) -> bool:
        return self._exhausted and not self.page and not self.again

    async def fill(self, checkpoint: Checkpoint, resumed: Set[str]) -> None:
        """Read the next page if this one is used up. Rows in ``resumed`` are left out:
        requeued by this run, they are in (or went through) ``RunContext.requeued``."""
        while not self.page and not self._exhausted:
            page = await checkpoint.jobs_in(
                [PENDING], after=self._after, limit=_PAGE, model=self.model
            )
            self._exhausted = not page
            if page:
                self._after = (page[-1].number, page[-1].id)
                self.page.extend(job for job in page if job.id not in resumed)


def first_in_order(heads: Iterable[Job]) -> Job | None:
    """The job first in manifest order, (number, id), of the models' next rows."""
    return min(heads, key=lambda job: (job.number, job.id), default=None)


class _Work:
    """What is left to feed, by model, and the choice of the next job."""

    def __init__(self, models: Iterable[str]) -> None:
        self.models = {model: _Model(model) for model in models}
        self._handed_back = 0

    @property
    def done(self) -> bool:
        return all(m.done for m in self.models.values())

    def take_requeued(self, requeued: deque[Job]) -> None:
        """Sort the jobs handed back since the last look by model."""
        while requeued:
            job = requeued.popleft()
            model = self.models.get(job.model)
            if model is None:
                model = self.models[job.model] = _Model(job.model, rows=False)
            self._handed_back += 1
            model.again.append((self._handed_back, job))

    async def fill(self, checkpoint: Checkpoint, resumed: Set[str]) -> None:
        """Every model's next page, where its last one is used up."""
        for model in self.models.values():
            await model.fill(checkpoint, resumed)

    def next(self, admissible: Callable[[str], bool]) -> Job | None:
        """The next job among the models with room (the first handed back, else the
        first row in manifest order), taken out; None if there is none now."""
        ready = [m for m in self.models.values() if not m.done and admissible(m.model)]
        again = [m for m in ready if m.again]
        if again:
            return min(again, key=lambda m: m.again[0][0]).again.popleft()[1]
        job = first_in_order(m.page[0] for m in ready if m.page)
        if job is not None:
            self.models[job.model].page.popleft()
        return job


async def _feed(ctx: RunContext, send: Channel[Job]) -> None:
    work = _Work(list(await ctx.checkpoint.models_in([PENDING])))
    try:
        while not ctx.stop_submitting.is_set():
            await work.fill(ctx.checkpoint, ctx.resumed)
            # Cleared after the last wait of a look and before it looks: anything that
            # moves from here on ends the wait below (the run's watcher, which clears
            # the same event, can only run once this task waits).
            ctx.requeue_signal.clear()
            work.take_requeued(ctx.requeued)
            job = work.next(ctx.admissible)
            if job is None:
                if work.done and ctx.active == 0:
                    return  # nothing pending, nothing in flight: nothing can be requeued
                # Jobs left only of models whose queue is full, or jobs in flight that may
                # be requeued: wait for either to move. The timeout bounds a wake-up missed.
                with anyio.move_on_after(_RECHECK_S):
                    await ctx.requeue_signal.wait()
                continue
            # The job's place in its model's queue is taken here, before the hand-off,
            # not by the worker that takes it: idle workers take several jobs before any
            # of them runs, and each would have been given a place seen free for one.
            ctx.reserve(job)
            # Counted at the hand-off, not when the worker runs: until then the job would be
            # in no count, and `active == 0` above could end the feed under a job that is
            # about to be submitted (and maybe requeued, with no feeder left to take it).
            ctx.active += 1
            await send.send(job)
    finally:
        send.close()  # the workers end once they have taken what is left
