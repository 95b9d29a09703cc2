"""The feeder: PENDING rows from the checkpoint, in manifest order (requeued jobs
first), into the bounded stream the submit workers take them from (submit.py)."""

from __future__ import annotations

from anyio.streams.memory import MemoryObjectSendStream

from batcher import handoff
from batcher.jobs import PENDING, Job
from batcher.pipeline import RunContext


async def feed(ctx: RunContext, send: MemoryObjectSendStream[Job]) -> None:
    """Send jobs to the workers until there is nothing left or submitting stops."""
    try:
        await _feed(ctx, send)
    finally:
        ctx.feed_done = True
        ctx.requeue_signal.set()


async def _feed(ctx: RunContext, send: MemoryObjectSendStream[Job]) -> None:
    cursor = (-1, "")
    page: list[Job] = []
    exhausted = False
    async with send:
        while not ctx.stop_submitting.is_set():
            if ctx.requeued:
                job = ctx.requeued.popleft()
            elif page:
                job = page.pop(0)
                if job.id in ctx.resumed:
                    continue  # requeued by this run: it is in (or went through) `requeued`
            elif not exhausted:
                page = await ctx.checkpoint.jobs_in([PENDING], after=cursor, limit=512)
                exhausted = not page
                cursor = (page[-1].number, page[-1].id) if page else cursor
                continue
            elif ctx.active == 0:
                return  # nothing pending, nothing in flight: nothing can be requeued
            else:
                ctx.requeue_signal.clear()
                await ctx.requeue_signal.wait()
                continue
            # Counted at the hand-off, not when the worker runs: until then the job would be
            # in no count, and `active == 0` above could end the feed under a job that is
            # about to be submitted (and maybe requeued, with no feeder left to take it).
            ctx.active += 1
            await handoff.send(send, job)
