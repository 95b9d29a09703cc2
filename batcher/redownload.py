"""Images of COMPLETED jobs that could not be downloaded, tried again from their saved URLs.

The job is billed, and its output URLs (public, kept about 7 days) outlive its result
(1 hour): a failed download is never a reason to fail the row, to GET the result again
(an API request, under the rate limit; but see refused links below), or to submit the
job again (pay twice). Each row is tried again after an exponential backoff with jitter.
When such rows are all the run has left, and have been for ``patience_s``, the run
stops, resumable (exit 4): the next run downloads them from the checkpoint without any
API request.

A link that refuses (403, 404, 410: not yet on the CDN, an expired signature, gone) is
tried again like any other failure; at its second refusal, while the result is still
kept, the result is read once more for fresh links (one API request); and once its
links have been refused for ``refused_grace_s`` the row is FAILED: waiting longer (or
across runs, for days) would not bring back a file that is gone.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import anyio

from batcher.due import DueHeap
from batcher.errors import UsageError

if TYPE_CHECKING:  # options.py holds a DownloadRetry, and pipeline.py the options
    from batcher.flight import Flight
    from batcher.pipeline import RunContext

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DownloadRetry:
    """How the images of a COMPLETED job are tried again after a download failed past its
    own retries. Durations are model seconds (multiplied by the run's time scale)."""

    #: Ceiling of the first wait; it doubles per failure...
    base_s: float = 5.0
    #: ...up to this.
    cap_s: float = 240.0
    #: How long such rows may keep failing once nothing else is left to do in the run,
    #: before it stops (exit 4) for the next run to try again.
    patience_s: float = 900.0
    #: How long a row's links may answer 403/404/410 (a file not yet on the CDN, a
    #: signature expired) before its images are taken for lost and the row FAILED.
    refused_grace_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("base_s", "cap_s", "patience_s", "refused_grace_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"DownloadRetry.{name} must be a positive number, got {value!r}")
        if self.cap_s < self.base_s:
            raise UsageError(
                f"DownloadRetry.cap_s ({self.cap_s}) must be at least base_s ({self.base_s})"
            )


def retry_delay(failures: int, cfg: DownloadRetry, scale: float, rng: random.Random) -> float:
    """Seconds before the next try after ``failures`` (>= 1) in a row: half the ceiling
    ``min(cap_s, base_s * 2**(failures - 1))``, plus up to as much again at random, so
    the rows of one outage do not come back together."""
    ceiling = min(cfg.cap_s, cfg.base_s * 2.0 ** min(failures - 1, 62)) * scale
    return rng.uniform(ceiling / 2, ceiling)


#: What an output link answers when it will not serve the file (as opposed to an outage):
#: no key or an expired signature (401, 403), no such file (404), removed (410).
REFUSED = frozenset({401, 403, 404, 410})


class OnRefusal(Enum):
    """What to do after an output link refused (see :func:`on_refusal`)."""

    ASK_RESULT = "read the result again for fresh links"
    RETRY = "try the same links again later"
    GIVE_UP = "the images are lost: FAILED"


def on_refusal(
    *, refusals: int, result_kept: bool, asked: bool, refused_for_s: float, grace_s: float
) -> OnRefusal:
    """After the ``refusals``-th refusal (>= 1) of a row's links, the first one
    ``refused_for_s`` ago: read the result again for fresh links once, at the second
    refusal (the first is most often a file not yet on the CDN, and a result read is an
    API request under the rate limit), while it is kept (``result_kept``) and not done
    yet (``asked``); retry the links while within ``grace_s`` of the first refusal; then
    give up."""
    if refusals >= 2 and result_kept and not asked:
        return OnRefusal.ASK_RESULT
    if refused_for_s < grace_s:
        return OnRefusal.RETRY
    return OnRefusal.GIVE_UP


def stop_reason(count: int, last_error: str) -> str:
    """Why the run stops with ``count`` rows whose images could not be downloaded."""
    return (
        f"{count} jobs are COMPLETED and billed but their images could not be downloaded "
        f"(last error: {last_error}); run the same command again to retry the downloads "
        "(links are kept about 7 days); nothing will be submitted again"
    )


@dataclass(slots=True)
class _Failing:
    failures: int
    reason: str


class Redownloads:
    """The rows whose images are waiting for another try, on a heap by due time.

    ``run`` tries each when due, through ``attempt`` (which reports back with
    :meth:`failed` or :meth:`done`), at most ``concurrency`` at once."""

    def __init__(self, ctx: RunContext, *, concurrency: int = 16) -> None:
        self._ctx = ctx
        self._cfg = ctx.options.download_retry
        self._due: DueHeap[Flight] = DueHeap(ctx.now)
        self._limit = anyio.Semaphore(concurrency)
        self._failing: dict[str, _Failing] = {}
        #: Per row, (refusals of its links so far, loop time of the first) in this run.
        self._refused: dict[str, tuple[int, float]] = {}
        #: Loop time since when every row in flight has been one of these (None: not so).
        self._alone_since: float | None = None
        self._stopped = False

    def __len__(self) -> int:
        """Rows whose last download failed and that are not done yet."""
        return len(self._failing)

    def resume(self, flight: Flight) -> None:
        """A row an earlier run left with saved output URLs: try it now."""
        self._push(flight, 0.0)

    def failed(self, flight: Flight, reason: str) -> None:
        """The row's images could not be downloaded (``reason`` shows no URL query): try
        again later, or set it aside for the next run if the run is stopping for these."""
        ctx = self._ctx
        entry = self._failing.setdefault(flight.job.id, _Failing(0, reason))
        entry.failures += 1
        entry.reason = reason
        if self._stopped:
            ctx.set_aside(flight.job)
            return
        delay = retry_delay(entry.failures, self._cfg, ctx.options.scale, ctx.rng)
        # Once a row at warning level: an outage would otherwise print a line per row per try.
        level = logging.WARNING if entry.failures == 1 else logging.INFO
        log.log(
            level,
            "row %s: the job is COMPLETED (billed) but %s; downloading again in %.3g s "
            "from its saved links (no API request)",
            flight.job.id,
            reason,
            delay,
        )
        self._push(flight, delay)
        self._check_patience(reason)

    def refused(self, job_id: str) -> tuple[int, float]:
        """The row's links refused once more: how many refusals so far in this run, and
        seconds since the first."""
        now = self._ctx.now()
        count, since = self._refused.get(job_id, (0, now))
        self._refused[job_id] = (count + 1, since)
        return count + 1, now - since

    def done(self, job_id: str) -> None:
        """The row is COMPLETED or FAILED: no longer waiting for its images."""
        self._failing.pop(job_id, None)
        self._refused.pop(job_id, None)

    def _push(self, flight: Flight, delay: float) -> None:
        self._due.push(self._ctx.now() + delay, flight)

    def _check_patience(self, last_error: str) -> None:
        """Stop the run once rows waiting for their images are all it has had in flight
        for ``patience_s``: nothing else can finish, and trying for ever helps no one."""
        ctx = self._ctx
        waiting = len(self._failing)
        # All slots held by such rows: a row the feeder holds out cannot be sent anyway.
        alone = ctx.active == waiting or (
            waiting >= ctx.options.max_in_flight and ctx.in_flight == waiting
        )
        now = ctx.now()
        if not alone:
            self._alone_since = None
            return
        if self._alone_since is None:
            self._alone_since = now
        if now - self._alone_since < self._cfg.patience_s * ctx.options.scale:
            return
        self._stopped = True
        ctx.stop(stop_reason(waiting, last_error))
        for flight in self._due.drain():  # those being tried now: set aside if they fail
            ctx.set_aside(flight.job)

    async def run(self, attempt: Callable[[Flight], Awaitable[None]]) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                _, flight = await self._due.next_due()
                await self._limit.acquire()
                tg.start_soon(self._guarded, attempt, flight)

    async def _guarded(self, attempt: Callable[[Flight], Awaitable[None]], flight: Flight) -> None:
        try:
            await attempt(flight)
        finally:
            self._limit.release()
