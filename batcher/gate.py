"""One gate for every API request: the account's rate limit, priorities, and 429s.

Segmind's per-minute limit is assumed to count every request (submit, status,
result), so all of them pass here. When requests wait, a result fetch goes before
a status poll, and a poll before a new submit: finishing paid work comes first.
A 429 pauses everyone (the whole pipeline slows, not one request) and cuts the
rate; steady success brings it back up (AIMD).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import re
from dataclasses import dataclass, replace
from enum import IntEnum

from aiolimiter import AsyncLimiter

from batcher.backoff import RetryConfig, backoff_delay
from batcher.errors import UsageError

_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
            "h": 3600.0, "hour": 3600.0}  # fmt: skip


class Priority(IntEnum):
    """Lower goes first."""

    FETCH = 0
    POLL = 1
    SUBMIT = 2


@dataclass(frozen=True, kw_only=True)
class RateConfig:
    """The client's request budget. The default stays just under Pro's 50 requests/minute."""

    requests: float = 48.0
    period_s: float = 60.0
    #: The rate never adapts below this fraction of the configured one.
    floor_fraction: float = 0.05
    #: Each 429 multiplies the rate by this; each success adds back a sliver.
    decrease: float = 0.7
    #: Submits left waiting count as the limit binding only when their backlog takes at
    #: least this long to drain at the current rate. A shorter one (a start-up burst at a
    #: rate far above need) is gone before any poll it would thin is due.
    bind_s: float = 1.0

    def __post_init__(self) -> None:
        if not (self.requests > 0 and self.period_s > 0):
            raise UsageError(f"rate must be positive, got {self.requests}/{self.period_s}s")
        if not 0 < self.floor_fraction <= 1 or not 0 < self.decrease < 1:
            raise UsageError("floor_fraction must be in (0, 1] and decrease in (0, 1)")
        if not 0 <= self.bind_s < math.inf:
            raise UsageError(f"bind_s must be a number >= 0, got {self.bind_s}")

    @property
    def per_second(self) -> float:
        return self.requests / self.period_s

    def scaled(self, time_scale: float) -> RateConfig:
        """The same budget over a time-scaled period (for a time-scaled emulator)."""
        return replace(self, period_s=self.period_s * time_scale, bind_s=self.bind_s * time_scale)


def parse_rate(text: str) -> RateConfig:
    """``"50/min"``, ``"2/s"``, ``"3000/h"`` -> a :class:`RateConfig`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*/\s*([a-z]+)\s*", text.lower())
    if not match or match.group(2) not in _PERIODS:
        raise UsageError(f"--rate {text!r} is not N/s, N/min or N/h (e.g. 50/min)")
    return RateConfig(requests=float(match.group(1)), period_s=_PERIODS[match.group(2)])


