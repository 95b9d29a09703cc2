"""When to poll a job next: the square-root checking rule over a learned latency model.

With a cost ``c1`` per status poll and ``c2`` per second a completion goes unnoticed,
the optimal density of polls at ``t`` seconds after submit is
``sqrt(c2 * h(t) / (2 * c1))``, ``h`` being the hazard of the job's latency
(Barlow, Hunter & Proschan 1963; Keller 1974; see ``POLLING.md``). This module turns
that into one pure decision, :func:`next_poll_delay`, with the first poll placed where
the same costs balance (:func:`optimal_first_poll`); the caller keeps the heap of
ids and the clock. Latency is modelled per model as a log-normal learned online
(:class:`batcher.latency.LatencyModel`), starting from the model page's prior.
"""

from __future__ import annotations

import bisect
import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from batcher.errors import UsageError
from batcher.latency import LatencyModel, mills_inverse, normal_sf

__all__ = [
    "PRESSURE_GAIN",
    "PollConfig",
    "cost_ratio_for",
    "expected_polls",
    "first_poll_quantile",
    "first_poll_time",
    "next_poll_delay",
    "optimal_first_poll",
    "poll_times",
    "simulate_schedule",
]

#: At full pressure (submits waiting for rate-limit tokens) a poll is worth
#: ``1 + PRESSURE_GAIN`` times more than when the limit is slack, so unclamped gaps
#: grow by ``sqrt(1 + PRESSURE_GAIN)``, about 3.2x. Then a poll spent is a job's
#: worth of throughput lost (jobs/min <= RPM / requests per job). With the first poll
#: and the gap cap moved up too (``PollConfig.bound_*``), a 163 s job (sigma 0.25)
#: drops from ~14.5 status polls to ~1.2 (noticed ~77 s late instead of ~2.5 s) and a
#: 7.7 s job (sigma 0.35) from ~5.4 to ~1.1 (~5 s late instead of ~0.4 s).
PRESSURE_GAIN = 9.0


# --- configuration --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PollConfig:
    """How status polls are spaced; every duration is multiplied by ``time_scale``."""

    #: Multiplies the latency priors and every duration below (the emulator can run
    #: time-scaled: 0.001 makes a 163 s job 0.163 s).
    time_scale: float = 1.0
    #: No poll before this quantile of the latency distribution.
    first_quantile: float = 0.03
    #: c2/c1 of POLLING.md with the rate limit slack: how many polls one second of
    #: detection lag is worth, for a job far longer than ``lag_reference_s``.
    cost_ratio: float = 5.5
    #: Lag also costs throughput in proportion to the job's own length (an in-flight
    #: slot idles for lag/median of its work), so for a model of median ``m`` the
    #: ratio used is ``cost_ratio * (1 + lag_reference_s / m)``: a second of lag on a
    #: 9 s job counts double. See :func:`cost_ratio_for` for why one constant fails.
    #: (11 until the InstantID polling benchmark ran unsaturated: at time scale 0.2
    #: it took 6.1 polls a job, lag 0.39 s; with 9, 5.6-5.8 polls, 0.43-0.45 s.)
    lag_reference_s: float = 9.0
    min_gap_s: float = 0.5
    #: A gap is at most this fraction of the model's current median latency, so a
    #: wrong model costs bounded lag. Not 0.1: for a 7.7 s model that cap (0.77 s)
    #: binds over the whole completion window and alone costs ~7 polls a job.
    max_gap_fraction: float = 0.2
    #: A gap is never longer than this, whatever the median.
    max_gap_s: float = 120.0
    #: Results vanish this long after submit.
    retention_s: float = 3600.0
    #: Every job is polled by ``submit + retention_safety * retention_s``.
    retention_safety: float = 0.5
    #: Gaps are multiplied by a uniform factor in ``[1 - jitter, 1 + jitter]``.
    jitter: float = 0.1
    #: The model-page prior counts as this many observed completions.
    prior_weight: float = 5.0
    #: When the rate limit binds (pressure 1) a poll costs a job's worth of throughput
    #: and lag costs none while slots are free: the first poll moves up to this
    #: quantile, and the gap cap to this fraction of the median, in proportion to the
    #: pressure. A 7.7 s job then takes ~1.1 status polls instead of ~5.4. (0.9 until
    #: the rate audit: a 163 s job of sigma 0.5 took 1.59 polls, 3.59 requests a job,
    #: where 0.94 takes 1.29; a later first poll would leave jobs noticed more than half
    #: a median late, and slots held that long.)
    bound_first_quantile: float = 0.94
    bound_max_gap_fraction: float = 0.5

    def __post_init__(self) -> None:
        positive = {
            "time_scale": self.time_scale,
            "cost_ratio": self.cost_ratio,
            "lag_reference_s": self.lag_reference_s,
            "min_gap_s": self.min_gap_s,
            "max_gap_fraction": self.max_gap_fraction,
            "max_gap_s": self.max_gap_s,
            "retention_s": self.retention_s,
            "prior_weight": self.prior_weight,
        }
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"PollConfig.{name} must be a positive number, got {value!r}")
        if not 0.0 < self.first_quantile < 0.5:
            raise UsageError(
                f"PollConfig.first_quantile must be in (0, 0.5), got {self.first_quantile!r}"
            )
        if not self.first_quantile <= self.bound_first_quantile < 1.0:
            raise UsageError(
                "PollConfig.bound_first_quantile must be in [first_quantile, 1), "
                f"got {self.bound_first_quantile!r}"
            )
        if not self.max_gap_fraction <= self.bound_max_gap_fraction:
            raise UsageError(
                "PollConfig.bound_max_gap_fraction must be >= max_gap_fraction, "
                f"got {self.bound_max_gap_fraction!r}"
            )
        if not 0.0 < self.retention_safety <= 1.0:
            raise UsageError(
                f"PollConfig.retention_safety must be in (0, 1], got {self.retention_safety!r}"
            )
        if not 0.0 <= self.jitter < 1.0:
            raise UsageError(f"PollConfig.jitter must be in [0, 1), got {self.jitter!r}")
        if self.max_gap_s < self.min_gap_s:
            raise UsageError(
                f"PollConfig.max_gap_s ({self.max_gap_s}) is below min_gap_s ({self.min_gap_s})"
            )
        if self.min_gap_s >= self.retention_safety * self.retention_s:
            raise UsageError("PollConfig.min_gap_s must be far shorter than the retention window")

    @property
    def deadline_s(self) -> float:
        """Seconds after submit by which every job has been polled at least once."""
        return self.retention_safety * self.retention_s * self.time_scale


