"""A COMPLETED job is billed: images that cannot be downloaded never fail its row, never
cost an API request, and are never paid for again. They are tried again from the output
URLs saved in the checkpoint (kept ~7 days, against the result's 1 hour), by this run or,
once they are all it has left for a while, by the next one (exit 4)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import sqlite3
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batcher.errors import UsageError
from batcher.gate import RateConfig
from batcher.options import RunOptions
from batcher.redownload import DownloadRetry, retry_delay
from batcher.run import EXIT_FAILED_ROWS, EXIT_OK, EXIT_STOPPED, arun
from batcher.sim import SimConfig, SimServer

KEY = "sk-redownload-0123456789"
#: Results kept 3.6 s, half of it 1.8 s: what the old code gave a failing download.
SCALE = 0.001


def _options(tmp_path: Path, server: SimServer, rows: int, **changes: Any) -> RunOptions:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,prompt,face_image\n"
        + "".join(f"d{n},p {n},https://example.com/face.jpg\n" for n in range(rows)),
        encoding="utf-8",
    )
    return RunOptions(
        manifest=manifest,
        out=tmp_path / "out",
        model="instantid",
        base_url=server.base_url,
        time_scale=SCALE,
        max_in_flight=rows,
        rate=RateConfig(requests=100_000, period_s=1.0),
        api_key=KEY,
        progress=False,
        **changes,
    )


def _rows(out: Path) -> list[dict[str, Any]]:
    return pq.read_table(out / "results.parquet").to_pylist()


def _api_requests(server: SimServer) -> dict[str, int]:
    """Answers of each API endpoint (output downloads are not API requests)."""
    requests = server.stats()["requests"]
    return {name: sum(requests.get(name, {}).values()) for name in ("submit", "status", "result")}


def _outputs_answer(status: int, while_: dict[str, bool]) -> Any:
    """A middleware: output URLs answer ``status`` while ``while_["on"]``."""

    @web.middleware
    async def cdn(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/outputs/") and while_["on"]:
            return web.json_response({"error": "CDN says no"}, status=status)
        response: web.StreamResponse = await handler(request)
        return response

    return cdn


async def test_images_down_past_half_the_results_retention_are_fetched_later_without_the_api(
    tmp_path: Path,
) -> None:
    """The CDN answers 503 for 2.5 s, longer than half the result's retention (1.8 s),
    after which the old code FAILED the rows ("it may have been billed") having asked
    for their result again at every try."""
    down = {"on": True}
    config = SimConfig(time_scale=SCALE, image_size=(16, 16))
    async with SimServer(config, middlewares=[_outputs_answer(503, down)]) as server:
        options = _options(tmp_path, server, 3, download_retry=DownloadRetry(patience_s=100_000.0))
        run = asyncio.create_task(arun(options))
        await asyncio.sleep(2.5)
        down["on"] = False
        result = await asyncio.wait_for(run, timeout=60)
        stats = server.stats()
        api = _api_requests(server)
    assert result.exit_code == EXIT_OK, result.text()
    assert stats["accepted"] == 3  # never submitted again
    assert api["result"] == 3  # one result GET a job: the downloads went to the saved URLs
    for row in _rows(options.out):
        assert row["status"] == "COMPLETED"
        assert row["outputs"]
        assert row["download_retries"] > 0  # each a download tried again, counted
        assert row["retries"] == 0  # no API request was repeated
        assert json.loads(row["metrics"])["inference_time"] > 0


async def test_a_cdn_that_stays_down_stops_the_run_resumably_and_the_next_run_needs_no_api(
    tmp_path: Path,
) -> None:
    config = SimConfig(time_scale=SCALE, image_size=(16, 16), truncate_rate=1.0)
    async with SimServer(config) as server:
        options = _options(tmp_path, server, 3)
        first = await asyncio.wait_for(arun(options), timeout=60)
        assert first.exit_code == EXIT_STOPPED, first.text()
        reason = first.stop_reason or ""
        assert reason.startswith(
            "3 jobs are COMPLETED and billed but their images could not be downloaded "
            "(last error: output could not be downloaded: "
        ), reason
        assert "body cut short" in reason
        assert reason.endswith(
            "run the same command again to retry the downloads (links are kept about 7 "
            "days); nothing will be submitted again"
        ), reason
        for row in _rows(options.out):
            assert row["status"] == "SUBMITTED", row  # resumable, not FAILED
            assert row["error"] is None
            assert json.loads(row["metrics"])["inference_time"] > 0
            assert row["inference_time"] is not None
        assert server.stats()["accepted"] == 3
        before = _api_requests(server)
        assert before["result"] == 3

        server.emulator.config = dataclasses.replace(config, truncate_rate=0.0)  # CDN is back
        second = await asyncio.wait_for(arun(options), timeout=60)

        assert second.exit_code == EXIT_OK, second.text()
        assert _api_requests(server) == before  # from the saved URLs, no API request
        assert server.stats()["accepted"] == 3
    for row in _rows(options.out):
        assert row["status"] == "COMPLETED"
        assert row["outputs"]
        assert (options.out / row["outputs"][0]).is_file()
        assert json.loads(row["metrics"])["inference_time"] > 0


async def test_an_output_link_that_is_gone_fails_the_row_as_billed_with_its_metrics(
    tmp_path: Path,
) -> None:
    config = SimConfig(time_scale=SCALE, image_size=(16, 16))
    async with SimServer(config, middlewares=[_outputs_answer(410, {"on": True})]) as server:
        options = _options(tmp_path, server, 1)
        result = await asyncio.wait_for(arun(options), timeout=60)
        accepted = server.stats()["accepted"]
        api = _api_requests(server)
    assert result.exit_code == EXIT_FAILED_ROWS, result.text()
    assert accepted == 1
    assert api["result"] == 1
    (row,) = _rows(options.out)
    assert row["status"] == "FAILED"
    error = row["error"]
    assert error.startswith("the job was COMPLETED and billed, but its images are lost: HTTP 410")
    assert "--retry-failed submits it again, and pays for it again" in error
    assert json.loads(row["metrics"])["inference_time"] > 0
    assert row["outputs"] == []


async def test_a_row_whose_images_were_lost_is_submitted_afresh_by_retry_failed(
    tmp_path: Path,
) -> None:
    """--retry-failed pays again for a new job: the lost job's links are forgotten, so a
    stop before its images come leaves nothing that points at the old ones."""
    gone = {"on": True}
    config = SimConfig(time_scale=SCALE, image_size=(16, 16))
    async with SimServer(config, middlewares=[_outputs_answer(404, gone)]) as server:
        options = _options(tmp_path, server, 1)
        first = await asyncio.wait_for(arun(options), timeout=60)
        assert first.exit_code == EXIT_FAILED_ROWS, first.text()
        gone["on"] = False
        again = dataclasses.replace(options, retry_failed=True)
        second = await asyncio.wait_for(arun(again), timeout=60)
        accepted = server.stats()["accepted"]
    assert second.exit_code == EXIT_OK, second.text()
    assert accepted == 2
    with sqlite3.connect(options.out / "checkpoint.sqlite") as db:
        ((urls, request_id),) = db.execute("SELECT output_urls, request_id FROM jobs")
    assert request_id in json.loads(urls)[0]  # the new job's links, not the lost one's


def test_download_retries_back_off_to_a_cap_with_jitter_scaled_by_the_time_scale() -> None:
    cfg = DownloadRetry(base_s=5.0, cap_s=240.0)
    rng = random.Random(1)
    first = [retry_delay(1, cfg, 1.0, rng) for _ in range(200)]
    assert min(first) >= 2.5
    assert max(first) <= 5.0
    assert len(set(first)) > 100
    assert all(120.0 <= retry_delay(n, cfg, 1.0, rng) <= 240.0 for n in (7, 8, 100, 10**6))
    assert all(0.12 <= retry_delay(40, cfg, 0.001, rng) <= 0.24 for _ in range(50))
    with pytest.raises(UsageError, match="patience_s"):
        DownloadRetry(patience_s=0.0)
    with pytest.raises(UsageError, match="cap_s"):
        DownloadRetry(base_s=10.0, cap_s=5.0)
