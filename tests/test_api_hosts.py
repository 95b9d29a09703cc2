"""The API key goes to --base-url's host and nowhere else.

Every request to the API carries the key, so batcher follows no URL that would take it
elsewhere: not status/result URLs an answer names on another host, not URLs a checkpoint
kept from a run against another base URL (or an emulator that is gone), not redirects.
API answers are read within a size cap, and a body nested too deep for the JSON parser
is an error text, not a crash.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from conftest import in_checkpoint, until, url_manifest

from batcher import client as client_module
from batcher.client import ApiClient, _parse_answer, api_urls, same_origin
from batcher.gate import RateConfig
from batcher.options import RunOptions
from batcher.run import EXIT_FAILED_ROWS, EXIT_OK, EXIT_STOPPED, arun
from batcher.sim import SimConfig, SimServer

KEY = "sk-hosts-0123456789abcdef"
BASE = "http://127.0.0.1:8400"


@pytest.mark.parametrize(
    ("url", "same"),
    [
        (f"{BASE}/v2/requests/r/status", True),
        ("http://127.0.0.1:8400", True),
        ("HTTP://127.0.0.1:8400/x", True),
        ("http://127.0.0.1:8401/v2/requests/r", False),  # another port
        ("https://127.0.0.1:8400/x", False),  # another scheme
        ("http://localhost:8400/x", False),  # another host name
        ("http://127.0.0.1:8400@evil.example/x", False),  # userinfo trick
        ("/v2/requests/r", False),  # relative
        ("ftp://127.0.0.1:8400/x", False),
        ("http://127.0.0.1:notaport/x", False),
    ],
)
def test_same_origin(url: str, same: bool) -> None:
    assert same_origin(url, BASE) is same


def test_default_ports_are_the_same_origin() -> None:
    assert same_origin("https://api.example.test:443/v2/requests/r", "https://api.example.test")
    assert same_origin("https://API.example.test/v2", "https://api.example.test/")


def test_api_urls_keep_the_servers_own_urls_on_the_base_host() -> None:
    status, result = f"{BASE}/v2/requests/r-1/status", f"{BASE}/v2/requests/r-1"
    assert api_urls(BASE, "r-1", status, result) == (status, result, False)


@pytest.mark.parametrize(
    ("status", "result"),
    [
        ("http://evil.example/steal/status", f"{BASE}/v2/requests/r-1"),
        (f"{BASE}/v2/requests/r-1/status", "http://127.0.0.1:9/v2/requests/r-1"),
        (None, None),
        ("", ""),
    ],
)
def test_api_urls_off_the_base_host_are_replaced_by_the_documented_ones(
    status: str | None, result: str | None
) -> None:
    assert api_urls(BASE + "/", "r-1", status, result) == (
        f"{BASE}/v2/requests/r-1/status",
        f"{BASE}/v2/requests/r-1",
        True,
    )


async def test_the_client_refuses_to_send_the_key_off_the_base_host() -> None:
    async with aiohttp.ClientSession() as session:
        api = ApiClient(session, BASE, KEY)
        with pytest.raises(ValueError, match="off --base-url") as info:
            await api.get("http://evil.example/v2/requests/r/status")
    assert KEY not in str(info.value)


def test_a_body_nested_too_deep_is_an_error_text() -> None:
    body = _parse_answer(b"[" * 200_000)
    assert body["error"].startswith("[[[")


# --- wired into runs ----------------------------------------------------------------------


class Foreign:
    """Another host (a second port on 127.0.0.1): records every request it gets."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []
        self.base_url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, "x-api-key" in request.headers))
        return web.json_response({"status": "COMPLETED", "output": "nothing"})


@pytest.fixture
async def foreign() -> AsyncIterator[Foreign]:
    host = Foreign()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", host.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    host.base_url = f"http://127.0.0.1:{port}"
    yield host
    await runner.cleanup()


def hostile(rewrite: Any) -> Any:
    """A middleware letting ``rewrite(request, response)`` change the emulator's answers."""

    @web.middleware
    async def change(request: web.Request, handler: Any) -> web.StreamResponse:
        changed: web.StreamResponse = await rewrite(request, await handler(request))
        return changed

    return change


def _sim(middleware: Any) -> SimServer:
    return SimServer(SimConfig(time_scale=0.001, image_size=(16, 16)), middlewares=[middleware])


def _options(manifest: Path, out: Path, base_url: str, scale: float) -> RunOptions:
    return RunOptions(
        manifest=manifest,
        out=out,
        model="instantid",
        base_url=base_url,
        time_scale=scale,
        max_in_flight=50,
        rate=RateConfig(requests=100_000, period_s=1.0),
        api_key=KEY,
        progress=False,
    )


