"""Poller pool: thousands of request_ids, each polled when its schedule says.

One scheduler task keeps a heap of (due time, job); due polls run as tasks, at most
``concurrency`` at once, each through the gate at poll priority. The next poll of a job
comes from :func:`batcher.schedule.next_poll_delay`, fitted online to the latency seen so
far for its model and thinned when the rate limit binds.

The polls are tasks of an ``asyncio.TaskGroup``, not anyio's: ``create_task`` costs ~12
us of CPU where ``start_soon`` costs ~60, at a task a poll. The group gives what anyio's
would: a poll's error ends the poller with the other polls cancelled, and the poller
cancelled cancels its polls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import anyio

from batcher.backoff import backoff_delay
from batcher.client import Outcome, Reply, TransportError
from batcher.due import DueHeap
from batcher.errors import AuthError
from batcher.flight import Flight
from batcher.gate import Priority
from batcher.handoff import Channel
from batcher.lateness import WINDOW
from batcher.pipeline import RunContext
from batcher.retry import CallStats, call
from batcher.schedule import next_poll_delay

log = logging.getLogger(__name__)

DONE = ("COMPLETED", "FAILED")

#: Puts a job back on the poll schedule; returns the seconds until its next poll.
Reschedule = Callable[[Flight], float]


class Poller:
    """Schedules and runs status polls; hands COMPLETED jobs to the fetch stream."""

    def __init__(
        self, ctx: RunContext, to_fetch: Channel[Flight], *, concurrency: int = 256
    ) -> None:
        self._ctx = ctx
        self._to_fetch = to_fetch
        self._due: DueHeap[Flight] = DueHeap(ctx.now)
        # fast_acquire: a free slot is taken without a turn of the loop (one per poll).
        self._limit = anyio.Semaphore(concurrency, fast_acquire=True)
        #: Loop time when poll slots last freed up after all were taken.
        self._unblocked = float("-inf")

    def __len__(self) -> int:
        return len(self._due)

    def track(self, flight: Flight) -> float:
        """Start polling a submitted job: the seconds until its first poll."""
        self._ctx.tracked(flight)
        return self._schedule(flight)

    def _schedule(self, flight: Flight, delay: float | None = None) -> float:
        """Put ``flight`` on the heap for its next poll; return the seconds until then."""
        ctx = self._ctx
        now = ctx.now()
        if delay is None:
            delay = next_poll_delay(
                elapsed=flight.clock(now),
                since_submit=flight.elapsed(now),
                model=ctx.latency[flight.job.model],
                cfg=ctx.poll,
                pressure=ctx.gate.pressure,
                rng=ctx.rng,
            )
            if flight.errors:  # its last requests got no usable answer: back off
                delay = max(delay, backoff_delay(flight.errors, ctx.retry, ctx.rng))
        self._due.push(now + delay, flight)
        return delay

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            while True:
                due, flight = await self._due.next_due()
                self._record_start(flight, due)
                all_taken = self._limit.value == 0  # every poll slot waits on the rate limit
                await self._limit.acquire()
                if all_taken:
                    self._unblocked = self._ctx.now()
                tg.create_task(self._poll_guarded(flight))

    def _record_start(self, flight: Flight, due: float) -> None:
        """How late this poll starts: from its due time, or from when the poll slots
        freed up if they were all taken (polls waiting for the rate limit are the run's
        budget at work, not a client falling behind)."""
        ctx = self._ctx
        now = ctx.now()
        base = flight.last_poll_mono if flight.last_poll_mono is not None else flight.submitted_mono
        if ctx.counters.poll_lateness.record(now - max(due, self._unblocked), due - base):
            share = ctx.counters.poll_lateness.recent_share or 0.0
            log.warning(
                "status polls are starting late: over the last %d, a median of %.0f%% of "
                "the gap they were planned for. The client cannot keep up (CPU, or too "
                "much asked of one event loop), so polls per job and detection lag include "
                "its delay%s",
                WINDOW,
                100 * share,
                "; with --simulate, a larger --time-scale asks less of it"
                if ctx.options.simulate
                else "",
            )

    async def _poll_guarded(self, flight: Flight) -> None:
        try:
            await self.poll(flight)
        finally:
            self._limit.release()

    async def poll(self, flight: Flight) -> None:
        ctx = self._ctx
        stats = CallStats()
        sent = ctx.now()
        reply = await _get(ctx, Priority.POLL, flight.status_url, stats)
        now = ctx.now()
        if flight.last_poll_mono is not None:
            flight.last_gap = now - flight.last_poll_mono
        else:
            flight.last_gap = flight.elapsed(now)
        flight.last_poll_mono = now
        await ctx.count_get("status", flight.job, stats)
        if isinstance(reply, TransportError):
            await retry_later(ctx, flight, str(reply), self._schedule)
            return
        state = str(reply.body.get("status", ""))
        if reply.outcome is Outcome.OK and state not in DONE:
            flight.errors = 0
            if state == "PROCESSING" and flight.processing_since is None:
                flight.processing_since = now
            elif state == "QUEUED":
                # Not started when this poll went out: all of its latency is still
                # ahead, so the schedule starts over (a long queue is not a slow job).
                flight.clock_mono = sent
            ctx.saw(flight, state)
            self._schedule(flight)
            return
        if reply.outcome is Outcome.OK:  # COMPLETED; failures are often fast, so they don't train
            # The server's submit-to-done time, on the job's clock (queue time before the
            # clock restarted taken off), so the model learns what it predicts.
            total = metric(reply.body.get("metrics"), "total_time")
            reported = None if total is None else total - flight.clock_offset
            ctx.latency[flight.job.model].observe(
                flight.clock(now), flight.last_gap, reported=reported
            )
            ctx.saw(flight, "COMPLETED")
            if flight.seen_done_mono is None:
                flight.seen_done_mono = now
            await self._to_fetch.send(flight)
            return
        await settle_not_ok(ctx, flight, reply, self._schedule)


def metric(metrics: object, key: str) -> float | None:
    """A number the server sent in ``metrics`` (a bool or a string is not one)."""
    value = metrics.get(key) if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


async def _get(
    ctx: RunContext, priority: Priority, url: str, stats: CallStats
) -> Reply | TransportError:
    """A status or result GET with its retries. No answer at all, when the API has been
    silent too long, stops the run (ApiUnreachable)."""

    async def get() -> Reply:
        reply = await ctx.api.get(url)
        ctx.heard_from_api(reply.status)
        return reply

    result = await call(
        ctx.gate, priority, get, retry=ctx.retry, rng=ctx.rng, safe_to_resend=True, stats=stats
    )
    if isinstance(result, TransportError):
        ctx.check_reachable()
    return result


async def settle_not_ok(
    ctx: RunContext, flight: Flight, reply: Reply, reschedule: Reschedule
) -> None:
    """A status or result GET that is not a plain success: FAILED, expired, or an error."""
    job = flight.job
    outcome = reply.outcome
    if outcome is Outcome.FAILED:
        error = str(reply.body.get("error") or reply.error_text())
        if job.attempts <= ctx.retry.max_failed_retries:
            await ctx.resubmit_failed(job, error)
            return
        await ctx.fail(job, error, metrics=reply.body.get("metrics"))
        return
    if outcome is Outcome.NOT_FOUND:
        await ctx.resubmit_or_fail(job, f"request {flight.request_id} is gone (expired or unknown)")
        return
    if outcome is Outcome.AUTH:
        raise AuthError(
            f"the API refused the key ({reply.error_text()}); check "
            "SEGMIND_API_KEY. Nothing was lost: run again to resume",
            status=reply.status,
        )
    # 5xx/429 past every retry, or another 4xx/3xx on a GET.
    await retry_later(ctx, flight, reply.error_text(), reschedule)


async def retry_later(ctx: RunContext, flight: Flight, reason: str, reschedule: Reschedule) -> None:
    """A status or result GET of the job got no usable answer (after its own retries).
    The job may be paid for: ask again later, backing off (see Poller._schedule), until
    the schedule's deadline (half the result's retention: the API still knows the job,
    so it is not sent again and paid twice on a 404); then the row is FAILED with the
    last reason. The one place that decides, so the one that logs which it did."""
    job = flight.job
    flight.errors += 1
    if flight.elapsed(ctx.now()) < ctx.poll.deadline_s:
        delay = reschedule(flight)
        shown = f"{delay:.3g}" if delay < 100 else f"{delay:.0f}"
        # Once a job at warning level: an outage would otherwise print a line per job in
        # flight per try (it stops the run as unreachable itself if it lasts).
        level = logging.WARNING if flight.errors == 1 else logging.INFO
        log.log(level, "row %s: %s; trying again in %s s", job.id, reason, shown)
        return
    error = (
        f"no usable answer about this job within half its result's retention "
        f"({flight.errors} tries in a row; last: {reason}); it may have been billed. "
        "--retry-failed submits it again"
    )
    log.warning("row %s: giving up: FAILED because %s", job.id, error)
    await ctx.fail(job, error)