# --- the decision ---------------------------------------------------------------------


def _gap_bounds(model: LatencyModel, cfg: PollConfig, pressure: float) -> tuple[float, float]:
    lo = cfg.min_gap_s * cfg.time_scale
    fraction = cfg.max_gap_fraction + pressure * (cfg.bound_max_gap_fraction - cfg.max_gap_fraction)
    hi = min(cfg.max_gap_s * cfg.time_scale, fraction * model.median)
    return lo, max(hi, lo)


def first_poll_quantile(cfg: PollConfig, pressure: float) -> float:
    """The latency quantile before which a job is not polled, at this rate-limit pressure."""
    p = _clamp_pressure(pressure)
    return cfg.first_quantile + p * (cfg.bound_first_quantile - cfg.first_quantile)


def optimal_first_poll(model: LatencyModel, ratio: float) -> float:
    """The first poll that minimises polls + ``ratio`` x lag when the square-root rule
    takes over after it.

    Polling first at ``t1`` costs the lag of every job done by then,
    ``ratio * integral_0^t1 (t1 - u) f(u) du``; the rule's density
    ``n = sqrt(ratio * h / 2)`` costs ``S n + ratio f / (2 n) = S sqrt(2 ratio h)`` per
    second after it. Setting the derivative to zero gives ``F(t1) / S(t1) =
    sqrt(2 h(t1) / ratio)``, solved here by bisection on the log-latency's z-score
    (the left side grows from 0 much faster than the right). Checked against dynamic
    programming over all schedules for InstantID's prior at ratio 10: the optimum's first
    poll is at 5.3 s, this rule's at 5.4 s, where a fixed 3% quantile (4.0 s) spent ~0.4
    polls a job on a poll that almost never finds the job done. For InfiniteYou (sigma
    0.25) the rule lands on the 3% quantile.
    """
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"ratio must be a positive number, got {ratio!r}")
    # The condition depends on the model and the ratio only through sigma and the
    # log-median plus log-ratio ("level"), which time scaling leaves alone: z is solved
    # for those two, rounded so that the solve (40 bisection steps, ~70 us) is mostly a
    # cache hit and not once a job, as each completion moves the model a little and the
    # gate's pressure the ratio. The level to 2 decimals moves the first poll by ~0.1%,
    # sigma to 3 by 0.05% x |z| (0.1% for the z of -1 to -2 it lands on, 0.4% at most);
    # jitter adds up to 10%.
    level = round(model.mu + math.log(ratio), _LEVEL_DECIMALS)
    z = _optimal_first_z(level, round(model.sigma, _SIGMA_DECIMALS))
    return math.exp(model.mu + model.sigma * z)


