"""A connection-reset storm (every submit lost after sending, nothing answered) stops the
run after a few rows, exit 4, instead of burning every row of the manifest as "submit
outcome unknown"; a lost submit now and then while the API answers is the row's alone."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import url_manifest

from batcher.gate import RateConfig
from batcher.jobs import UNKNOWN_OUTCOME
from batcher.lost import LOST_IN_A_ROW, LostStreak, storm_reason
from batcher.options import RunOptions
from batcher.run import EXIT_STOPPED, arun

KEY = "sk-lost-connections-0123456789"
ROWS = 120  # several times the 32 submit workers: most rows must be left untouched


def _losses(streak: LostStreak, times: list[float], last_ok: float) -> LostStreak:
    for now in times:
        streak = streak.after_loss(now, last_ok)
    return streak


def test_losses_with_nothing_answered_since_the_first_are_a_storm_at_the_threshold() -> None:
    # Several workers may lose theirs at the same loop time: each counts.
    times = [10.0, 10.0, 10.1, 10.1, 10.2, 10.3][: LOST_IN_A_ROW - 1]
    almost = _losses(LostStreak(), times, last_ok=9.0)
    assert (almost.count, almost.is_storm) == (LOST_IN_A_ROW - 1, False)
    storm = almost.after_loss(10.5, last_ok=9.0)
    assert (storm.since, storm.count, storm.is_storm) == (10.0, LOST_IN_A_ROW, True)


def test_a_success_after_the_first_loss_starts_the_count_again() -> None:
    streak = _losses(LostStreak(), [10.0, 10.1, 10.2], last_ok=9.0)
    # Any request answered 2xx after the streak began (a poll, another row's submit).
    after = streak.after_loss(10.3, last_ok=10.15)
    assert (after.since, after.count, after.is_storm) == (10.3, 1, False)
    # A 2xx at the very time of the first loss counts too: the API was answering then.
    assert LostStreak(10.0, 3).after_loss(11.0, last_ok=10.0).count == 1


@pytest.mark.parametrize("resubmit", [False, True])
def test_the_storms_reason_says_what_happened_what_is_maybe_billed_and_how_to_go_on(
    resubmit: bool,
) -> None:
    reason = storm_reason(5, 7, resubmit_unknown=resubmit)
    assert "lost after the request is sent: 5 submits in a row" in reason
    assert re.search(r"\b7 (rows|submits of this run) have an unknown outcome", reason)
    assert "may exist and be billed" in reason
    assert reason.endswith("The other rows are untouched: run the same command again to resume")


def _options(manifest: Path, base_url: str, **changes: Any) -> RunOptions:
    return RunOptions(
        manifest=manifest,
        out=manifest.parent / "out",
        model="instantid",
        base_url=base_url,
        time_scale=0.001,
        max_in_flight=ROWS,
        rate=RateConfig(requests=100_000, period_s=1.0),
        api_key=KEY,
        progress=False,
        **changes,
    )


def _unknown_in(reason: str) -> int:
    found = re.search(r"(\d+) (?:rows|submits of this run) have an unknown outcome", reason)
    assert found, reason
    return int(found.group(1))


async def test_a_connection_reset_storm_stops_the_run_with_the_rest_untouched(
    tmp_path: Path, sim: Any
) -> None:
    """Every connection reset after sending, nothing accepted (a broken proxy). Before,
    all 120 rows ended FAILED "submit outcome unknown" (exit 3), to be sent again only
    with --resubmit-unknown (at-least-once). Now the run stops after a few (exit 4), says
    how many are maybe billed, and the others are PENDING, as never sent."""
    server = await sim(time_scale=0.001, drop_rate=1.0, drop_after_accept=0.0)
    options = _options(url_manifest(tmp_path, ROWS), server.base_url)

    result = await asyncio.wait_for(arun(options), 60)

    assert result.exit_code == EXIT_STOPPED, result.text()
    reason = result.stop_reason or ""
    assert "connections to the API are being lost after the request is sent" in reason
    rows = pq.read_table(options.out / "results.parquet").to_pylist()
    lost = [r for r in rows if r["unknown_submits"]]
    # Each lost row stays maybe billed (at-most-once), and the reason counts all of them:
    # those lost while the stop waited for the submits on the wire too.
    assert {(r["status"], r["error"], r["unknown_submits"]) for r in lost} == {
        ("FAILED", UNKNOWN_OUTCOME, 1)
    }
    assert _unknown_in(reason) == len(lost) >= LOST_IN_A_ROW
    untouched = [r for r in rows if not r["unknown_submits"]]
    assert len(untouched) >= ROWS // 2, len(lost)
    assert {(r["status"], r["attempts"]) for r in untouched} == {("PENDING", 0)}
    assert server.stats()["accepted"] == 0


async def test_a_storm_stops_a_resubmit_unknown_run_instead_of_sending_for_ever(
    tmp_path: Path, sim: Any
) -> None:
    """--resubmit-unknown sends a lost submit again at once: in a storm, before, the
    rows went round for ever (each try maybe billed). Now the run stops; the rows lost
    are PENDING, their unknown submits counted, to be sent again by the next run."""
    server = await sim(time_scale=0.001, drop_rate=1.0, drop_after_accept=0.0)
    options = _options(url_manifest(tmp_path, ROWS), server.base_url, resubmit_unknown=True)

    result = await asyncio.wait_for(arun(options), 60)

    assert result.exit_code == EXIT_STOPPED, result.text()
    rows = pq.read_table(options.out / "results.parquet").to_pylist()
    assert {r["status"] for r in rows} == {"PENDING"}
    unknown = sum(r["unknown_submits"] for r in rows)
    assert _unknown_in(result.stop_reason or "") == unknown >= LOST_IN_A_ROW
    assert server.stats()["requests"]["submit"] == {"dropped": unknown}
