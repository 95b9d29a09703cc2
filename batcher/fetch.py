"""Fetch stage: GET the result of a COMPLETED job, then save every output image.

Result fetches have the gate's first priority: the job is paid for and its result
expires. Output images are public URLs (no key, not rate limited) or inline
base64; each is verified to decode before it is written atomically. The URLs and
the metrics are saved first: a download that fails is tried again from them
(batcher.redownload); the result is read again only for links that refuse, once.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, TypeGuard

import aiohttp
import anyio

from batcher.backoff import backoff_delay
from batcher.client import Outcome, Reply, TransportError
from batcher.errors import OutputUnwritable
from batcher.flight import Flight
from batcher.gate import Priority
from batcher.handoff import Channel
from batcher.imagedata import INLINE_ON_LOOP, decode_inline, is_url, output_items
from batcher.jobs import Job
from batcher.offload import run_sized
from batcher.pipeline import RunContext
from batcher.poll import Reschedule, _get, metric, retry_later, settle_not_ok
from batcher.redownload import REFUSED, OnRefusal, Redownloads, on_refusal
from batcher.retry import CallStats
from batcher.sink import CorruptImage, IncompleteDownload, SavedImage, download

log = logging.getLogger(__name__)


async def work(
    ctx: RunContext,
    receive: Channel[Flight],
    reschedule: Reschedule,
    redownloads: Redownloads,
) -> None:
    async for flight in receive:
        await fetch_one(ctx, flight, reschedule, redownloads)


async def fetch_one(
    ctx: RunContext, flight: Flight, reschedule: Reschedule, redownloads: Redownloads
) -> None:
    stats = CallStats()
    reply = await _get(ctx, Priority.FETCH, flight.response_url, stats)
    # The read's counts go in the row's next statement: with its output URLs on the way
    # to COMPLETED (one statement a job fewer), at once on every other way.
    counts = ctx.tally_get("result", stats)
    if not _completed(reply):
        await ctx.checkpoint.update(flight.job.id, counts=counts, wait=False)
        await _not_completed(ctx, flight, reply, reschedule)
        return
    body = reply.body
    job = flight.job
    seen = ctx.now() if flight.seen_done_mono is None else flight.seen_done_mono
    raw_metrics = body.get("metrics")
    metrics: dict[str, Any] = raw_metrics if isinstance(raw_metrics, dict) else {}
    latency = seen - flight.submitted_mono
    total = metric(metrics, "total_time")
    completion: dict[str, Any] = {
        "completed_at": flight.submitted_wall + latency,
        "latency_s": latency,
        "notice_lag_s": None if total is None else max(0.0, latency - total),
        "inference_time": metric(metrics, "inference_time"),
        "metrics": metrics,
        # Submitted by an earlier run: latency_s and notice_lag_s include the stop.
        "spans_stop": flight.resumed,
    }
    try:
        items = output_items(body.get("output"))
    except ValueError as exc:  # the output itself is unusable
        await ctx.fail(job, f"output could not be saved: {exc}", counts=counts, **completion)
        return
    flight.outputs = items
    if all(is_url(item) for item in items):
        # Billed, and the links outlive the result: saved before any download, so that
        # a download that fails, here or after a crash, is tried again from them alone.
        # Queued, not waited for: it commits before any later write of the row (its
        # COMPLETED among them), and a crash before that reads the result again.
        await ctx.checkpoint.update(
            job.id, output_urls=items, counts=counts, wait=False, **completion
        )
        await save_outputs(ctx, flight, redownloads)
        return
    await ctx.checkpoint.update(job.id, counts=counts, wait=False)
    await save_outputs(ctx, flight, redownloads, completion)


def _completed(reply: Reply | TransportError) -> TypeGuard[Reply]:
    """Whether a result GET answered COMPLETED (an answer without a status counts)."""
    return (
        not isinstance(reply, TransportError)
        and reply.outcome is Outcome.OK
        and reply.body.get("status", "COMPLETED") == "COMPLETED"
    )


async def _not_completed(
    ctx: RunContext, flight: Flight, reply: Reply | TransportError, reschedule: Reschedule
) -> None:
    """A result GET that did not answer COMPLETED: no answer, an error, or not done."""
    if isinstance(reply, TransportError):  # the status said COMPLETED: poll, fetch again
        await retry_later(ctx, flight, str(reply), reschedule)
    elif reply.outcome is not Outcome.OK:
        await settle_not_ok(ctx, flight, reply, reschedule)
    else:
        reschedule(flight)


async def save_outputs(
    ctx: RunContext,
    flight: Flight,
    redownloads: Redownloads,
    completion: dict[str, Any] | None = None,
) -> None:
    """Save the images of a job seen COMPLETED (``flight.outputs``), then complete its row
    with ``completion`` (what its result said; None: saved in the checkpoint already). A
    download that fails past its own retries goes to ``redownloads``; only links that
    refuse may have the result read again, once (see :func:`_refused`)."""
    job = flight.job
    items = flight.outputs or []
    fields = completion or {}
    saved: list[SavedImage] = []
    try:
        for i, item in enumerate(items):
            saved.append(await _save(ctx, job, i, item))
    except aiohttp.ClientResponseError as exc:
        if exc.status in REFUSED:
            await _refused(ctx, flight, redownloads, exc, saved, fields)
        else:  # 5xx, 429 and the like: an outage, the links stay valid for days
            await _try_again(ctx, flight, redownloads, exc)
        return
    except (IncompleteDownload, aiohttp.ClientError, TimeoutError) as exc:
        # A CDN outage, resets, a body cut short: the links stay valid for days.
        await _try_again(ctx, flight, redownloads, exc)
        return
    except (ValueError, CorruptImage) as exc:  # the output itself is unusable
        redownloads.done(job.id)
        # A FAILED row has no images: the samples written before the bad one go too.
        await anyio.to_thread.run_sync(_remove, ctx.out, [s.path for s in saved])
        await ctx.fail(
            job,
            f"output could not be saved: {_reason(exc, ctx.options.downloads.timeout_s)}",
            request_id=flight.request_id,
            **fields,
        )
        return
    redownloads.done(job.id)
    await ctx.complete(
        job,
        **fields,
        outputs=[s.path for s in saved],
        width=saved[0].width if saved else None,
        height=saved[0].height if saved else None,
        bytes=sum(s.bytes for s in saved),
        sha256=",".join(s.sha256 for s in saved),
    )


async def _refused(
    ctx: RunContext,
    flight: Flight,
    redownloads: Redownloads,
    exc: aiohttp.ClientResponseError,
    saved: list[SavedImage],
    fields: dict[str, Any],
) -> None:
    """A link of the row answered 403/404/410: try it again, read the result for fresh
    links, or take the images for lost (see batcher.redownload.on_refusal)."""
    job = flight.job
    refusals, refused_for = redownloads.refused(job.id)
    scale = ctx.options.scale
    action = on_refusal(
        refusals=refusals,
        result_kept=flight.elapsed(ctx.now()) < ctx.poll.retention_s * ctx.poll.time_scale,
        asked=flight.asked_links,
        refused_for_s=refused_for,
        grace_s=ctx.options.download_retry.refused_grace_s * scale,
    )
    if action is OnRefusal.ASK_RESULT:
        flight.asked_links = True
        links = await _fresh_links(ctx, flight)
        if links is not None and links != flight.outputs:
            log.info(
                "row %s: its output links were refused (HTTP %d); its result names new "
                "ones: downloading from them",
                job.id,
                exc.status,
            )
            flight.outputs = links
            await ctx.checkpoint.update(job.id, output_urls=links)
            await ctx.count_download_retries(job, 1)
            await save_outputs(ctx, flight, redownloads, fields or None)
            return
        action = OnRefusal.RETRY  # the same links, or none: wait for them as before
    if action is OnRefusal.RETRY:
        await _try_again(ctx, flight, redownloads, exc)
        return
    redownloads.done(job.id)
    await anyio.to_thread.run_sync(_remove, ctx.out, [s.path for s in saved])
    await ctx.fail(
        job,
        f"the job was COMPLETED and billed, but its images are lost: "
        f"{_reason(exc, ctx.options.downloads.timeout_s)}, for {refused_for / scale:.0f} s "
        f"and {refusals} tries (the link expired or is gone). --retry-failed submits it "
        "again, and pays for it again",
        request_id=flight.request_id,
        **fields,
    )


async def _fresh_links(ctx: RunContext, flight: Flight) -> list[str] | None:
    """The output links the job's result names now, if it is still kept and COMPLETED
    with links: one API request, counted. Never a resubmit, whatever the answer: the
    job is paid for, and its old links are kept."""
    stats = CallStats()
    reply = await _get(ctx, Priority.FETCH, flight.response_url, stats)
    await ctx.count_get("result", flight.job, stats)
    if isinstance(reply, TransportError) or reply.outcome is not Outcome.OK:
        return None
    try:
        items = output_items(reply.body.get("output"))
    except ValueError:
        return None
    return items if items and all(is_url(item) for item in items) else None


async def _try_again(
    ctx: RunContext, flight: Flight, redownloads: Redownloads, exc: Exception
) -> None:
    """The images are to be downloaded again later: a retry in the row's count."""
    await ctx.count_download_retries(flight.job, 1)
    reason = f"output could not be downloaded: {_reason(exc, ctx.options.downloads.timeout_s)}"
    redownloads.failed(flight, reason)


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
            await ctx.count_download_retries(job, 1)
            await asyncio.sleep(backoff_delay(attempt, ctx.retry, ctx.rng))
