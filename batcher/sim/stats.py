"""What the emulator saw: counters for tests and benchmarks (``GET /__sim/stats``)."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


def _summary(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "p50": ordered[len(ordered) // 2],
        "p95": p95,
        "max": ordered[-1],
    }


@dataclass
class SimStats:
    """Counters by endpoint and outcome, plus the figures that prove a client's behaviour."""

    #: (endpoint, outcome) -> count; outcome is the HTTP status or "dropped".
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Jobs accepted, each charged at submit (the charge of one that ends FAILED is returned).
    accepted: int = 0
    #: Accepted jobs that do not end FAILED: the ones the account pays for.
    billed: int = 0
    #: Billed jobs whose payload matched an earlier billed one from the same key.
    paid_twice: int = 0
    #: Submits accepted, then the connection was dropped: the client never heard, and the job
    #: is billed (unless it ends FAILED, as any job).
    accepted_then_dropped: int = 0
    #: Completion (or failure) to the first status poll that saw it, wall seconds.
    detection_lag: list[float] = field(default_factory=list)
    #: Status polls each job took until one saw it done.
    polls_per_job: list[int] = field(default_factory=list)
    _payloads: set[tuple[str, str]] = field(default_factory=set)

    def count(self, endpoint: str, outcome: int | str) -> None:
        self.requests[(endpoint, str(outcome))] += 1

    def accept(self, key_id: str, digest: str, *, billed: bool) -> None:
        """Count an accepted job; ``billed`` is False for one that will end FAILED."""
        self.accepted += 1
        if not billed:
            return
        self.billed += 1
        if (key_id, digest) in self._payloads:
            self.paid_twice += 1
        else:
            self._payloads.add((key_id, digest))

    def total(self, endpoint: str | None = None, outcome: int | str | None = None) -> int:
        """Requests seen, optionally for one endpoint and/or one outcome."""
        return sum(
            n
            for (e, o), n in self.requests.items()
            if (endpoint is None or e == endpoint) and (outcome is None or o == str(outcome))
        )

    def snapshot(self, time_scale: float = 1.0) -> dict[str, Any]:
        """A JSON-ready view; lags are also given in model seconds (divided by time_scale)."""
        by_endpoint: dict[str, dict[str, int]] = {}
        for (endpoint, outcome), n in sorted(self.requests.items()):
            by_endpoint.setdefault(endpoint, {})[outcome] = n
        lag = _summary(self.detection_lag)
        lag_model = _summary([x / time_scale for x in self.detection_lag])
        return {
            "requests": by_endpoint,
            "accepted": self.accepted,
            "billed": self.billed,
            "paid_twice": self.paid_twice,
            "accepted_then_dropped": self.accepted_then_dropped,
            "detection_lag_s": lag,
            "detection_lag_model_s": lag_model,
            "polls_per_job": _summary([float(p) for p in self.polls_per_job]),
        }
