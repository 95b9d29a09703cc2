"""Every behaviour knob of the emulator, in one frozen, validated object.

Durations are in model seconds: ``time_scale`` multiplies all of them (latency,
cold start, slow answers, rate-limit period, retention), so ``time_scale=0.001``
makes a 163 s InfiniteYou job take 0.163 s of wall time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

RateLimitHeaders = Literal["retry-after", "reset-at", "both", "none"]
Base64Style = Literal["raw", "data-url"]

_FRACTIONS = (
    "error_rate",
    "drop_rate",
    "slow_rate",
    "truncate_rate",
    "fail_rate",
    "drop_after_accept",
)


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """How the emulated Segmind v2 service behaves."""

    #: Multiplies every duration below (and each model's latency).
    time_scale: float = 1.0
    #: Median latency per model slug, overriding the model page's figure.
    latency_median_s: Mapping[str, float] = field(default_factory=dict)
    #: Log-normal spread (sigma of log latency); None keeps each model's own.
    latency_sigma: float | None = None
    #: Jobs running at once per model; the rest wait QUEUED. None is unlimited.
    capacity: int | None = None
    #: Extra delay for a job that starts while its model is cold.
    cold_start_s: float = 0.0
    #: A model goes cold after this long with nothing running.
    cold_idle_s: float = 300.0
    #: Requests allowed per key per ``rate_period_s`` (every API request counts). None: no limit.
    rate_limit: int | None = None
    rate_period_s: float = 60.0
    #: What a 429 tells the client: the real header is unknown, so all variants exist.
    rate_limit_headers: RateLimitHeaders = "retry-after"
    #: Fraction of API answers that are 500/502/504.
    error_rate: float = 0.0
    #: Fraction of API requests whose connection is dropped without an answer.
    drop_rate: float = 0.0
    #: Fraction of dropped submits that were accepted (and billed) before the drop.
    drop_after_accept: float = 0.5
    #: Fraction of API answers delayed by ``slow_s``.
    slow_rate: float = 0.0
    slow_s: float = 5.0
    #: Fraction of image downloads cut off before the declared length.
    truncate_rate: float = 0.0
    #: Fraction of jobs that end FAILED with a realistic error (not billed: the charge taken
    #: at submit is returned when the job fails).
    fail_rate: float = 0.0
    #: Account balance in USD; a submit that it cannot pay answers 406. None: unlimited.
    credits_usd: float | None = None
    #: Status and results are kept this long after submission, then 404.
    retention_s: float = 3600.0
    #: Output image URLs stay downloadable this long.
    output_retention_s: float = 7 * 24 * 3600.0
    #: Output URLs answer 404 until this long after their job completed (a CDN that
    #: has not got the file yet).
    output_delay_s: float = 0.0
    #: Output URLs are signed, and answer 403 this long after the result that named them
    #: was read (an expired signed link); each result read signs them afresh. None: plain
    #: links that last ``output_retention_s``.
    output_link_ttl_s: float | None = None
    #: Serve a one-sample output as a one-element list instead of a bare string.
    single_output_as_list: bool = False
    #: With ``base64: true``: bare base64, or a ``data:image/...;base64,`` URL.
    base64_style: Base64Style = "raw"
    #: Force every output image to this (width, height): cheap images for benchmarks.
    image_size: tuple[int, int] | None = None
    #: Keys accepted in ``x-api-key``; None accepts any non-empty key.
    api_keys: frozenset[str] | None = field(default=None, repr=False)  # secrets: never printed
    #: Seed of every random choice (latency draws, faults), for repeatable runs.
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")
        for name in _FRACTIONS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.error_rate + self.drop_rate > 1.0:
            raise ValueError("error_rate + drop_rate must not exceed 1")
        for slug, median in self.latency_median_s.items():
            if median < 0:
                raise ValueError(f"latency for {slug} must be >= 0, got {median}")
        if self.latency_sigma is not None and self.latency_sigma < 0:
            raise ValueError(f"latency_sigma must be >= 0, got {self.latency_sigma}")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if self.rate_limit is not None and self.rate_limit < 1:
            raise ValueError(f"rate_limit must be >= 1, got {self.rate_limit}")
        for name in ("cold_start_s", "cold_idle_s", "slow_s", "output_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("rate_period_s", "retention_s", "output_retention_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.output_link_ttl_s is not None and not self.output_link_ttl_s > 0:
            raise ValueError(f"output_link_ttl_s must be > 0, got {self.output_link_ttl_s}")
        if self.credits_usd is not None and self.credits_usd < 0:
            raise ValueError("credits_usd must be >= 0")
        if self.image_size is not None and min(self.image_size) < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    def scaled(self, seconds: float) -> float:
        """Model seconds as wall seconds under ``time_scale``."""
        return seconds * self.time_scale
