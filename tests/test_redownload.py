"""A COMPLETED job is billed: images that cannot be downloaded never fail its row, never
cost an API request, and are never paid for again. They are tried again from the output
URLs saved in the checkpoint (kept ~7 days, against the result's 1 hour), by this run or,
once they are all it has left for a while, by the next one (exit 4).

Links that refuse (403/404/410: a file not yet on the CDN, a signed link that expired, a
file gone) are retried too, the result read once more for fresh links, and the row
FAILED with a clear reason once they have refused for the grace, not left waiting
across runs for ever."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import sqlite3
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batcher.errors import UsageError
from batcher.gate import RateConfig
from batcher.options import RunOptions
from batcher.redownload import DownloadRetry, OnRefusal, on_refusal, retry_delay
from batcher.run import EXIT_FAILED_ROWS, EXIT_OK, EXIT_STOPPED, arun
from batcher.schedule import PollConfig
from batcher.sim import SimConfig, SimServer

KEY = "sk-redownload-0123456789"
#: Results kept 3.6 s, half of it 1.8 s: what the old code gave a failing download.
SCALE = 0.001  # and the refused-link grace, 600 model seconds, is 0.6 s


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


def _count(server: SimServer, endpoint: str) -> dict[str, int]:
    """Answers of ``endpoint`` by HTTP status."""
    counts: dict[str, int] = server.stats()["requests"].get(endpoint, {})
    return counts


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


async def test_an_output_link_that_stays_gone_fails_the_row_as_billed_with_its_metrics(
    tmp_path: Path,
) -> None:
    """410 for longer than the grace (600 model seconds): FAILED, paid once, the result
    read once more for fresh links (it named the same ones), the reason saying how long."""
    config = SimConfig(time_scale=SCALE, image_size=(16, 16))
    async with SimServer(config, middlewares=[_outputs_answer(410, {"on": True})]) as server:
        options = _options(tmp_path, server, 1)
        result = await asyncio.wait_for(arun(options), timeout=60)
        accepted = server.stats()["accepted"]
        api = _api_requests(server)
    assert result.exit_code == EXIT_FAILED_ROWS, result.text()
    assert accepted == 1
    assert api["result"] == 2
    (row,) = _rows(options.out)
    assert row["status"] == "FAILED"
    error = row["error"]
    assert error.startswith("the job was COMPLETED and billed, but its images are lost: HTTP 410")
    assert re.search(r", for (6\d\d|[7-9]\d\d|\d{4,}) s and \d+ tries \(the link", error), error
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


async def test_a_reopened_row_that_fails_again_shows_nothing_of_the_lost_job(
    tmp_path: Path,
) -> None:
    """--retry-failed on a row whose images were lost, and the new job is refused (HTTP
    400): the row is FAILED for the refusal, with none of the lost job's figures (before:
    its completed_at, latency, inference_time and metrics stayed, as if this one had run)."""
    gone = {"on": True}
    refuse = {"on": False}

    @web.middleware
    async def submits(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" and refuse["on"]:
            return web.json_response({"error": "Invalid face_image"}, status=400)
        response: web.StreamResponse = await handler(request)
        return response

    config = SimConfig(time_scale=SCALE, image_size=(16, 16))
    async with SimServer(config, middlewares=[_outputs_answer(404, gone), submits]) as server:
        options = _options(tmp_path, server, 1)
        first = await asyncio.wait_for(arun(options), timeout=60)
        assert first.exit_code == EXIT_FAILED_ROWS, first.text()
        (lost,) = _rows(options.out)
        assert lost["inference_time"] > 0
        assert lost["completed_at"] is not None
        refuse["on"] = True
        again = dataclasses.replace(options, retry_failed=True)
        second = await asyncio.wait_for(arun(again), timeout=60)
    assert second.exit_code == EXIT_FAILED_ROWS, second.text()
    (row,) = _rows(options.out)
    assert row["status"] == "FAILED"
    assert "Invalid face_image" in row["error"]
    stale = {name: row[name] for name in _OUTCOME if row[name] not in (None, [], False)}
    assert stale == {}
    assert row["attempts"] == 2  # its counts are the row's, over both jobs
    assert row["result_reads"] == lost["result_reads"]


#: results.parquet's columns that a job's answer fills.
_OUTCOME = (
    "completed_at", "latency_s", "notice_lag_s", "inference_time", "metrics", "outputs",
    "width", "height", "bytes", "sha256", "request_id",
)  # fmt: skip


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


def test_a_refused_link_asks_the_result_once_at_its_second_refusal_then_gives_up_after_grace() -> (
    None
):
    def act(refusals: int, kept: bool, asked: bool, for_s: float) -> OnRefusal:
        return on_refusal(
            refusals=refusals, result_kept=kept, asked=asked, refused_for_s=for_s, grace_s=600.0
        )

    assert act(1, True, False, 0.0) is OnRefusal.RETRY  # most often not on the CDN yet
    assert act(2, True, False, 5.0) is OnRefusal.ASK_RESULT
    assert act(3, True, True, 20.0) is OnRefusal.RETRY  # asked once already
    assert act(2, False, False, 5.0) is OnRefusal.RETRY  # the result is gone: nothing to ask
    assert act(9, True, True, 599.0) is OnRefusal.RETRY
    assert act(9, True, True, 600.0) is OnRefusal.GIVE_UP
    assert act(9, False, False, 601.0) is OnRefusal.GIVE_UP
    with pytest.raises(UsageError, match="refused_grace_s"):
        DownloadRetry(refused_grace_s=0.0)


async def test_links_not_yet_on_the_cdn_are_waited_for_not_failed(tmp_path: Path) -> None:
    """404 for 100 model seconds after each job completes: before, every row FAILED at its
    first 404, billed, its images lost."""
    config = SimConfig(time_scale=SCALE, image_size=(16, 16), output_delay_s=100.0)
    async with SimServer(config) as server:
        options = _options(tmp_path, server, 4)
        result = await asyncio.wait_for(arun(options), timeout=60)
        accepted = server.stats()["accepted"]
        outputs = _count(server, "output")
        results = sum(_count(server, "result").values())
    assert result.exit_code == EXIT_OK, result.text()
    assert accepted == 4  # nobody paid twice
    assert outputs.get("404", 0) >= 4  # each row's link refused at first
    assert outputs["200"] == 4
    assert results <= 8  # at most one more result read a row, for fresh links
    for row in _rows(options.out):
        assert row["status"] == "COMPLETED", row
        assert (options.out / row["outputs"][0]).is_file()
        assert row["download_retries"] >= 1


async def test_signed_links_that_expired_in_an_outage_are_signed_afresh_by_the_result(
    tmp_path: Path,
) -> None:
    """The CDN answers 503 for 0.4 s; the signed links expire after 0.1 s: then they
    answer 403. Before, a 403 was retried until the run stopped (exit 4), and so on at
    every run; now the result, still kept, names fresh links, and the rows complete."""
    down = {"on": True}
    config = SimConfig(time_scale=SCALE, image_size=(16, 16), output_link_ttl_s=100.0)
    async with SimServer(config, middlewares=[_outputs_answer(503, down)]) as server:
        options = _options(tmp_path, server, 3)
        run = asyncio.create_task(arun(options))
        await asyncio.sleep(0.4)
        down["on"] = False
        result = await asyncio.wait_for(run, timeout=60)
        accepted = server.stats()["accepted"]
        outputs = _count(server, "output")
        results = _count(server, "result")
    assert result.exit_code == EXIT_OK, result.text()
    assert accepted == 3
    assert outputs.get("403", 0) >= 3  # the expired links were tried...
    assert results == {"200": 6}  # ...and each row's result read once more
    rows = _rows(options.out)
    for row in rows:
        assert row["status"] == "COMPLETED", row
        assert (options.out / row["outputs"][0]).is_file()
        assert row["retries"] == 0
    assert sum(row["download_retries"] for row in rows) >= 6


async def test_links_left_by_an_earlier_run_that_now_refuse_fail_the_row_not_every_run(
    tmp_path: Path,
) -> None:
    """A first run stops resumably (CDN down, exit 4); by the next, the links answer 403
    and the results have expired (kept 200 model seconds here). Before, that run stopped
    with exit 4 too, and every run after it: now the row is FAILED after the grace, with
    a reason, not submitted again, and its expired result not asked for."""
    cdn = {"status": 503}

    @web.middleware
    async def answer(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/outputs/"):
            return web.json_response({"error": "no"}, status=cdn["status"])
        response: web.StreamResponse = await handler(request)
        return response

    config = SimConfig(time_scale=SCALE, image_size=(16, 16), retention_s=200.0)
    async with SimServer(config, middlewares=[answer]) as server:
        options = _options(tmp_path, server, 2, poll=PollConfig(retention_s=200.0))
        first = await asyncio.wait_for(arun(options), timeout=60)
        assert first.exit_code == EXIT_STOPPED, first.text()  # after 900 model seconds
        results = _count(server, "result")
        cdn["status"] = 403
        second = await asyncio.wait_for(arun(options), timeout=60)
        accepted = server.stats()["accepted"]
        assert _count(server, "result") == results  # expired: not asked for fresh links
    assert second.exit_code == EXIT_FAILED_ROWS, second.text()
    assert accepted == 2
    for row in _rows(options.out):
        assert row["status"] == "FAILED", row
        assert row["error"].startswith(
            "the job was COMPLETED and billed, but its images are lost: HTTP 403"
        ), row["error"]
        assert json.loads(row["metrics"])["inference_time"] > 0
