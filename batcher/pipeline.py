"""The state one run shares across its stages, and the transitions that end a job.

Each job in flight (a :class:`batcher.flight.Flight`) holds one of ``max_in_flight``
slots from its submit until it is COMPLETED, FAILED, or handed back for resubmission;
:class:`RunContext` releases the slot in exactly those transitions, after the checkpoint
has recorded them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from batcher.admission import QueueWatch, may_submit
from batcher.backoff import RetryConfig
from batcher.checkpoint import Checkpoint
from batcher.client import ApiClient
from batcher.errors import ApiUnreachable, BatcherError, reason_key
from batcher.flight import Flight
from batcher.gate import RequestGate
from batcher.image_writer import ImageWriter
from batcher.inputs import ImageInputs
from batcher.jobs import FAILED, NO_JOB, NO_OUTCOME, PENDING, REMOVED, Job
from batcher.latency import LatencyModel
from batcher.lateness import PollLateness
from batcher.lost import LostStreak
from batcher.options import RunOptions
from batcher.retry import CallStats
from batcher.schedule import PollConfig
from batcher.schemas import registry

log = logging.getLogger(__name__)

#: Model seconds without any HTTP answer from the API (status polls and result fetches
#: failing after all their retries) before a run stops as "API unreachable".
UNREACHABLE_S = 300.0


@dataclass
class Counters:
    """Live figures for the progress bar and the summary."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    invalid: int = 0
    skipped: int = 0
    resubmitted_expired: int = 0
    #: Jobs that ended FAILED and were submitted again (--max-failed-retries), by reason.
    resubmitted_failed: Counter[str] = field(default_factory=Counter)
    unknown_submits: int = 0
    failed_reasons: Counter[str] = field(default_factory=Counter)
    api_requests: Counter[str] = field(default_factory=Counter)
    poll_lateness: PollLateness = field(default_factory=PollLateness)


