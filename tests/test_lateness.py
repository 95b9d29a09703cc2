"""Poll lateness: a run says when its status polls start late, so that polls-per-job and
detection-lag figures are not read as the API's when they are the client's."""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import pytest

from batcher.gate import RateConfig
from batcher.lateness import (
    FINAL_MIN,
    LATE_SHARE,
    RESERVOIR,
    WINDOW,
    PollLateness,
    late_share,
    running_late,
)
from batcher.options import RunOptions
from batcher.poll import Poller
from batcher.run import EXIT_OK, arun

# --- the pure decision ------------------------------------------------------------------


def test_late_share_is_the_median_share_of_the_planned_gap() -> None:
    assert late_share([0.1, 0.2, 5.0], [1.0, 1.0, 1.0]) == pytest.approx(0.2)
    assert late_share([0.5, 0.5], [1.0, 10.0]) == pytest.approx((0.5 + 0.05) / 2)
    assert late_share([], []) is None


def test_a_poll_due_at_once_is_on_time_only_when_it_starts_at_once() -> None:
    assert late_share([0.0], [0.0]) == 0.0
    assert late_share([0.01], [0.0]) == math.inf


def test_late_share_needs_matching_lengths() -> None:
    with pytest.raises(ValueError, match="same length"):
        late_share([0.1], [])


@pytest.mark.parametrize(
    ("share", "late"),
    [(None, False), (0.0, False), (LATE_SHARE, False), (LATE_SHARE * 1.01, True), (3.0, True)],
)
def test_running_late_above_the_threshold_only(share: float | None, late: bool) -> None:
    assert running_late(share) is late


# --- the running record -----------------------------------------------------------------


def test_the_record_flags_the_first_late_window_once() -> None:
    record = PollLateness()
    flags = [record.record(0.001, 1.0) for _ in range(3 * WINDOW)]  # 0.1% of the gap
    assert not any(flags)
    assert record.recent_share == pytest.approx(0.001)
    flags = [record.record(0.5, 1.0) for _ in range(3 * WINDOW)]  # half the gap
    assert flags.count(True) == 1
    assert flags.index(True) == WINDOW - 1  # at the end of the first late window
    assert record.behind_since_poll == 4 * WINDOW
    assert record.recent_share == pytest.approx(0.5)


def test_early_starts_count_as_on_time() -> None:
    record = PollLateness()
    for _ in range(WINDOW):
        record.record(-0.002, 1.0)  # timers may fire a hair early
    assert record.recent_share == 0.0
    assert record.percentiles() == (0.0, 0.0)


def test_the_end_of_a_run_judges_its_last_partial_window() -> None:
    few, some = PollLateness(), PollLateness()
    for _ in range(FINAL_MIN - 1):
        few.record(0.5, 1.0)
    for _ in range(FINAL_MIN):
        some.record(0.5, 1.0)
    assert not few.fell_behind  # too few polls to say
    assert some.fell_behind
    assert some.behind_since_poll is None


def test_percentiles_come_from_a_bounded_uniform_sample() -> None:
    record = PollLateness()
    rng = random.Random(5)
    n = 20 * RESERVOIR
    for _ in range(n):
        record.record(rng.uniform(0.0, 1.0), 10.0)
    assert record.polls == n
    assert len(record._sample) == RESERVOIR  # memory stays bounded over a long run
    percentiles = record.percentiles()
    assert percentiles is not None
    p50, p90 = percentiles
    assert p50 == pytest.approx(0.5, abs=0.03)
    assert p90 == pytest.approx(0.9, abs=0.03)
    assert PollLateness().percentiles() is None


# --- end to end ---------------------------------------------------------------------------


async def _run(
    tmp_path: Path,
    sim: Any,
    *,
    jobs: int,
    scale: float,
    stall_s: float | None,
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(
        "id,prompt,face_image\n"
        + "".join(f"j{n:02d},p {n},https://example.com/face.jpg\n" for n in range(jobs)),
        encoding="utf-8",
    )
    server = await sim(time_scale=scale, image_size=(32, 32), seed=2)
    options = RunOptions(
        manifest=manifest,
        out=tmp_path / "out",
        model="instantid",
        base_url=server.base_url,
        time_scale=scale,
        max_in_flight=jobs,
        rate=RateConfig(requests=100_000, period_s=1.0),
        api_key="sk-late-0123456789",
        progress=False,
    )

    if stall_s is not None:
        # A client too busy to poll on time: whenever a poll comes due, the event loop is
        # held (other work, blocking) for stall_s first. Every poll starts that late at
        # least, and the ones due meanwhile queue behind it, whatever the timing.
        # (Before: the loop blocked in fixed 20 ms stretches 80% of the time. The polls'
        # due times locked on to the stretches' phase, and 1 run in 8 beside two busy
        # loops had a median lateness of 4-9 ms: no warning.)
        start = Poller._record_start

        def stalled(self: Poller, flight: Any, due: float) -> None:
            time.sleep(stall_s)
            start(self, flight, due)

        monkeypatch.setattr(Poller, "_record_start", stalled)
    result = await arun(options)
    assert result.exit_code == EXIT_OK, result.text()
    return result


async def test_a_client_that_cannot_poll_on_time_says_so(
    tmp_path: Path, sim: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="batcher.poll")
    # At time scale 0.01 an InstantID job's first poll comes ~50-90 ms after its submit,
    # the next ones ~9 ms apart: 20 ms late is over LATE_SHARE of any of them.
    # 80 jobs make at least 80 polls: at least one full window is judged during the run.
    result = await _run(tmp_path, sim, jobs=80, scale=0.01, stall_s=0.02, monkeypatch=monkeypatch)
    warnings = [r.getMessage() for r in caplog.records if "starting late" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per run
    summary = result.summary
    assert summary.polls_fell_behind
    assert summary.poll_late is not None
    assert summary.poll_late[0] > 0.01
    assert "the client fell behind" in result.text()


async def test_a_client_with_time_to_spare_polls_on_time(
    tmp_path: Path, sim: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="batcher.poll")
    # At time scale 0.2 the gaps are ~180 ms (100 ms at the least), and nothing else holds
    # the loop: time to spare on a loaded machine too. (40 jobs at 0.1, gaps from 50 ms,
    # fell behind beside 3 busy loops, up to 98% of the gap late; 16 at 0.2 stayed <6%.)
    jobs = 16
    result = await _run(tmp_path, sim, jobs=jobs, scale=0.2, stall_s=None, monkeypatch=monkeypatch)
    assert not [r for r in caplog.records if "starting late" in r.getMessage()]
    summary = result.summary
    assert summary.api_requests - 2 * jobs >= WINDOW  # a full window of polls was judged
    assert not summary.polls_fell_behind
    assert summary.poll_late is not None  # measured, and reported
    assert "after their planned time" in result.text()
    assert "fell behind" not in result.text()
