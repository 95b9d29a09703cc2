"""The official SDK (``segmind`` 1.3.0, synchronous httpx) works against the emulator unchanged.

The emulator runs on its own event loop in a background thread, as a real server would
be to a blocking client.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import segmind
from PIL import Image
from segmind.exceptions import SegmindError
from segmind.v2 import AsyncJob, InferenceFailed

from batcher.sim import FAIL_MARKERS, FAILURES, SimConfig, SimServer

StartThreaded = Callable[..., str]
MakeClient = Callable[..., segmind.SegmindClient]

FAST: dict[str, Any] = {"time_scale": 0.001}
POLL = 0.005  # seconds between the SDK's status polls


@pytest.fixture(scope="module")
def sim_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running forever in a background thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sim-loop", daemon=True)
    thread.start()
    yield loop
    asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture
def threaded_sim(sim_loop: asyncio.AbstractEventLoop) -> Iterator[StartThreaded]:
    """A factory: ``threaded_sim(**knobs)`` starts an emulator on the loop thread, gives its URL."""
    servers: list[SimServer] = []

    def start(**knobs: Any) -> str:
        server = SimServer(SimConfig(**knobs), host="127.0.0.1", port=0)
        asyncio.run_coroutine_threadsafe(server.start(), sim_loop).result(10)
        servers.append(server)
        return server.base_url

    yield start
    for server in servers:
        asyncio.run_coroutine_threadsafe(server.stop(), sim_loop).result(10)


@pytest.fixture
def sdk(api_key: str) -> Iterator[MakeClient]:
    """A factory of SDK clients pointed at an emulator, as its docstring says: BASE + "/v1"."""
    clients: list[segmind.SegmindClient] = []

    def make(base_url: str, key: str = api_key) -> segmind.SegmindClient:
        client = segmind.SegmindClient(api_key=key, base_url=base_url + "/v1")
        clients.append(client)
        return client

    yield make
    for client in clients:
        client._client.close()


def _image(data: bytes) -> tuple[str | None, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as img:
        return img.format, img.size


def _download(url: str) -> tuple[str | None, tuple[int, int]]:
    resp = httpx.get(url)
    assert resp.status_code == 200
    return _image(resp.content)


# -- the happy path ------------------------------------------------------------------------------


def test_submit_async_wait_completes_instantid(
    threaded_sim: StartThreaded, sdk: MakeClient, api_key: str, instantid_payload: dict[str, Any]
) -> None:
    base = threaded_sim(api_keys=frozenset({api_key}), **FAST)
    job = sdk(base).submit_async("instantid", **instantid_payload)
    assert job.request_id
    assert job.status_url.startswith(base + "/v2/requests/")
    result = job.wait(timeout=10, interval=POLL)
    assert result["status"] == "COMPLETED"
    assert result["metrics"]["inference_time"] > 0
    assert isinstance(result["output"], str)
    assert _download(result["output"]) == ("PNG", (1024, 1024))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, ("WEBP", (864, 1152))),  # the page's example as it is
        ({"output_format": "png", "width": 512, "height": 640}, ("PNG", (512, 640))),
        ({"output_format": "jpg", "width": 256, "height": 1280}, ("JPEG", (256, 1280))),
    ],
)
def test_submit_async_wait_completes_infinite_you(
    threaded_sim: StartThreaded,
    sdk: MakeClient,
    infinite_you_payload: dict[str, Any],
    change: dict[str, Any],
    expected: tuple[str, tuple[int, int]],
) -> None:
    base = threaded_sim(latency_median_s={"infinite-you": 20.0}, **FAST)
    job = sdk(base).submit_async("infinite-you", **{**infinite_you_payload, **change})
    result = job.wait(timeout=10, interval=POLL)
    assert result["status"] == "COMPLETED"
    assert result["metrics"]["inference_time"] == pytest.approx(0.02, rel=0.9)
    assert _download(result["output"]) == expected


def test_client_run_returns_the_result(
    threaded_sim: StartThreaded, sdk: MakeClient, instantid_payload: dict[str, Any]
) -> None:
    # run() polls every 1.0 s; a zero-latency job is COMPLETED at the first poll.
    base = threaded_sim(latency_median_s={"instantid": 0.0}, image_size=(16, 16))
    result = sdk(base).run("instantid", **instantid_payload)
    assert result["status"] == "COMPLETED"
    assert _download(result["output"]) == ("PNG", (16, 16))


def test_run_sync_returns_image_bytes(
    threaded_sim: StartThreaded, sdk: MakeClient, instantid_payload: dict[str, Any]
) -> None:
    base = threaded_sim(**FAST)
    resp = sdk(base).run_sync("instantid", **instantid_payload)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "image/png"
    assert _image(resp.content) == ("PNG", (1024, 1024))


# -- FAILED --------------------------------------------------------------------------------------


@pytest.mark.parametrize("marker", sorted(FAIL_MARKERS))
def test_failed_job_raises_inference_failed_with_detail(
    threaded_sim: StartThreaded,
    sdk: MakeClient,
    instantid_payload: dict[str, Any],
    marker: str,
) -> None:
    base = threaded_sim(**FAST)
    job = sdk(base).submit_async("instantid", **{**instantid_payload, "prompt": marker})
    with pytest.raises(InferenceFailed) as caught:
        job.wait(timeout=10, interval=POLL)
    assert caught.value.detail == FAIL_MARKERS[marker]
    assert caught.value.status_body["status"] == "FAILED"
    result = job.result()  # served as 422; the SDK reads the body anyway
    assert result["status"] == "FAILED"
    assert result["error"] == FAIL_MARKERS[marker]
    assert "inference_time" in result["metrics"]


def test_fail_rate_raises_inference_failed(
    threaded_sim: StartThreaded, sdk: MakeClient, infinite_you_payload: dict[str, Any]
) -> None:
    base = threaded_sim(fail_rate=1.0, latency_median_s={"infinite-you": 1.0}, **FAST)
    job = sdk(base).submit_async("infinite-you", **infinite_you_payload)
    with pytest.raises(InferenceFailed) as caught:
        job.wait(timeout=10, interval=POLL)
    assert caught.value.detail in FAILURES


# -- errors as SegmindError ----------------------------------------------------------------------


def _status_of(call: Callable[[], object]) -> SegmindError:
    with pytest.raises(SegmindError) as caught:
        call()
    assert not isinstance(caught.value, InferenceFailed)
    return caught.value


def test_bad_key_is_401(
    threaded_sim: StartThreaded, sdk: MakeClient, api_key: str, instantid_payload: dict[str, Any]
) -> None:
    base = threaded_sim(api_keys=frozenset({api_key}), **FAST)
    good = sdk(base).submit_async("instantid", **instantid_payload)
    bad = sdk(base, key="sk-not-the-key")
    for call in (
        lambda: bad.submit_async("instantid", **instantid_payload),
        lambda: bad.run_sync("instantid", **instantid_payload),
        lambda: AsyncJob(good.request_id, good.status_url, good.response_url, {}, bad).status(),
    ):
        error = _status_of(call)
        assert error.status == 401
        assert error.detail is not None
        assert "API key" in error.detail


def test_unknown_model_is_404(
    threaded_sim: StartThreaded, sdk: MakeClient, instantid_payload: dict[str, Any]
) -> None:
    client = sdk(threaded_sim(**FAST))
    for call in (
        lambda: client.submit_async("no-such-model", **instantid_payload),
        lambda: client.run_sync("no-such-model", **instantid_payload),
    ):
        error = _status_of(call)
        assert error.status == 404
        assert "no-such-model" in (error.detail or "")


def test_out_of_range_parameter_is_400(
    threaded_sim: StartThreaded, sdk: MakeClient, infinite_you_payload: dict[str, Any]
) -> None:
    client = sdk(threaded_sim(**FAST))
    payload = {**infinite_you_payload, "num_steps": 500}
    for call in (
        lambda: client.submit_async("infinite-you", **payload),
        lambda: client.run_sync("infinite-you", **payload),
    ):
        error = _status_of(call)
        assert error.status == 400
        assert "num_steps" in (error.detail or "")


def test_unknown_request_id_is_404(threaded_sim: StartThreaded, sdk: MakeClient) -> None:
    base = threaded_sim(**FAST)
    client = sdk(base)
    rid = "00000000-0000-4000-8000-000000000000"
    url = f"{base}/v2/requests/{rid}"
    job = AsyncJob(rid, url + "/status", url, {}, client)
    for call in (job.status, job.result, lambda: job.wait(timeout=1, interval=POLL)):
        error = _status_of(call)
        assert error.status == 404
        assert rid in (error.detail or "")
    resp = client._client.get(url + "/status")
    assert resp.status_code == 404


def test_sdk_does_not_retry_429_or_5xx(
    threaded_sim: StartThreaded, sdk: MakeClient, instantid_payload: dict[str, Any]
) -> None:
    """The contract's note: the SDK raises on any 429 or 5xx; the emulator must produce them."""
    # The window is not time-scaled: at FAST's scale a 60 s window is 60 ms, and a loaded
    # machine can take longer than that between the two calls (CI did, once).
    limited = sdk(threaded_sim(rate_limit=1, rate_period_s=60.0))
    limited.submit_async("instantid", **instantid_payload)
    assert _status_of(lambda: limited.submit_async("instantid", **instantid_payload)).status == 429
    broken = sdk(threaded_sim(error_rate=1.0, **FAST))
    error = _status_of(lambda: broken.submit_async("instantid", **instantid_payload))
    assert error.status in (500, 502, 504)
