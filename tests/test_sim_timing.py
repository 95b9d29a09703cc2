"""Timing knobs: time_scale, latency, sigma, capacity, cold start, retention, seed."""

from __future__ import annotations

import asyncio
import math
import statistics
from typing import Any

import pytest
from conftest import Api, Clock, StartSim


async def _submit_all(api: Api, base_url: str, payloads: list[dict[str, Any]]) -> list[Any]:
    subs = []
    for payload in payloads:
        code, sub = await api.submit(base_url, "instantid", payload)
        assert code == 200, sub
        subs.append(sub)
    return subs


async def _metrics(api: Api, base_url: str, payload: dict[str, Any], n: int) -> list[Any]:
    """Submit ``n`` jobs back to back, wait for all, return their final metrics in order."""
    subs = await _submit_all(api, base_url, [payload] * n)
    return [(await api.wait(sub["status_url"]))[1]["metrics"] for sub in subs]


async def _held_metrics(
    api: Api, base_url: str, clock: Clock, payload: dict[str, Any], *, wait_s: float
) -> Any:
    """Submit one job to an emulator on a held clock, move the clock ``wait_s`` on, and
    return the job's final metrics."""
    code, sub = await api.submit(base_url, "instantid", payload)
    assert code == 200, sub
    clock.now += wait_s
    _, body = await api.get(sub["status_url"])
    assert body["status"] == "COMPLETED", body
    return body["metrics"]


@pytest.mark.parametrize(
    ("time_scale", "median_s", "wall_s"),
    [(0.01, 10.0, 0.1), (0.005, 40.0, 0.2), (0.02, 10.0, 0.2)],
)
async def test_job_completes_at_its_scaled_latency(
    sim: StartSim,
    api: Api,
    clock: Clock,
    instantid_payload: dict[str, Any],
    time_scale: float,
    median_s: float,
    wall_s: float,
) -> None:
    # Read on a held clock: at 0.6 of a 0.1 s job, a loaded machine could be past its end.
    server = await sim(
        time_scale=time_scale,
        latency_median_s={"instantid": median_s},
        latency_sigma=0.0,
        clock=clock,
    )
    t0 = clock.now
    code, sub = await api.submit(server.base_url, "instantid", instantid_payload)
    assert code == 200
    clock.now = t0 + 0.6 * wall_s
    _, body = await api.get(sub["status_url"])
    assert body["status"] == "PROCESSING"
    clock.now = t0 + 1.3 * wall_s
    _, body = await api.get(sub["status_url"])
    assert body["status"] == "COMPLETED"
    assert body["metrics"]["inference_time"] == pytest.approx(wall_s, abs=1e-6)


@pytest.mark.parametrize(("model", "page_s"), [("instantid", 7.7), ("infinite-you", 163.0)])
async def test_default_latency_is_the_model_pages_figure(
    sim: StartSim,
    api: Api,
    instantid_payload: dict[str, Any],
    infinite_you_payload: dict[str, Any],
    model: str,
    page_s: float,
) -> None:
    server = await sim(time_scale=0.001, latency_sigma=0.0, image_size=(8, 8))
    payload = instantid_payload if model == "instantid" else infinite_you_payload
    code, sub = await api.submit(server.base_url, model, payload)
    assert code == 200
    _, body = await api.wait(sub["status_url"])
    assert body["metrics"]["inference_time"] == pytest.approx(page_s * 0.001, abs=1e-6)


def _log_spread(metrics: list[Any]) -> float:
    return statistics.stdev(math.log(m["total_time"]) for m in metrics)


