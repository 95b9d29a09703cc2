"""Submit stage: PENDING rows from the checkpoint -> POST /v2/{model} -> the poller.

A feeder (feed.py) reads PENDING rows in manifest order (requeued jobs first) into a
bounded stream; workers take a slot, then a job, and submit it. The row is marked
SUBMITTING before the POST and SUBMITTED with its request_id before it is polled,
so a crash between the two is visible on resume.

Unknown outcome (the connection was lost after the POST went out): the job may
exist and be billed. By default (at-most-once) the row ends FAILED with a reason
that says so, and is not sent again; ``resubmit_unknown`` (at-least-once) sends it
again at once. Either way the row's ``unknown_submits`` counts it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio

from batcher.client import Outcome, Reply, TransportError, api_urls, encode_params
from batcher.errors import ApiUnreachable, AuthError, ConnectionsLost, UnknownModel
from batcher.flight import Flight
from batcher.gate import Priority
from batcher.handoff import Channel
from batcher.inputs import InputError
from batcher.jobs import NO_JOB, PENDING, SUBMITTED, SUBMITTING, UNKNOWN_OUTCOME, Job
from batcher.lost import storm_reason
from batcher.pipeline import RunContext
from batcher.retry import CallStats, call
from batcher.schemas import get_model

log = logging.getLogger(__name__)


async def work(ctx: RunContext, receive: Channel[Job], track: Callable[[Flight], object]) -> None:
    """Take a slot, then a job, and submit it; the slot goes with the job."""
    while True:
        await ctx.acquire_slot()
        try:
            job = await receive.receive()
        except anyio.EndOfStream:
            ctx.release_slot()
            return
        if ctx.stop_submitting.is_set():  # its place in the queue is the feeder's
            await ctx.unsubmitted(job)
            continue
        await submit_one(ctx, job, track)


async def _payload(ctx: RunContext, job: Job) -> dict[str, Any] | str:
    """The parameters to send, local images as base64; or why the row cannot be sent."""
    params = dict(job.params)
    for name in get_model(job.model).image_params:
        value = params.get(name)
        if isinstance(value, str):
            try:
                params[name] = await ctx.inputs.resolve(name, value)
            except InputError as exc:
                return str(exc)
    return params


async def submit_one(ctx: RunContext, job: Job, track: Callable[[Flight], object]) -> None:
    try:
        await _submit(ctx, job, track)
    finally:
        # The row's last write is made (or the run is ending around it).
        ctx.submitting.discard(job.id)


async def _submit(ctx: RunContext, job: Job, track: Callable[[Flight], object]) -> None:
    payload = await _payload(ctx, job)
    if isinstance(payload, str):
        await ctx.fail(job, payload)
        return
    body = await encode_params(payload)  # once for all attempts, before any is on the wire
    stats = CallStats()  # the row's retries over all its attempts
    while True:
        job = _with(job, attempts=job.attempts + 1)
        attempt = _Attempt(stats, stats.retries, stats.rate_limited)
        sent: list[float] = []
        began = ctx.now()
        try:
            result = await _post(ctx, job, attempt, body, sent)
        except _Stopping:
            # Granted after the run began to stop (between tries, or waiting at the gate):
            # not sent, so the row waits for the next run as it was.
            counts = attempt.tally(ctx, answered=False)
            await ctx.unsubmitted(_with(job, attempts=job.attempts - 1), counts=counts)
            return
        # Each write below saves the row's state with this attempt's counts: a stop
        # cannot come between them and lose the counts (earlier attempts saved theirs).
        counts = attempt.tally(ctx, answered=True)
        if isinstance(result, TransportError):
            if not result.maybe_sent:
                down = ApiUnreachable(f"cannot reach the API at {ctx.api.base_url}: {result}")
                # Recorded first: once the row is handed back the run may end around this
                # worker, and a cancel in the write would drop the error.
                ctx.record_stop(down)
                await ctx.unsubmitted(_with(job, attempts=job.attempts - 1), counts=counts)
                raise down
            ctx.counters.unknown_submits += 1
            job = _with(job, unknown_submits=job.unknown_submits + 1)
            storm = _lost_in_a_row(ctx)
            if ctx.options.resubmit_unknown:
                # PENDING until its next try is granted: a stop meanwhile must not leave it
                # SUBMITTING, which the next run would count as a second unknown submit.
                await ctx.checkpoint.update(
                    job.id,
                    counts=counts,
                    state=PENDING,
                    attempts=job.attempts,
                    unknown_submits=job.unknown_submits,
                )
                if storm is None:
                    log.warning("row %s: %s; sending it again (--resubmit-unknown)", job.id, result)
                    continue
                await ctx.unsubmitted(job)  # sent again by the next run, not this one
                raise storm
            await ctx.fail(job, UNKNOWN_OUTCOME, counts=counts, unknown_submits=job.unknown_submits)
            if storm is not None:
                raise storm
            return
        # The answer is recorded first: nothing may come between a request_id and the
        # checkpoint, the row's retry and 429 counts included (see _settle for when the
        # write is waited for). The job's clock starts when its POST went out, not when
        # it began waiting for the gate (rate-bound, submits wait longest): polls are
        # timed from it.
        sent_at = sent[-1] if sent else time.time()
        await _settle(ctx, job, result, sent_at, stats, counts, track, began)
        return


def _lost_in_a_row(ctx: RunContext) -> ConnectionsLost | None:
    """After a submit lost after sending: the error that stops the run when it makes a
    storm (see batcher/lost.py), recorded first (a cancel in the row's write that
    follows must not drop it); else None."""
    ctx.lost_streak = ctx.lost_streak.after_loss(ctx.now(), ctx.last_ok)
    if not ctx.lost_streak.is_storm:
        return None
    # The figure is for now; the run says the final one when it ends (run.py).
    storm = lost_connections(ctx)
    ctx.record_stop(storm)
    return storm


def lost_connections(ctx: RunContext) -> ConnectionsLost:
    """The stop of a connection-reset storm, with the run's unknown submits so far."""
    in_a_row = ctx.lost_streak.count
    reason = storm_reason(
        in_a_row, ctx.counters.unknown_submits, resubmit_unknown=ctx.options.resubmit_unknown
    )
    return ConnectionsLost(reason, in_a_row=in_a_row)


