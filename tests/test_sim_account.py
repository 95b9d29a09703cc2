"""The account: credits (406 once spent, top-up) and the stats that judge a client."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from conftest import Api, Clock, StartSim

INSTANT: dict[str, Any] = {
    "latency_median_s": {"instantid": 0.0, "infinite-you": 0.0},
    "image_size": (16, 16),
}


async def _credits(api: Api, base_url: str) -> Any:
    return (await api.get(f"{base_url}/__sim/stats"))[1]["credits_remaining_usd"]


async def test_credits_pay_for_jobs_then_406(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(credits_usd=0.06, **INSTANT)
    for _ in range(2):  # 2 x 0.025
        code, sub = await api.submit(server.base_url, "instantid", instantid_payload)
        assert code == 200
    _, final = await api.get(sub["status_url"])
    assert final["metrics"]["cost"] == pytest.approx(0.025)
    assert await _credits(api, server.base_url) == pytest.approx(0.01)
    code, body = await api.submit(server.base_url, "instantid", instantid_payload)
    assert code == 406
    assert "credits" in body["error"].lower()
    code, _ = await api.submit(server.base_url, "instantid", instantid_payload, version="v1")
    assert code == 406
    stats = server.stats()
    assert stats["accepted"] == 2
    assert stats["requests"]["submit"] == {"200": 2, "406": 1}
    assert await _credits(api, server.base_url) == pytest.approx(0.01)  # a 406 costs nothing


async def test_each_model_costs_its_own_price(
    sim: StartSim,
    api: Api,
    instantid_payload: dict[str, Any],
    infinite_you_payload: dict[str, Any],
) -> None:
    server = await sim(credits_usd=0.07, **INSTANT)
    code, _ = await api.submit(server.base_url, "infinite-you", infinite_you_payload)
    assert code == 200
    assert await _credits(api, server.base_url) == pytest.approx(0.02)  # 0.05 (assumed price)
    code, _ = await api.submit(server.base_url, "instantid", instantid_payload)
    assert code == 406  # 0.025 > 0.02


async def test_top_up_lets_submits_pass_again(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(credits_usd=0.025, **INSTANT)
    assert (await api.submit(server.base_url, "instantid", instantid_payload))[0] == 200
    assert (await api.submit(server.base_url, "instantid", instantid_payload))[0] == 406
    async with api.http.post(f"{server.base_url}/__sim/credits", json={"add_usd": 0.05}) as resp:
        assert resp.status == 200
        assert (await resp.json())["credits_remaining_usd"] == pytest.approx(0.05)
    for _ in range(2):
        assert (await api.submit(server.base_url, "instantid", instantid_payload))[0] == 200
    assert (await api.submit(server.base_url, "instantid", instantid_payload))[0] == 406


async def test_rejected_submit_is_not_billed(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(credits_usd=0.025, **INSTANT)
    code, _ = await api.submit(server.base_url, "instantid", {**instantid_payload, "samples": 9})
    assert code == 400
    assert await _credits(api, server.base_url) == pytest.approx(0.025)
    assert (await api.submit(server.base_url, "instantid", instantid_payload))[0] == 200


async def test_unlimited_credits_by_default(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(**INSTANT)
    for _ in range(50):
        assert (await api.submit(server.base_url, "instantid", instantid_payload))[0] == 200
    assert await _credits(api, server.base_url) is None


async def test_a_failed_job_is_held_while_it_runs_then_not_billed(
    sim: StartSim, api: Api, clock: Clock, instantid_payload: dict[str, Any]
) -> None:
    # A 20 ms job on a held clock: its charge is taken at submit (a 406 decides on it, as
    # the service cannot know the job's fate yet) and given back when it ends FAILED.
    server = await sim(
        credits_usd=0.025,
        time_scale=0.01,
        latency_median_s={"instantid": 2.0},
        latency_sigma=0.0,
        clock=clock,
    )
    failing = {**instantid_payload, "prompt": "sim:no-face"}
    code, sub = await api.submit(server.base_url, "instantid", failing)
    assert code == 200
    assert await _credits(api, server.base_url) == pytest.approx(0.0)
    assert (await api.submit(server.base_url, "instantid", instantid_payload))[0] == 406
    clock.now += 0.021  # the job has ended FAILED, polled or not
    assert await _credits(api, server.base_url) == pytest.approx(0.025)
    code, body = await api.get(sub["status_url"])
    assert (code, body["status"]) == (422, "FAILED")
    assert body["metrics"]["cost"] == 0
    assert await _credits(api, server.base_url) == pytest.approx(0.025)  # returned once only
    assert (await api.submit(server.base_url, "instantid", instantid_payload))[0] == 200
    stats = server.stats()
    assert (stats["accepted"], stats["billed"]) == (2, 1)


async def test_a_failed_sync_job_is_not_billed(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(credits_usd=0.025, **INSTANT)
    failing = {**instantid_payload, "prompt": "sim:blocked"}
    assert (await api.submit(server.base_url, "instantid", failing, version="v1"))[0] == 422
    assert await _credits(api, server.base_url) == pytest.approx(0.025)


# -- stats ---------------------------------------------------------------------------------------


async def test_paid_twice_counts_identical_payloads_per_key(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(**INSTANT)
    base = server.base_url
    await api.submit(base, "instantid", instantid_payload)
    assert server.stats()["paid_twice"] == 0
    await api.submit(base, "instantid", {**instantid_payload, "seed": 1})  # another job
    await api.submit(base, "instantid", instantid_payload, headers={"x-api-key": "sk-other"})
    assert server.stats()["paid_twice"] == 0
    await api.submit(base, "instantid", dict(reversed(instantid_payload.items())))  # same job
    stats = server.stats()
    assert stats["paid_twice"] == 1
    assert stats["accepted"] == 4


async def test_detection_lag_and_polls_per_job(
    sim: StartSim, api: Api, clock: Clock, instantid_payload: dict[str, Any]
) -> None:
    # A 20 ms job polled 3 times while it runs, then once 0.1 s after it finished. On a
    # held clock: three polls in 20 ms of wall time were too many for a loaded machine.
    server = await sim(
        time_scale=0.01, latency_median_s={"instantid": 2.0}, latency_sigma=0.0, clock=clock
    )
    code, sub = await api.submit(server.base_url, "instantid", instantid_payload)
    assert code == 200
    for _ in range(3):
        assert (await api.get(sub["status_url"]))[1]["status"] == "PROCESSING"
        clock.now += 0.005
    clock.now = 1000.0 + 0.02 + 0.1
    assert (await api.get(sub["status_url"]))[1]["status"] == "COMPLETED"
    await api.get(sub["status_url"])  # later polls do not count again
    stats = server.stats()
    assert stats["polls_per_job"]["n"] == 1
    assert stats["polls_per_job"]["max"] == 4
    lag = stats["detection_lag_s"]
    assert lag["n"] == 1
    assert lag["max"] == pytest.approx(0.1)
    assert stats["detection_lag_model_s"]["max"] == pytest.approx(10.0)


async def test_detection_lag_counts_a_failure_seen_on_the_result_route(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(**INSTANT)
    code, sub = await api.submit(
        server.base_url, "instantid", {**instantid_payload, "prompt": "sim:no-face"}
    )
    assert code == 200
    assert (await api.get(sub["response_url"]))[0] == 422
    stats = server.stats()
    assert stats["detection_lag_s"]["n"] == 1
    assert stats["polls_per_job"] == {"n": 1, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}


async def test_live_jobs_drops_when_retention_passes_without_requests(
    sim: StartSim, api: Api, clock: Clock, instantid_payload: dict[str, Any]
) -> None:
    # Held clock: the submit's answer may take longer than the 50 ms on a loaded machine.
    server = await sim(time_scale=0.005, retention_s=10.0, clock=clock, **INSTANT)  # 50 ms
    assert (await api.submit(server.base_url, "instantid", instantid_payload))[0] == 200
    clock.now += 0.049
    assert server.stats()["live_jobs"] == 1
    clock.now += 0.002
    assert server.stats()["live_jobs"] == 0  # no API request in between to expire it


async def test_paid_twice_counts_only_billed_jobs(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    """The same payload sent until it completes: the FAILED tries before it cost nothing and
    are paid for by no one, so the one that completes is not paid twice; a second completed
    one is."""
    server = await sim(fail_rate=0.5, credits_usd=1.0, seed=3, **INSTANT)

    async def until_completed() -> int:
        failed = 0
        while True:
            code, sub = await api.submit(server.base_url, "instantid", instantid_payload)
            assert code == 200
            code, body = await api.wait(sub["status_url"])
            if body["status"] == "COMPLETED":
                return failed
            failed += 1

    failed = await until_completed()
    assert failed >= 1, "no job failed before the first completed: change the seed"
    stats = server.stats()
    assert (stats["accepted"], stats["billed"], stats["paid_twice"]) == (failed + 1, 1, 0)
    assert stats["credits_remaining_usd"] == pytest.approx(1.0 - 0.025)
    more = await until_completed()
    stats = server.stats()
    assert (stats["accepted"], stats["billed"]) == (failed + more + 2, 2)
    assert stats["paid_twice"] == 1
    assert stats["credits_remaining_usd"] == pytest.approx(1.0 - 0.05)


@pytest.mark.parametrize(("prompt", "billed"), [("photo of a man", 2), ("sim:no-face", 0)])
async def test_an_accepted_then_dropped_job_is_billed_unless_it_fails(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any], prompt: str, billed: int
) -> None:
    """The client never heard of the job, but the account pays for it (twice, if sent again),
    unless it ends FAILED, as any job."""
    server = await sim(drop_rate=1.0, drop_after_accept=1.0, credits_usd=1.0, **INSTANT)
    for _ in range(2):
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.submit(server.base_url, "instantid", {**instantid_payload, "prompt": prompt})
    stats = server.stats()
    assert (stats["accepted_then_dropped"], stats["billed"]) == (2, billed)
    assert stats["paid_twice"] == billed // 2
    assert stats["credits_remaining_usd"] == pytest.approx(1.0 - 0.025 * billed)
