"""The API key stays secret and output files stay inside --out.

A distinctive key goes through a whole run against a separately started, faulty
`batcher sim`, then against one that wants another key (401). Its bytes, in any common
encoding, must then be in no file under --out (the SQLite checkpoint included), in no
output of either process, and in no repr, str or exception of the objects that hold it.
Download bounds are unit-tested in tests/test_sink.py (size cap, time cap, http(s)
only, a keyed session refused); here they are checked wired into a real run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image

from batcher.client import ApiClient, TransportError, json_body
from batcher.errors import AuthError
from batcher.options import RunOptions
from batcher.run import arun
from batcher.sim import SimConfig, SimServer
from batcher.sink import DownloadLimits

KEY = "sk-canary-7f3a9c1e5d2b-DO-NOT-LEAK"
OTHER_KEY = "sk-another-account-0000"
FACE_URL = "https://example.com/face.jpg"
#: Row ids that would escape a naive ``out / "images" / id``.
HOSTILE_IDS = ["a/b", "../../escape", "..", "/etc/passwd", "..\\..\\win", "~root", "-rf", ".x"]
FAULTS = (
    *("--error-rate", "0.1", "--drop-rate", "0.05", "--fail-rate", "0.2"),
    *("--truncate-rate", "0.3", "--slow-rate", "0.05", "--slow", "2"),
    *("--rate-limit", "30", "--rate-period", "60", "--rate-limit-headers", "both"),
    *("--seed", "7"),
)
TIME_SCALE = "0.01"


def encodings(secret: str) -> dict[str, bytes]:
    """The forms in which a key could be written down by accident."""
    raw = secret.encode()
    return {
        "utf-8": raw,
        "utf-16-le": secret.encode("utf-16-le"),
        "utf-16-be": secret.encode("utf-16-be"),
        "base64": base64.b64encode(raw).rstrip(b"="),
        "urlsafe-base64": base64.urlsafe_b64encode(raw).rstrip(b"="),
        "hex": raw.hex().encode(),
    }


def leaks(data: bytes | str) -> list[str]:
    blob = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    low = blob.lower()
    return [name for name, form in encodings(KEY).items() if form.lower() in low]


def test_the_leak_detector_finds_the_key_in_every_form() -> None:
    """If this fails, every "no leak" assertion below would pass for nothing."""
    for name, form in encodings(KEY).items():
        assert name in leaks(b"..." + form + b"...")
    assert leaks(f'{{"x-api-key": "{KEY}"}}') == ["utf-8"]
    assert leaks("sk-canary") == []


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# --- a `batcher sim` of its own ----------------------------------------------------------


@dataclass
class SimProcess:
    url: str
    proc: subprocess.Popen[bytes]
    output: Path  # stdout and stderr, for the leak check

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/__sim/stats", timeout=10) as resp:
            data: dict[str, Any] = json.load(resp)
            return data


@contextlib.contextmanager
def batcher_sim(log: Path, *args: str, env_key: str | None = None) -> Iterator[SimProcess]:
    """`python -m batcher sim --port 0 ARGS`; the URL parsed from the line it prints."""
    env = {k: v for k, v in os.environ.items() if k != "SEGMIND_API_KEY"}
    if env_key is not None:
        env["SEGMIND_API_KEY"] = env_key
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "batcher", "sim", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=sink,
            env=env,
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, "batcher sim printed nothing in 30 s"
            line = proc.stdout.readline()
            sink.write(line)
            found = re.fullmatch(rb"batcher sim listening on (http://([^:/]+):(\d+))\n", line)
            assert found, line
            assert found[2] == b"127.0.0.1"  # loopback unless --host says otherwise
            yield SimProcess(found[1].decode(), proc, log)
        finally:
            proc.send_signal(signal.SIGINT)
            rest, _ = proc.communicate(timeout=10)
            sink.write(rest)
            assert proc.returncode == 0


def batcher_run(*args: str | Path, key: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SEGMIND_API_KEY"}
    env["SEGMIND_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "batcher", "run", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def write_manifest(folder: Path) -> Path:
    """Hostile ids, local files (sent as base64) and URLs, one sample or two, one bad row."""
    Image.new("RGB", (64, 64), (200, 150, 120)).save(folder / "face.png")
    ids = HOSTILE_IDS + [f"r{i}" for i in range(12)]
    rows: list[dict[str, object]] = [
        {"id": row_id, "prompt": f"portrait {i}", "face_image": "face.png" if i % 2 else FACE_URL}
        | ({"samples": 2} if i % 3 == 0 else {})
        for i, row_id in enumerate(ids)
    ]
    rows.append({"id": "bad", "prompt": "x", "face_image": FACE_URL, "guidance_scale": 99})
    path = folder / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_key_never_reaches_a_file_or_an_output_and_files_stay_inside_out(
    tmp_path: Path,
) -> None:
    manifest = write_manifest(tmp_path)
    out, refused_out = tmp_path / "out", tmp_path / "out-401"
    with (
        batcher_sim(tmp_path / "sim.log", *FAULTS, "--time-scale", TIME_SCALE, env_key=KEY) as sim,
        batcher_sim(tmp_path / "sim-401.log", "--api-key", OTHER_KEY) as wrong,
    ):
        where = ("--model", "instantid", "--time-scale", TIME_SCALE, "--no-progress")
        done = batcher_run(manifest, "--out", out, "--base-url", sim.url, *where, key=KEY)
        refused = batcher_run(
            manifest, "--out", refused_out, "--base-url", wrong.url, *where, key=KEY
        )
        faults = sim.stats()["requests"]
        denied = wrong.stats()["requests"]

    # The faulty run went through: retries, 429s, cut downloads, FAILED jobs, one INVALID row.
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    counts = {o: n for by in faults.values() for o, n in by.items()}
    assert {"429", "truncated", "422"} <= set(counts), faults
    assert any(o.startswith("50") for o in counts), faults
    rows = {r["id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert rows["bad"]["status"] == "INVALID"
    assert sum(r["status"] == "COMPLETED" for r in rows.values()) >= len(rows) // 2
    # Every 5xx answer is retried and counted on its row, whichever request got it
    # (submit, status or result), over all of the row's attempts.
    api_5xx = sum(
        n for endpoint, by in faults.items() if endpoint != "output"
        for o, n in by.items() if o.startswith("50")
    )  # fmt: skip
    retries = sum(r["retries"] for r in rows.values())
    assert retries >= api_5xx > 0, faults

    # 401: exit 2, one line that says what to do, and the key is not in it.
    assert refused.returncode == 2, refused.stderr
    assert "batcher: the API refused the key (HTTP 401" in refused.stderr
    assert "check SEGMIND_API_KEY" in refused.stderr
    assert "Traceback" not in refused.stderr
    # Stopped at once: the first submit's 401 ends it (a second may already be on its way).
    assert set(denied) == {"submit"}, denied
    assert set(denied["submit"]) == {"401"}, denied
    assert denied["submit"]["401"] <= 2, denied

    # The key in no file under either --out (checkpoint, its WAL, results, images, ...).
    scanned = files_under(out) + files_under(refused_out)
    assert {p.name for p in scanned} >= {"checkpoint.sqlite", "results.parquet"}
    for path in scanned:
        assert leaks(path.read_bytes()) == [], path
    for text in (done.stdout, done.stderr, refused.stdout, refused.stderr):
        assert leaks(text) == [], text
    for log in (sim.output, wrong.output):
        assert leaks(log.read_bytes()) == [], log.read_text()

    # Hostile ids: every file the run wrote is inside --out, images inside out/images.
    images = (out / "images").resolve()
    for row_id in HOSTILE_IDS:
        for rel in rows[row_id]["outputs"] or []:
            assert (out / rel).resolve().parent == images, (row_id, rel)
    made = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert made == {"face.png", "m.jsonl", "sim.log", "sim-401.log", "out", "out-401"}
    assert all(p.parent.resolve() == images for p in files_under(out / "images"))
    assert not [p for p in files_under(out) if p.name.endswith(".part")]
    saved = [rel for r in rows.values() for rel in r["outputs"] or []]
    assert saved
    assert len(saved) == len(files_under(out / "images"))


# --- in process: reprs, exceptions, logs ------------------------------------------------


def exception_chain(exc: BaseException) -> list[BaseException]:
    """The exception, its causes and contexts, and group members, each once."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        if isinstance(e, BaseExceptionGroup):
            todo += list(e.exceptions)
    return seen


