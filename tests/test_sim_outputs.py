"""The shape of ``output`` (URL, base64, list) and the images behind it."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import pytest
from conftest import Api, StartSim
from PIL import Image

# InfiniteYou's 163 s would cost 0.16 s a job even at this scale; the shape is what matters here.
FAST: dict[str, Any] = {"time_scale": 0.001, "latency_median_s": {"infinite-you": 10.0}}


async def _output(api: Api, base_url: str, model: str, payload: dict[str, Any]) -> Any:
    job = await api.run(base_url, model, payload)
    code, result = await api.get(job["response_url"])
    assert code == 200
    assert result["status"] == "COMPLETED"
    return result["output"]


async def _image(api: Api, url: str) -> bytes:
    code, data, _ = await api.download(url)
    assert code == 200
    return data


def _decode_png(data: bytes) -> tuple[str | None, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as img:
        return img.format, img.size


async def test_base64_raw_is_bare_decodable_image_data(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(base64_style="raw", **FAST)
    out = await _output(api, server.base_url, "instantid", {**instantid_payload, "base64": True})
    assert isinstance(out, str)
    assert not out.startswith(("http", "data:"))
    data = base64.b64decode(out, validate=True)
    assert _decode_png(data) == ("PNG", (1024, 1024))


async def test_base64_data_url_carries_mime_and_data(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(base64_style="data-url", **FAST)
    out = await _output(api, server.base_url, "instantid", {**instantid_payload, "base64": True})
    assert isinstance(out, str)
    prefix = "data:image/png;base64,"
    assert out.startswith(prefix)
    assert _decode_png(base64.b64decode(out.removeprefix(prefix), validate=True))[0] == "PNG"
    with pytest.raises(binascii.Error):  # the prefix makes it no longer bare base64
        base64.b64decode(out, validate=True)


async def test_samples_3_gives_a_list_of_3_distinct_images(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(image_size=(64, 64), **FAST)
    out = await _output(api, server.base_url, "instantid", {**instantid_payload, "samples": 3})
    assert isinstance(out, list)
    assert len(out) == 3
    assert len(set(out)) == 3
    images = [await _image(api, url) for url in out]
    assert len(set(images)) == 3
    assert all(_decode_png(img) == ("PNG", (64, 64)) for img in images)


async def test_samples_with_base64_gives_a_list_of_data(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(image_size=(32, 32), **FAST)
    payload = {**instantid_payload, "samples": 2, "base64": True}
    out = await _output(api, server.base_url, "instantid", payload)
    assert isinstance(out, list)
    assert [_decode_png(base64.b64decode(x)) for x in out] == [("PNG", (32, 32))] * 2


@pytest.mark.parametrize("as_list", [False, True])
async def test_single_output_as_list(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any], as_list: bool
) -> None:
    server = await sim(single_output_as_list=as_list, **FAST)
    out = await _output(api, server.base_url, "instantid", instantid_payload)
    if as_list:
        assert isinstance(out, list)
        assert len(out) == 1
        url = out[0]
    else:
        assert isinstance(out, str)
        url = out
    assert url.startswith(server.base_url + "/outputs/")
    assert _decode_png(await _image(api, url))[0] == "PNG"


async def test_image_size_knob_overrides_requested_size(
    sim: StartSim, api: Api, infinite_you_payload: dict[str, Any]
) -> None:
    server = await sim(image_size=(40, 30), **FAST)
    out = await _output(api, server.base_url, "infinite-you", infinite_you_payload)
    with Image.open(io.BytesIO(await _image(api, out))) as img:
        assert (img.format, img.size) == ("WEBP", (40, 30))


async def test_same_seed_and_params_give_identical_bytes(
    sim: StartSim, api: Api, infinite_you_payload: dict[str, Any]
) -> None:
    payload = {**infinite_you_payload, "width": 256, "height": 256}
    first = await sim(**FAST)
    second = await sim(seed=99, **FAST)  # another emulator, other knobs' seed: same image
    a = await _image(api, await _output(api, first.base_url, "infinite-you", payload))
    b = await _image(api, await _output(api, first.base_url, "infinite-you", payload))
    c = await _image(api, await _output(api, second.base_url, "infinite-you", payload))
    assert a == b == c
    other = await _image(
        api, await _output(api, first.base_url, "infinite-you", {**payload, "seed": 6256})
    )
    assert other != a
    prompt = await _image(
        api, await _output(api, first.base_url, "infinite-you", {**payload, "prompt": "a cat"})
    )
    assert prompt != a


async def test_random_seed_gives_different_images(
    sim: StartSim, api: Api, instantid_payload: dict[str, Any]
) -> None:
    server = await sim(image_size=(64, 64), **FAST)
    payload = {**instantid_payload, "seed": -1}
    a = await _image(api, await _output(api, server.base_url, "instantid", payload))
    b = await _image(api, await _output(api, server.base_url, "instantid", payload))
    assert a != b
