"""Jobs an earlier run left on the wire or in flight, taken up before a resumed run submits."""

from __future__ import annotations

import json
import logging
import time

from batcher.client import api_urls
from batcher.flight import Flight
from batcher.jobs import FAILED, PENDING, SUBMITTED, SUBMITTING, UNKNOWN_OUTCOME
from batcher.pipeline import RunContext
from batcher.poll import Poller
from batcher.redownload import Redownloads

log = logging.getLogger(__name__)


async def resume(ctx: RunContext, poller: Poller, redownloads: Redownloads) -> None:
    """Jobs a previous run left on the wire or in flight."""
    cp = ctx.checkpoint
    for job in await cp.jobs_in([SUBMITTING], limit=1 << 30):
        # The process died between the gate's grant and the answer: maybe billed. One
        # write: a kill between two would count the unknown submit twice.
        ctx.counters.unknown_submits += 1
        if ctx.options.resubmit_unknown and not job.removed:
            await cp.update(job.id, counts={"unknown_submits": 1}, state=PENDING)
        else:
            await cp.update(
                job.id, counts={"unknown_submits": 1}, state=FAILED, error=UNKNOWN_OUTCOME
            )
    now_wall, now = time.time(), ctx.now()
    limit = ctx.poll.retention_s * ctx.poll.time_scale
    moved = 0
    for job in await cp.jobs_in([SUBMITTED], limit=1 << 30):
        age = now_wall - (job.submitted_at or now_wall)
        ctx.resumed.add(job.id)
        ctx.take_resumed_slot()
        if not job.output_urls and (age >= limit or not job.request_id):
            await ctx.resubmit_or_fail(job, "its result expired while batcher was not running")
            continue
        # URLs kept from a run against another base URL (or an emulator now gone) are
        # not followed: the request is asked of this run's API, with its key.
        status_url, response_url, replaced = api_urls(
            ctx.api.base_url, job.request_id or "", job.status_url, job.response_url
        )
        moved += replaced
        flight = Flight.start(
            job=job,
            request_id=job.request_id or "",
            status_url=status_url,
            response_url=response_url,
            submitted_wall=job.submitted_at or now_wall,
            now_wall=now_wall,
            now_mono=now,
            resumed=True,
        )
        if job.output_urls:  # COMPLETED, billed: its images are due, from its saved links
            flight.outputs = json.loads(job.output_urls)
            redownloads.resume(flight)
        else:
            poller.track(flight)
    if moved:
        log.info(
            "%d jobs in flight were submitted to another API address (an earlier --base-url "
            "or emulator): asking %s about them",
            moved,
            ctx.api.base_url,
        )