async def test_status_urls_an_answer_names_on_another_host_are_not_followed(
    tmp_path: Path, foreign: Foreign
) -> None:

    async def steer(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        if request.method != "POST" or not isinstance(response, web.Response):
            return response
        body = dict(await _json(response))
        rid = body["request_id"]
        body["status_url"] = f"{foreign.base_url}/steal/{rid}/status"
        body["poll_url"] = body["status_url"]
        body["response_url"] = f"{foreign.base_url}/steal/{rid}"
        return web.json_response(body, status=response.status)

    server = _sim(hostile(steer))
    async with server:
        result = await arun(
            _options(url_manifest(tmp_path, 5), tmp_path / "out", server.base_url, 0.001)
        )
    assert result.exit_code == EXIT_OK, result.text()  # polled on --base-url instead
    assert foreign.seen == []


@pytest.mark.parametrize("endpoint", ["submit", "status", "result"])
async def test_redirects_are_not_followed(tmp_path: Path, foreign: Foreign, endpoint: str) -> None:

    async def redirect(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        kind = (
            "submit"
            if request.method == "POST"
            else "status"
            if request.path.endswith("/status")
            else "result"
            if request.path.startswith("/v2/requests/")
            else "other"
        )
        if kind != endpoint:
            return response
        return web.Response(status=307, headers={"Location": f"{foreign.base_url}/x"})

    server = _sim(hostile(redirect))
    out = tmp_path / "out"
    async with server:
        options = _options(url_manifest(tmp_path, 2), out, server.base_url, 0.001)
        if endpoint == "submit":
            result = await arun(options)
        else:  # the row is kept (paid) and asked again: stop the run after a while
            interrupted = asyncio.Event()
            asyncio.get_running_loop().call_later(1.0, interrupted.set)
            result = await arun(options, interrupted=interrupted)
    assert foreign.seen == []
    if endpoint == "submit":
        assert result.exit_code == EXIT_FAILED_ROWS
        rows = pq.read_table(out / "results.parquet").to_pylist()
        assert all("redirect, not followed" in r["error"] for r in rows), rows
    else:
        assert result.exit_code == EXIT_STOPPED


async def test_an_oversized_answer_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "MAX_BODY_BYTES", 64)

    async def bloat(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        if request.method != "POST":
            return response
        return web.json_response({"error": "x" * 500}, status=400)

    server = _sim(hostile(bloat))
    out = tmp_path / "out"
    async with server:
        result = await arun(_options(url_manifest(tmp_path, 1), out, server.base_url, 0.001))
    assert result.exit_code == EXIT_FAILED_ROWS
    (row,) = pq.read_table(out / "results.parquet").to_pylist()
    assert row["error"].startswith("HTTP 400: answer body over")


async def test_a_compressed_answer_is_capped_as_it_decompresses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gzip bomb: a small body on the wire (its Content-Length says little) that
    decompresses far past the cap is cut off at the cap, not read whole."""
    monkeypatch.setattr(client_module, "MAX_BODY_BYTES", 1024)
    bomb = gzip.compress(b'{"error": "' + b"0" * 200_000 + b'"}')

    async def inflate(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        if request.method != "POST":
            return response
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        return web.Response(body=bomb, status=400, headers=headers)

    server = _sim(hostile(inflate))
    out = tmp_path / "out"
    async with server:
        result = await arun(_options(url_manifest(tmp_path, 1), out, server.base_url, 0.001))
    assert len(bomb) < 1024 < 200_000
    assert result.exit_code == EXIT_FAILED_ROWS
    (row,) = pq.read_table(out / "results.parquet").to_pylist()
    assert row["error"].startswith("HTTP 400: answer body over")


async def test_a_run_resumed_after_its_emulator_is_gone_finishes(tmp_path: Path) -> None:
    """Jobs in flight keep the URLs of the emulator (or base URL) they were sent to. A
    resume against another one asks its own API about them (unknown there: sent again),
    instead of polling a host that is gone until the end of time. A folder records its
    base URL now and refuses another one: this is a folder from before that record (with
    --simulate, every run's emulator has a port of its own, the same case)."""
    manifest, out = url_manifest(tmp_path, 6), tmp_path / "out"
    first = SimServer(SimConfig(time_scale=1.0, image_size=(16, 16)), port=0)
    async with first:  # InstantID at full time: 7.7 s, nothing finishes before the stop
        interrupted = asyncio.Event()
        task = asyncio.create_task(
            arun(_options(manifest, out, first.base_url, 1.0), interrupted=interrupted)
        )
        # Stopped once all six are sent (after a fixed 0.5 s, a slow start could leave one).
        await until(lambda: in_checkpoint(out, "SUBMITTED") == 6 or task.done())
        interrupted.set()
        stopped = await task
    assert stopped.exit_code == EXIT_STOPPED
    assert stopped.summary is not None
    assert stopped.summary.counts.get("SUBMITTED") == 6
    db = sqlite3.connect(out / "checkpoint.sqlite")
    try:
        db.execute("DELETE FROM meta WHERE key IN ('service', 'time_scale')")
        db.commit()
    finally:
        db.close()
    second = SimServer(SimConfig(time_scale=0.01, image_size=(16, 16)), port=0)
    async with second:
        result = await asyncio.wait_for(
            arun(_options(manifest, out, second.base_url, 0.01)), timeout=60
        )
    assert result.exit_code == EXIT_OK, result.text()
    assert second.stats()["requests"]["status"].get("404", 0) >= 6  # asked, unknown there


async def _json(response: web.Response) -> dict[str, Any]:
    assert isinstance(response.body, bytes)
    data: dict[str, Any] = json.loads(response.body)
    return data
