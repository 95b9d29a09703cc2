"""Fault knobs: 5xx, dropped connections, slow answers, cut downloads, FAILED jobs."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import Api, StartSim

from batcher.sim import FAIL_MARKERS, FAILURES, SimConfig, SimServer

# Jobs finish at submit: these tests are about the faults, not the wait.
INSTANT: dict[str, Any] = {"latency_median_s": {"instantid": 0.0}, "image_size": (16, 16)}


async def _status_codes(api: Api, url: str, n: int) -> list[int]:
    return [(await api.get(url))[0] for _ in range(n)]


async def _job(api: Api, base_url: str, payload: dict[str, Any]) -> Any:
    code, sub = await api.submit(base_url, "instantid", payload)
    assert code == 200, sub
    return sub


# -- 5xx -----------------------------------------------------------------------------------------


async def test_error_rate_answers_500_502_504_at_its_fraction(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    clean = await sim(**INSTANT)
    sub = await _job(api, clean.base_url, instantid_payload)
    assert set(await _status_codes(api, sub["status_url"], 50)) == {200}

    server = await sim(error_rate=0.2, **INSTANT)
    job_url = None
    while job_url is None:  # the submit itself may meet a 5xx
        code, sub = await api.submit(server.base_url, "instantid", instantid_payload)
        job_url = sub["status_url"] if code == 200 else None
    counts: Counter[int] = Counter()
    for _ in range(300):
        code, body = await api.get(job_url)
        counts[code] += 1
        if code >= 500:
            assert body["error"]
    assert set(counts) == {200, 500, 502, 504}
    errors = counts[500] + counts[502] + counts[504]
    assert 0.13 < errors / 300 < 0.27, counts


async def test_5xx_on_submit_creates_no_job(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(error_rate=0.5, credits_usd=10.0, **INSTANT)
    codes = [
        (await api.submit(server.base_url, "instantid", instantid_payload))[0] for _ in range(40)
    ]
    stats = server.stats()
    assert codes.count(200) == stats["accepted"] == stats["live_jobs"]
    assert 0 < codes.count(200) < 40
    assert stats["credits_remaining_usd"] == pytest.approx(10.0 - 0.025 * codes.count(200))


async def test_same_seed_gives_same_fault_sequence(sim: StartSim, api: Api) -> None:
    runs = []
    for seed in (3, 3, 4):
        server = await sim(error_rate=0.5, seed=seed, time_scale=0.001)
        runs.append(await _status_codes(api, f"{server.base_url}/v2/requests/x/status", 40))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert 404 in runs[0]
    assert {500, 502, 504} & set(runs[0])


# -- dropped connections ----------------------------------------------------------------------


async def test_drop_rate_one_drops_every_api_request(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(drop_rate=1.0, drop_after_accept=0.0, **INSTANT)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await api.get(f"{server.base_url}/v2/requests/x/status")
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.get(f"{server.base_url}/v2/requests/x")
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.submit(server.base_url, "instantid", instantid_payload, version="v1")
    requests = server.stats()["requests"]
    # aiohttp retries an idempotent request once on a dropped connection, so >= 1.
    assert requests["status"]["dropped"] >= 1
    assert requests["result"]["dropped"] >= 1
    assert requests["sync"] == {"dropped": 1}
    # The session is not poisoned: the next (non-API) request works.
    async with api.http.get(f"{server.base_url}/__sim/stats") as resp:
        assert resp.status == 200


async def test_drop_rate_drops_about_its_fraction(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    # POST: aiohttp does not retry it, so each drop is seen exactly once.
    server = await sim(drop_rate=0.3, drop_after_accept=0.0, **INSTANT)
    outcomes: Counter[str] = Counter()
    for _ in range(200):
        try:
            code, _ = await api.submit(server.base_url, "instantid", instantid_payload)
            outcomes[str(code)] += 1
        except aiohttp.ClientConnectionError:
            outcomes["dropped"] += 1
    assert 0.22 < outcomes["dropped"] / 200 < 0.38, outcomes
    assert server.stats()["requests"]["submit"]["dropped"] == outcomes["dropped"]
    assert server.stats()["accepted"] == outcomes["200"]


@pytest.mark.parametrize(("after_accept", "accepted"), [(1.0, 1), (0.0, 0)])
async def test_drop_after_accept_decides_whether_the_dropped_submit_was_billed(
    sim: StartSim,
    api: Api,
    instantid_payload: dict[str, Any],
    after_accept: float,
    accepted: int,
) -> None:
    server = await sim(drop_rate=1.0, drop_after_accept=after_accept, credits_usd=1.0, **INSTANT)
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.submit(server.base_url, "instantid", instantid_payload)
    stats = server.stats()
    assert stats["accepted"] == accepted
    assert stats["accepted_then_dropped"] == accepted
    assert stats["live_jobs"] == accepted
    assert stats["credits_remaining_usd"] == pytest.approx(1.0 - 0.025 * accepted)


async def test_drop_after_accept_fraction(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(drop_rate=1.0, drop_after_accept=0.5, **INSTANT)
    for _ in range(100):
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.submit(server.base_url, "instantid", instantid_payload)
    stats = server.stats()
    assert 35 <= stats["accepted_then_dropped"] <= 65
    assert stats["accepted"] == stats["accepted_then_dropped"]


# -- slow answers ------------------------------------------------------------------------------


async def _timed_get(api: Api, url: str) -> float:
    t0 = time.monotonic()
    await api.get(url)
    return time.monotonic() - t0


@pytest.mark.parametrize(("slow_rate", "slow_s"), [(1.0, 20.0), (0.0, 500.0)])
async def test_slow_rate_one_delays_every_answer_by_slow_s(
    sim: StartSim, api: Api, slow_rate: float, slow_s: float
) -> None:
    # 0.2 s when every answer is slow. When none is, a 5 s delay: an answer a loaded
    # machine is slow to give cannot pass for it (0.2 s could).
    delay_s = slow_s * 0.01
    server = await sim(slow_rate=slow_rate, slow_s=slow_s, time_scale=0.01)
    elapsed = await _timed_get(api, f"{server.base_url}/v2/requests/x/status")
    assert (elapsed >= delay_s) is (slow_rate == 1.0), elapsed


async def test_slow_rate_delays_about_its_fraction(api: Api) -> None:
    held: list[float] = []

    @web.middleware
    async def timed(request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.monotonic()
        response: web.StreamResponse = await handler(request)
        held.append(time.monotonic() - started)
        return response

    config = SimConfig(slow_rate=0.5, slow_s=60.0, time_scale=0.005)  # 0.3 s
    async with SimServer(config, port=0, middlewares=[timed]) as server:
        url = f"{server.base_url}/v2/requests/x/status"
        elapsed = await asyncio.gather(*(_timed_get(api, url) for _ in range(40)))
    # Told apart by how long the emulator held each answer, not by when the client got
    # it: on a loaded machine the fast answers of a burst of 40 can reach the client
    # spread over more than 0.25 s (and all came 70 ms late once). A fast answer is one
    # step of the event loop; a slow one sleeps 0.3 s.
    slow = sum(h >= 0.25 for h in held)
    assert 10 <= slow <= 30, sorted(held)
    assert sum(e >= 0.25 for e in elapsed) >= slow  # and reached the client that late


# -- cut downloads -------------------------------------------------------------------------------


async def test_truncate_rate_one_cuts_every_download(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(truncate_rate=1.0, **INSTANT)
    sub = await _job(api, server.base_url, instantid_payload)
    _, result = await api.get(sub["response_url"])
    async with api.http.get(result["output"]) as resp:
        assert resp.status == 200
        assert resp.content_length is not None
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert server.stats()["requests"]["output"] == {"truncated": 1}


async def test_truncate_rate_cuts_about_its_fraction(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(truncate_rate=0.5, **INSTANT)
    sub = await _job(api, server.base_url, instantid_payload)
    _, result = await api.get(sub["response_url"])
    whole: set[bytes] = set()
    cut = 0
    for _ in range(40):
        try:
            whole.add((await api.download(result["output"]))[1])
        except aiohttp.ClientPayloadError:
            cut += 1
    assert 10 <= cut <= 30
    assert len(whole) == 1  # every uncut download is the same, complete image
    assert whole.pop().endswith(b"IEND\xaeB`\x82")


# -- FAILED jobs ---------------------------------------------------------------------------------


async def _final_states(api: Api, base_url: str, payload: dict[str, Any], n: int) -> list[Any]:
    finals = []
    for _ in range(n):
        sub = await _job(api, base_url, payload)
        finals.append(await api.get(sub["status_url"]))
    return finals


async def test_fail_rate_fails_about_its_fraction_with_realistic_errors(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(fail_rate=0.3, **INSTANT)
    finals = await _final_states(api, server.base_url, instantid_payload, 200)
    failed = [body for code, body in finals if code == 422]
    assert all(body["status"] == "COMPLETED" for code, body in finals if code == 200)
    assert all(body["status"] == "FAILED" for body in failed)
    assert 0.22 < len(failed) / 200 < 0.38
    assert {body["error"] for body in failed} == set(FAILURES)


@pytest.mark.parametrize(("fail_rate", "expected"), [(1.0, 422), (0.0, 200)])
async def test_fail_rate_extremes(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any], fail_rate: float, expected: int
) -> None:
    server = await sim(fail_rate=fail_rate, **INSTANT)
    finals = await _final_states(api, server.base_url, instantid_payload, 20)
    assert {code for code, _ in finals} == {expected}


@pytest.mark.parametrize("marker", sorted(FAIL_MARKERS))
async def test_prompt_marker_fails_with_its_error(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any], marker: str
) -> None:
    server = await sim(**INSTANT)
    payload = {**instantid_payload, "prompt": f"portrait {marker} of a man"}
    [(code, body)] = await _final_states(api, server.base_url, payload, 1)
    assert code == 422
    assert body["error"] == FAIL_MARKERS[marker]


async def test_failed_job_has_no_output_image(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(**INSTANT)
    sub = await _job(api, server.base_url, {**instantid_payload, "prompt": "sim:blocked"})
    rid = sub["request_id"]
    assert (await api.download(f"{server.base_url}/outputs/{rid}/0.png"))[0] == 404


async def test_v1_sync_failure_is_422_with_error(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(**INSTANT)
    code, body = await api.submit(
        server.base_url, "instantid", {**instantid_payload, "prompt": "sim:no-face"}, version="v1"
    )
    assert code == 422
    assert body["error"] == FAIL_MARKERS["sim:no-face"]
