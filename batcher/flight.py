"""A submitted job while the run tracks it in memory: its request, its clocks and what
its polls have seen. The checkpoint holds its request_id; this holds the rest, compactly
(a hundred thousand of them may be in flight at once)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from batcher.jobs import Job


def _compact_urls(request_id: str, status_url: str, response_url: str) -> str | tuple[str, str]:
    """The common prefix when the URLs are ``{prefix}{id}/status`` and ``{prefix}{id}``
    (as Segmind's are), else both URLs: two long strings per job in flight are ~25 MB at
    100,000 jobs."""
    if response_url.endswith(request_id) and status_url == f"{response_url}/status":
        prefix = response_url[: len(response_url) - len(request_id)]
        return sys.intern(prefix)  # one string for every job of the run
    return (status_url, response_url)


@dataclass(slots=True)
class Flight:
    """A submitted job while it is tracked in memory (the checkpoint has its request_id).
    Made with :meth:`start`."""

    job: Job
    request_id: str
    urls: str | tuple[str, str]  # see _compact_urls
    submitted_wall: float  # epoch seconds
    submitted_mono: float  # loop time
    last_poll_mono: float | None = None
    last_gap: float = 0.0
    processing_since: float | None = None
    state: str = "QUEUED"
    #: Loop time from which the job's latency clock runs: its submit, or the last
    #: status poll that found it still QUEUED (it started after that poll went out).
    clock_mono: float | None = None
    #: Status or result requests in a row that got no usable answer (each after its
    #: own retries): the next poll backs off by this count.
    errors: int = 0
    #: The outputs of a job seen COMPLETED whose images are not all saved yet: they are
    #: downloaded again from these, without the result (see batcher.redownload).
    outputs: list[str] | None = None
    #: The result was read again in this run for fresh links, after the links refused.
    asked_links: bool = False
    #: Loop time of the status answer that first said COMPLETED: when polling saw the
    #: job done (the result read after it may wait its turn at the rate limit).
    seen_done_mono: float | None = None
    #: Re-created by a later run than the one that submitted it (batcher.resume): its
    #: latency clock runs across the time batcher was stopped.
    resumed: bool = False

    @classmethod
    def start(
        cls,
        *,
        job: Job,
        request_id: str,
        status_url: str,
        response_url: str,
        submitted_wall: float,
        now_wall: float,
        now_mono: float,
        resumed: bool = False,
    ) -> Flight:
        """A job submitted at ``submitted_wall`` (epoch seconds), seen from the clocks'
        readings now; ``resumed``: by an earlier run. A submit time ahead of now (the wall
        clock was stepped back since) counts as now."""
        return cls(
            job=job,
            request_id=request_id,
            urls=_compact_urls(request_id, status_url, response_url),
            submitted_wall=submitted_wall,
            submitted_mono=now_mono - max(0.0, now_wall - submitted_wall),
            resumed=resumed,
        )

    @property
    def status_url(self) -> str:
        urls = self.urls
        return urls[0] if isinstance(urls, tuple) else f"{urls}{self.request_id}/status"

    @property
    def response_url(self) -> str:
        urls = self.urls
        return urls[1] if isinstance(urls, tuple) else f"{urls}{self.request_id}"

    def elapsed(self, now: float) -> float:
        """Seconds since submit (what the retention deadline counts)."""
        return now - self.submitted_mono

    @property
    def clock_offset(self) -> float:
        """Seconds from submit to the start of the job's latency clock (its known queue)."""
        return 0.0 if self.clock_mono is None else self.clock_mono - self.submitted_mono

    def clock(self, now: float) -> float:
        """Seconds of the job's latency clock: what the latency model predicts."""
        return self.elapsed(now) - self.clock_offset
