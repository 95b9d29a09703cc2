"""`batcher sim`: its own process, the "listening on URL" line scripts read, flags as knobs."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from asyncio.subprocess import Process
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent


async def _start_sim(*args: str, stderr: int | None = None) -> tuple[Process, str]:
    """``batcher sim --port 0 ARGS`` without SEGMIND_API_KEY in its environment: the
    process and the base URL it printed."""
    env = {k: v for k, v in os.environ.items() if k != "SEGMIND_API_KEY"}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "batcher", "sim", "--port", "0", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        found = re.fullmatch(r"batcher sim listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert found, line
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, found[1]


@pytest.fixture
async def sim_process(api_key: str) -> AsyncIterator[str]:
    proc, url = await _start_sim(
        *("--api-key", api_key),
        *("--time-scale", "0.001", "--latency", "instantid=0", "--fail-rate", "1"),
        *("--rate-limit", "3", "--rate-period", "60000", "--rate-limit-headers", "both"),
    )
    try:
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_cli_flags_reach_the_emulator(
    sim_process: str, http: aiohttp.ClientSession, api_key: str
) -> None:
    payload = {"prompt": "x", "face_image": "https://example.com/face.jpg"}
    url = f"{sim_process}/v2/instantid"
    async with http.post(url, json=payload, headers={"x-api-key": "sk-wrong"}) as resp:
        assert resp.status == 401  # --api-key: only that key
    key = {"x-api-key": api_key}
    async with http.post(url, json=payload, headers=key) as resp:
        assert resp.status == 200
        sub = await resp.json()
    async with http.get(sub["status_url"], headers=key) as resp:
        assert resp.status == 422  # --fail-rate 1, --latency instantid=0
    async with http.get(sub["response_url"], headers=key) as resp:
        assert resp.status == 422
    async with http.get(sub["status_url"], headers=key) as resp:
        assert resp.status == 429  # --rate-limit 3
        assert {"Retry-After", "x-rate-limit-reset-at-utc"} <= set(resp.headers)


async def test_output_link_flags_reach_the_emulator(
    http: aiohttp.ClientSession, api_key: str
) -> None:
    proc, base = await _start_sim(
        *("--api-key", api_key, "--time-scale", "0.001", "--latency", "instantid=0"),
        *("--image-size", "8x8", "--output-delay", "100000", "--output-link-ttl", "60"),
    )
    try:
        key = {"x-api-key": api_key}
        payload = {"prompt": "x", "face_image": "https://example.com/face.jpg"}
        async with http.post(f"{base}/v2/instantid", json=payload, headers=key) as resp:
            sub = await resp.json()
        async with http.get(sub["response_url"], headers=key) as resp:
            output = (await resp.json())["output"]
        assert "?Expires=" in output  # --output-link-ttl: signed links
        async with http.get(output) as resp:
            assert resp.status == 404  # --output-delay: 100 s at 0.001, not on the CDN yet
        async with http.get(output.partition("?")[0]) as resp:
            assert resp.status == 403  # unsigned
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


def _refused(*args: str) -> str:
    """`batcher sim ARGS` exits 2 at once with one `batcher: ...` line: that line."""
    proc = subprocess.run(
        [sys.executable, "-m", "batcher", "sim", "--api-key", "sk-sim-cli-key", *args],
        capture_output=True,
        text=True,
        timeout=30,  # a sim that accepted the flags would serve until killed
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("batcher: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("scale", ["inf", "nan", "1e-9", "0"])
def test_a_time_scale_out_of_range_is_refused(scale: str) -> None:
    assert _refused(f"--time-scale={scale}") == (
        f"batcher: --time-scale must be between 0.001 and 1000, got {float(scale):g}"
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--port", "99999"), "--port must be between 0 and 65535, got 99999"),
        (("--port", "-1"), "--port must be between 0 and 65535, got -1"),
        (
            ("--latency", "nope=5"),
            "--latency: unknown model 'nope'; known models: infinite-you, instantid",
        ),
        (
            ("--host", "1.2.3.4"),  # an address, but not one of this machine's
            "sim: cannot listen on 1.2.3.4:0 (Cannot assign requested address); "
            "check --host and --port",
        ),
        (("--output-link-ttl", "0"), "sim: output_link_ttl_s must be > 0, got 0.0"),
        (("--output-delay", "-1"), "sim: output_delay_s must be >= 0"),
    ],
    ids=[
        "port-too-big",
        "port-negative",
        "unknown-latency-model",
        "host-not-this-machine",
        "link-ttl-zero",
        "output-delay-negative",
    ],
)
def test_a_bad_flag_is_refused_in_one_line(args: tuple[str, ...], says: str) -> None:
    assert _refused(*args) == f"batcher: {says}"


def test_a_host_that_is_no_address_is_refused_in_one_line() -> None:
    line = _refused("--host", "256.1.1.1")
    assert line.startswith("batcher: sim: cannot listen on 256.1.1.1:0 ("), line
    assert line.endswith("); check --host and --port"), line


def test_a_port_in_use_is_refused_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert _refused("--port", str(port)) == (
            f"batcher: sim: cannot listen on 127.0.0.1:{port} (Address already in use); "
            "check --host and --port"
        )


async def test_a_short_key_is_served_with_a_warning_that_batcher_run_refuses_it(
    http: aiohttp.ClientSession,
) -> None:
    """The emulator masks nothing and the SDK takes any key, so a short one is served; but
    `batcher run` refuses it (client._Redactor would mask its letters in base64 images), and
    a user testing batcher against this emulator should learn why before the run says so."""
    proc, url = await _start_sim("--api-key", "Qz7", stderr=asyncio.subprocess.PIPE)
    try:
        payload = {"prompt": "x", "face_image": "https://example.com/face.jpg"}
        headers = {"x-api-key": "Qz7"}
        async with http.post(f"{url}/v2/instantid", json=payload, headers=headers) as resp:
            assert resp.status == 200
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0
    assert stderr.decode().splitlines() == [
        "batcher sim: warning: the key is 3 characters long: `batcher run` refuses keys "
        "shorter than 8, so it cannot use this emulator"
    ]
