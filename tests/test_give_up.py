"""Every run ends: a job the API keeps refusing to talk about ends FAILED when its result's
retention is half over (the API still knows it: not sent again), a download that fails is
tried again from its saved URLs, and an API that stops answering altogether stops the run (exit 4,
resumable) instead of polling a dead host for ever."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import signal
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import Statements, before_each_commit, in_checkpoint, until

import batcher.client as client_module
import batcher.interrupt as interrupt_module
import batcher.run as run_module
from batcher.backoff import RetryConfig
from batcher.client import ApiClient, Reply, TransportError
from batcher.errors import AuthError
from batcher.gate import RateConfig
from batcher.interrupt import Interrupt
from batcher.options import RunOptions
from batcher.run import EXIT_FAILED_ROWS, EXIT_OK, EXIT_STOPPED, arun
from batcher.sim import SimConfig, SimServer

KEY = "sk-give-up-0123456789"
Handler = Callable[[web.Request], Awaitable[web.Response]]


def _options(tmp_path: Path, base_url: str, scale: float, rows: int) -> RunOptions:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,prompt,face_image\n"
        + "".join(f"g{n},p {n},https://example.com/face.jpg\n" for n in range(rows)),
        encoding="utf-8",
    )
    return RunOptions(
        manifest=manifest,
        out=tmp_path / "out",
        model="instantid",
        base_url=base_url,
        time_scale=scale,
        max_in_flight=rows,
        rate=RateConfig(requests=100_000, period_s=1.0),
        api_key=KEY,
        progress=False,
    )


def assert_retried_then_gave_up(caplog: pytest.LogCaptureFixture, row: str) -> list[str]:
    """The row's log says what was done: each try before the deadline is retried after a
    stated delay, the last (at the deadline) gives up, FAILED, and claims no retry.
    (Before, every one, the last included, said "trying again later".)"""
    records = [r for r in caplog.records if r.getMessage().startswith(f"row {row}:")]
    said = [r.getMessage() for r in records]
    *retried, last = said
    assert len(retried) > 1, said
    assert all(re.search(r"; trying again in \d[\d.e+-]* s$", m) for m in retried), retried
    assert "giving up: FAILED because no usable answer" in last, last
    assert "again" not in last.replace("--retry-failed submits it again", ""), last
    # At the default level, one line when the trouble starts and one at the end: not a
    # line per job per try (an outage has thousands).
    warned = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert warned == [retried[0], last], warned
    return said


async def test_a_job_the_api_keeps_refusing_ends_failed_within_its_retention(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # time scale 0.001: the 1-hour retention is 3.6 s
    caplog.set_level(logging.INFO, logger="batcher.poll")

    @web.middleware
    async def teapot(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.endswith("/status"):
            return web.json_response({"error": "I'm a teapot"}, status=418)
        response: web.StreamResponse = await handler(request)
        return response

    server = SimServer(SimConfig(time_scale=0.001, image_size=(16, 16)), middlewares=[teapot])
    async with server:
        result = await asyncio.wait_for(
            arun(_options(tmp_path, server.base_url, 0.001, 2)), timeout=60
        )
    assert result.exit_code == EXIT_FAILED_ROWS, result.text()
    rows = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    for row in rows:
        assert row["status"] == "FAILED"
        assert "within half its result's retention" in row["error"]
        assert "HTTP 418: I'm a teapot" in row["error"]
        assert row["request_id"]  # the job is known: it may have been billed
        # Backing off (up to 60 model-s apart): far fewer polls than one a model-second.
        assert row["polls"] < 600, row["polls"]
        assert_retried_then_gave_up(caplog, row["id"])


async def test_an_api_gone_silent_stops_the_run_resumable(tmp_path: Path) -> None:
    server = SimServer(SimConfig(time_scale=1.0, image_size=(16, 16)), port=0)
    await server.start()
    # At time scale 0.01 the client gives up after 3 s with no answer at all.
    options = _options(tmp_path, server.base_url, 0.01, 3)

    async def go_silent() -> None:
        # Full-time InstantID (7.7 s): the jobs are in flight when the API goes away, once
        # all three are submitted (after a fixed 0.5 s, a slow start could leave one out).
        await until(lambda: in_checkpoint(options.out, "SUBMITTED") == 3)
        await server.stop()

    silent = asyncio.create_task(go_silent())
    try:
        result = await asyncio.wait_for(arun(options), timeout=60)
    finally:
        silent.cancel()
        await asyncio.gather(silent, return_exceptions=True)
        await server.stop()
    assert result.exit_code == EXIT_STOPPED, result.text()
    assert result.stop_reason is not None
    assert "cannot reach the API" in result.stop_reason
    assert result.summary is not None
    assert result.summary.counts.get("SUBMITTED") == 3  # kept, to resume


async def test_a_queue_longer_than_the_retention_pays_each_row_twice_at_most(
    tmp_path: Path,
) -> None:
    """One job at a time, results kept 20 model-s after submit, InstantID's 7.7 s: jobs
    deep in the queue expire before they finish. Each is sent again once (paid), then
    ends FAILED with the reason, instead of being paid for again and again."""
    rows = 8
    config = SimConfig(
        time_scale=0.01, capacity=1, retention_s=20.0, latency_sigma=0.05, image_size=(16, 16)
    )
    async with SimServer(config) as server:
        result = await asyncio.wait_for(
            arun(_options(tmp_path, server.base_url, 0.01, rows)), timeout=120
        )
        accepted = server.stats()["accepted"]
    table = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    failed = [r for r in table if r["status"] == "FAILED"]
    assert result.exit_code == EXIT_FAILED_ROWS, result.text()
    assert failed, "the queue was meant to outlast the retention"
    for row in failed:
        assert "is gone (expired or unknown); submitted 2 times" in row["error"], row["error"]
    assert accepted <= 2 * rows, accepted


def _flaky_outputs(failures: int, *, sign: bool = False) -> Any:
    """A middleware: each output URL answers 503 its first ``failures`` times; ``sign``
    appends a signed-URL query (a credential) to the output URLs in results."""
    seen: dict[str, int] = {}

    @web.middleware
    async def flaky(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/outputs/"):
            seen[request.path] = seen.get(request.path, 0) + 1
            if seen[request.path] <= failures:
                return web.json_response({"error": "CDN hiccup"}, status=503)
        response: web.StreamResponse = await handler(request)
        if sign and request.path.startswith("/v2/requests/") and "/status" not in request.path:
            assert isinstance(response, web.Response)
            assert response.text is not None
            body = json.loads(response.text)
            body["output"] = f"{body['output']}?X-Amz-Signature=SECRET-SIG"
            return web.json_response(body, status=response.status)
        return response

    return flaky


async def test_a_paid_job_whose_download_fails_is_fetched_again_not_failed(
    tmp_path: Path,
) -> None:
    config = SimConfig(time_scale=0.001, image_size=(16, 16))
    async with SimServer(config, middlewares=[_flaky_outputs(3)]) as server:
        result = await asyncio.wait_for(
            arun(_options(tmp_path, server.base_url, 0.001, 3)), timeout=60
        )
        accepted = server.stats()["accepted"]
        results = sum(server.stats()["requests"]["result"].values())
    assert result.exit_code == EXIT_OK, result.text()
    assert accepted == 3  # fetched again, never submitted again
    assert results == 3  # from the output URLs: the result is not asked for again


async def test_a_download_that_never_works_stops_the_run_without_the_signature(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The job is COMPLETED and billed: not FAILED, not sent again, but left to the next
    run (exit 4). The signed URL is kept in the checkpoint (the user's own folder), to
    download from, and its query (a credential) is in no message."""
    caplog.set_level(logging.DEBUG)
    config = SimConfig(time_scale=0.001, image_size=(16, 16))
    async with SimServer(config, middlewares=[_flaky_outputs(10**9, sign=True)]) as server:
        result = await asyncio.wait_for(
            arun(_options(tmp_path, server.base_url, 0.001, 1)), timeout=60
        )
    assert result.exit_code == EXIT_STOPPED, result.text()
    (row,) = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert row["status"] == "SUBMITTED"
    assert row["error"] is None
    assert "1 jobs are COMPLETED and billed but their images could not be downloaded" in (
        result.stop_reason or ""
    )
    assert "HTTP 503" in (result.stop_reason or "")
    assert "SECRET-SIG" not in result.text()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("row g0:")]
    assert said
    assert all("output could not be downloaded: HTTP 503" in m for m in said), said
    assert "SECRET-SIG" not in caplog.text
    with sqlite3.connect(tmp_path / "out" / "checkpoint.sqlite") as db:
        ((urls,),) = db.execute("SELECT output_urls FROM jobs")
    assert json.loads(urls)[0].endswith("?X-Amz-Signature=SECRET-SIG")


