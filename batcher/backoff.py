"""Pure retry decisions: how long to back off, and what a 429's headers ask for.

Exponential backoff with "full jitter" (a uniform draw below the exponential
ceiling) spreads retries of many failing requests apart, so a struggling server is
not hit by synchronised waves. A server hint beats the computed delay: the caller
waits ``parse_retry_after(...)`` when it is not None.
"""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from batcher.errors import UsageError

__all__ = ["MAX_HINT_S", "RetryConfig", "backoff_delay", "parse_retry_after"]

#: Longest wait a server hint can impose: results expire an hour after submit, so a
#: longer hint is a broken header, not a plan.
MAX_HINT_S = 3600.0

# Numbers in x-rate-limit-reset-at-utc: below 1e9 (September 2001) a value cannot be
# a current epoch time, so it is read as seconds from now, as some servers send; up
# to 1e11 (year 5138) it is epoch seconds; beyond, epoch milliseconds.
_EPOCH_S_MIN = 1e9
_EPOCH_MS_MIN = 1e11


@dataclass(frozen=True, kw_only=True)
class RetryConfig:
    """How transient failures (5xx, connection errors) and FAILED jobs are retried."""

    #: Ceiling of the first backoff; it doubles per attempt...
    base_s: float = 1.0
    #: ...up to this.
    cap_s: float = 60.0
    #: Tries of one request in all, the first included.
    max_attempts: int = 8
    #: Times a FAILED (422) job is resubmitted before its row is recorded as FAILED.
    max_failed_retries: int = 1

    def __post_init__(self) -> None:
        for name, value in (("base_s", self.base_s), ("cap_s", self.cap_s)):
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"RetryConfig.{name} must be a positive number, got {value!r}")
        if self.cap_s < self.base_s:
            raise UsageError(
                f"RetryConfig.cap_s ({self.cap_s}) must be at least base_s ({self.base_s})"
            )
        if self.max_attempts < 1:
            raise UsageError(f"RetryConfig.max_attempts must be >= 1, got {self.max_attempts!r}")
        if self.max_failed_retries < 0:
            raise UsageError(
                f"RetryConfig.max_failed_retries must be >= 0, got {self.max_failed_retries!r}"
            )


def backoff_delay(attempt: int, cfg: RetryConfig, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based), with full jitter:
    uniform in ``[0, min(cap_s, base_s * 2**attempt)]``."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt!r}")
    # 2**attempt past ~1000 overflows a float; by 2**62 every sane cap is reached.
    ceiling = min(cfg.cap_s, cfg.base_s * 2.0 ** min(attempt, 62))
    return rng.uniform(0.0, ceiling)


def parse_retry_after(headers: Mapping[str, str], now: datetime) -> float | None:
    """Seconds the response's headers ask the client to wait, or None without a usable hint.

    ``Retry-After`` (delta-seconds, integer or not, or an HTTP-date) comes first; when
    it is missing or unreadable, ``x-rate-limit-reset-at-utc`` (ISO-8601 with or
    without a zone, epoch seconds or milliseconds, or an HTTP-date). Header names are
    matched case-insensitively; a naive ``now`` or date is taken as UTC. The answer is
    clamped to ``[0, MAX_HINT_S]``; nothing here raises on a malformed header.
    """
    lowered: dict[str, str] = {}
    for name, value in headers.items():
        lowered.setdefault(name.lower(), value)
    now = _as_utc(now)
    for name, parse in (
        ("retry-after", _parse_retry_after_value),
        ("x-rate-limit-reset-at-utc", _parse_reset_at_value),
    ):
        raw = lowered.get(name)
        if not isinstance(raw, str):
            continue
        try:
            seconds = parse(raw.strip(), now)
        except (ValueError, TypeError, OverflowError, IndexError):
            seconds = None
        if seconds is not None and not math.isnan(seconds):
            return min(max(seconds, 0.0), MAX_HINT_S)
    return None


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _number(text: str) -> float | None:
    """A plain decimal number, or None; 'nan', 'inf' and '1_000' are not numbers here."""
    if not text or not all(c.isdigit() or c in "+-.eE" for c in text):
        return None
    return float(text)


def _seconds_until_http_date(text: str, now: datetime) -> float:
    return (_as_utc(email.utils.parsedate_to_datetime(text)) - now).total_seconds()


def _parse_retry_after_value(text: str, now: datetime) -> float | None:
    number = _number(text)
    if number is not None:
        return number
    return _seconds_until_http_date(text, now)


def _parse_reset_at_value(text: str, now: datetime) -> float | None:
    number = _number(text)
    if number is not None:
        if abs(number) < _EPOCH_S_MIN:
            return number
        epoch_s = number / 1000.0 if number >= _EPOCH_MS_MIN else number
        return epoch_s - now.timestamp()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return _seconds_until_http_date(text, now)
    return (_as_utc(moment) - now).total_seconds()
