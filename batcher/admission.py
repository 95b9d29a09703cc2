"""How many jobs of a model may wait in the service's queue.

A result is kept an hour after its submit, queue time included: a job still queued
then is paid for and lost, and submitting it again puts it at the back of the same
queue. So a job is submitted only if, behind the jobs already waiting, it can start
and finish well within that hour (the horizon: the retention share that polls keep,
half by default).

A job waits from its submit until a status poll sees it PROCESSING (or done); polls
are sparse, so this over-counts, which errs on the safe side. The service's
parallelism is its throughput times the service time (Little's law), the throughput
being the completions seen over the last few service times; before any completion,
the jobs seen PROCESSING; at least 1. (Jobs seen PROCESSING are no measure once jobs
complete: one whose completion no poll has seen yet still counts as running.) A run
starts with a window of ``horizon / service time`` jobs a model (11 for InfiniteYou's
163 s, 233 for InstantID's 7.7 s) and widens it as it sees jobs start and finish.
"""

from __future__ import annotations

from collections import Counter, deque

__all__ = ["QueueWatch", "may_submit"]

#: Flight states that hold a place at the service: not started, started.
WAITING, RUNNING = "QUEUED", "PROCESSING"
#: Completions counted over this many service times, to measure the throughput.
SERVICE_TIMES = 4.0


def may_submit(*, waiting: int, parallel: float, service_s: float, horizon_s: float) -> bool:
    """Whether one more job may join ``waiting`` jobs not yet started: served
    ``parallel`` at a time, ``service_s`` each, it would finish within ``horizon_s``.
    With nothing waiting, always (a model slower than the horizon still runs)."""
    if waiting <= 0:
        return True
    return (waiting / max(parallel, 1.0) + 1.0) * service_s <= horizon_s


class QueueWatch:
    """Per model: jobs admitted or in flight and not yet seen started, jobs seen
    PROCESSING, and when jobs were seen COMPLETED lately.

    Flights carry their own state (``Flight.state``); this keeps the counts in step
    through :meth:`moved`, and counts jobs admitted but not yet answered by their submit
    (``reserve``/``unreserve``, taken by the feeder at each hand-off), so that jobs handed
    to submit workers but not yet sent cannot overshoot.
    """

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        self._reserved: dict[str, str] = {}  # job id -> model, until its flight exists
        self._done: dict[str, deque[float]] = {}
        self._since: dict[str, float] = {}  # when the model's first job was admitted

    def waiting(self, model: str) -> int:
        return self._counts[model, WAITING]

    def running(self, model: str) -> int:
        return self._counts[model, RUNNING]

    def reserve(self, job_id: str, model: str, now: float) -> None:
        """A job admitted for submit: it waits from now on."""
        if job_id not in self._reserved:
            self._reserved[job_id] = model
            self._since.setdefault(model, now)
            self._counts[model, WAITING] += 1

    def unreserve(self, job_id: str) -> None:
        """The admitted job became a flight (which counts itself), or was not sent."""
        model = self._reserved.pop(job_id, None)
        if model is not None:
            self._counts[model, WAITING] -= 1

    def moved(self, model: str, old: str | None, new: str | None, now: float) -> None:
        """A flight of ``model`` went from state ``old`` to ``new`` (None: not in flight)."""
        if old in (WAITING, RUNNING):
            self._counts[model, old] -= 1
        if new in (WAITING, RUNNING):
            self._counts[model, new] += 1
            self._since.setdefault(model, now)
        elif new == "COMPLETED":
            self._done.setdefault(model, deque()).append(now)

    def parallel(self, model: str, now: float, service_s: float) -> float:
        """Jobs of ``model`` the service runs at once, as far as this run has seen."""
        window = SERVICE_TIMES * service_s
        done = self._done.get(model)
        while done and done[0] < now - window:
            done.popleft()
        if not done:
            return float(max(1, self.running(model)))
        seen_for = min(window, now - self._since.get(model, now))
        return max(1.0, len(done) * service_s / max(seen_for, service_s))
