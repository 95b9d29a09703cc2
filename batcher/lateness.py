"""How late status polls start against the schedule: is the client keeping up?

The poll schedule places each poll for a reason (POLLING.md); a poll that starts late
adds its delay to the job's detection lag, and a client that cannot keep up (a busy CPU,
too many jobs in flight for one event loop, an emulator run at a tiny time scale) makes
polls-per-job and lag figures describe the client, not the API. The poller records, for
every poll it takes off its heap, how long after its planned time it started (waits for
the rate limit are the run's budget, not lateness, and are not counted) and the gap it
was planned for. A run warns once when the recent polls are late by a large share of
their gaps, and its summary gives the percentiles.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

#: Polls over which "running late" is judged, and how often it is judged.
WINDOW = 64
#: Fewest polls of a last, partial window judged at the end of a run.
FINAL_MIN = 16
#: Late by this share of the planned gap (median over a window) counts as running late.
LATE_SHARE = 0.1
#: Polls whose lateness is kept for the run's percentiles (a uniform sample of all).
RESERVOIR = 4096


def late_share(late_s: Sequence[float], planned_s: Sequence[float]) -> float | None:
    """Median of lateness / planned gap over a window of polls; None for an empty one.
    A poll planned with no gap (due at once) counts as on time when it is."""
    if len(late_s) != len(planned_s):
        raise ValueError("late_s and planned_s must be the same length")
    if not late_s:
        return None
    shares = [
        late / planned if planned > 0 else (0.0 if late <= 0 else float("inf"))
        for late, planned in zip(late_s, planned_s, strict=True)
    ]
    return statistics.median(shares)


def running_late(share: float | None, threshold: float = LATE_SHARE) -> bool:
    """Whether polls start late enough to distort polls-per-job and detection lag."""
    return share is not None and share > threshold


@dataclass
class PollLateness:
    """Running record of poll start lateness; ``record`` once per poll."""

    polls: int = 0
    #: Share of the gap of the most recent full window (see :func:`late_share`).
    recent_share: float | None = None
    #: The window whose share first passed LATE_SHARE, once (for the warning).
    behind_since_poll: int | None = None
    _late: list[float] = field(default_factory=list, repr=False)
    _planned: list[float] = field(default_factory=list, repr=False)
    _sample: list[float] = field(default_factory=list, repr=False)
    _rng: random.Random = field(default_factory=lambda: random.Random(0), repr=False)

    def record(self, late_s: float, planned_s: float) -> bool:
        """Add one poll; True exactly once: when a window first shows the run behind."""
        late = max(0.0, late_s)
        self.polls += 1
        if len(self._sample) < RESERVOIR:
            self._sample.append(late)
        else:
            slot = self._rng.randrange(self.polls)
            if slot < RESERVOIR:
                self._sample[slot] = late
        self._late.append(late)
        self._planned.append(planned_s)
        if len(self._late) < WINDOW:
            return False
        self.recent_share = late_share(self._late, self._planned)
        self._late.clear()
        self._planned.clear()
        if self.behind_since_poll is None and running_late(self.recent_share):
            self.behind_since_poll = self.polls
            return True
        return False

    @property
    def fell_behind(self) -> bool:
        """Whether any window, or the run's last partial one of FINAL_MIN polls or more,
        was running late."""
        if self.behind_since_poll is not None:
            return True
        return len(self._late) >= FINAL_MIN and running_late(late_share(self._late, self._planned))

    def percentiles(self) -> tuple[float, float] | None:
        """(p50, p90) lateness in seconds over the run's polls (a uniform sample)."""
        if not self._sample:
            return None
        ordered = sorted(self._sample)

        def at(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return at(0.5), at(0.9)