async def test_latency_sigma_zero_gives_equal_latencies(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(time_scale=0.001, latency_median_s={"instantid": 2.0}, latency_sigma=0.0)
    metrics = await _metrics(api, server.base_url, instantid_payload, 20)
    assert {m["total_time"] for m in metrics} == {0.002}


async def test_latency_spread_grows_with_sigma(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    spreads = {}
    medians = {}
    for sigma in (None, 0.3, 1.0):  # None: InstantID's own 0.35
        server = await sim(
            time_scale=0.001, latency_median_s={"instantid": 2.0}, latency_sigma=sigma
        )
        metrics = await _metrics(api, server.base_url, instantid_payload, 40)
        spreads[sigma] = _log_spread(metrics)
        medians[sigma] = statistics.median(m["total_time"] for m in metrics)
    # Seeded, so these are exact for the seed; the bounds are the statistics' (n=40).
    assert 0.2 < spreads[0.3] < 0.45
    assert 0.2 < spreads[None] < 0.5
    assert 0.7 < spreads[1.0] < 1.4
    assert spreads[1.0] > 2 * spreads[0.3]
    for sigma, median in medians.items():  # the median stays the configured one
        assert median == pytest.approx(0.002, rel=0.5), sigma


@pytest.mark.parametrize(
    ("capacity", "running"), [(None, 4), (1, 1), (2, 2)], ids=["unlimited", "one", "two"]
)
async def test_capacity_keeps_extra_jobs_queued_fifo(
    sim: StartSim,
    api: Api,
    instantid_payload: dict[str, Any],
    capacity: int | None,
    running: int,
) -> None:
    """Read against a clock held still, so a loaded machine cannot move a job on between
    the submits and the reads (it did: 50 ms of real time is not much at load 6)."""
    now = [1000.0]
    server = await sim(
        time_scale=0.005,
        latency_median_s={"instantid": 10.0, "infinite-you": 10.0},
        latency_sigma=0.0,
        capacity=capacity,
        clock=lambda: now[0],
    )
    subs = await _submit_all(api, server.base_url, [instantid_payload] * 4)
    states = [(await api.get(sub["status_url"]))[1]["status"] for sub in subs]
    assert states == ["PROCESSING"] * running + ["QUEUED"] * (4 - running)
    now[0] += 1.0  # 200 model-seconds: every job is done
    finals = [(await api.get(sub["status_url"]))[1] for sub in subs]
    assert [f["status"] for f in finals] == ["COMPLETED"] * 4
    metrics = [f["metrics"] for f in finals]
    assert all(m["inference_time"] == pytest.approx(0.05, abs=1e-6) for m in metrics)
    # Each later job starts when the one `running` places before it ends (50 ms).
    queue = [m["queue_time"] for m in metrics]
    expected = [0.05 * (i // running) for i in range(4)]
    assert queue == pytest.approx(expected, abs=1e-6), queue


async def test_capacity_is_per_model(
    sim: StartSim,
    api: Api,
    clock: Clock,
    instantid_payload: dict[str, Any],
    infinite_you_payload: dict[str, Any],
) -> None:
    # Held clock: the InstantID job (50 ms) is surely still running when the other model's
    # job is submitted, however long the machine takes (else its one worker would be free).
    server = await sim(
        time_scale=0.005,
        latency_median_s={"instantid": 10.0},
        latency_sigma=0.0,
        capacity=1,
        clock=clock,
    )
    await _submit_all(api, server.base_url, [instantid_payload])
    code, sub = await api.submit(server.base_url, "infinite-you", infinite_you_payload)
    assert code == 200
    _, body = await api.get(sub["status_url"])
    assert body["status"] == "PROCESSING"


async def test_cold_start_delays_the_first_job_until_the_model_idles(
    sim: StartSim, api: Api, clock: Clock, instantid_payload: dict[str, Any]
) -> None:
    # 10 ms jobs; a cold start costs 100 ms; the model goes cold after 100 ms idle. On a
    # held clock: a loaded machine once let the 100 ms idle pass before the warm submit.
    server = await sim(
        time_scale=0.01,
        latency_median_s={"instantid": 1.0},
        latency_sigma=0.0,
        cold_start_s=10.0,
        cold_idle_s=10.0,
        clock=clock,
    )
    base, payload = server.base_url, instantid_payload
    first = await _held_metrics(api, base, clock, payload, wait_s=0.11)
    assert first["queue_time"] == pytest.approx(0.1, abs=1e-6)
    assert first["inference_time"] == pytest.approx(0.01, abs=1e-6)
    clock.now += 0.05  # idle, but not for long
    warm = await _held_metrics(api, base, clock, payload, wait_s=0.01)
    assert warm["queue_time"] == 0.0
    clock.now += 0.15  # past cold_idle_s
    cold_again = await _held_metrics(api, base, clock, payload, wait_s=0.11)
    assert cold_again["queue_time"] == pytest.approx(0.1, abs=1e-6)


async def test_job_submitted_during_a_cold_start_waits_for_it(
    sim: StartSim, api: Api, clock: Clock, instantid_payload: dict[str, Any]
) -> None:
    """A model still booting is not warm: a second job cannot start before the boot ends.

    Fails today: jobs.py marks the model warm at the first submit, so the second job,
    submitted a few ms into the 100 ms cold start, starts at once and finishes first.
    """
    # On a held clock: the second submit came over 20 ms after the first on a loaded machine.
    server = await sim(
        time_scale=0.01,
        latency_median_s={"instantid": 1.0},
        latency_sigma=0.0,
        cold_start_s=10.0,
        clock=clock,
    )
    [first] = await _submit_all(api, server.base_url, [instantid_payload])
    clock.now += 0.005  # 5 ms into the cold start
    [second] = await _submit_all(api, server.base_url, [instantid_payload])
    _, body = await api.get(second["status_url"])
    assert body["status"] == "QUEUED"  # not PROCESSING on a model that is not up yet
    clock.now += 0.2  # both done
    [m1, m2] = [(await api.get(sub["status_url"]))[1]["metrics"] for sub in (first, second)]
    assert m1["queue_time"] == pytest.approx(0.1, abs=1e-6)
    assert m2["queue_time"] == pytest.approx(0.095, abs=1e-6), (m1, m2)


async def test_no_cold_start_by_default(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(time_scale=0.01, latency_median_s={"instantid": 1.0}, latency_sigma=0.0)
    [first] = await _metrics(api, server.base_url, instantid_payload, 1)
    assert first["queue_time"] == 0.0


async def test_retention_expires_status_and_result(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    quick = {"time_scale": 0.005, "latency_median_s": {"instantid": 0.0}}
    short = await sim(retention_s=20.0, **quick)  # 0.1 s
    default = await sim(**quick)  # 3600 s: 18 s
    subs = [
        (await api.submit(server.base_url, "instantid", instantid_payload))[1]
        for server in (short, default)
    ]
    await asyncio.sleep(0.15)
    for url in (subs[0]["status_url"], subs[0]["response_url"]):
        assert (await api.get(url))[0] == 404
    for url in (subs[1]["status_url"], subs[1]["response_url"]):
        assert (await api.get(url))[0] == 200
    assert short.stats()["live_jobs"] == 0
    assert default.stats()["live_jobs"] == 1


async def test_output_retention_is_separate_from_job_retention(
    sim: StartSim, api: Api, clock: Clock, instantid_payload: dict[str, Any]
) -> None:
    # Held clock: submit, result and download took over the 0.1 s on a loaded machine.
    quick = {
        "time_scale": 0.005,
        "latency_median_s": {"instantid": 0.0},
        "image_size": (8, 8),
        "clock": clock,
    }
    short_output = await sim(output_retention_s=20.0, **quick)
    short_job = await sim(retention_s=20.0, **quick)
    outputs = []
    for server in (short_output, short_job):
        code, sub = await api.submit(server.base_url, "instantid", instantid_payload)
        assert code == 200
        code, result = await api.get(sub["response_url"])
        assert code == 200
        assert (await api.download(result["output"]))[0] == 200
        outputs.append((sub, result["output"]))
    clock.now += 0.15
    (sub_a, out_a), (sub_b, out_b) = outputs
    # Output gone, job still answered.
    assert (await api.download(out_a))[0] == 404
    assert (await api.get(sub_a["response_url"]))[0] == 200
    # Job gone (404), but its image URL, like Segmind's CDN, still serves.
    assert (await api.get(sub_b["response_url"]))[0] == 404
    assert (await api.download(out_b))[0] == 200


async def test_same_seed_gives_same_latency_draws(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    knobs = {"time_scale": 0.001, "latency_median_s": {"instantid": 2.0}, "latency_sigma": 0.5}
    runs = []
    for seed in (7, 7, 8):
        server = await sim(seed=seed, **knobs)
        metrics = await _metrics(api, server.base_url, instantid_payload, 10)
        runs.append([m["inference_time"] for m in metrics])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 10
    assert runs[2] != runs[0]


async def _completed_output(
    sim: StartSim, api: Api, clock: Clock, payload: dict[str, Any], **knobs: Any
) -> tuple[Any, str, str]:
    """A zero-latency job on an emulator at time scale 0.01: (server, result URL, output)."""
    server = await sim(
        time_scale=0.01,
        latency_median_s={"instantid": 0.0},
        image_size=(8, 8),
        clock=clock,
        **knobs,
    )
    code, sub = await api.submit(server.base_url, "instantid", payload)
    assert code == 200
    code, result = await api.get(sub["response_url"])
    assert (code, result["status"]) == (200, "COMPLETED")
    return server, sub["response_url"], result["output"]


async def test_output_links_answer_404_until_the_cdn_has_the_file(
    sim: StartSim, api: Api, clock: Clock, instantid_payload: dict[str, Any]
) -> None:
    _, _, output = await _completed_output(sim, api, clock, instantid_payload, output_delay_s=30.0)
    assert (await api.download(output))[0] == 404
    clock.now += 0.29
    assert (await api.download(output))[0] == 404
    clock.now += 0.02
    assert (await api.download(output))[0] == 200


async def test_signed_output_links_expire_and_each_result_read_signs_afresh(
    sim: StartSim, api: Api, clock: Clock, instantid_payload: dict[str, Any]
) -> None:
    server, result_url, old = await _completed_output(
        sim, api, clock, instantid_payload, output_link_ttl_s=60.0
    )
    assert "?Expires=" in old
    assert "&Signature=" in old
    assert (await api.download(old))[0] == 200
    forged = old[:-4] + ("0000" if not old.endswith("0000") else "1111")
    assert (await api.download(forged))[0] == 403
    assert (await api.download(old.partition("?")[0]))[0] == 403  # unsigned
    clock.now += 0.61
    assert (await api.download(old))[0] == 403  # expired
    fresh = (await api.get(result_url))[1]["output"]
    assert fresh != old
    assert (await api.download(fresh))[0] == 200
    assert server.stats()["requests"]["output"] == {"200": 2, "403": 3}