#: Decimals kept of the level and sigma when solving for the first poll.
_LEVEL_DECIMALS, _SIGMA_DECIMALS = 2, 3
#: The z-scores the first poll is sought between.
_Z_RANGE = 8.0


@functools.lru_cache(maxsize=256)  # asked before every poll
def _optimal_first_z(level: float, sigma: float) -> float:
    def excess(z: float) -> float:
        sf = normal_sf(z)
        # hazard / ratio = mills(z) / (sigma t ratio), and t ratio = exp(level + sigma z)
        per_ratio = mills_inverse(z) / (sigma * math.exp(level + sigma * z))
        return (1.0 - sf) / sf - math.sqrt(2.0 * per_ratio)

    lo, hi = -_Z_RANGE, _Z_RANGE
    if excess(lo) >= 0:
        return lo
    if excess(hi) <= 0:
        return hi
    for _ in range(40):  # z to ~1e-11: far below any timer's resolution
        mid = 0.5 * (lo + hi)
        if excess(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def first_poll_time(model: LatencyModel, cfg: PollConfig, pressure: float = 0.0) -> float:
    """Seconds after submit of a job's first status poll (before the retention rules):
    :func:`optimal_first_poll`, never before the quantile :func:`first_poll_quantile`."""
    return _first_poll_time(model, cfg, pressure, cost_ratio_for(model, cfg, pressure))


def _first_poll_time(model: LatencyModel, cfg: PollConfig, pressure: float, ratio: float) -> float:
    floor = model.quantile(first_poll_quantile(cfg, pressure))
    return max(floor, optimal_first_poll(model, ratio))


def cost_ratio_for(model: LatencyModel, cfg: PollConfig, pressure: float = 0.0) -> float:
    """c2/c1, polls worth one (time-scaled) second of lag, for this model and pressure.

    One constant cannot serve both a 7.7 s and a 163 s model: under the square-root
    rule polls per job grow like ``sqrt(ratio * median)`` and lag like
    ``sqrt(median / ratio)``, so a ratio lean enough for InfiniteYou (<= 16 polls
    needs ratio <~ 7) leaves InstantID late (<= 0.5 s needs ratio >~ 8). Pricing a
    second of lag both as wall-clock time and as a fraction of the median resolves
    it; with the defaults InfiniteYou gets 5.8 and InstantID 11.9. Pressure divides
    the ratio by up to ``1 + PRESSURE_GAIN``.
    """
    scale = cfg.time_scale
    ratio = cfg.cost_ratio / scale * (1.0 + cfg.lag_reference_s * scale / model.median)
    return ratio / (1.0 + PRESSURE_GAIN * _clamp_pressure(pressure))


def _clamp_pressure(pressure: float) -> float:
    if not math.isfinite(pressure):
        raise ValueError(f"pressure must be a number in [0, 1], got {pressure!r}")
    return min(max(pressure, 0.0), 1.0)  # a rate limiter's ratio may overshoot a hair


def _sqrt_rule_gap(
    elapsed: float, model: LatencyModel, ratio: float, lo: float, hi: float
) -> float:
    """``sqrt(2 c1 / (c2 h))`` with ``h`` taken at the middle of the gap, clamped."""
    gap = hi
    at = elapsed
    for _ in range(3):  # gap = g(h(elapsed + gap / 2)): 3 rounds land within 1% of it
        h = model.hazard(at)
        gap = hi if h <= 0 else min(max(math.sqrt(2.0 / (ratio * h)), lo), hi)
        at = elapsed + 0.5 * gap
    return gap


def next_poll_delay(
    *,
    elapsed: float,
    model: LatencyModel,
    cfg: PollConfig,
    pressure: float = 0.0,
    rng: random.Random | None = None,
    since_submit: float | None = None,
) -> float:
    """Seconds from now until the next status poll of a job whose latency clock has run
    ``elapsed`` s: since submit, or since a status answer said it was still QUEUED (it
    had not started, so all of its latency was still ahead). ``since_submit`` (default
    ``elapsed``) is the time since submit, which the retention deadline counts from.

    - Before the first-poll quantile of the latency (:func:`first_poll_quantile`):
      wait until it (jitter only delays), or until the retention deadline if sooner.
    - After: the square-root rule with c2/c1 from :func:`cost_ratio_for`. The gap is
      clamped to [``min_gap_s``, min(``max_gap_s``, fraction x median)], the fraction
      going from ``max_gap_fraction`` to ``bound_max_gap_fraction`` with the pressure,
      never below the minimum, and jittered inside those bounds.
    - ``pressure`` in [0, 1] is how hard the rate limit binds (1: submits are waiting
      for tokens). It raises the first-poll quantile, the gap cap and c1/c2 together:
      polls are what the run is short of, and a later notice costs no throughput.
    - Retention: a job is never scheduled past ``deadline_s`` after submit unless it
      was polled in the last ``min_gap_s`` before it. From then on, the square-root
      rule applies whatever the model says (even before its first quantile: a model
      that slow is wrong or cold), clamped as above, so the cadence stays between
      ``min_gap_s`` and ``max_gap_s`` until the job ends or the caller gives up.
    """
    if not (math.isfinite(elapsed) and elapsed >= 0):
        raise ValueError(f"elapsed must be >= 0, got {elapsed!r}")
    age = elapsed if since_submit is None else since_submit
    if not (math.isfinite(age) and age >= elapsed):
        raise ValueError(f"since_submit must be >= elapsed, got {since_submit!r}")
    pressure = _clamp_pressure(pressure)
    lo, hi = _gap_bounds(model, cfg, pressure)
    # A poll within a min gap of the deadline counts as the poll by it: timers fire a
    # hair early, and a second poll a millisecond later would be a request wasted.
    deadline = cfg.deadline_s
    deadline_met = age >= deadline - lo
    ratio = cost_ratio_for(model, cfg, pressure)
    first = _first_poll_time(model, cfg, pressure, ratio)
    if elapsed < first and not deadline_met:
        # Not before the first quantile, nor sooner than the rule's own gap (a job
        # polled just before that quantile is not polled again at once). Both grow
        # with the pressure, so the delay does too. The gap is at most ``hi``: when the
        # wait for the first poll is longer, the rule need not be worked out.
        wait = first - elapsed
        delay = wait if wait >= hi else max(wait, _sqrt_rule_gap(elapsed, model, ratio, lo, hi))
        if rng is not None:
            delay *= 1.0 + cfg.jitter * rng.random()
    else:
        delay = _sqrt_rule_gap(elapsed, model, ratio, lo, hi)
        if rng is not None:
            delay = min(max(delay * rng.uniform(1.0 - cfg.jitter, 1.0 + cfg.jitter), lo), hi)
    if not deadline_met:
        delay = min(delay, deadline - age)
    return delay


# --- simulation -----------------------------------------------------------------------


def poll_times(delay: Callable[[float], float], until: float) -> list[float]:
    """Elapsed times of the polls a deterministic schedule makes, up to the first >= until."""
    times: list[float] = []
    t = 0.0
    while not times or times[-1] < until:
        step = delay(t)
        if not step > 0:
            raise ValueError(f"schedule made no progress at t={t!r} (delay {step!r})")
        t += step
        times.append(t)
    return times


def simulate_schedule(
    delay: Callable[[float], float], latencies: Sequence[float]
) -> tuple[float, float]:
    """(mean status polls per job, mean detection lag) of a deterministic schedule.

    A schedule without jitter polls every job at the same elapsed times, so those are
    computed once and each latency is placed among them by bisection.
    """
    if not latencies:
        raise ValueError("simulate_schedule needs at least one latency")
    if any(not (math.isfinite(t) and t >= 0) for t in latencies):
        raise ValueError("latencies must be finite and >= 0")
    times = poll_times(delay, max(latencies))
    polls = 0
    lag = 0.0
    for t in latencies:
        i = bisect.bisect_left(times, t)  # the first poll at or after completion sees it
        polls += i + 1
        lag += times[i] - t
    return polls / len(latencies), lag / len(latencies)


def expected_polls(
    model: LatencyModel,
    cfg: PollConfig,
    latencies: Sequence[float],
    *,
    pressure: float = 0.0,
) -> tuple[float, float]:
    """(mean status polls per job, mean detection lag) of :func:`next_poll_delay`
    without jitter, over the given true latencies; for tests and benchmarks."""
    return simulate_schedule(
        lambda t: next_poll_delay(elapsed=t, model=model, cfg=cfg, pressure=pressure),
        latencies,
    )
