"""The emulator's jobs: each one's fate is fixed at submit, its state read off the clock.

No task runs per job. A submit draws the latency, takes the earliest free worker of
its model (FIFO, so ``capacity`` makes the rest wait QUEUED), and stores when it
starts and ends; a status request compares those times with now. That keeps a
hundred thousand jobs in flight cheap.
"""

from __future__ import annotations

import heapq
import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batcher.schemas import ModelSpec
from batcher.sim.config import SimConfig

#: Realistic reasons a job ends FAILED.
FAILURES = (
    "No face detected in the input image",
    "Content policy violation: the request was blocked by the safety filter (RAI)",
)
#: A prompt containing one of these markers fails with that reason, for exact tests.
FAIL_MARKERS = {"sim:no-face": FAILURES[0], "sim:blocked": FAILURES[1]}


class Job:
    """One submitted request and its predetermined timeline (wall-clock seconds)."""

    __slots__ = (
        "cost",
        "digest",
        "done_at",
        "error",
        "first_seen_done",
        "key_id",
        "model",
        "params",
        "polls",
        "request_id",
        "seed",
        "started_at",
        "submitted_at",
    )

    def __init__(
        self,
        *,
        request_id: str,
        model: ModelSpec,
        params: dict[str, Any],
        seed: int,
        key_id: str,
        digest: str,
        submitted_at: float,
        started_at: float,
        done_at: float,
        error: str | None,
        cost: float,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.params = params
        self.seed = seed
        self.key_id = key_id
        self.digest = digest
        self.submitted_at = submitted_at
        self.started_at = started_at
        self.done_at = done_at
        self.error = error
        self.cost = cost
        self.polls = 0
        self.first_seen_done: float | None = None

    def state(self, now: float) -> str:
        if now < self.started_at:
            return "QUEUED"
        if now < self.done_at:
            return "PROCESSING"
        return "FAILED" if self.error else "COMPLETED"

    def metrics(self) -> dict[str, float]:
        """What the server reports once the job is done (wall seconds)."""
        return {
            "inference_time": round(self.done_at - self.started_at, 6),
            "queue_time": round(self.started_at - self.submitted_at, 6),
            "total_time": round(self.done_at - self.submitted_at, 6),
            "cost": 0.0 if self.error else self.cost,  # a FAILED job is not billed
        }


@dataclass(frozen=True)
class _Model:
    mu: float
    sigma: float


class JobTable:
    """Every live job, the per-model worker pools, and retention."""

    def __init__(self, config: SimConfig, clock: Callable[[], float]) -> None:
        self._cfg = config
        self._clock = clock
        self._rng = random.Random(config.seed)
        self._jobs: dict[str, Job] = {}
        self._workers: dict[str, list[float]] = {}  # per model: heap of times a worker frees
        self._warm_until: dict[str, float] = {}
        self._ready_at: dict[str, float] = {}  # when a cold model's boot ends
        self._expiry: list[tuple[float, str]] = []  # heap of (expires_at, request_id)

    def __len__(self) -> int:
        return len(self._jobs)

    def _latency(self, model: ModelSpec) -> float:
        median = self._cfg.latency_median_s.get(model.slug, model.median_latency_s)
        sigma = model.latency_sigma if self._cfg.latency_sigma is None else self._cfg.latency_sigma
        if median <= 0:
            return 0.0
        draw = self._rng.lognormvariate(math.log(median), sigma) if sigma > 0 else median
        return self._cfg.scaled(draw)

    def _start_time(self, slug: str, now: float) -> float:
        """FIFO: the job starts when the earliest worker of its model is free."""
        if self._cfg.capacity is None:
            return now
        pool = self._workers.setdefault(slug, [])
        if len(pool) < self._cfg.capacity:
            return now
        return max(now, heapq.heappop(pool))

    def submit(self, *, model: ModelSpec, params: dict[str, Any], key_id: str, digest: str) -> Job:
        """Accept a job: fix its timeline and fate now."""
        now = self._clock()
        start = self._start_time(model.slug, now)
        if self._cfg.cold_start_s and start > self._warm_until.get(model.slug, -math.inf):
            start += self._cfg.scaled(self._cfg.cold_start_s)
            self._ready_at[model.slug] = start
        # A job that arrives while the model boots waits for the boot too.
        start = max(start, self._ready_at.get(model.slug, -math.inf))
        done = start + self._latency(model)
        if self._cfg.capacity is not None:
            heapq.heappush(self._workers[model.slug], done)
        self._warm_until[model.slug] = max(
            self._warm_until.get(model.slug, -math.inf),
            done + self._cfg.scaled(self._cfg.cold_idle_s),
        )
        seed = params.get("seed")
        if not isinstance(seed, int) or seed < 0:
            seed = self._rng.randrange(1 << 40)
        job = Job(
            request_id=str(uuid.uuid4()),  # unique across emulators, even with one seed
            model=model,
            params=params,
            seed=seed,
            key_id=key_id,
            digest=digest,
            submitted_at=now,
            started_at=start,
            done_at=done,
            error=self._fate(params),
            cost=model.cost_usd,
        )
        self._jobs[job.request_id] = job
        heapq.heappush(
            self._expiry, (now + self._cfg.scaled(self._cfg.retention_s), job.request_id)
        )
        return job

    def _fate(self, params: dict[str, Any]) -> str | None:
        prompt = str(params.get("prompt", ""))
        for marker, error in FAIL_MARKERS.items():
            if marker in prompt:
                return error
        if self._cfg.fail_rate and self._rng.random() < self._cfg.fail_rate:
            return self._rng.choice(FAILURES)
        return None

    def get(self, request_id: str) -> Job | None:
        """The live job, or None when unknown or past retention."""
        self.expire()
        return self._jobs.get(request_id)

    def expire(self) -> int:
        """Forget jobs past retention; returns how many went."""
        now = self._clock()
        gone = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, request_id = heapq.heappop(self._expiry)
            if self._jobs.pop(request_id, None) is not None:
                gone += 1
        return gone
