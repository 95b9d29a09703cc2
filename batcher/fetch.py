"""Fetch stage: GET the result of a COMPLETED job, then save every output image.

Result fetches have the gate's first priority: the job is paid for and its result
expires. Output images are public URLs (no key, not rate limited) or inline
base64; each is verified to decode before it is written atomically.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from batcher import handoff
from batcher.backoff import backoff_delay
from batcher.checkpoint import Job
from batcher.client import Outcome, TransportError
from batcher.errors import OutputUnwritable
from batcher.gate import Priority
from batcher.imagedata import INLINE_ON_LOOP, decode_inline, output_items
from batcher.offload import run_sized
from batcher.pipeline import Flight, RunContext
from batcher.poll import Reschedule, _get, metric, retry_later, settle_not_ok
from batcher.retry import CallStats
from batcher.sink import CorruptImage, IncompleteDownload, SavedImage, download

log = logging.getLogger(__name__)


async def work(
    ctx: RunContext, receive: MemoryObjectReceiveStream[Flight], reschedule: Reschedule
) -> None:
    async with receive:
        while True:
            try:
                flight = await handoff.receive(receive)
            except anyio.EndOfStream:
                return
            await fetch_one(ctx, flight, reschedule)


async def fetch_one(ctx: RunContext, flight: Flight, reschedule: Reschedule) -> None:
    stats = CallStats()
    reply = await _get(ctx, Priority.FETCH, flight.response_url, stats)
    await ctx.count_get("result", flight.job, stats)
    if isinstance(reply, TransportError):  # the status said COMPLETED: poll, fetch again
        await retry_later(ctx, flight, str(reply), reschedule)
        return
    body = reply.body
    if reply.outcome is not Outcome.OK:
        await settle_not_ok(ctx, flight, reply, reschedule)
        return
    if body.get("status", "COMPLETED") != "COMPLETED":
        reschedule(flight)
        return
    job = flight.job
    seen = ctx.now()
    raw_metrics = body.get("metrics")
    metrics: dict[str, Any] = raw_metrics if isinstance(raw_metrics, dict) else {}
    saved: list[SavedImage] = []
    try:
        items = output_items(body.get("output"))
        for i, item in enumerate(items):
            saved.append(await _save(ctx, job, i, item))
    except (IncompleteDownload, aiohttp.ClientError, TimeoutError) as exc:
        # The job is done and paid for; its output URLs outlive the result. A download
        # that failed past its own retries (a CDN outage, 5xx, resets) is tried again
        # later from the result, not turned into a FAILED row.
        reason = f"output could not be downloaded: {_reason(exc, ctx.options.downloads.timeout_s)}"
        await retry_later(ctx, flight, reason, reschedule)
        return
    except (ValueError, CorruptImage) as exc:  # the output itself is unusable
        # A FAILED row has no images: the samples written before the bad one go too.
        await anyio.to_thread.run_sync(_remove, ctx.out, [s.path for s in saved])
        await ctx.fail(
            job,
            f"output could not be saved: {_reason(exc, ctx.options.downloads.timeout_s)}",
            metrics=metrics,
            polls=job.polls + flight.polls,
            request_id=flight.request_id,
        )
        return
    latency = seen - flight.submitted_mono
    total = metric(metrics, "total_time")
    await ctx.complete(
        job,
        polls=job.polls + flight.polls,
        completed_at=flight.submitted_wall + latency,
        latency_s=latency,
        notice_lag_s=None if total is None else max(0.0, latency - total),
        inference_time=metric(metrics, "inference_time"),
        metrics=metrics,
        outputs=[s.path for s in saved],
        width=saved[0].width if saved else None,
        height=saved[0].height if saved else None,
        bytes=sum(s.bytes for s in saved),
        sha256=",".join(s.sha256 for s in saved),
    )


def _remove(out: Path, paths: list[str]) -> None:
    """Delete images written under ``out`` (paths as SavedImage gives them). Blocking."""
    for path in paths:
        (out / path).unlink(missing_ok=True)


def _reason(exc: Exception, timeout_s: float) -> str:
    """Why an output was not saved, never empty (``str(TimeoutError())`` is ""), and
    never with a URL's query (a signed URL's query is a credential)."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"download timed out after {timeout_s:g} s"
    if isinstance(exc, aiohttp.ClientResponseError):
        url = str(exc.request_info.real_url).partition("?")[0]
        return f"HTTP {exc.status} {exc.message} from {url}"
    return str(exc) or type(exc).__name__


async def _save(ctx: RunContext, job: Job, index: int, item: str) -> SavedImage:
    data = await run_sized(len(item) > INLINE_ON_LOOP, decode_inline, item)
    if data is None:
        data = await _download(ctx, job, item)
    try:
        return await ctx.images.write(job.id, index, data)
    except OSError as exc:  # the folder's problem, not this row's: stop before all fail
        reason = exc.strerror or type(exc).__name__
        raise OutputUnwritable(
            f"cannot write images under {ctx.out / 'images'} ({reason}); jobs in flight "
            "stay in the checkpoint: fix the folder or free space, then run the same "
            "command again to resume"
        ) from None


async def _download(ctx: RunContext, job: Job, url: str) -> bytes:
    """Download with retries for transient failures (cut bodies, resets, timeouts)."""
    attempt = 0
    while True:
        try:
            return await download(ctx.downloads, url, ctx.options.downloads)
        except (IncompleteDownload, aiohttp.ClientConnectionError, TimeoutError):
            attempt += 1
            if attempt >= ctx.retry.max_attempts:
                raise
            await ctx.count_retries(job, 1)
            await asyncio.sleep(backoff_delay(attempt, ctx.retry, ctx.rng))