async def test_an_api_answering_5xx_to_everything_stops_the_run_with_no_row_failed(
    tmp_path: Path,
) -> None:
    """An outage answering 503 to every request is not the rows' fault: before, each row
    ended FAILED 'gave up after 8 attempts' and the next run did nothing. When the first
    row gives up, another row's submit may be at the server: it gets its answer (a 503)
    before the run stops, and no row is sent again, so all five are PENDING. (Before,
    one cut off on the wire stayed SUBMITTING, maybe billed, in about 1 run in 8.)"""
    options = _options(tmp_path, "http://127.0.0.1:9", 0.001, 5)
    async with SimServer(SimConfig(time_scale=0.001, error_rate=1.0)) as down:
        options = dataclasses.replace(options, base_url=down.base_url)
        result = await asyncio.wait_for(arun(options), timeout=60)
    assert result.exit_code == EXIT_STOPPED, result.text()
    assert result.stop_reason is not None
    assert "to every attempt of a submit" in result.stop_reason
    assert result.summary is not None
    assert result.summary.counts == {"PENDING": 5}
    # The API back at its address: a folder's jobs belong to one base URL's origin.
    back = SimServer(SimConfig(time_scale=0.001, image_size=(16, 16)), port=down.port or 0)
    async with back as up:
        resumed = await arun(options)
        assert up.stats()["accepted"] == 5
    assert resumed.exit_code == EXIT_OK, resumed.text()


