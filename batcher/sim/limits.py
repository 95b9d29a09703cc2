"""Per-key request limits and the credit balance, as the emulated account sees them."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """Whether a request may pass; if not, how long until one would (wall seconds)."""

    allowed: bool
    retry_after: float = 0.0


class SlidingWindow:
    """At most ``limit`` requests in any window of ``period`` seconds, per key."""

    def __init__(self, limit: int | None, period: float, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._period = period
        self._clock = clock
        self._seen: dict[str, deque[float]] = {}

    def hit(self, key_id: str) -> Verdict:
        """Count one request for the key, unless it is over the limit."""
        if self._limit is None:
            return Verdict(True)
        now = self._clock()
        window = self._seen.setdefault(key_id, deque())
        while window and window[0] <= now - self._period:
            window.popleft()
        if len(window) >= self._limit:
            return Verdict(False, window[0] + self._period - now)
        window.append(now)
        return Verdict(True)


class Credits:
    """The account balance in USD; None is unlimited. Kept in micro-dollars to stay exact."""

    def __init__(self, usd: float | None) -> None:
        self._micros: int | None = None if usd is None else round(usd * 1_000_000)

    @property
    def remaining(self) -> float | None:
        return None if self._micros is None else self._micros / 1_000_000

    def charge(self, usd: float) -> bool:
        """Take the cost of one job, or False when the balance cannot pay it."""
        if self._micros is None:
            return True
        cost = round(usd * 1_000_000)
        if cost > self._micros:
            return False
        self._micros -= cost
        return True

    def add(self, usd: float) -> None:
        if self._micros is not None:
            self._micros += round(usd * 1_000_000)