@dataclass(frozen=True)
class _Attempt:
    """One submit attempt of a row: its share of ``stats``, which runs over them all."""

    stats: CallStats
    retries_before: int
    rate_limited_before: int

    def tally(self, ctx: RunContext, *, answered: bool) -> dict[str, int]:
        """Count the attempt's requests in the run's totals (once, when it ends) and
        return its retries and 429s, for the checkpoint write that ends it."""
        retries = self.stats.retries - self.retries_before
        rate_limited = self.stats.rate_limited - self.rate_limited_before
        ctx.counters.api_requests["submit"] += int(answered) + retries + rate_limited
        return {"retries": retries, "rate_limited": rate_limited}


class _Stopping(Exception):
    """A submit's turn came after the run stopped submitting: it is not sent."""


async def _post(
    ctx: RunContext, job: Job, attempt: _Attempt, body: bytes, sent: list[float]
) -> Reply | TransportError:
    """POST through the gate; the row is SUBMITTING from the grant until the answer.
    Each try's send time (epoch seconds) is appended to ``sent``. Raises _Stopping when
    its turn comes after the run stopped submitting (the caller hands the row back)."""
    marked = False  # the row is SUBMITTING in the checkpoint
    tried = False  # it was marked at least once: its tries have counts to save
    on_wire = False  # a request of this row may be at the server, unanswered

    async def mark_sending() -> None:
        # After the gate's grant: a row still waiting for a token is not on the wire.
        nonlocal marked, tried
        if ctx.stop_submitting.is_set():  # not even marked SUBMITTING
            raise _Stopping
        marked = tried = True
        ctx.submitting.add(job.id)
        # An earlier job's request id goes: were this submit's outcome unknown, the row
        # must not show (or be taken for) a job it may not have.
        await ctx.checkpoint.update(job.id, state=SUBMITTING, attempts=job.attempts, **NO_JOB)

    async def unmark() -> None:
        # A try answered 5xx, or whose connection never opened: nothing of this row is
        # at the server during the backoff, so its row says PENDING meanwhile. A process
        # killed now (a second Ctrl-C) must not leave it SUBMITTING, "maybe billed".
        nonlocal marked
        if marked and not on_wire:
            await ctx.checkpoint.update(job.id, state=PENDING, attempts=job.attempts - 1)
            marked = False
            ctx.submitting.discard(job.id)

    async def send() -> Reply:
        nonlocal on_wire
        if ctx.stop_submitting.is_set():  # stopped while it was being marked
            raise _Stopping
        on_wire = True
        sent.append(time.time())
        ctx.on_wire += 1
        try:
            reply = await ctx.api.submit(job.model, body)
        except TransportError as exc:
            on_wire = exc.maybe_sent
            raise
        finally:
            ctx.on_wire -= 1
        on_wire = False
        ctx.heard_from_api(reply.status)
        return reply

    try:
        return await call(
            ctx.gate,
            Priority.SUBMIT,
            send,
            retry=ctx.retry,
            rng=ctx.rng,
            safe_to_resend=False,
            stats=attempt.stats,
            before_send=mark_sending,
            between_tries=unmark,
        )
    except _Stopping:
        raise
    except BaseException:
        if tried:
            counts = attempt.tally(ctx, answered=on_wire)
            with anyio.CancelScope(shield=True):
                if on_wire:
                    # Cut off with its POST at the server (past the stop's wait for its
                    # answer, or a bug): the row stays SUBMITTING, maybe billed; its tries
                    # so far are counted, and the run's stop says how many were left so.
                    ctx.abandoned += 1
                    await ctx.checkpoint.update(job.id, counts=counts)
                else:
                    # Cancelled between tries (in a backoff after a refused connection
                    # or a 5xx, or at the gate): nothing of this row is at the server,
                    # so it is PENDING, not a maybe-billed "unknown outcome" on resume.
                    await ctx.checkpoint.update(
                        job.id, counts=counts, state=PENDING, attempts=job.attempts - 1
                    )
        raise


