"""Status answers are information: a job found still QUEUED has all of its latency ahead.

Against an emulator that runs 2 jobs at a time, 16 jobs submitted at once wait in its
queue for up to 7 runs of the job before their own; the poll schedule restarts a job's
clock at each QUEUED answer, so a long wait costs about one poll per typical job length,
not a poll every gap of a job already overdue.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from batcher.gate import RateConfig
from batcher.options import RunOptions
from batcher.run import EXIT_OK, arun

KEY = "sk-queue-0123456789abcdef"
JOBS = 16
CAPACITY = 2
SCALE = 0.01  # a 7.7 s job takes 77 ms


async def _run(tmp_path: Path, sim: Any) -> tuple[list[dict[str, Any]], Any]:
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(
        "id,prompt,face_image\n"
        + "".join(f"q{n:02d},p {n},https://example.com/face.jpg\n" for n in range(JOBS)),
        encoding="utf-8",
    )
    server = await sim(
        time_scale=SCALE, capacity=CAPACITY, latency_sigma=0.1, image_size=(32, 32), seed=4
    )
    options = RunOptions(
        manifest=manifest,
        out=tmp_path / "out",
        model="instantid",
        base_url=server.base_url,
        time_scale=SCALE,
        max_in_flight=JOBS,
        rate=RateConfig(requests=100_000, period_s=1.0),  # all submitted at once
        api_key=KEY,
        progress=False,
    )
    result = await arun(options)
    assert result.exit_code == EXIT_OK, result.text()
    rows: list[dict[str, Any]] = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    return rows, server


async def test_a_queued_job_is_polled_about_once_per_job_length_of_its_wait(
    tmp_path: Path, sim: Any
) -> None:
    rows, server = await _run(tmp_path, sim)

    assert [r["status"] for r in rows] == ["COMPLETED"] * JOBS

    def wait_s(row: dict[str, Any]) -> float:  # model seconds in the emulator's queue
        return float(json.loads(row["metrics"])["queue_time"]) / SCALE

    assert max(wait_s(r) for r in rows) > 5 * 7.7 * 0.8  # the last really waited ~7 jobs

    # Polls of the jobs that waited longest: about one per 5 s (the first-poll time of
    # a fresh job) of their wait, plus a fresh job's ~6. A schedule blind to QUEUED
    # polls an overdue job every ~1.5 s (a fifth of the median): ~25 polls for 40 s.
    longest = sorted(rows, key=wait_s)
    for row in longest[-4:]:
        assert row["polls"] <= wait_s(row) / 4.0 + 8, (row["id"], row["polls"], wait_s(row))
    # Jobs that never waited are polled as usual.
    first = longest[:CAPACITY]
    assert statistics.fmean(r["polls"] for r in first) <= 8
    status_polls = sum(server.stats()["requests"]["status"].values())
    assert status_polls == sum(r["polls"] for r in rows)  # every poll counted on the row
