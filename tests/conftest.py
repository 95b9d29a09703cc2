"""Shared fixtures: an API key, emulators on 127.0.0.1 port 0, a raw HTTP helper, and the
model pages' example payloads."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import struct
import time
import zlib
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow.parquet as pq
import pytest

from batcher.checkpoint import Checkpoint
from batcher.flight import Flight
from batcher.jobs import Job
from batcher.options import RunOptions
from batcher.pipeline import RunContext
from batcher.run import RunResult, arun
from batcher.sim import SimConfig, SimServer

StartSim = Callable[..., Awaitable[SimServer]]

#: The InstantID page's example payload (shared/api/000_...txt).
INSTANTID_PAYLOAD: dict[str, Any] = {
    "prompt": "photo of a man",
    "face_image": "https://segmind-sd-models.s3.amazonaws.com/outputs/instantid_input.jpg",
    "negative_prompt": "lowquality, badquality, sketches",
    "style": "Vibrant Color",
    "samples": 1,
    "num_inference_steps": 10,
    "guidance_scale": 5,
    "seed": 354849415,
    "identity_strength": 0.8,
    "adapter_strength": 0.8,
    "enhance_face_region": True,
    "base64": False,
}

#: The InfiniteYou page's example payload (shared/api/004_...txt), prompt shortened.
INFINITE_YOU_PAYLOAD: dict[str, Any] = {
    "seed": 6255,
    "width": 864,
    "height": 1152,
    "prompt": "A sophisticated gentleman exuding confidence, in an elegant library",
    "id_image": "https://segmind-resources.s3.amazonaws.com/output/"
    "e533504e-4e22-4219-88a1-152e002e1a99-man2.png",
    "num_steps": 30,
    "model_version": "aes_stage2",
    "output_format": "webp",
    "enable_realism": True,
    "guidance_scale": 3.5,
    "output_quality": 80,
    "enable_anti_blur": False,
    "infusenet_guidance_end": 1,
    "infusenet_guidance_start": 0,
    "infusenet_conditioning_scale": 1,
}

TERMINAL = ("COMPLETED", "FAILED")


class Clock:
    """An emulator's clock (``sim(clock=...)``), held still and moved by hand: what a test
    reads off the emulator then depends on the moves alone, never on how long a loaded
    machine took between two requests."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Api:
    """Raw HTTP to the emulated API with one session and key; answers are (status, JSON body).

    ``headers=None`` sends the key; pass a mapping to send exactly those headers instead.
    """

    def __init__(self, http: aiohttp.ClientSession, key: str) -> None:
        self.http = http
        self.key = key

    def _headers(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        return {"x-api-key": self.key} if headers is None else dict(headers)

    async def submit(
        self,
        base_url: str,
        model: str,
        payload: Mapping[str, Any],
        *,
        headers: Mapping[str, str] | None = None,
        version: str = "v2",
    ) -> tuple[int, Any]:
        """POST a job; the body is JSON, or bytes for an image (v1 sync)."""
        url = f"{base_url}/{version}/{model}"
        async with self.http.post(url, json=payload, headers=self._headers(headers)) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.read()

    async def get(self, url: str, *, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        async with self.http.get(url, headers=self._headers(headers)) as resp:
            return resp.status, await resp.json()

    async def wait(self, status_url: str, *, interval: float = 0.002) -> tuple[int, Any]:
        """Poll until a terminal state (5 s at most); the last (status, body)."""
        async with asyncio.timeout(5.0):
            while True:
                code, body = await self.get(status_url)
                if body.get("status") in TERMINAL:
                    return code, body
                await asyncio.sleep(interval)

    async def run(self, base_url: str, model: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Submit and wait until done; the submit answer (request_id and the URLs)."""
        code, sub = await self.submit(base_url, model, payload)
        assert code == 200, sub
        await self.wait(sub["status_url"])
        return dict(sub)

    async def download(self, url: str) -> tuple[int, bytes, str]:
        """An output URL, with no key (outputs are public): status, bytes, Content-Type."""
        async with self.http.get(url) as resp:
            return resp.status, await resp.read(), resp.content_type


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_zeros(width: int, height: int) -> bytes:
    """A valid greyscale PNG of black pixels: well under 1 MB for 100+ megapixels."""
    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # the filter byte, then the pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


Statements = list[tuple[str, Sequence[Any]]]


def before_each_commit(monkeypatch: pytest.MonkeyPatch, hook: Callable[[Statements], None]) -> None:
    """Call ``hook`` with each batch of statements, on the checkpoint's worker thread,
    before the batch is applied (to record it, or to hold it there)."""
    apply = Checkpoint._apply

    def hooked(self: Checkpoint, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        batch = list(statements)
        hook(batch)
        apply(self, batch)

    monkeypatch.setattr(Checkpoint, "_apply", hooked)


def a_flight(
    request_id: str, status_url: str, response_url: str, *, now_mono: float = 0.0
) -> Flight:
    """A job in flight, submitted at ``now_mono``; its row's id is its request_id."""
    job = Job(
        id=request_id, number=1, model="instantid", params_json="{}", state="SUBMITTED",
        request_id=request_id, status_url=None, response_url=None, attempts=1,
        unknown_submits=0, submitted_at=None,
    )  # fmt: skip
    return Flight.start(
        job=job,
        request_id=request_id,
        status_url=status_url,
        response_url=response_url,
        submitted_wall=0.0,
        now_wall=0.0,
        now_mono=now_mono,
    )


def offline_context(tmp_path: Path, cp: Checkpoint) -> RunContext:
    """A RunContext on ``cp`` for stage code that makes no request."""
    options = RunOptions(manifest=tmp_path / "m.csv", out=tmp_path / "out", api_key="sk-x")
    nothing: Any = None
    return RunContext(
        options=options,
        checkpoint=cp,
        api=nothing,
        downloads=nothing,
        gate=nothing,
        inputs=nothing,
    )


def in_checkpoint(out: Path, state: str) -> int:
    """Rows in ``state`` as the run has recorded them so far (the file is WAL: readable live)."""
    path = out / "checkpoint.sqlite"
    if not path.exists():
        return 0
    db = sqlite3.connect(path)
    try:
        count: int = db.execute("SELECT COUNT(*) FROM jobs WHERE state=?", (state,)).fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0
    finally:
        db.close()
    return count


def url_manifest(tmp_path: Path, rows: int) -> Path:
    """``tmp_path/m.csv``: ``rows`` InstantID rows (no model column) whose face is a URL."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,prompt,face_image\n"
        + "".join(f"h{n},p {n},https://example.com/face.jpg\n" for n in range(rows)),
        encoding="utf-8",
    )
    return manifest


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Return once ``check()`` holds: a run's moment to act on, not a guess in seconds."""
    async with asyncio.timeout(timeout_s):
        # Neither the emulator's counters nor the checkpoint file can be awaited: poll them.
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.002)


async def interrupted_run(options: RunOptions, when: Callable[[], bool]) -> RunResult:
    """Run until ``when()`` holds, then set the run's interrupt event; how it ended."""
    interrupted = asyncio.Event()
    task = asyncio.create_task(arun(options, interrupted=interrupted))
    await until(lambda: when() or task.done())
    interrupted.set()
    return await task


@pytest.fixture
def api_key() -> str:
    return "sk-sim-test-0123456789"


@pytest.fixture
def instantid_payload() -> dict[str, Any]:
    return dict(INSTANTID_PAYLOAD)


@pytest.fixture
def infinite_you_payload() -> dict[str, Any]:
    return dict(INFINITE_YOU_PAYLOAD)


@pytest.fixture
def clock() -> Clock:
    """A held clock for ``sim(clock=clock)``, at 1000.0 until the test moves it."""
    return Clock()


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port on 127.0.0.1 whose connections never open: it listens, but its accept
    queue is full, so the kernel drops every new SYN (as a firewall does)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            yield port
        finally:
            for filler in fillers:
                filler.close()


@pytest.fixture
async def sim() -> AsyncIterator[StartSim]:
    """A factory: ``await sim(time_scale=0.001, ...)`` starts an emulator; all stop at teardown."""
    servers: list[SimServer] = []

    async def start(
        config: SimConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        **knobs: Any,
    ) -> SimServer:
        if config is not None and knobs:
            raise TypeError("give a SimConfig or knobs, not both")
        server = SimServer(config or SimConfig(**knobs), host="127.0.0.1", port=0, clock=clock)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client session with no default headers (each test says what it sends)."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def api(http: aiohttp.ClientSession, api_key: str) -> Api:
    return Api(http, api_key)


def sim_run_options(manifest: Path, sim: SimServer, key: str, **changes: Any) -> RunOptions:
    """A run of ``manifest`` into ``out/`` beside it, against the emulator ``sim``."""
    return RunOptions(
        manifest=manifest,
        out=manifest.parent / "out",
        base_url=sim.base_url,
        time_scale=sim.config.time_scale,
        api_key=key,
        progress=False,
        **changes,
    )


def results_by_id(out: Path) -> dict[str, dict[str, Any]]:
    """results.parquet's rows by id."""
    return {r["id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