async def _settle(
    ctx: RunContext,
    job: Job,
    reply: Reply,
    sent_at: float,
    stats: CallStats,
    counts: dict[str, int],
    track: Callable[[Flight], object],
    began: float,
) -> None:
    """Record the submit's answer; ``counts`` (the attempt's retries and 429s) go in the
    same write as the row's new state."""
    outcome = reply.outcome
    if outcome is Outcome.OK:
        body = reply.body
        request_id = str(body.get("request_id") or "")
        if not request_id:
            await ctx.fail(
                job, f"submit answered {reply.status} without a request_id", counts=counts
            )
            return
        given = body.get("status_url") or body.get("poll_url"), body.get("response_url")
        status_url, response_url, replaced = api_urls(
            ctx.api.base_url, request_id, *(str(u) if u else None for u in given)
        )
        if replaced and any(given) and not ctx.warned_foreign_urls:
            ctx.warned_foreign_urls = True
            log.warning(
                "the API's answer names status/result URLs off --base-url's host; polling "
                "%s/v2/requests/{id} instead (the API key is only sent to --base-url)",
                ctx.api.base_url,
            )
        # Queued, not waited for, while the run goes on: no step needs it on disk (a crash
        # before its commit leaves the row SUBMITTING, as one just after the POST would),
        # and the row's later writes commit after it. Once a stop has begun it is waited
        # for, so that the row stays among ctx.submitting until its request_id is on
        # disk: a second Ctrl-C (exit at once) then counts it as "outcome unknown".
        await ctx.checkpoint.update(
            job.id,
            counts=counts,
            state=SUBMITTED,
            request_id=request_id,
            status_url=status_url,
            response_url=response_url,
            submitted_at=sent_at,
            wait=ctx.stop_submitting.is_set(),
        )
        ctx.counters.submitted += 1
        track(
            Flight.start(
                job=job,
                request_id=request_id,
                status_url=status_url,
                response_url=response_url,
                submitted_wall=sent_at,
                now_wall=time.time(),
                now_mono=ctx.now(),
            )
        )
        return
    # 401, 404 and 406 create no job: the attempt does not count (it would use up the
    # row's --max-failed-retries when the run resumes).
    unsent = _with(job, attempts=job.attempts - 1)
    if outcome is Outcome.AUTH:
        await ctx.unsubmitted(unsent, counts=counts)
        raise AuthError(
            f"the API refused the key ({reply.error_text()}); check "
            "SEGMIND_API_KEY. Nothing was lost: run again to resume",
            status=reply.status,
        )
    if outcome is Outcome.NOT_FOUND:
        await ctx.unsubmitted(unsent, counts=counts)
        raise UnknownModel(
            f"the API does not know model {job.model!r} ({reply.error_text()})", status=404
        )
    if outcome is Outcome.NO_CREDITS:
        await ctx.unsubmitted(unsent, counts=counts)
        ctx.stop(
            f"out of credits ({reply.error_text()}): no new submits; finishing the "
            f"jobs in flight. Top up, then run the same command again to resume"
        )
        return
    if outcome is Outcome.RETRY and ctx.last_ok < began:
        # 5xx on every attempt, and no request of the run succeeded meanwhile: the API is
        # down, not this row's fault. A 5xx created no job: the row waits for the next run.
        await ctx.unsubmitted(unsent, counts=counts)
        raise ApiUnreachable(
            f"the API answered {reply.error_text()} to every attempt of a submit "
            f"({stats.retries + 1}) and to everything else meanwhile. Nothing was lost: "
            "run the same command again to resume"
        )
    if outcome in (Outcome.RETRY, Outcome.RATE_LIMITED):
        await ctx.fail(
            job,
            f"gave up after {stats.retries + 1} attempts: {reply.error_text()}",
            counts=counts,
        )
        return
    await ctx.fail(job, reply.error_text(), counts=counts)  # 400, 422, other 4xx


def _with(job: Job, **changes: Any) -> Job:
    return replace(job, **changes)


__all__ = ["UNKNOWN_OUTCOME", "ApiUnreachable", "submit_one", "work"]