def assert_exception_is_clean(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    assert leaks(text) == []
    for e in exception_chain(exc):
        assert leaks(repr(e)) == [], type(e)
        assert leaks(str(e)) == [], type(e)
        assert all(leaks(repr(a)) == [] for a in e.args)


def test_key_is_in_no_repr_or_str() -> None:
    sim = SimConfig(api_keys=frozenset({KEY}))
    options = RunOptions(manifest=Path("m.csv"), out=Path("out"), api_key=KEY, sim=sim)
    for obj in (options, sim, options.sim_config()):
        assert leaks(repr(obj)) == []
        assert leaks(str(obj)) == []
    assert options.api_key == KEY  # it is there, only not shown


async def test_api_client_repr_and_its_transport_errors_hold_no_key() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with aiohttp.ClientSession() as session:
        client = ApiClient(session, f"http://127.0.0.1:{port}", KEY)
        assert leaks(repr(client)) == []
        assert leaks(str(client)) == []
        with pytest.raises(TransportError) as info:
            await client.submit("instantid", json_body({"prompt": "x", "face_image": FACE_URL}))
    assert_exception_is_clean(info.value)


async def test_auth_error_of_a_run_and_its_log_hold_no_key(
    tmp_path: Path, sim: Callable[..., Awaitable[SimServer]], caplog: pytest.LogCaptureFixture
) -> None:
    server = await sim(time_scale=0.001, api_keys=frozenset({OTHER_KEY}))
    options = _one_row_options(tmp_path, server, KEY)
    caplog.set_level("DEBUG")
    with pytest.raises(AuthError) as info:
        await arun(options)
    assert info.value.status == 401
    assert_exception_is_clean(info.value)
    assert leaks(caplog.text) == []
    assert server.stats()["requests"]["submit"] == {"401": 1}


# --- downloads: no key, bounded, wired into a run --------------------------------------


def recording(seen: list[tuple[str, bool]]) -> Any:
    """A middleware recording (path, carried x-api-key) for every request."""

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append((request.path, "x-api-key" in request.headers))
        response: web.StreamResponse = await handler(request)
        return response

    return record


def one_row(tmp_path: Path) -> Path:
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,prompt,face_image\na,x,{FACE_URL}\n", encoding="utf-8")
    return manifest


def _one_row_options(tmp_path: Path, server: SimServer, key: str) -> RunOptions:
    """One InstantID row against ``server`` (time scale 0.001), with ``key``."""
    return RunOptions(
        manifest=one_row(tmp_path),
        out=tmp_path / "out",
        model="instantid",
        base_url=server.base_url,
        time_scale=0.001,
        api_key=key,
        progress=False,
    )


async def test_output_downloads_never_carry_the_key(tmp_path: Path) -> None:
    seen: list[tuple[str, bool]] = []
    server = SimServer(SimConfig(time_scale=0.001), port=0, middlewares=[recording(seen)])
    async with server:
        result = await arun(_one_row_options(tmp_path, server, KEY))
    assert result.exit_code == 0
    downloads = [has_key for path, has_key in seen if path.startswith("/outputs/")]
    api = [has_key for path, has_key in seen if path.startswith("/v2/")]
    assert downloads == [False]
    assert api
    assert all(api)


@pytest.mark.parametrize(
    ("limits", "says", "code", "status"),
    [
        (DownloadLimits(max_bytes=100), "byte cap", 3, "FAILED"),
        # Before: "output could not be saved: " and nothing more (str(TimeoutError()) is "").
        # A COMPLETED job's download is tried again from its links, then left to the next
        # run (exit 4) once nothing else is left for the patience window (0.9 s here).
        (
            DownloadLimits(timeout_s=0.0005),
            "output could not be downloaded: download timed out after 0.0005 s",
            4,
            "SUBMITTED",
        ),
    ],
    ids=["size", "time"],
)
async def test_run_applies_the_download_limits(
    tmp_path: Path, limits: DownloadLimits, says: str, code: int, status: str
) -> None:
    options = RunOptions(
        manifest=one_row(tmp_path),
        out=tmp_path / "out",
        model="instantid",
        simulate=True,
        time_scale=0.001,
        downloads=limits,
        progress=False,
    )
    started = time.monotonic()
    result = await arun(options)
    assert time.monotonic() - started < 20
    assert result.exit_code == code
    (row,) = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert row["status"] == status
    assert says in (row["error"] if status == "FAILED" else result.stop_reason or "")
    assert not list((tmp_path / "out").rglob("*.png"))


async def test_whitespace_around_the_key_is_not_sent(
    tmp_path: Path, sim: Callable[..., Awaitable[SimServer]]
) -> None:
    """A key pasted with a trailing newline (or read from a file) is the key: before, the
    line break went into the header, and aiohttp refused every request."""
    server = await sim(time_scale=0.001, api_keys=frozenset({KEY}))
    result = await arun(_one_row_options(tmp_path, server, f" \t{KEY}\r\n"))
    assert result.exit_code == 0, result.text()
    assert server.stats()["requests"]["submit"] == {"200": 1}
