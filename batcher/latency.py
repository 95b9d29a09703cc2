"""What a run knows of a model's latency: a log-normal learned online from completions,
starting from the model page's prior; and the standard normal it is built on, in pure
Python."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

from batcher.errors import UsageError

if TYPE_CHECKING:
    from batcher.schedule import PollConfig

__all__ = ["LatencyModel", "mills_inverse", "normal_cdf", "normal_pdf", "normal_ppf", "normal_sf"]

_SIGMA_FLOOR = 0.05
_FORGET = 0.999  # weight kept by the past per new observation: ~1,000-job memory
_TINY_S = 1e-9
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# --- the standard normal, pure Python -------------------------------------------------


def normal_pdf(z: float) -> float:
    """Density of the standard normal at ``z``."""
    return _INV_SQRT_2PI * math.exp(-0.5 * z * z)


def normal_cdf(z: float) -> float:
    """``P(Z <= z)``; through ``erfc`` so the lower tail keeps its relative precision."""
    return 0.5 * math.erfc(-z / _SQRT2)


def normal_sf(z: float) -> float:
    """``P(Z > z)``, accurate in the upper tail where ``1 - normal_cdf`` is not."""
    return 0.5 * math.erfc(z / _SQRT2)


# Acklam's rational approximation of the inverse normal CDF (relative error < 1.2e-9),
# then one Halley step on erfc, which brings it to double precision.
_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
      1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)  # fmt: skip
_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
      6.680131188771972e01, -1.328068155288572e01)  # fmt: skip
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
      -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)  # fmt: skip
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00,
      3.754408661907416e00)  # fmt: skip
_P_LOW = 0.02425


def _acklam(p: float) -> float:
    if p < _P_LOW:
        q = math.sqrt(-2.0 * math.log(p))
        num = ((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5]
        return num / ((((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0)
    if p > 1.0 - _P_LOW:
        q = math.sqrt(-2.0 * math.log1p(-p))
        num = ((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5]
        return -num / ((((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0)
    q = p - 0.5
    r = q * q
    num = (((((_A[0] * r + _A[1]) * r + _A[2]) * r + _A[3]) * r + _A[4]) * r + _A[5]) * q
    return num / (((((_B[0] * r + _B[1]) * r + _B[2]) * r + _B[3]) * r + _B[4]) * r + 1.0)


@functools.lru_cache(maxsize=64)  # asked a job, mostly for the same few quantiles
def normal_ppf(p: float) -> float:
    """The ``z`` with ``normal_cdf(z) == p``, for ``0 < p < 1``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"normal_ppf needs 0 < p < 1, got {p!r}")
    z = _acklam(p)
    err = normal_cdf(z) - p
    u = err / normal_pdf(z)
    return z - u / (1.0 + 0.5 * z * u)


def mills_inverse(z: float) -> float:
    """``pdf(z) / sf(z)``, the hazard of the standard normal, finite for every ``z``."""
    if z < 35.0:
        return normal_pdf(z) / normal_sf(z)
    # sf underflows near z = 38; from z = 35 the asymptotic series is exact to 1e-10.
    inv = 1.0 / (z * z)
    return z / (1.0 + inv * (-1.0 + inv * (3.0 - 15.0 * inv)))


# --- the latency model ----------------------------------------------------------------


class LatencyModel:
    """Online log-normal estimate of one model's submit->completion latency.

    The log-latencies are summarised by a weighted mean and sum of squared deviations
    (West's update: the running sums of ``log t`` and ``log**2 t`` without their
    cancellation). The prior enters as ``prior_weight`` observations at ``log median``
    with variance ``sigma**2``; every observation multiplies the weight of the past by
    0.999, so the estimate follows drift (a slower GPU pool, longer queues) over about
    a thousand completions.
    """

    __slots__ = ("_m2", "_mean", "_median", "_n", "_sigma", "_weight")

    def __init__(self, median_s: float, sigma: float, cfg: PollConfig) -> None:
        if not (math.isfinite(median_s) and median_s > 0):
            raise UsageError(f"prior median latency must be positive, got {median_s!r}")
        if not (math.isfinite(sigma) and sigma > 0):
            raise UsageError(f"prior latency sigma must be positive, got {sigma!r}")
        self._weight = cfg.prior_weight
        self._mean = math.log(median_s * cfg.time_scale)
        self._m2 = cfg.prior_weight * sigma * sigma
        self._n = 0
        self._derive()

    def _derive(self) -> None:
        # Kept, not computed on each read: a poll's schedule reads sigma ~9 times.
        self._sigma = max(math.sqrt(max(self._m2, 0.0) / self._weight), _SIGMA_FLOOR)
        self._median = math.exp(self._mean)

    def __repr__(self) -> str:
        return f"LatencyModel(median={self.median:.4g}, sigma={self.sigma:.3f}, n={self._n})"

    def observe(
        self, seen_at_elapsed: float, last_gap: float, reported: float | None = None
    ) -> None:
        """Record a completion first seen ``seen_at_elapsed`` s after submit.

        ``reported`` is the server's own submit-to-completion time (``metrics.total_time``)
        when it sent one: exact, so it is recorded as is if it fits (``0 <`` it ``<=``
        ``seen_at_elapsed``). Otherwise the completion happened somewhere in the last poll
        gap, and the midpoint of that gap, ``seen_at_elapsed - last_gap / 2``, is
        recorded; a gap longer than the elapsed time (which a caller should not pass)
        is floored at half the elapsed time.
        """
        if not (math.isfinite(seen_at_elapsed) and seen_at_elapsed >= 0):
            raise ValueError(f"seen_at_elapsed must be >= 0, got {seen_at_elapsed!r}")
        if not (math.isfinite(last_gap) and last_gap >= 0):
            raise ValueError(f"last_gap must be >= 0, got {last_gap!r}")
        if reported is not None and math.isfinite(reported) and 0 < reported <= seen_at_elapsed:
            t = reported
        else:
            t = max(seen_at_elapsed - 0.5 * last_gap, 0.5 * seen_at_elapsed, _TINY_S)
        x = math.log(t)
        self._weight = self._weight * _FORGET + 1.0
        self._m2 *= _FORGET
        delta = x - self._mean
        self._mean += delta / self._weight
        self._m2 += delta * (x - self._mean)
        self._n += 1
        self._derive()

    @property
    def n(self) -> int:
        """Completions observed (not counting the prior)."""
        return self._n

    @property
    def mu(self) -> float:
        """Mean of log-latency."""
        return self._mean

    @property
    def sigma(self) -> float:
        """Standard deviation of log-latency, floored at 0.05."""
        return self._sigma

    @property
    def median(self) -> float:
        """Median latency in (time-scaled) seconds."""
        return self._median

    def z(self, t: float) -> float:
        """Standard score of ``log t``."""
        return (math.log(t) - self._mean) / self._sigma

    def quantile(self, p: float) -> float:
        """The latency that a fraction ``p`` of jobs beats."""
        return math.exp(self._mean + self._sigma * normal_ppf(p))

    def survival(self, t: float) -> float:
        """``P(latency > t)``."""
        return 1.0 if t <= 0 else normal_sf(self.z(t))

    def hazard(self, t: float) -> float:
        """Chance per second of completing at ``t``, given it has not completed yet."""
        if t <= 0:
            return 0.0
        return mills_inverse(self.z(t)) / (self._sigma * t)