async def test_a_row_the_api_answers_5xx_while_others_succeed_ends_failed(
    tmp_path: Path,
) -> None:
    """A 5xx for one row's submit while the API serves the others is that row's problem:
    it ends FAILED and the run goes on."""

    @web.middleware
    async def poison(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" and (await request.json()).get("prompt") == "p 0":
            return web.json_response({"error": "boom"}, status=500)
        response: web.StreamResponse = await handler(request)
        return response

    config = SimConfig(time_scale=0.001, image_size=(16, 16))
    async with SimServer(config, middlewares=[poison]) as server:
        result = await asyncio.wait_for(
            arun(_options(tmp_path, server.base_url, 0.001, 4)), timeout=60
        )
    assert result.exit_code == EXIT_FAILED_ROWS, result.text()
    table = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()}
    assert table["g0"]["status"] == "FAILED"
    assert "HTTP 500: boom" in table["g0"]["error"]
    assert {table[f"g{n}"]["status"] for n in (1, 2, 3)} == {"COMPLETED"}


async def test_a_row_whose_second_sample_is_not_an_image_keeps_no_images(
    tmp_path: Path,
) -> None:
    """A FAILED row has no images: before, the samples written ahead of the bad one
    stayed in images/ with no row pointing at them."""

    @web.middleware
    async def bad_second(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/outputs/") and request.path.rsplit("/", 1)[1][:2] == "1.":
            return web.Response(body=b"these are words, not pixels", content_type="image/png")
        response: web.StreamResponse = await handler(request)
        return response

    options = _options(tmp_path, "http://127.0.0.1:9", 0.001, 1)
    options.manifest.write_text(
        "id,prompt,face_image,samples\ng0,p 0,https://example.com/face.jpg,3\n"
    )
    config = SimConfig(time_scale=0.001, image_size=(16, 16))
    async with SimServer(config, middlewares=[bad_second]) as server:
        result = await arun(dataclasses.replace(options, base_url=server.base_url))
    assert result.exit_code == EXIT_FAILED_ROWS, result.text()
    (row,) = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert "not a decodable image" in row["error"]
    assert list((tmp_path / "out" / "images").iterdir()) == []


@pytest.mark.parametrize(
    ("held_answer", "held_row"),
    [
        (200, ("SUBMITTED", "held-1")),
        # Refused outright: the row ends FAILED, and with g1 PENDING nothing is left to
        # do, so the run ends during the stop's grace. The 401 must still be raised (it
        # was lost once: the cancel that ended the grace took its place, exit 4).
        (400, ("FAILED", None)),
    ],
)
async def test_a_run_stopped_by_an_error_lets_another_rows_submit_on_the_wire_land(
    tmp_path: Path, held_answer: int, held_row: tuple[str, str | None]
) -> None:
    """Row g1's submit is refused (401: the run stops) while row g0's POST is at the
    server, unanswered. Before, the stop cut g0 off: SUBMITTING, which the next run must
    count as maybe billed (FAILED, unknown outcome). Now its answer comes first, and g0's
    request_id is saved to be polled when the run resumes."""
    on_wire = asyncio.Event()
    refused = asyncio.Event()

    async def submit(request: web.Request) -> web.Response:
        body = await request.json()
        if body["prompt"] == "p 0":
            on_wire.set()
            await refused.wait()
            await asyncio.sleep(0.2)  # answered well after the 401
            if held_answer != 200:
                return web.json_response({"error": "bad prompt"}, status=held_answer)
            return _queued(request, "held-1")
        await on_wire.wait()  # g0's POST is at the server: now refuse g1's
        refused.set()
        return web.json_response({"error": "Invalid API key"}, status=401)

    async with TestServer(_api(submit, "held-1"), host="127.0.0.1") as server:
        options = _options(tmp_path, str(server.make_url("")).rstrip("/"), 0.001, 2)
        with pytest.raises(AuthError, match="refused the key"):
            await asyncio.wait_for(arun(options), timeout=60)

    rows = _rows(options.out, "id, state, request_id")
    assert {r[0]: tuple(r[1:]) for r in rows} == {"g0": held_row, "g1": ("PENDING", None)}


def _queued(request: web.Request, request_id: str) -> web.Response:
    """A submit's answer: job ``request_id`` is QUEUED."""
    base = f"{request.url.origin()}/v2/requests/{request_id}"
    return web.json_response(
        {
            "request_id": request_id,
            "status": "QUEUED",
            "status_url": f"{base}/status",
            "response_url": base,
        }
    )


def _api(submit: Handler, request_id: str) -> web.Application:
    """An API whose submits are ``submit``'s, and whose job ``request_id`` is PROCESSING."""

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"request_id": request_id, "status": "PROCESSING"})

    app = web.Application()
    app.router.add_post("/v2/instantid", submit)
    app.router.add_get(f"/v2/requests/{request_id}/status", status)
    return app


