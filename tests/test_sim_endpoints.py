"""Each route of the emulated Segmind API, as a raw HTTP client sees it (issue #2, section 3)."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
from conftest import Api, Clock, StartSim
from PIL import Image

from batcher.sim import FAILURES

FAST = {"time_scale": 0.001}


async def test_submit_answers_queued_with_absolute_urls(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(**FAST)
    code, body = await api.submit(server.base_url, "instantid", instantid_payload)
    assert code == 200
    rid = body["request_id"]
    assert rid
    assert body["status"] == "QUEUED"
    job_url = f"{server.base_url}/v2/requests/{rid}"
    assert body["status_url"] == job_url + "/status"
    assert body["response_url"] == job_url
    assert body["poll_url"] == job_url + "/status"


async def test_submit_urls_follow_the_host_the_client_used(
    sim: StartSim, api: Api, api_key: str, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(**FAST)
    headers = {"x-api-key": api_key, "Host": "api.example.test:8443"}
    code, body = await api.submit(server.base_url, "instantid", instantid_payload, headers=headers)
    assert code == 200
    for key in ("status_url", "response_url", "poll_url"):
        assert body[key].startswith("http://api.example.test:8443/v2/requests/"), body[key]


async def test_status_walks_queued_processing_completed_with_metrics(
    sim: StartSim, api: Api, clock: Clock, instantid_payload: dict[str, Any]
) -> None:
    # One worker and 50 ms jobs: the second job is QUEUED behind the first, then runs.
    # Polled every 5 ms of a held clock: polling every 5 ms of wall time, a loaded machine
    # can skip PROCESSING, and 20 ms between the two submits cut the queue time below 30 ms.
    server = await sim(
        time_scale=0.005,
        latency_median_s={"instantid": 10.0},
        latency_sigma=0.0,
        capacity=1,
        clock=clock,
    )
    code, _ = await api.submit(server.base_url, "instantid", instantid_payload)
    assert code == 200
    clock.now += 0.005
    code, sub = await api.submit(server.base_url, "instantid", instantid_payload)
    assert code == 200
    seen: list[str] = []
    async with asyncio.timeout(5):
        while not seen or seen[-1] != "COMPLETED":
            code, body = await api.get(sub["status_url"])
            assert code == 200
            assert body["request_id"] == sub["request_id"]
            assert "output" not in body  # the status answer never carries the output
            if not seen or seen[-1] != body["status"]:
                seen.append(body["status"])
            clock.now += 0.005
    assert seen == ["QUEUED", "PROCESSING", "COMPLETED"]
    metrics = body["metrics"]
    assert metrics["inference_time"] == pytest.approx(0.05, abs=1e-3)
    assert metrics["queue_time"] == pytest.approx(0.045, abs=1e-6)
    assert metrics["total_time"] == pytest.approx(
        metrics["queue_time"] + metrics["inference_time"], abs=1e-5
    )


async def test_result_returns_output_and_metrics(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(**FAST)
    job = await api.run(server.base_url, "instantid", instantid_payload)
    code, body = await api.get(job["response_url"])
    assert code == 200
    assert body["status"] == "COMPLETED"
    assert isinstance(body["output"], str)
    assert body["output"].startswith(server.base_url + "/outputs/")
    assert body["metrics"]["inference_time"] > 0
    assert body["metrics"]["cost"] == pytest.approx(0.025)


async def test_result_before_completion_has_no_output(
    sim: StartSim, api: Api, clock: Clock, instantid_payload: dict[str, Any]
) -> None:
    # 77 ms, on a held clock: a loaded machine may take longer than that to ask.
    server = await sim(time_scale=0.01, clock=clock)
    code, sub = await api.submit(server.base_url, "instantid", instantid_payload)
    assert code == 200
    code, body = await api.get(sub["response_url"])
    assert code == 200
    assert body["status"] in ("QUEUED", "PROCESSING")
    assert "output" not in body


async def test_failed_is_422_with_body_on_status_and_result(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(**FAST)
    payload = {**instantid_payload, "prompt": "sim:no-face"}
    job = await api.run(server.base_url, "instantid", payload)
    for url in (job["status_url"], job["response_url"]):
        code, body = await api.get(url)
        assert code == 422
        assert body["status"] == "FAILED"
        assert body["error"] == FAILURES[0]
        assert body["request_id"] == job["request_id"]
        assert body["metrics"]["inference_time"] > 0
        assert "output" not in body


async def test_unknown_request_id_is_404_with_error(sim: StartSim, api: Api) -> None:
    server = await sim(**FAST)
    for url in (
        f"{server.base_url}/v2/requests/no-such-id/status",
        f"{server.base_url}/v2/requests/no-such-id",
    ):
        code, body = await api.get(url)
        assert code == 404
        assert "no-such-id" in body["error"]
        assert "not found" in body["error"]


async def test_expired_request_id_is_404(
    sim: StartSim, api: Api, clock: Clock, instantid_payload: dict[str, Any]
) -> None:
    # retention 20 model s at time_scale 0.005: 0.1 s, of a held clock (a loaded machine
    # may take longer between the submit and the first status).
    server = await sim(
        time_scale=0.005, retention_s=20.0, latency_median_s={"instantid": 0.0}, clock=clock
    )
    code, sub = await api.submit(server.base_url, "instantid", instantid_payload)
    assert code == 200
    code, body = await api.get(sub["status_url"])
    assert (code, body["status"]) == (200, "COMPLETED")
    clock.now += 0.15
    for url in (sub["status_url"], sub["response_url"]):
        code, body = await api.get(url)
        assert code == 404
        assert "not found" in body["error"]


async def test_v1_sync_returns_image_bytes(
    sim: StartSim, api: Api, api_key: str, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(**FAST)
    async with api.http.post(
        f"{server.base_url}/v1/instantid", json=instantid_payload, headers={"x-api-key": api_key}
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == "image/png"
        data = await resp.read()
    with Image.open(io.BytesIO(data)) as img:
        assert (img.format, img.size) == ("PNG", (1024, 1024))


@pytest.mark.parametrize(
    ("fmt", "pil_format", "mime"),
    [("png", "PNG", "image/png"), ("jpg", "JPEG", "image/jpeg"), ("webp", "WEBP", "image/webp")],
)
async def test_output_url_serves_requested_format_and_size(
    sim: StartSim,
    api: Api,
    infinite_you_payload: dict[str, Any],
    fmt: str,
    pil_format: str,
    mime: str,
) -> None:
    server = await sim(**FAST)
    payload = {**infinite_you_payload, "width": 320, "height": 480, "output_format": fmt}
    job = await api.run(server.base_url, "infinite-you", payload)
    _, result = await api.get(job["response_url"])
    code, data, content_type = await api.download(result["output"])  # no key: outputs are public
    assert code == 200
    assert content_type == mime
    with Image.open(io.BytesIO(data)) as img:
        assert (img.format, img.size) == (pil_format, (320, 480))


async def test_infinite_you_page_example_gives_its_webp_size(
    sim: StartSim, api: Api, infinite_you_payload: dict[str, Any]
) -> None:
    server = await sim(**FAST)
    job = await api.run(server.base_url, "infinite-you", infinite_you_payload)
    _, result = await api.get(job["response_url"])
    _, data, _ = await api.download(result["output"])
    with Image.open(io.BytesIO(data)) as img:
        assert (img.format, img.size) == ("WEBP", (864, 1152))


async def test_instantid_output_defaults_to_1024_png(sim: StartSim, api: Api) -> None:
    server = await sim(**FAST)
    minimal = {"prompt": "photo of a man", "face_image": "https://example.com/face.jpg"}
    job = await api.run(server.base_url, "instantid", minimal)
    _, result = await api.get(job["response_url"])
    code, data, content_type = await api.download(result["output"])
    assert (code, content_type) == (200, "image/png")
    with Image.open(io.BytesIO(data)) as img:
        assert (img.format, img.size) == ("PNG", (1024, 1024))


async def test_output_url_of_unknown_job_or_sample_is_404(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(**FAST)
    job = await api.run(server.base_url, "instantid", instantid_payload)
    _, result = await api.get(job["response_url"])
    assert (await api.download(result["output"]))[0] == 200
    assert (await api.download(result["output"].replace("/0.png", "/1.png")))[0] == 404
    assert (await api.download(f"{server.base_url}/outputs/nope/0.png"))[0] == 404


# -- auth ---------------------------------------------------------------------------------------


def _api_calls(base: str, rid: str) -> list[tuple[str, str]]:
    return [
        ("POST", f"{base}/v2/instantid"),
        ("GET", f"{base}/v2/requests/{rid}/status"),
        ("GET", f"{base}/v2/requests/{rid}"),
        ("POST", f"{base}/v1/instantid"),
    ]


@pytest.mark.parametrize("sent", [None, "", "sk-wrong"], ids=["missing", "empty", "wrong"])
async def test_bad_key_is_401_on_every_api_route(
    sim: StartSim,
    api: Api,
    api_key: str,
    instantid_payload: dict[str, Any],
    sent: str | None,
) -> None:
    server = await sim(api_keys=frozenset({api_key}), **FAST)
    code, sub = await api.submit(server.base_url, "instantid", instantid_payload)
    assert code == 200  # the configured key passes
    headers = {} if sent is None else {"x-api-key": sent}
    for method, url in _api_calls(server.base_url, sub["request_id"]):
        async with api.http.request(method, url, json=instantid_payload, headers=headers) as resp:
            assert resp.status == 401, (method, url)
            assert "API key" in (await resp.json())["error"]
    assert server.stats()["accepted"] == 1  # no 401 created a job


async def test_any_key_mode_accepts_any_non_empty_key(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(**FAST)  # api_keys=None
    for key in ("a", "sk-anything-at-all"):
        code, _ = await api.submit(
            server.base_url, "instantid", instantid_payload, headers={"x-api-key": key}
        )
        assert code == 200
    code, body = await api.submit(server.base_url, "instantid", instantid_payload, headers={})
    assert code == 401
    assert body["error"]


# -- bad requests -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v2", "v1"])
async def test_unknown_model_is_404(sim: StartSim, api: Api, version: str) -> None:
    server = await sim(**FAST)
    code, body = await api.submit(
        server.base_url, "no-such-model", {"prompt": "x"}, version=version
    )
    assert code == 404
    assert "no-such-model" in body["error"]


@pytest.mark.parametrize(
    ("model", "change", "named"),
    [
        ("instantid", {"guidance_scale": 30}, "guidance_scale"),
        ("instantid", {"samples": 5}, "samples"),
        ("instantid", {"num_inference_steps": 3}, "num_inference_steps"),
        ("instantid", {"identity_strength": 1.5}, "identity_strength"),
        ("infinite-you", {"width": 2000}, "width"),
        ("infinite-you", {"output_format": "gif"}, "output_format"),
        ("infinite-you", {"id_image": "not an image"}, "id_image"),
        ("infinite-you", {"no_such_param": 1}, "no_such_param"),
    ],
)
async def test_bad_parameter_is_400_naming_it(
    sim: StartSim,
    api: Api,
    instantid_payload: dict[str, Any],
    infinite_you_payload: dict[str, Any],
    model: str,
    change: dict[str, Any],
    named: str,
) -> None:
    server = await sim(**FAST)
    base = instantid_payload if model == "instantid" else infinite_you_payload
    code, body = await api.submit(server.base_url, model, {**base, **change})
    assert code == 400
    assert named in body["error"]
    assert server.stats()["accepted"] == 0


async def test_missing_required_parameter_is_400_naming_it(sim: StartSim, api: Api) -> None:
    server = await sim(**FAST)
    code, body = await api.submit(server.base_url, "instantid", {"prompt": "photo of a man"})
    assert code == 400
    assert "face_image" in body["error"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"a string"'])
async def test_non_json_object_body_is_400(
    sim: StartSim, api: Api, api_key: str, raw: bytes
) -> None:
    server = await sim(**FAST)
    async with api.http.post(
        f"{server.base_url}/v2/instantid",
        data=raw,
        headers={"x-api-key": api_key, "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
        assert "body" in (await resp.json())["error"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
async def test_wrong_content_type_is_406(
    sim: StartSim, api: Api, api_key: str, content_type: str
) -> None:
    server = await sim(**FAST)
    async with api.http.post(
        f"{server.base_url}/v2/instantid",
        data=b'{"prompt": "x", "face_image": "https://example.com/f.jpg"}',
        headers={"x-api-key": api_key, "Content-Type": content_type},
    ) as resp:
        assert resp.status == 406
        assert "Content-Type" in (await resp.json())["error"]


# -- stats ---------------------------------------------------------------------------------------


async def test_sim_stats_counts_requests(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(**FAST)
    job = await api.run(server.base_url, "instantid", instantid_payload)
    await api.get(job["response_url"])
    await api.get(f"{server.base_url}/v2/requests/nope/status")
    async with api.http.get(f"{server.base_url}/__sim/stats") as resp:
        assert resp.status == 200
        stats = await resp.json()
    assert stats["requests"]["submit"] == {"200": 1}
    assert stats["requests"]["status"]["200"] >= 1
    assert stats["requests"]["status"]["404"] == 1
    assert stats["requests"]["result"] == {"200": 1}
    assert stats["accepted"] == 1
    assert stats["live_jobs"] == 1
    assert stats["polls_per_job"]["n"] == 1
    assert stats["time_scale"] == 0.001