class RunContext:
    """Everything the stages share: clients, gate, checkpoint, slots and the stop signals."""

    def __init__(
        self,
        *,
        options: RunOptions,
        checkpoint: Checkpoint,
        api: ApiClient,
        downloads: aiohttp.ClientSession,
        gate: RequestGate,
        inputs: ImageInputs,
        rng: random.Random | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.options = options
        self.out: Path = options.out
        self.checkpoint = checkpoint
        self.api = api
        self.downloads = downloads
        self.gate = gate
        self.inputs = inputs
        #: Verified, atomic image writes, batched onto worker threads (its ``run`` is
        #: one of the pipeline's tasks).
        self.images = ImageWriter(self.out)
        self.rng = rng or random.Random()
        self.retry: RetryConfig = options.scaled_retry()
        self.poll: PollConfig = options.scaled_poll()
        self.counters = Counters()
        self.latency: dict[str, LatencyModel] = {
            slug: LatencyModel(m.median_latency_s, m.latency_sigma, self.poll)
            for slug, m in registry().items()
        }
        #: Slots taken: by jobs in flight, and by submit workers about to take a job.
        self.in_flight = 0
        #: Jobs taken for submit and not yet finished or requeued.
        self.active = 0
        self._slot_freed = asyncio.Event()
        #: Submits with a POST out now, unanswered (a crash now leaves them unknown).
        self.on_wire = 0
        #: Rows marked SUBMITTING and not moved on since (on the wire, about to be sent, or
        #: between tries): an exit at once leaves them "outcome unknown".
        self.submitting: set[str] = set()
        #: Submits cut off on the wire by the stop: their rows stay SUBMITTING, maybe billed.
        self.abandoned = 0
        #: Loop time until which a stopping run waits for the submits on the wire.
        self._wire_deadline = math.inf
        #: Jobs to submit again (expired, retried FAILED), ahead of new rows.
        self.requeued: deque[Job] = deque()
        #: Rows an earlier run left in flight, taken over by this one. They never enter
        #: through the feeder's pages: requeued, they are PENDING in the checkpoint *and*
        #: in ``requeued``, and read from both they would be submitted (and paid) twice.
        self.resumed: set[str] = set()
        #: Wakes the feeder: a job requeued, a slot freed, a held model's queue moved, a stop.
        self.requeue_signal = asyncio.Event()
        self.stop_submitting = asyncio.Event()
        #: The feeder has returned: no new job will be taken for submit.
        self.feed_done = False
        self.stop_reason: str | None = None
        #: The first error that stops the run (raised once the stages have ended).
        self.stop_error: BatcherError | None = None
        self.flights: dict[str, Flight] = {}
        #: Per model, jobs waiting in the service's queue and running (see admission).
        self.queue = QueueWatch()
        self._held: set[str] = set()  # models whose queue has held a submit (logged once)
        #: Warned that the API named status/result URLs on another host (once a run).
        self.warned_foreign_urls = False
        self.started_mono = time.monotonic()
        #: Loop time of the last HTTP answer of any kind from the API.
        self.last_answer = self.now()
        #: Loop time of the last 2xx answer from the API.
        self.last_ok = self.last_answer
        #: Submits lost after sending with no 2xx answer since the first (see lost.py).
        self.lost_streak = LostStreak()

    def now(self) -> float:
        return self._loop.time()

    def heard_from_api(self, status: int) -> None:
        """An HTTP answer came: the API is reachable (and working, for a 2xx)."""
        self.last_answer = self.now()
        if 200 <= status < 300:
            self.last_ok = self.last_answer

    def check_reachable(self) -> None:
        """After a request failed with no answer at all (every retry spent): stop the run,
        resumable, once the API has given no answer of any kind for UNREACHABLE_S (model
        time). A blip shorter than that is ridden out; jobs in flight stay saved."""
        silent = self.now() - self.last_answer
        if silent >= UNREACHABLE_S * self.poll.time_scale:
            raise ApiUnreachable(
                f"cannot reach the API at {self.api.base_url}: no answer for {silent:.0f} s. "
                "Jobs in flight are saved: run the same command again to resume"
            )

    async def acquire_slot(self) -> None:
        """Wait until fewer than max_in_flight jobs are in flight, then take a slot."""
        while self.in_flight >= self.options.max_in_flight:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        self.in_flight += 1

    def take_resumed_slot(self) -> None:
        """A job resumed from the checkpoint is in flight already, whatever the cap."""
        self.in_flight += 1
        self.active += 1

    def release_slot(self) -> None:
        self.in_flight -= 1
        self._slot_freed.set()
        self.requeue_signal.set()  # the feeder may be waiting for in-flight work to end

    def _release(self, job_id: str) -> None:
        flight = self.flights.pop(job_id, None)
        if flight is not None:
            self.queue.moved(flight.job.model, flight.state, None, self.now())
        self.queue.unreserve(job_id)
        self.active -= 1
        self.release_slot()

    def reserve(self, job: Job) -> None:
        """Take a place in the queue of the row's model for its job (the feeder does, as
        it hands the job over; see batcher.feed), until the job is in flight or released."""
        self.queue.reserve(job.id, job.model, self.now())

    def admissible(self, model: str) -> bool:
        """Whether the service's queue for ``model`` has room for one more job now."""
        service_s = self.latency[model].median
        waiting = self.queue.waiting(model)
        if may_submit(
            waiting=waiting,
            parallel=self.queue.parallel(model, self.now(), service_s),
            service_s=service_s,
            horizon_s=self.poll.deadline_s,
        ):
            return True
        if model not in self._held:
            self._held.add(model)
            log.info(
                "%s: %d jobs wait in the service's queue; its new submits wait too, so "
                "that each job can finish within its result's retention (rows of other "
                "models go on)",
                model,
                waiting,
            )
        return False

    def tracked(self, flight: Flight) -> None:
        """A submitted job is in flight (polled from now on): it waits at the service."""
        job_id = flight.job.id
        if self.flights.get(job_id) is flight:
            return  # polled again (a result not ready, a download to retry)
        self.flights[job_id] = flight
        self.queue.unreserve(job_id)
        self.queue.moved(flight.job.model, None, flight.state, self.now())

    def saw(self, flight: Flight, state: str) -> None:
        """A status poll found the job QUEUED, PROCESSING or COMPLETED (other states the
        API may name leave it where it was)."""
        if state == flight.state or state not in ("QUEUED", "PROCESSING", "COMPLETED"):
            return
        self.queue.moved(flight.job.model, flight.state, state, self.now())
        flight.state = state
        self.requeue_signal.set()  # the feeder may wait for a held model's queue to move

    def set_aside(self, job: Job) -> None:
        """Leave a job in flight to the next run, its row as the checkpoint has it: this
        run no longer waits for it."""
        self._release(job.id)

    def stop(self, reason: str) -> None:
        """Stop submitting new jobs; what is in flight goes on."""
        if self.stop_reason is None:
            self.stop_reason = reason
            log.warning("%s", reason)
        self._halt_submits()

    def _halt_submits(self) -> None:
        """No new submit from now on; the feeder wakes to see it."""
        self.stop_submitting.set()
        self.requeue_signal.set()

    def record_stop(self, error: BatcherError) -> None:
        """``error`` stops the run: kept (the first one) to be raised once the stages
        have ended, even if a cancel then takes its place in the task that raised it."""
        if self.stop_error is None:
            self.stop_error = error

    async def wind_down(self, wait_s: float) -> None:
        """The run is about to stop (an interrupt, or an error): no new submit, and each
        POST on the wire gets its answer first (at most ``wait_s``), so that its row is
        recorded SUBMITTED or PENDING and not left "maybe billed" by the stop. A shorter
        wait asked meanwhile (SIGTERM during an error's wait) ends every wait sooner. The
        other stages go on meanwhile: the gate grants, and an answer's request_id is saved."""
        self._halt_submits()
        self._wire_deadline = min(self._wire_deadline, self.now() + wait_s)
        # A counter changed from many places: polling it for a few seconds beats an event.
        while self.on_wire and self.now() < self._wire_deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    async def count_get(self, endpoint: str, job: Job, stats: CallStats) -> None:
        """A status or result GET of the row is over: its requests, retries (after a 5xx
        or a lost connection) and 429s go into the row's counts at once, a poll with
        them, not when the job ends: a kill or a stop keeps the polls of the jobs in
        flight (and `batcher report`'s request total with them). Queued, not waited for:
        the next group commit, a few milliseconds on, holds them."""
        await self.checkpoint.update(job.id, counts=self.tally_get(endpoint, stats), wait=False)

    def tally_get(self, endpoint: str, stats: CallStats) -> dict[str, int]:
        """Count a status or result GET in the run's totals; the row's counts for it, for
        the caller to write at once (:meth:`count_get`) or in the row's next statement."""
        self.counters.api_requests[endpoint] += 1 + stats.retries + stats.rate_limited
        counts = {"retries": stats.retries, "rate_limited": stats.rate_limited}
        counts["polls" if endpoint == "status" else "result_reads"] = 1
        return counts

    async def count_download_retries(self, job: Job, retries: int) -> None:
        """Add ``retries`` image downloads of the row tried again (a cut body, a lost
        connection, a timeout): not API requests, counted apart from them."""
        await self.checkpoint.increment(job.id, "download_retries", retries)

    async def complete(self, job: Job, **fields: Any) -> None:
        await self.checkpoint.update(job.id, state="COMPLETED", error=None, **fields)
        self.counters.completed += 1
        self._release(job.id)

    async def fail(
        self, job: Job, error: str, *, counts: Mapping[str, int] | None = None, **fields: Any
    ) -> None:
        await self.checkpoint.update(job.id, counts=counts, state=FAILED, error=error, **fields)
        self.counters.failed += 1
        self.counters.failed_reasons[reason_key(error)] += 1
        self._release(job.id)

    async def requeue(self, job: Job) -> None:
        """Hand a job back to be submitted again (its old request is gone or failed)."""
        await self.checkpoint.update(job.id, state=PENDING, **NO_JOB, **NO_OUTCOME)
        self._release(job.id)
        self.requeued.append(job)
        self.requeue_signal.set()

    async def resubmit_failed(self, job: Job, error: str) -> None:
        """A job that ended FAILED, submitted again (``--max-failed-retries``). The first
        of each reason is logged, the others counted (progress lines, summary): a line
        per job was nearly all of a long run's log, at a few percent of FAILED jobs."""
        if job.removed:  # no longer in the manifest: nobody wants it paid again
            await self.fail(job, f"job FAILED ({error}); {REMOVED}")
            return
        seen = self.counters.resubmitted_failed
        reason = reason_key(error)
        first = not seen[reason]
        seen[reason] += 1
        log.log(
            logging.INFO if first else logging.DEBUG,
            "row %s: job FAILED (%s); submitting it again%s",
            job.id,
            error,
            "; more jobs FAILED for this reason are counted in the progress lines" if first else "",
        )
        await self.requeue(job)

    async def resubmit_or_fail(self, job: Job, why: str) -> None:
        """A paid job whose result is gone (expired, or unknown to the API): submit it
        again while the row has submits left (``max_failed_retries`` more than the
        first), else FAILED. A queue longer than the retention would otherwise pay for
        every row again and again."""
        if job.removed:  # no longer in the manifest: nobody wants it paid again
            await self.fail(job, f"{why}; {REMOVED}")
            return
        if job.attempts <= self.retry.max_failed_retries:
            self.counters.resubmitted_expired += 1
            log.warning("row %s: %s; submitting it again (it was paid for)", job.id, why)
            await self.requeue(job)
            return
        await self.fail(
            job,
            f"{why}; submitted {job.attempts} times (each may be billed), not sent again: "
            "--retry-failed sends it again",
        )

    async def unsubmitted(self, job: Job, *, counts: Mapping[str, int] | None = None) -> None:
        """A job taken for submit that was not sent, or refused before a job existed (the
        run is stopping): back to PENDING with ``job.attempts``, the submits that counted,
        and what its tries cost (``counts``: retries, 429s) in the same write."""
        await self.checkpoint.update(job.id, counts=counts, state=PENDING, attempts=job.attempts)
        self._release(job.id)
