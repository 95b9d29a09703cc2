"""What a long unattended run leaves in its log: lines that stay few as rows grow, and
progress lines that say how far the run is and how long it has left."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import sim_run_options

from batcher.pipeline import Counters
from batcher.progress import Progress, time_left
from batcher.run import EXIT_FAILED_ROWS, arun
from batcher.sim import FAIL_MARKERS

SCALE = 0.002
KEY = "sk-logs-0123456789abcdef"


def _manifest(tmp_path: Path, prompts: list[str]) -> Path:
    path = tmp_path / "jobs.csv"
    lines = ["id,prompt,face_image"]
    lines += [f"r{n},{prompt},https://example.com/f.jpg" for n, prompt in enumerate(prompts)]
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_jobs_failed_and_sent_again_are_logged_once_per_reason_and_counted(
    tmp_path: Path, sim: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A line per job FAILED and submitted again was 98% of a long run's log (50 lines per
    1,000 rows at 5% FAILED jobs): the first of each reason is logged, the rest counted."""
    no_face, blocked = FAIL_MARKERS
    prompts = [f"{no_face} {n}" for n in range(8)] + [f"{blocked} {n}" for n in range(8)]
    manifest = _manifest(tmp_path, [*prompts, "fine", "also fine"])
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    caplog.set_level(logging.INFO, logger="batcher")

    result = await arun(sim_run_options(manifest, server, KEY, model="instantid"))

    assert result.exit_code == EXIT_FAILED_ROWS
    again = [m for m in caplog.messages if "submitting it again" in m]
    assert len(again) == 2, again  # one per reason
    assert "jobs FAILED and submitted again: 16" in result.text()


def test_a_progress_line_says_the_pace_and_the_time_left_and_counts_every_runs_failures() -> None:
    """A log file's progress line said neither how fast the run went nor how long it had
    left (a million rows at Pro's 50/min is weeks), and its `failed` was this run's
    alone beside a `done` over every run."""
    counters = Counters(completed=0, failed=0)
    ctx: Any = SimpleNamespace(counters=counters, flights={}, gate=SimpleNamespace(limited=3))
    progress = Progress(
        ctx,
        before={"COMPLETED": 960, "FAILED": 40, "PENDING": 9000},
        enabled=False,
        log_every_s=30.0,
    )
    progress.line(now=0.0)
    counters.completed, counters.failed = 2398, 2

    line = progress.line(now=60.0)

    assert line.startswith("progress: 3400/10000 done, 2400/min, about 3 min left; "), line
    assert "failed=42 " in line
    assert line.endswith(" 429s=3")
    # The pace is the last 5 minutes': the fast start is gone from it 9 minutes later.
    counters.completed += 540
    assert progress.line(now=600.0).startswith("progress: 3940/10000 done, 60/min, about 1.7 h")


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (40, "under a minute"),
        (600, "about 10 min"),
        (7200, "about 2.0 h"),
        (86_400 * 40, "about 40 days"),
    ],
)
def test_time_left_reads_at_the_scale_of_its_length(seconds: float, shown: str) -> None:
    assert time_left(seconds) == shown


def test_log_lines_carry_the_date_a_run_of_weeks_needs(tmp_path: Path) -> None:
    """`HH:MM:SS` alone: a log of a run that lasts days cannot say which day a line is."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,prompt,face_image,num_inference_steps\nr0,a,https://x/a.jpg,10\nr1,b,https://x/b.jpg,999\n"
    )
    env = {**os.environ, "SEGMIND_API_KEY": KEY}
    done = subprocess.run(
        [sys.executable, "-m", "batcher", "run", str(manifest), "--out", str(tmp_path / "out"),
         "--model", "instantid", "--simulate", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert done.returncode == 3, done.stderr
    logged = [line for line in done.stderr.splitlines() if " WARNING " in line]
    assert logged, done.stderr
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARNING ", line) for line in logged)