class RequestGate:
    """Grants API requests one at a time at the current rate, highest priority first.

    Run :meth:`serve` in the run's task group; callers ``await gate.acquire(priority)``
    before each request and report 429s with :meth:`rate_limited`.
    """

    def __init__(
        self,
        config: RateConfig,
        *,
        retry: RetryConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._retry = retry or RetryConfig()
        self._rng = rng or random.Random()
        self._rate = config.per_second
        self._limiter = _limiter(self._rate)
        #: Tokens to take from the bucket, unused, before its next grant (see _BURST).
        self._spend = 1
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._paused_until = 0.0
        self._streak_429 = 0
        #: Share of recent grants that left a backlog of submits waiting (one that takes
        #: ``config.bind_s`` or more to drain): 1.0 means the limit binds.
        self.pressure = 0.0
        self._submits_waiting = 0
        self.granted = 0
        self.limited = 0

    @property
    def rate(self) -> float:
        """Current requests per second after adaptation."""
        return self._rate

    async def acquire(self, priority: Priority) -> None:
        """Wait for this request's turn."""
        loop = asyncio.get_running_loop()
        if (
            not self._waiters
            and not self._spend
            and self._paused_until <= loop.time()
            and self._limiter.has_capacity()
        ):
            # Nobody waits and a token is there: granted at once, without a round trip
            # through serve() (when the limit is slack, that is every request).
            await self._limiter.acquire()  # returns without suspending: it has capacity
            self._granted(starved=False)
            return
        future = loop.create_future()
        heapq.heappush(self._waiters, (int(priority), next(self._seq), future))
        if priority == Priority.SUBMIT:
            self._submits_waiting += 1
            future.add_done_callback(self._submit_cancelled)
        self._wake.set()
        await future  # a cancelled waiter is skipped by serve()

    def _submit_cancelled(self, future: asyncio.Future[None]) -> None:
        # A granted submit left the count in serve(), at its grant: its done-callback
        # runs later, after any grant that serve() makes without yielding in between.
        if future.cancelled():
            self._submits_waiting -= 1

    def _granted(self, *, starved: bool) -> None:
        self.granted += 1
        self.pressure += 0.05 * (float(starved) - self.pressure)

    def waiting(self, priority: Priority) -> int:
        return sum(1 for p, _, f in self._waiters if p == priority and not f.done())

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not any(not f.done() for *_, f in self._waiters):
                self._waiters.clear()
                self._wake.clear()
                await self._wake.wait()
            pause = self._paused_until - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
                continue
            while self._spend:  # a new bucket opens with no burst (see _BURST)
                self._spend -= 1
                await self._limiter.acquire()
            await self._limiter.acquire()
            if self._paused_until > loop.time():
                continue  # a 429 arrived while we waited for the token
            while self._waiters:
                priority, _, future = heapq.heappop(self._waiters)
                if not future.done():
                    future.set_result(None)
                    if priority == Priority.SUBMIT:
                        self._submits_waiting -= 1
                    self._granted(
                        starved=binds(self._submits_waiting, self._rate, self.config.bind_s)
                    )
                    break

    def rate_limited(self, retry_after: float | None) -> float:
        """A 429 came back: pause every request, slow down; returns the pause in seconds."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.limited += 1
        if now >= self._paused_until:  # cut once per pause, not once per 429 in the burst
            floor = self.config.per_second * self.config.floor_fraction
            self._set_rate(max(floor, self._rate * self.config.decrease))
            self._streak_429 += 1
        if retry_after is None:
            wait = max(1 / self._rate, backoff_delay(self._streak_429, self._retry, self._rng))
        else:
            wait = retry_after
        self._paused_until = max(self._paused_until, now + wait)
        return wait

    def succeeded(self) -> None:
        """A request got through: creep back towards the configured rate."""
        self._streak_429 = 0
        target = self.config.per_second
        if self._rate < target:
            self._set_rate(min(target, self._rate + target * 0.01))

    def _set_rate(self, per_second: float) -> None:
        self._rate = per_second
        self._limiter = _limiter(per_second)
        self._spend = _BURST


#: Tokens the bucket holds. With one, every grant that the event loop serves late
#: loses that lateness for good (a 1 ms lag at 80 requests/s wastes 8% of the budget);
#: with two, it is made up at the next grant. The first bucket starts with its spare
#: token spent, so the run does not open with a burst: any window of the server's
#: period sees at most one request above the configured rate (48/min: 49 of Pro's 50).
#: A bucket that replaces another (each rate change: a cut at a 429, and every step of
#: the climb back, one per success) starts with both spent, so its next grant waits an
#: interval as under the old one. It used to start with one: every success while the
#: rate climbed back granted the next request at once, a burst that drew the next 429,
#: so one 429 became a cycle of hundreds.
_BURST = 2


def binds(submits_waiting: int, per_second: float, bind_s: float) -> bool:
    """Whether a grant that leaves ``submits_waiting`` submits behind shows the limit
    binding: some wait, and draining them at ``per_second`` takes ``bind_s`` or more."""
    # The relative slack keeps an exact boundary exact after time scaling's rounding
    # (120/min at scale 0.003 is 2.0000000000000004 requests per bind_s).
    return submits_waiting > 0 and submits_waiting * (1 + 1e-9) >= per_second * bind_s


def _limiter(per_second: float) -> AsyncLimiter:
    return AsyncLimiter(_BURST, _BURST / per_second)