def _rows(out: Path, columns: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(out / "checkpoint.sqlite")
    try:
        return db.execute(f"SELECT {columns} FROM jobs ORDER BY number").fetchall()
    finally:
        db.close()


async def test_a_resubmit_unknown_row_stopped_before_its_next_try_is_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--resubmit-unknown: a row whose POST was lost mid-flight is sent again, and waits
    at the gate for that. Ctrl-C then: before, it was left SUBMITTING from the lost POST,
    and the next run counted a second unknown submit and FAILED it. Now it is PENDING
    (its one maybe-billed submit counted once), to be sent by the next run."""
    interrupted = asyncio.Event()

    async def lost(self: ApiClient, model: str, body: bytes) -> Reply:
        interrupted.set()
        raise TransportError("connection lost (ServerDisconnectedError)", maybe_sent=True)

    options = dataclasses.replace(
        _options(tmp_path, "http://127.0.0.1:9", 1.0, 1),
        resubmit_unknown=True,
        rate=RateConfig(requests=1, period_s=3600.0),  # the next try waits an hour
    )
    monkeypatch.setattr(ApiClient, "submit", lost)
    result = await asyncio.wait_for(arun(options, interrupted=interrupted), timeout=60)

    assert result.exit_code == EXIT_STOPPED, result.text()
    assert _rows(options.out, "state, attempts, unknown_submits") == [("PENDING", 1, 1)]


async def test_a_submit_due_again_after_the_run_stops_is_not_sent(tmp_path: Path) -> None:
    """Ctrl-C while a row waits between tries of its submit (after a 503): its next try
    comes up inside the stop's grace. Before, it was sent, and then the rest of its
    tries; now nothing new goes out once the run stops submitting, and the row waits,
    PENDING with no attempt used, for the next run."""
    interrupted = asyncio.Event()
    posts = 0

    async def submit(request: web.Request) -> web.Response:
        nonlocal posts
        posts += 1
        interrupted.set()  # Ctrl-C while the POST is at the server...
        # ...answered once the run has seen it (it looks every 0.2 s), inside the stop's
        # 3 s grace for submits on the wire. The row's next try is then due in ms.
        await asyncio.sleep(1.0)
        return web.json_response({"error": "Service unavailable"}, status=503)

    app = web.Application()
    app.router.add_post("/v2/instantid", submit)
    async with TestServer(app, host="127.0.0.1") as server:
        options = _options(tmp_path, str(server.make_url("")).rstrip("/"), 0.001, 1)
        result = await asyncio.wait_for(arun(options, interrupted=interrupted), timeout=60)

    assert result.exit_code == EXIT_STOPPED, result.text()
    assert posts == 1
    assert _rows(options.out, "state, attempts, request_id") == [("PENDING", 0, None)]


async def test_ctrl_c_waits_for_a_submit_on_the_wire_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C while a submit's answer is slow: the run says at once that it waits for it,
    then waits (up to the request timeout), and its request_id is saved, to be polled on
    resume. Before, a fixed 3 s grace cut it off (shortened here, so the answer need not
    take 3 s: the new code has no such grace), and the next run FAILED the row "submit
    outcome unknown" though its job was known."""
    monkeypatch.setattr(run_module, "GRACE_S", 0.2, raising=False)
    interrupted = asyncio.Event()

    async def submit(request: web.Request) -> web.Response:
        interrupted.set()  # Ctrl-C while the POST is at the server
        await asyncio.sleep(1.0)
        return _queued(request, "slow-1")

    async with TestServer(_api(submit, "slow-1"), host="127.0.0.1") as server:
        options = _options(tmp_path, str(server.make_url("")).rstrip("/"), 0.001, 1)
        result = await asyncio.wait_for(arun(options, interrupted=interrupted), 60)

    assert result.exit_code == EXIT_STOPPED, result.text()
    assert _rows(options.out, "state, request_id") == [("SUBMITTED", "slow-1")]
    said = [r.getMessage() for r in caplog.records if r.name == "batcher.run"]
    assert (
        "waiting up to 60 s for 1 submits already sent; Ctrl-C again to stop now (they "
        "would be left as 'outcome unknown', maybe billed)"
    ) in said, said
    assert not result.notes  # nothing abandoned


def test_sigterm_waits_less_than_ctrl_c_for_the_submits_on_the_wire() -> None:
    """A container manager SIGKILLs soon after SIGTERM (Docker: 10 s): the wait for the
    answers is bounded, leaving time to save; Ctrl-C waits up to the request timeout."""
    assert interrupt_module.wire_wait_s(signal.SIGINT, 60.0) == 60.0
    assert interrupt_module.wire_wait_s(None, 60.0) == 60.0  # an error stopping the run
    assert interrupt_module.wire_wait_s(signal.SIGTERM, 60.0) == interrupt_module.TERM_WAIT_S == 5.0
    assert interrupt_module.wire_wait_s(signal.SIGTERM, 2.0) == 2.0


async def test_the_last_rows_refused_connection_still_says_why_the_run_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One row, its connection refused: handing it back to PENDING left nothing to do, so
    the run ended while its worker still wrote its retry count, and the cancel took the
    error's place: exit 4 with no reason. The reason is now kept."""

    async def refused(self: ApiClient, model: str, body: bytes) -> Reply:
        raise TransportError("cannot connect: [Errno 111] Connection refused", maybe_sent=False)

    monkeypatch.setattr(ApiClient, "submit", refused)
    result = await asyncio.wait_for(arun(_options(tmp_path, "http://127.0.0.1:9", 0.001, 1)), 60)

    assert result.exit_code == EXIT_STOPPED, result.text()
    assert result.stop_reason is not None
    assert "cannot reach the API" in result.stop_reason


async def test_an_api_whose_connections_never_open_stops_the_run_with_nothing_failed(
    tmp_path: Path, blackhole: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead VPN or a firewall dropping packets: no connection opens, so nothing was
    sent. Each submit is tried again, then the run stops (exit 4) with every row PENDING.
    Before, each ended FAILED "outcome unknown, may be billed", never to be sent again,
    and the run went on through the whole manifest."""
    monkeypatch.setattr(client_module, "CONNECT_TIMEOUT_S", 0.2)
    options = dataclasses.replace(
        _options(tmp_path, f"http://127.0.0.1:{blackhole}", 0.001, rows=3),
        retry=RetryConfig(max_attempts=2),
    )

    result = await arun(options)

    assert result.exit_code == EXIT_STOPPED, result.text()
    assert "cannot reach the API" in result.text()
    assert "no connection within 0.2 s" in result.text()
    rows = pq.read_table(options.out / "results.parquet").to_pylist()
    assert {(r["status"], r["attempts"], r["unknown_submits"]) for r in rows} == {("PENDING", 0, 0)}


async def test_a_submit_cut_off_on_the_wire_keeps_the_counts_of_its_tries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row's first POST is answered 503, its second is held at the server past
    SIGTERM's wait: the row stays SUBMITTING (maybe billed), its retry is counted, and the
    stop says so. Before, a worker cancelled with its POST on the wire dropped the
    attempt's counts."""
    monkeypatch.setattr(interrupt_module, "TERM_WAIT_S", 0.2)
    posts: list[int] = []
    held = asyncio.Event()

    async def submit(request: web.Request) -> web.Response:
        posts.append(1)
        if len(posts) == 1:
            return web.json_response({"error": "Service Unavailable"}, status=503)
        held.set()
        await asyncio.sleep(3600)  # never answered: the client gives up on it
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_post("/v2/instantid", submit)
    async with TestServer(app, host="127.0.0.1") as server:
        options = _options(tmp_path, str(server.make_url("")).rstrip("/"), 0.001, 1)
        interrupted = Interrupt()
        task = asyncio.create_task(arun(options, interrupted=interrupted))
        await asyncio.wait_for(held.wait(), 30)
        interrupted.signal = signal.SIGTERM
        interrupted.set()
        result = await asyncio.wait_for(task, 30)

    assert result.exit_code == EXIT_STOPPED, result.text()
    assert _rows(options.out, "state, attempts, retries") == [("SUBMITTING", 1, 1)]
    assert result.notes[0].startswith("1 submits abandoned on the wire: outcome unknown")
    assert result.summary is not None
    assert result.summary.api_requests == len(posts) == 2


async def test_a_row_waiting_to_retry_a_5xx_submit_is_pending_not_maybe_billed(
    tmp_path: Path, sim: Any
) -> None:
    """Between a 5xx and the next try nothing of the row is at the server: its row says
    PENDING meanwhile, so a process killed then (a second Ctrl-C, a crash) leaves it to
    be sent again, not FAILED "submit outcome unknown" (maybe billed) by the next run.
    Before, it stayed SUBMITTING through the backoff."""
    server = await sim(time_scale=1.0, error_rate=1.0)  # every submit answered 5xx
    options = dataclasses.replace(
        _options(tmp_path, server.base_url, 1.0, rows=2),
        retry=RetryConfig(base_s=60.0, cap_s=60.0),  # the first backoff: 30-60 s
    )
    out = options.out
    interrupted = Interrupt()
    run = asyncio.create_task(arun(options, interrupted=interrupted))
    try:
        # Both rows were answered 5xx: each is in its backoff now (its write on the way).
        await until(lambda: sum(server.stats()["requests"].get("submit", {}).values()) >= 2)
        await until(lambda: in_checkpoint(out, "SUBMITTING") == 0, timeout_s=2.0)
        assert in_checkpoint(out, "PENDING") == 2
    finally:
        interrupted.set()  # Ctrl-C: the backoffs end, the run stops
        result = await asyncio.wait_for(run, 30)
    assert result.exit_code == EXIT_STOPPED, result.text()
    assert in_checkpoint(out, "PENDING") == 2
    assert server.stats()["accepted"] == 0


async def test_a_submit_answered_during_a_stop_counts_as_on_the_wire_until_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A POST answered during the first Ctrl-C's wait: its row stays among the rows a
    second Ctrl-C (exit at once) names as "outcome unknown" until its request_id is on
    disk. Before, the SUBMITTED write was only queued, the row left that count at once,
    and a second Ctrl-C before the commit lost the request_id without a word."""
    held = asyncio.Event()
    answer = asyncio.Event()

    async def submit(request: web.Request) -> web.Response:
        held.set()
        await answer.wait()
        rid = "5b0f1c2e-0000-4e8b-9f3a-000000000001"
        base = str(request.url.origin())
        return web.json_response(
            {
                "request_id": rid,
                "status": "QUEUED",
                "status_url": f"{base}/v2/requests/{rid}/status",
                "response_url": f"{base}/v2/requests/{rid}",
            }
        )

    loop = asyncio.get_running_loop()
    committing = asyncio.Event()
    commit = threading.Event()

    def slow_submitted(statements: Statements) -> None:
        if any("SUBMITTED" in params for _, params in statements):
            loop.call_soon_threadsafe(committing.set)  # on the checkpoint's worker thread
            commit.wait(10)

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"status": "QUEUED"})  # still at the service at the end

    before_each_commit(monkeypatch, slow_submitted)
    app = web.Application()
    app.router.add_post("/v2/instantid", submit)
    app.router.add_get("/v2/requests/{rid}/status", status)
    async with TestServer(app, host="127.0.0.1") as server:
        options = _options(tmp_path, str(server.make_url("")).rstrip("/"), 0.001, 1)
        interrupted = Interrupt()
        task = asyncio.create_task(arun(options, interrupted=interrupted))
        try:
            await asyncio.wait_for(held.wait(), 30)
            interrupted.on_signal(signal.SIGINT)  # the first Ctrl-C
            run = interrupted.context
            assert run is not None
            await until(run.stop_submitting.is_set)
            answer.set()  # the POST on the wire gets its answer during the stop's wait
            await asyncio.wait_for(committing.wait(), 30)
            assert run.submitting == {"g0"}  # what a second Ctrl-C would count now
        finally:
            commit.set()
            answer.set()
            result = await asyncio.wait_for(task, 30)

    assert result.exit_code == EXIT_STOPPED, result.text()
    assert _rows(options.out, "state, request_id") == [
        ("SUBMITTED", "5b0f1c2e-0000-4e8b-9f3a-000000000001")
    ]
    assert not any("abandoned" in note for note in result.notes)
