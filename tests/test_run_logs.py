"""What a long unattended run leaves in its log: lines that stay few as rows grow, and
progress lines that say how far the run is and how long it has left."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from batcher.options import RunOptions
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


def _options(manifest: Path, base_url: str, **changes: Any) -> RunOptions:
    return RunOptions(
        manifest=manifest,
        out=manifest.parent / "out",
        model="instantid",
        base_url=base_url,
        time_scale=SCALE,
        api_key=KEY,
        progress=False,
        **changes,
    )


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

    result = await arun(_options(manifest, server.base_url))

    assert result.exit_code == EXIT_FAILED_ROWS
    again = [m for m in caplog.messages if "submitting it again" in m]
    assert len(again) == 2, again  # one per reason
    assert "jobs FAILED and submitted again: 16" in result.text()
