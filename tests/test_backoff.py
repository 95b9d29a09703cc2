"""Retry decisions: jittered exponential backoff and server wait hints."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest

from batcher.backoff import MAX_HINT_S, RetryConfig, backoff_delay, parse_retry_after
from batcher.errors import UsageError

NOW = datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC)


# --- RetryConfig ----------------------------------------------------------------------


def test_retry_config_defaults() -> None:
    cfg = RetryConfig()
    assert (cfg.base_s, cfg.cap_s, cfg.max_attempts, cfg.max_failed_retries) == (1.0, 60.0, 8, 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_s": 0.0},
        {"base_s": -1.0},
        {"base_s": float("nan")},
        {"cap_s": float("inf")},
        {"base_s": 10.0, "cap_s": 5.0},
        {"max_attempts": 0},
        {"max_failed_retries": -1},
    ],
)
def test_retry_config_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        RetryConfig(**kwargs)


def test_retry_config_allows_no_failed_retries() -> None:
    assert RetryConfig(max_failed_retries=0).max_failed_retries == 0


# --- backoff_delay --------------------------------------------------------------------


@pytest.mark.parametrize("attempt", range(10))
def test_backoff_delay_within_full_jitter_bounds(attempt: int) -> None:
    cfg = RetryConfig(base_s=0.5, cap_s=30.0)
    rng = random.Random(attempt)
    ceiling = min(30.0, 0.5 * 2**attempt)
    draws = [backoff_delay(attempt, cfg, rng) for _ in range(2_000)]
    assert all(0.0 <= d <= ceiling for d in draws)
    # full jitter spreads over the whole range, not just near the ceiling
    assert min(draws) < 0.05 * ceiling
    assert max(draws) > 0.95 * ceiling


def test_backoff_delay_doubles_then_caps() -> None:
    cfg = RetryConfig(base_s=1.0, cap_s=60.0)
    means = []
    for attempt in range(10):
        rng = random.Random(42)  # the same draws each time, so only the range changes
        means.append(sum(backoff_delay(attempt, cfg, rng) for _ in range(4_000)) / 4_000)
    for attempt, mean in enumerate(means):
        assert mean == pytest.approx(min(60.0, 2.0**attempt) * means[0], rel=1e-9)
    assert means[9] == pytest.approx(30.0, rel=0.05)  # uniform on [0, 60]


def test_backoff_delay_huge_attempt_does_not_overflow() -> None:
    cfg = RetryConfig()
    assert 0.0 <= backoff_delay(10_000, cfg, random.Random(1)) <= cfg.cap_s


def test_backoff_delay_rejects_negative_attempt() -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(-1, RetryConfig(), random.Random(0))


def test_backoff_delay_is_deterministic_with_a_seed() -> None:
    cfg = RetryConfig()
    first = [backoff_delay(a, cfg, random.Random(7)) for a in range(8)]
    second = [backoff_delay(a, cfg, random.Random(7)) for a in range(8)]
    assert first == second


# --- parse_retry_after: Retry-After ---------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("  7 ", 7.0),
        ("-3", 0.0),  # clamped
        ("86400", MAX_HINT_S),  # absurd: capped
        ("1e400", MAX_HINT_S),  # overflows to inf: capped
    ],
)
def test_retry_after_delta_seconds(value: str, expected: float) -> None:
    assert parse_retry_after({"Retry-After": value}, NOW) == expected


def test_retry_after_http_date() -> None:
    when = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after({"Retry-After": when}, NOW) == pytest.approx(90.0)


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    when = format_datetime(NOW - timedelta(minutes=5), usegmt=True)
    assert parse_retry_after({"Retry-After": when}, NOW) == 0.0


def test_retry_after_http_date_far_ahead_is_capped() -> None:
    when = format_datetime(NOW + timedelta(days=2), usegmt=True)
    assert parse_retry_after({"Retry-After": when}, NOW) == MAX_HINT_S


@pytest.mark.parametrize("name", ["retry-after", "RETRY-AFTER", "Retry-after", "rEtRy-AfTeR"])
def test_header_names_are_case_insensitive(name: str) -> None:
    assert parse_retry_after({name: "12"}, NOW) == 12.0


@pytest.mark.parametrize(
    "value", ["", "soon", "nan", "inf", "12 seconds", "1_000", "+", ".", "1e", "Fri, 99 Foo"]
)
def test_retry_after_garbage_is_none(value: str) -> None:
    assert parse_retry_after({"Retry-After": value}, NOW) is None


def test_no_hint_is_none() -> None:
    assert parse_retry_after({}, NOW) is None
    assert parse_retry_after({"Content-Type": "application/json"}, NOW) is None


def test_naive_now_is_taken_as_utc() -> None:
    when = format_datetime(NOW + timedelta(seconds=30), usegmt=True)
    naive = NOW.replace(tzinfo=None)
    assert parse_retry_after({"Retry-After": when}, naive) == pytest.approx(30.0)


# --- parse_retry_after: x-rate-limit-reset-at-utc -------------------------------------


def _reset(value: str) -> float | None:
    return parse_retry_after({"x-rate-limit-reset-at-utc": value}, NOW)


@pytest.mark.parametrize(
    "value",
    [
        "2025-03-14T12:00:45Z",
        "2025-03-14T12:00:45+00:00",
        "2025-03-14T12:00:45.000Z",
        "2025-03-14T12:00:45",  # no zone: the header says UTC
        "2025-03-14 12:00:45",
        "2025-03-14T13:00:45+01:00",
        "2025-03-14T07:00:45-05:00",
        "20250314T120045Z",
    ],
)
def test_reset_at_iso8601(value: str) -> None:
    assert _reset(value) == pytest.approx(45.0)


def test_reset_at_epoch_seconds() -> None:
    assert _reset(str(int(NOW.timestamp()) + 20)) == pytest.approx(20.0)
    assert _reset(f"{NOW.timestamp() + 2.5:.3f}") == pytest.approx(2.5)


def test_reset_at_epoch_milliseconds() -> None:
    assert _reset(str(int(NOW.timestamp() * 1000) + 1500)) == pytest.approx(1.5)


def test_reset_at_small_number_is_seconds_from_now() -> None:
    assert _reset("30") == 30.0


def test_reset_at_http_date() -> None:
    assert _reset(format_datetime(NOW + timedelta(seconds=10), usegmt=True)) == pytest.approx(10.0)


def test_reset_at_past_is_zero_and_far_future_capped() -> None:
    assert _reset("2025-03-14T11:00:00Z") == 0.0
    assert _reset(str(int(NOW.timestamp()) - 100)) == 0.0
    assert _reset("2031-01-01T00:00:00Z") == MAX_HINT_S
    assert _reset("99999999999999999999") == MAX_HINT_S


@pytest.mark.parametrize("value", ["", "tomorrow", "2025-13-45T99:00:00Z", "12:00", "nan"])
def test_reset_at_garbage_is_none(value: str) -> None:
    assert _reset(value) is None


def test_retry_after_wins_over_reset_at() -> None:
    headers = {"Retry-After": "5", "X-Rate-Limit-Reset-At-UTC": "2025-03-14T12:01:00Z"}
    assert parse_retry_after(headers, NOW) == 5.0


def test_unreadable_retry_after_falls_back_to_reset_at() -> None:
    headers = {"Retry-After": "later", "X-RATE-LIMIT-RESET-AT-UTC": "2025-03-14T12:01:00Z"}
    assert parse_retry_after(headers, NOW) == pytest.approx(60.0)


def test_reset_at_with_an_offset_now() -> None:
    ist = NOW.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert parse_retry_after({"x-rate-limit-reset-at-utc": "2025-03-14T12:00:10Z"}, ist) == (
        pytest.approx(10.0)
    )
