"""The rate-limit knobs: every API request counts, 429 answers, and each header variant."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import Api, Clock, StartSim

from batcher.sim import Emulator, SimConfig

# 3 requests per 20 model s; at time_scale 0.01 the window is 0.2 s of emulator time.
LIMITED: dict[str, Any] = {"rate_limit": 3, "rate_period_s": 20.0, "time_scale": 0.01}
WINDOW_S = 0.2


async def test_every_api_request_counts_and_the_excess_is_429(
    sim: StartSim, api: Api, clock: Clock, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(clock=clock, **LIMITED)
    code, sub = await api.submit(server.base_url, "instantid", instantid_payload)
    assert code == 200
    assert (await api.get(sub["status_url"]))[0] == 200  # a poll: 2
    assert (await api.get(sub["response_url"]))[0] == 200  # a result: 3
    code, body = await api.get(sub["status_url"])
    assert code == 429
    assert "rate limit" in body["error"].lower()
    code, _ = await api.submit(server.base_url, "instantid", instantid_payload)
    assert code == 429
    assert server.stats()["accepted"] == 1  # a 429 submit is no job
    clock.now += WINDOW_S + 0.001
    assert (await api.get(sub["status_url"]))[0] == 200  # the window moved on


async def test_v1_sync_counts_too(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(rate_limit=1, latency_median_s={"instantid": 0.0}, image_size=(8, 8))
    code, image = await api.submit(server.base_url, "instantid", instantid_payload, version="v1")
    assert code == 200
    assert image.startswith(b"\x89PNG")
    code, _ = await api.submit(server.base_url, "instantid", instantid_payload)
    assert code == 429


async def test_limit_is_per_key_and_outputs_do_not_count(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(rate_limit=2, latency_median_s={"instantid": 0.0}, image_size=(8, 8))
    _, sub = await api.submit(server.base_url, "instantid", instantid_payload)
    _, result = await api.wait(sub["response_url"])
    assert (await api.get(sub["status_url"]))[0] == 429
    for _ in range(3):  # public image downloads and debug routes are not API requests
        assert (await api.download(result["output"]))[0] == 200
        assert (await api.get(f"{server.base_url}/__sim/stats"))[0] == 200
    other = {"x-api-key": "sk-another-key"}
    assert (await api.get(sub["status_url"], headers=other))[0] == 200


async def test_no_limit_by_default(sim: StartSim, api: Api) -> None:
    server = await sim(time_scale=0.001)
    codes = {(await api.get(f"{server.base_url}/v2/requests/x/status"))[0] for _ in range(100)}
    assert codes == {404}


async def _hit_limit(api: Api, base_url: str) -> tuple[datetime, Any, dict[str, str]]:
    url = f"{base_url}/v2/requests/x/status"
    for _ in range(3):
        assert (await api.get(url))[0] == 404
    before = datetime.now(UTC)
    async with api.http.get(url, headers={"x-api-key": api.key}) as resp:
        assert resp.status == 429
        return before, await resp.json(), dict(resp.headers)


@pytest.mark.parametrize(
    ("mode", "retry_after", "reset_at"),
    [
        ("retry-after", True, False),
        ("reset-at", False, True),
        ("both", True, True),
        ("none", False, False),
    ],
)
async def test_rate_limit_header_variants(
    sim: StartSim, api: Api, clock: Clock, mode: str, retry_after: bool, reset_at: bool
) -> None:
    server = await sim(rate_limit_headers=mode, clock=clock, **LIMITED)
    before, body, headers = await _hit_limit(api, server.base_url)
    assert body["error"]
    assert ("Retry-After" in headers) is retry_after
    assert ("x-rate-limit-reset-at-utc" in headers) is reset_at
    if retry_after:
        wait = float(headers["Retry-After"])  # fractional: the window is time-scaled
        assert 0 < wait <= WINDOW_S + 0.001  # rounded up to the millisecond
    if reset_at:
        at = datetime.fromisoformat(headers["x-rate-limit-reset-at-utc"])
        assert at.tzinfo is not None
        assert before < at < before + timedelta(seconds=WINDOW_S + 1)


async def test_retry_after_is_enough_to_pass_again(sim: StartSim, api: Api, clock: Clock) -> None:
    server = await sim(clock=clock, **LIMITED)
    _, _, headers = await _hit_limit(api, server.base_url)
    clock.now += float(headers["Retry-After"])
    assert (await api.get(f"{server.base_url}/v2/requests/x/status"))[0] == 404


async def test_retry_after_is_whole_seconds_at_real_time(sim: StartSim, api: Api) -> None:
    server = await sim(rate_limit=3, rate_period_s=60.0, rate_limit_headers="both")
    before, _, headers = await _hit_limit(api, server.base_url)
    assert headers["Retry-After"].isdigit()
    assert 59 <= int(headers["Retry-After"]) <= 60
    at = datetime.fromisoformat(headers["x-rate-limit-reset-at-utc"])
    assert before + timedelta(seconds=58) < at < before + timedelta(seconds=61)


async def test_a_client_that_waits_exactly_retry_after_passes(
    http: aiohttp.ClientSession, api_key: str
) -> None:
    """Retry-After must never round the wait down, or an obedient client meets another 429."""
    clock = Clock()
    config = SimConfig(rate_limit=1, rate_period_s=1.0, time_scale=0.5)  # a 0.5 s window
    async with TestServer(Emulator(config, clock=clock).app(), host="127.0.0.1") as server:
        url = str(server.make_url("/v2/requests/x/status"))
        headers = {"x-api-key": api_key}
        async with http.get(url, headers=headers) as resp:
            assert resp.status == 404
        for waited in (0.4996, 0.2504):  # left to wait: 0.4 ms, then 249.6 ms
            clock.now = 1000.0 + waited
            async with http.get(url, headers=headers) as resp:
                assert resp.status == 429
                retry_after = float(resp.headers["Retry-After"])
            assert retry_after >= 0.5 - waited
        clock.now += retry_after
        async with http.get(url, headers=headers) as resp:
            assert resp.status == 404
