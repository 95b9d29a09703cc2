"""The feeder against a real checkpoint and run context, with stand-in submit workers
that take a job, wait in admission as the real ones do, and keep it waiting at the
service (nothing is sent): how many rows of a held model reach the workers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from conftest import offline_context, until

from batcher.checkpoint import Checkpoint
from batcher.feed import feed
from batcher.handoff import Channel
from batcher.jobs import Job, NewRow
from batcher.pipeline import RunContext

#: InfiniteYou's 163 s jobs, one at a time: 11 may wait in its queue when a run starts.
ROOM = 11


def _row(n: int, model: str) -> NewRow:
    return NewRow(id=f"r{n:03d}", number=n, model=model, digest=f"d{n}", params={"prompt": "p"})


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[Checkpoint]:
    async with Checkpoint(tmp_path / "checkpoint.sqlite") as checkpoint:
        yield checkpoint


async def _worker(ctx: RunContext, receive: Channel[Job], got: list[Job]) -> None:
    """As batcher.submit.work, up to the submit: the job keeps the place the feeder took."""
    async for job in receive:
        got.append(job)


async def _fed(tmp_path: Path, cp: Checkpoint, ctx: RunContext, workers: int) -> list[Job]:
    """Jobs handed to ``workers`` stand-in workers once every instantid row is."""
    got: list[Job] = []
    channel: Channel[Job] = Channel(0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(feed, ctx, channel)
        for _ in range(workers):
            tg.start_soon(_worker, ctx, channel, got)
        try:
            await until(lambda: sum(j.model == "instantid" for j in got) == 5, timeout_s=3.0)
            await anyio.sleep(0.05)  # anything more the feeder would hand out
        finally:
            ctx.stop("test over")
            tg.cancel_scope.cancel()
    return got


async def test_a_held_model_gets_no_more_rows_than_its_queue_has_room_for(
    tmp_path: Path, cp: Checkpoint
) -> None:
    """Workers idle at once (the run's start, the stream's buffer 0) each took the row
    the feeder saw room for before any of them took its place: 31 of 32 workers waited
    in admission for one place."""
    await cp.add_rows(
        [_row(n, "infinite-you") for n in range(40)] + [_row(n, "instantid") for n in range(40, 45)]
    )
    ctx = offline_context(tmp_path, cp)
    got = await _fed(tmp_path, cp, ctx, workers=32)
    assert sum(j.model == "infinite-you" for j in got) == ROOM
    assert ctx.queue.waiting("infinite-you") == ROOM


async def test_jobs_requeued_for_a_held_model_do_not_hold_up_the_rows_of_another(
    tmp_path: Path, cp: Checkpoint
) -> None:
    """Jobs handed back to be sent again (a resumed run's expired results, FAILED jobs
    retried) went first whatever their model's queue: 16 of InfiniteYou took its 11
    places and then both workers, and no instantid row went until InfiniteYou's queue
    moved."""
    iy = [_row(n, "infinite-you") for n in range(16)]
    await cp.add_rows([*iy, *(_row(n, "instantid") for n in range(40, 45))])
    ctx = offline_context(tmp_path, cp)
    for job in await cp.jobs_in(["PENDING"], model="infinite-you"):
        ctx.resumed.add(job.id)  # as batcher.resume does, then requeue
        ctx.requeued.append(job)
    got = await _fed(tmp_path, cp, ctx, workers=2)
    assert sum(j.model == "infinite-you" for j in got) == ROOM
    assert {j.id for j in got if j.model == "infinite-you"} == {r.id for r in iy[:ROOM]}
