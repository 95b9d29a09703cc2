"""Whole runs against the emulator on 127.0.0.1: every manifest format and both models,
every fault at once, invalid rows, unusable manifests, and the rate limit.

Each run's time scale is the emulator's, so the client's schedule, backoff and rate
limit shrink with the service (a 163 s InfiniteYou job takes 0.33 s here).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import before_each_commit
from PIL import Image

import batcher.client as client_module
import batcher.fetch as fetch_module
from batcher.backoff import RetryConfig
from batcher.client import ApiClient, Reply, TransportError
from batcher.errors import ManifestError
from batcher.gate import RateConfig
from batcher.options import RunOptions
from batcher.report import build_report, read_results
from batcher.run import CHECKPOINT, EXIT_FAILED_ROWS, EXIT_OK, arun
from batcher.sim import FAIL_MARKERS, FAILURES, SimServer
from batcher.submit import UNKNOWN_OUTCOME

SCALE = 0.002
KEY = "sk-e2e-0123456789abcdef"

REQUIRED_COLUMNS = (
    "id", "model", "status", "error", "request_id", "attempts", "submitted_at", "completed_at",
    "latency_s", "inference_time", "metrics", "polls", "outputs", "width", "height", "bytes",
    "sha256", "params",
)  # fmt: skip
PILLOW_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
#: Any run of base64 this long in the params column would be an image body.
BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{80,}")


# -- helpers ------------------------------------------------------------------------------


def _face(path: Path, color: tuple[int, int, int] = (200, 150, 120), fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), color).save(path, fmt)
    return path


def _b64_face(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    """The rows as CSV, Parquet or JSONL (by extension); a missing key is an empty cell."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows]), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _options(manifest: Path, out: Path, sim: SimServer, **changes: Any) -> RunOptions:
    return RunOptions(
        manifest=manifest,
        out=out,
        base_url=sim.base_url,
        time_scale=sim.config.time_scale,
        api_key=KEY,
        progress=False,
        **changes,
    )


def _results(out: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pq.read_table(out / "results.parquet").to_pylist()
    return rows


def _requests(stats: dict[str, Any], endpoint: str | None = None, outcome: str = "") -> int:
    """API requests the emulator saw (image downloads are not API requests)."""
    return sum(
        n
        for e, outcomes in stats["requests"].items()
        if e != "output" and (endpoint is None or e == endpoint)
        for o, n in outcomes.items()
        if not outcome or o.startswith(outcome)
    )


# -- 1. end to end --------------------------------------------------------------------------


def _e2e_rows(face_b64: str, pose_b64: str) -> list[dict[str, Any]]:
    url = "https://example.com/portraits/person.jpg"
    return [
        {"id": "iid-local", "model": "instantid", "prompt": "a portrait", "face_image": "face.png",
         "seed": 11},
        {"id": "iid-url-2", "model": "instantid", "prompt": "two portraits", "face_image": url,
         "samples": 2},
        {"id": "iid-b64", "model": "instantid", "prompt": "inline in and out",
         "face_image": "faces/other.jpg", "pose_image": "data:image/png;base64," + pose_b64,
         "base64": True},
        {"id": "iy-jpg", "model": "infinite-you", "prompt": "a gentleman", "id_image": "face.png",
         "width": 256, "height": 320, "output_format": "jpg"},
        {"id": "iy-png", "model": "infinite-you", "prompt": "a lady", "id_image": url,
         "width": 320, "height": 256, "output_format": "png"},
        {"id": "iy-webp", "model": "infinite-you", "prompt": "a child", "id_image": "face.png",
         "control_image": face_b64, "width": 256, "height": 256, "output_format": "webp"},
    ]  # fmt: skip


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
async def test_every_row_completes_with_verified_images_and_a_full_results_table(
    tmp_path: Path, sim: Any, suffix: str
) -> None:
    _face(tmp_path / "face.png")
    _face(tmp_path / "faces" / "other.jpg", (90, 60, 40), "JPEG")
    face_b64, pose_b64 = _b64_face((1, 2, 3)), _b64_face((4, 5, 6))
    spec = _e2e_rows(face_b64, pose_b64)
    manifest = _write_manifest(tmp_path / f"jobs{suffix}", spec)
    server = await sim(time_scale=SCALE)

    result = await arun(_options(manifest, tmp_path / "out", server))

    assert result.exit_code == EXIT_OK, result.text()
    rows = {r["id"]: r for r in _results(tmp_path / "out")}
    assert len(rows) == len(spec)
    table = pq.read_table(tmp_path / "out" / "results.parquet")
    assert set(REQUIRED_COLUMNS) <= set(table.column_names)
    for want in spec:
        row = rows[want["id"]]
        assert row["status"] == "COMPLETED", (row["id"], row["error"])
        assert row["model"] == want["model"]
        assert row["error"] is None
        assert row["request_id"]
        assert row["attempts"] == 1
        assert row["polls"] >= 1
        assert row["submitted_at"] <= row["completed_at"]
        assert row["latency_s"] > 0
        assert row["inference_time"] > 0
        assert json.loads(row["metrics"])["inference_time"] == row["inference_time"]
        _check_images(tmp_path / "out", row, want)
        _check_params(row["params"], want, (face_b64, pose_b64))
    assert len({r["request_id"] for r in rows.values()}) == len(spec)
    assert not list((tmp_path / "out").rglob("*.part"))
    stats = server.stats()
    assert stats["accepted"] == len(spec)
    assert stats["paid_twice"] == 0


@pytest.mark.parametrize("large", [False, True], ids=["small-on-loop", "large-off-loop"])
async def test_inline_outputs_and_large_answers_are_decoded_off_the_event_loop(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch, large: bool
) -> None:
    """A result with base64 images is megabytes: its JSON and each image's base64 are
    decoded in a worker thread past a size (lowered here, so small images cross it),
    and on the loop below it, where a thread hop would cost more than the work."""
    if large:
        monkeypatch.setattr(client_module, "LARGE_BODY_BYTES", 1000)
        monkeypatch.setattr(fetch_module, "INLINE_ON_LOOP", 1000)
    threads: dict[str, list[bool]] = {"answer": [], "image": []}

    def spy(kind: str, real: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def call(value: Any) -> Any:
            threads[kind].append(threading.current_thread() is threading.main_thread())
            return real(value)

        return call

    monkeypatch.setattr(client_module, "_parse_answer", spy("answer", client_module._parse_answer))
    monkeypatch.setattr(fetch_module, "decode_inline", spy("image", fetch_module.decode_inline))
    _face(tmp_path / "face.png")
    spec = [{"id": "b64", "prompt": "p", "face_image": "face.png", "samples": 2, "base64": True}]
    manifest = _write_manifest(tmp_path / "jobs.csv", spec)
    server = await sim(time_scale=SCALE)

    result = await arun(_options(manifest, tmp_path / "out", server, model="instantid"))

    assert result.exit_code == EXIT_OK, result.text()
    (row,) = _results(tmp_path / "out")
    _check_images(tmp_path / "out", row, {"model": "instantid", **spec[0]})
    assert threads["image"] == [not large] * 2  # the result's two samples
    # The result (over 1,000 bytes with its images) crosses; the small status answers not.
    assert set(threads["answer"]) == ({True, False} if large else {True})


def _check_images(out: Path, row: dict[str, Any], want: dict[str, Any]) -> None:
    if want["model"] == "infinite-you":
        size, fmt = (want["width"], want["height"]), PILLOW_FORMAT[want["output_format"]]
    else:  # InstantID has no size or format parameter: the emulator's 1024x1024 PNG
        size, fmt = (1024, 1024), "PNG"
    assert len(row["outputs"]) == want.get("samples", 1)
    digests, total = [], 0
    for rel in row["outputs"]:
        data = (out / rel).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert (image.size, image.format) == (size, fmt), rel
        digests.append(hashlib.sha256(data).hexdigest())
        total += len(data)
    assert (row["width"], row["height"]) == size
    assert row["bytes"] == total
    assert row["sha256"] == ",".join(digests)


def _check_params(text: str, want: dict[str, Any], bodies: tuple[str, ...]) -> None:
    assert BASE64_RUN.search(text) is None, text[:300]
    assert not any(body[:40] in text for body in bodies)
    params = json.loads(text)
    for name in ("face_image", "id_image", "pose_image", "control_image"):
        value = want.get(name)
        if value is None:
            continue
        if value.startswith("https://"):
            assert params[name] == value
        elif value.startswith("data:") or value in bodies:
            assert params[name].startswith("base64:"), params[name]
        else:
            assert params[name] == "file:" + value
    assert params["prompt"] == want["prompt"]


# -- 2. every fault at once -------------------------------------------------------------------


def _fault_rows(tmp_path: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """30 rows of both models; three carry a failure marker (each prompt unique)."""
    _face(tmp_path / "face.png")
    rows: list[dict[str, Any]] = []
    markers: dict[str, str] = {}
    for n in range(22):
        prompt = f"portrait {n}"
        if n in (3, 13):
            prompt += " sim:no-face"
            markers[f"i{n}"] = FAIL_MARKERS["sim:no-face"]
        rows.append(
            {"id": f"i{n}", "model": "instantid", "prompt": prompt, "face_image": "face.png"}
        )
    for n in range(8):
        prompt = f"gentleman {n}"
        if n == 5:
            prompt += " sim:blocked"
            markers[f"y{n}"] = FAIL_MARKERS["sim:blocked"]
        rows.append(
            {"id": f"y{n}", "model": "infinite-you", "prompt": prompt, "id_image": "face.png",
             "width": 256, "height": 256}
        )  # fmt: skip
    return rows, markers


@pytest.mark.parametrize(
    ("headers", "resubmit_unknown"),
    [("retry-after", False), ("none", False), ("reset-at", True)],
)
async def test_all_faults_at_once_end_every_row_in_its_right_state(
    tmp_path: Path,
    sim: Any,
    headers: str,
    resubmit_unknown: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec, markers = _fault_rows(tmp_path)
    manifest = _write_manifest(tmp_path / "jobs.csv", spec)
    server = await sim(
        time_scale=SCALE,
        error_rate=0.1,
        drop_rate=0.02,
        slow_rate=0.05,
        slow_s=2.0,
        truncate_rate=0.3,  # of ~27 downloads: none cut is a 1e-4 chance
        fail_rate=0.03,
        # A 429 storm: the emulator allows 10/min, the client sends at 48/min.
        rate_limit=10,
        rate_period_s=60.0,
        rate_limit_headers=headers,
        # Results kept long: under the storm no job may expire (this test counts each
        # accepted job's fate; expiry has its own tests).
        retention_s=1e6,
        image_size=(64, 64),
        seed=3,
    )
    options = _options(
        manifest,
        tmp_path / "out",
        server,
        resubmit_unknown=resubmit_unknown,
        # Random FAILED jobs (fail_rate) get enough retries that none fails 4 times in a row.
        retry=RetryConfig(max_failed_retries=3),
    )

    result = await arun(options)

    assert result.exit_code == EXIT_FAILED_ROWS, result.text()
    rows = _results(tmp_path / "out")
    assert len(rows) == len(spec)
    for row in rows:
        where = (row["id"], row["status"], row["error"], row["unknown_submits"])
        if row["unknown_submits"] and not resubmit_unknown:
            assert (row["status"], row["error"]) == ("FAILED", UNKNOWN_OUTCOME), where
        elif row["id"] in markers:
            assert (row["status"], row["error"]) == ("FAILED", markers[row["id"]]), where
        else:  # no 5xx, 429, dropped poll, slow answer or cut download fails a row
            assert row["status"] == "COMPLETED", where
            assert len(row["outputs"]) == 1
    for row in rows:
        if row["status"] == "FAILED" and row["error"] != UNKNOWN_OUTCOME:
            assert row["error"] in FAILURES
    stats = server.stats()
    # The faults really happened, and the client saw the 429s.
    assert _requests(stats, outcome="429") > 0
    assert result.summary is not None
    assert result.summary.rate_limited > 0
    # Each 429 is on the row whose request got it, and none is missed or counted twice.
    assert sum(r["rate_limited"] for r in rows) == _requests(stats, outcome="429")
    assert _requests(stats, outcome="5") > 0
    assert stats["requests"]["output"].get("truncated", 0) > 0
    # A download cut on every one of its tries sends the job back to fetch its result again.
    refetches = sum("output could not be downloaded" in r.getMessage() for r in caplog.records)
    _check_accounting(rows, stats, refetches=refetches)
    # Every API request the emulator saw, errors, drops and 429s included, is one the
    # run counted (see the next test for dropped connections).
    assert result.summary.api_requests == _requests(stats)


async def test_report_counts_exactly_the_api_requests_the_server_saw_and_downloads_apart(
    tmp_path: Path, sim: Any
) -> None:
    """`batcher report` is how users benchmark the API: its request total is what the
    server saw (5xx, drops and 429s included), and cut downloads are counted apart."""
    rows = [
        {"id": f"r{n}", "model": "instantid", "prompt": f"p {n}", "face_image": "https://x/a.jpg"}
        for n in range(20)
    ]
    manifest = _write_manifest(tmp_path / "jobs.csv", rows)
    server = await sim(
        time_scale=SCALE,
        error_rate=0.1,
        drop_rate=0.05,
        drop_after_accept=0.0,  # a dropped submit never made a job: each row completes
        truncate_rate=0.3,
        rate_limit=30,
        rate_period_s=60.0,
        image_size=(64, 64),
        seed=9,
    )

    result = await arun(_options(manifest, tmp_path / "out", server, resubmit_unknown=True))

    assert result.exit_code == 0, result.text()
    stats = server.stats()
    cut = stats["requests"]["output"].get("truncated", 0)
    assert cut > 0  # 20 downloads cut at 30%: none cut is a 1e-3 chance
    report = build_report(*read_results(tmp_path / "out"))
    assert report.api_requests == _requests(stats)
    dropped_downloads = stats["requests"]["output"].get("dropped", 0)
    assert report.download_retries == cut + dropped_downloads


async def test_a_result_reads_count_is_written_with_the_output_urls_not_apart(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the way to COMPLETED, the result read's counts go in the same statement as the
    job's output URLs (one statement a job fewer), and each row still counts its read."""
    rows = [
        {"id": f"r{n}", "model": "instantid", "prompt": f"p {n}", "face_image": "https://x/a.jpg"}
        for n in range(8)
    ]
    manifest = _write_manifest(tmp_path / "jobs.csv", rows)
    server = await sim(time_scale=SCALE, image_size=(64, 64), seed=3)
    statements: list[str] = []
    before_each_commit(monkeypatch, lambda batch: statements.extend(sql for sql, _ in batch))

    result = await arun(_options(manifest, tmp_path / "out", server))

    assert result.exit_code == EXIT_OK
    reads = [sql for sql in statements if "result_reads=result_reads+?" in sql]
    assert len(reads) == len(rows)
    assert all("output_urls=?" in sql for sql in reads), reads
    assert [r["result_reads"] for r in _results(tmp_path / "out")] == [1] * len(rows)


async def test_a_get_whose_connection_drops_is_sent_again_through_the_gate_and_counted(
    tmp_path: Path, sim: Any
) -> None:
    """aiohttp sends a GET again by itself, unseen, when the server closes the reused
    connection under it: a request the rate gate never granted and no count shows. The
    run turns that off and retries through the gate, so it counts what the server saw."""
    rows = [
        {"id": f"r{n}", "model": "instantid", "prompt": f"p {n}", "face_image": "https://x/a.jpg"}
        for n in range(20)
    ]
    manifest = _write_manifest(tmp_path / "jobs.csv", rows)
    server = await sim(time_scale=SCALE, drop_rate=0.25, image_size=(64, 64), seed=5)

    result = await arun(_options(manifest, tmp_path / "out", server))

    stats = server.stats()
    get_drops = sum(stats["requests"][e].get("dropped", 0) for e in ("status", "result"))
    assert get_drops > 0  # ~40 GETs at 25%: none dropped is a 1e-5 chance
    assert result.summary is not None
    assert result.summary.api_requests == _requests(stats)


def _check_accounting(
    rows: list[dict[str, Any]], stats: dict[str, Any], *, refetches: int = 0
) -> None:
    """Every job the emulator accepted is one the client sent knowingly or lost on the wire,
    and every job whose submit was answered was seen done and, if COMPLETED, fetched:
    once, or once more for each of its downloads that failed past its retries."""
    attempts = sum(r["attempts"] for r in rows)
    unknown = sum(r["unknown_submits"] for r in rows)
    assert stats["accepted"] == attempts - unknown + stats["accepted_then_dropped"]
    answered = stats["accepted"] - stats["accepted_then_dropped"]
    assert stats["polls_per_job"]["n"] == answered  # no answered job left unpolled
    completed = [r for r in rows if r["status"] == "COMPLETED"]
    assert stats["requests"]["result"]["200"] == len(completed) + refetches
    assert len({r["request_id"] for r in completed}) == len(completed)
    refused = [o for o in stats["requests"]["submit"] if o.startswith("4") and o != "429"]
    assert refused == []  # no submit the server refused (400, 401, 406...)


async def test_dropped_submits_fail_at_most_once_then_resubmit_unknown_completes_them(
    tmp_path: Path, sim: Any
) -> None:
    _face(tmp_path / "face.png")
    spec = [{"id": f"r{n}", "prompt": f"portrait {n}", "face_image": "face.png"} for n in range(30)]
    manifest = _write_manifest(tmp_path / "jobs.csv", spec)
    # Every dropped submit was accepted first: each unknown outcome is a billed job.
    server = await sim(
        time_scale=SCALE,
        drop_rate=0.25,
        drop_after_accept=1.0,
        error_rate=0.1,
        image_size=(64, 64),
        seed=5,
    )
    out = tmp_path / "out"

    first = await arun(_options(manifest, out, server, model="instantid"))

    assert first.exit_code == EXIT_FAILED_ROWS
    rows = _results(out)
    lost = [r for r in rows if r["unknown_submits"]]
    assert lost, "the emulator dropped no submit: raise drop_rate"
    for row in rows:
        if row["unknown_submits"]:
            assert (row["status"], row["error"]) == ("FAILED", UNKNOWN_OUTCOME)
            assert row["request_id"] is None
            assert row["attempts"] == 1
        else:
            assert row["status"] == "COMPLETED", (row["id"], row["error"])
    assert first.summary is not None
    assert first.summary.unknown_submits == len(lost)
    assert "unknown outcome" in first.text()
    stats = server.stats()
    assert stats["paid_twice"] == 0  # at-most-once: nothing sent twice
    assert stats["accepted_then_dropped"] == len(lost)
    _check_accounting(rows, stats)
    before = stats

    second = await arun(_options(manifest, out, server, model="instantid", resubmit_unknown=True))

    assert second.exit_code == EXIT_OK, second.text()
    rows = _results(out)
    assert {r["status"] for r in rows} == {"COMPLETED"}
    stats = server.stats()
    # Each unknown outcome was a billed job: exactly those are paid twice.
    unknown = sum(r["unknown_submits"] for r in rows)
    assert stats["accepted"] == len(spec) + unknown
    assert stats["paid_twice"] == unknown == stats["accepted_then_dropped"]
    # Requests reported by the client: never more than were made (aiohttp silently resends
    # a GET once on a dropped keep-alive connection, so it may report a few fewer).
    assert second.summary is not None
    made = _requests(stats) - _requests(before)
    dropped_gets = sum(
        stats["requests"][e].get("dropped", 0) - before["requests"].get(e, {}).get("dropped", 0)
        for e in ("status", "result")
    )
    assert made - dropped_gets <= second.summary.api_requests <= made


async def test_a_job_failed_more_than_once_is_retried_up_to_its_limit_and_its_polls_add_up(
    tmp_path: Path, sim: Any
) -> None:
    manifest = _write_manifest(
        tmp_path / "jobs.csv",
        [{"id": "only", "prompt": "sim:no-face", "face_image": "https://example.com/a.jpg"}],
    )
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    options = _options(
        manifest,
        tmp_path / "out",
        server,
        model="instantid",
        retry=RetryConfig(max_failed_retries=2),
    )

    result = await arun(options)

    assert result.exit_code == EXIT_FAILED_ROWS, result.text()
    (row,) = _results(tmp_path / "out")
    assert (row["status"], row["error"], row["attempts"]) == ("FAILED", FAILURES[0], 3)
    stats = server.stats()
    assert stats["accepted"] == 3
    assert (stats["billed"], stats["paid_twice"]) == (0, 0)  # FAILED jobs are not billed
    assert row["polls"] == _requests(stats, "status")  # the polls of every attempt


async def test_a_row_resubmitted_after_failed_is_billed_once_and_never_paid_twice(
    tmp_path: Path, sim: Any
) -> None:
    """FAILED jobs are not billed (API contract): resubmitting one pays for nothing twice."""
    spec = [{"id": f"r{n}", "prompt": f"portrait {n}", "face_image": "https://x/a.jpg"}
            for n in range(20)]  # fmt: skip
    manifest = _write_manifest(tmp_path / "jobs.csv", spec)
    server = await sim(
        time_scale=SCALE, fail_rate=0.3, credits_usd=10.0, image_size=(64, 64), seed=4
    )
    out = tmp_path / "out"
    retry = RetryConfig(max_failed_retries=20)  # no row fails 21 times in a row

    result = await arun(_options(manifest, out, server, model="instantid", retry=retry))

    assert result.exit_code == EXIT_OK, result.text()
    rows = _results(out)
    assert {r["status"] for r in rows} == {"COMPLETED"}
    attempts = sum(r["attempts"] for r in rows)
    assert attempts > len(spec), "no job failed: raise fail_rate"
    stats = server.stats()
    assert (stats["accepted"], stats["billed"]) == (attempts, len(spec))
    assert stats["paid_twice"] == 0
    assert stats["credits_remaining_usd"] == pytest.approx(10.0 - 0.025 * len(spec))


# -- 6. rows that cannot be sent, manifests that cannot be used ------------------------------


async def test_invalid_rows_are_recorded_with_the_column_and_never_sent(
    tmp_path: Path, sim: Any
) -> None:
    _face(tmp_path / "face.png")
    (tmp_path / "notes.png").write_text("not an image at all\n")
    spec = [
        {"id": "ok-1", "model": "instantid", "prompt": "p", "face_image": "face.png"},
        {"id": "range", "model": "instantid", "prompt": "p", "face_image": "face.png",
         "guidance_scale": 30},
        {"id": "enum", "model": "infinite-you", "prompt": "p", "id_image": "face.png",
         "output_format": "gif"},
        {"id": "missing", "model": "instantid", "prompt": "p", "face_image": "gone/face.png"},
        {"id": "not-image", "model": "infinite-you", "prompt": "p", "id_image": "notes.png"},
        {"id": "ok-2", "model": "infinite-you", "prompt": "p", "id_image": "face.png",
         "width": 256, "height": 256},
    ]  # fmt: skip
    column = {
        "range": "guidance_scale",
        "enum": "output_format",
        "missing": "face_image",
        "not-image": "id_image",
    }
    manifest = _write_manifest(tmp_path / "jobs.jsonl", spec)
    server = await sim(time_scale=SCALE, image_size=(64, 64))

    result = await arun(_options(manifest, tmp_path / "out", server))

    assert result.exit_code == EXIT_FAILED_ROWS
    rows = {r["id"]: r for r in _results(tmp_path / "out")}
    assert rows["ok-1"]["status"] == rows["ok-2"]["status"] == "COMPLETED"
    for row_id, name in column.items():
        row = rows[row_id]
        assert row["status"] == "INVALID"
        assert row["error"].startswith(name + "="), row["error"]
        assert row["request_id"] is None
        assert row["attempts"] == 0
    assert "30" in rows["range"]["error"]
    assert "gif" in rows["enum"]["error"]
    assert "not found" in rows["missing"]["error"]
    assert "not an image" in rows["not-image"]["error"]
    stats = server.stats()
    assert stats["accepted"] == 2
    assert _requests(stats, "submit") == 2


async def test_bad_inline_images_are_never_sent_and_good_ones_are_sent_byte_for_byte(
    tmp_path: Path, sim: Any
) -> None:
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, "PNG")  # 64 megapixels in a few kB
    face_url = "data:image/png;base64," + _b64_face((7, 8, 9))
    bad = {
        "bad-base64": "data:image/png;base64,!!!notbase64",
        "not-base64": "data:,hello",
        "text": "data:image/png;base64," + base64.b64encode(b"not pixels\n" * 9).decode(),
        "pixels": base64.b64encode(buf.getvalue()).decode(),
        "too-big": "data:image/png;base64,"
        + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(20 * 1024 * 1024)).decode(),
    }
    spec = [
        *({"id": i, "model": "instantid", "prompt": "p", "face_image": v} for i, v in bad.items()),
        # The same value on several rows, as a big manifest has it.
        *({"id": f"url-{n}", "model": "instantid", "prompt": "p", "face_image": face_url}
          for n in range(3)),
        {"id": "bare", "model": "infinite-you", "prompt": "p", "id_image": _b64_face((1, 1, 1)),
         "width": 256, "height": 256},
    ]  # fmt: skip
    manifest = _write_manifest(tmp_path / "jobs.jsonl", spec)
    server = await sim(time_scale=SCALE, image_size=(64, 64), retention_s=1e6)

    result = await arun(_options(manifest, tmp_path / "out", server))

    assert result.exit_code == EXIT_FAILED_ROWS
    rows = {r["id"]: r for r in _results(tmp_path / "out")}
    for row_id in bad:
        row = rows[row_id]
        assert (row["status"], row["attempts"], row["request_id"]) == ("INVALID", 0, None)
        assert row["error"].startswith(f"face_image=<inline data, {len(bad[row_id])} characters>: ")
    assert "not valid base64" in rows["bad-base64"]["error"]
    assert "not base64-encoded" in rows["not-base64"]["error"]
    assert "not an image" in rows["text"]["error"]
    assert "8000x8000" in rows["pixels"]["error"]
    assert "over the 20971520 byte limit" in rows["too-big"]["error"]
    stats = server.stats()
    assert stats["accepted"] == _requests(stats, "submit") == len(spec) - len(bad)
    for want in spec[len(bad) :]:
        row = rows[want["id"]]
        assert row["status"] == "COMPLETED", row["error"]
        job = server.emulator.jobs.get(row["request_id"])
        assert job is not None
        name = "face_image" if want["model"] == "instantid" else "id_image"
        assert job.params[name] == want[name]  # the manifest's text, byte for byte


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{"id": "a", "prompt": "p", "face_image": "https://e.x/f.jpg"},
             {"id": "a", "prompt": "q", "face_image": "https://e.x/f.jpg"}],
            "duplicate ids",
        ),
        (
            [{"id": "a", "prompt": "p", "face_image": "https://e.x/f.jpg", "guidanse_scale": 3}],
            'unknown column "guidanse_scale" (did you mean "guidance_scale"?)',
        ),
    ],
    ids=["duplicate-ids", "unknown-column"],
)  # fmt: skip
async def test_an_unusable_manifest_stops_before_any_request(
    tmp_path: Path, sim: Any, rows: list[dict[str, Any]], message: str
) -> None:
    manifest = _write_manifest(tmp_path / "jobs.csv", rows)
    server = await sim(time_scale=SCALE)

    with pytest.raises(ManifestError, match=re.escape(message)):
        await arun(_options(manifest, tmp_path / "out", server, model="instantid"))

    assert _requests(server.stats()) == 0
    assert not (tmp_path / "out" / CHECKPOINT).exists()


# -- 7. the rate limit ---------------------------------------------------------------------


async def test_under_the_emulators_limit_no_request_is_refused_and_requests_are_reported(
    tmp_path: Path, sim: Any
) -> None:
    _face(tmp_path / "face.png")
    spec = [{"id": f"r{n}", "prompt": f"p {n}", "face_image": "face.png"} for n in range(12)]
    manifest = _write_manifest(tmp_path / "jobs.csv", spec)
    # 50/min on the emulator, 40/min on the client; a coarser time scale keeps the
    # emulator's window (0.6 s) wide against scheduling jitter.
    scale = 0.01
    server = await sim(time_scale=scale, rate_limit=50, rate_period_s=60.0, image_size=(64, 64))
    options = _options(
        manifest,
        tmp_path / "out",
        server,
        model="instantid",
        rate=RateConfig(requests=40, period_s=60.0),
    )

    result = await arun(options)

    assert result.exit_code == EXIT_OK, result.text()
    stats = server.stats()
    assert _requests(stats, outcome="429") == 0
    assert result.summary is not None
    assert result.summary.rate_limited == 0
    # Every API request counted, and reported per completed job.
    made = _requests(stats)
    assert result.summary.api_requests == made
    assert made >= 3 * len(spec)  # submit + status + result, at least
    assert f"{made} API requests ({made / len(spec):.2f} per completed job)" in result.text()


async def test_a_binding_limit_thins_status_polls_to_about_one_per_job(
    tmp_path: Path, sim: Any
) -> None:
    """48 jobs at once at 60/min (time scale 0.01) need >= 144 requests, >= 144 model-s
    against a 7.7 s job: submits queue at the gate, its pressure reaches the schedule,
    and each job gets about one status poll. (A burst the rate drains at once is not
    pressure: tests/test_gate.py; here the pipeline's 32 submit workers never leave
    enough submits waiting at a slack rate for either rule to see one.)"""
    jobs = 48
    spec = [{"id": f"j{n:02d}", "prompt": f"p {n}", "face_image": "https://e.com/f.jpg"}
            for n in range(jobs)]  # fmt: skip
    manifest = _write_manifest(tmp_path / "jobs.csv", spec)
    server = await sim(time_scale=0.01, latency_sigma=0.35, image_size=(32, 32), seed=5)
    rate = RateConfig(requests=60, period_s=60.0)
    out = tmp_path / "out"
    result = await arun(_options(manifest, out, server, model="instantid", rate=rate,
                                 max_in_flight=jobs))  # fmt: skip

    assert result.exit_code == EXIT_OK, result.text()
    rows = _results(out)
    assert [r["status"] for r in rows] == ["COMPLETED"] * jobs
    assert _requests(server.stats(), "status") == sum(r["polls"] for r in rows)
    bound = sum(r["polls"] for r in rows) / jobs
    # The floor is 1 (one status poll, then the result). Without pressure (bind_s not
    # time-scaled, say), the gate's queue alone, delaying every poll, leaves ~1.7.
    assert bound <= 1.35, bound


async def test_every_request_is_counted_once_through_retries_and_resent_submits(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three rows meet a 502, then a connection lost after sending, then get through."""
    spec = [
        {"id": f"r{n}", "prompt": f"{'flaky' if n % 2 else 'plain'} {n}",
         "face_image": "https://example.com/f.jpg"}
        for n in range(6)
    ]  # fmt: skip
    manifest = _write_manifest(tmp_path / "jobs.csv", spec)
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    real_submit = ApiClient.submit
    calls: Counter[str] = Counter()

    async def flaky_submit(self: ApiClient, model: str, body: bytes) -> Reply:
        prompt = str(json.loads(body)["prompt"])
        calls[prompt] += 1
        if prompt.startswith("flaky") and calls[prompt] == 1:
            return Reply(502, {"error": "Bad gateway"})
        if prompt.startswith("flaky") and calls[prompt] == 2:
            raise TransportError("connection lost (ServerDisconnectedError)", maybe_sent=True)
        return await real_submit(self, model, body)

    monkeypatch.setattr(ApiClient, "submit", flaky_submit)

    result = await arun(
        _options(manifest, tmp_path / "out", server, model="instantid", resubmit_unknown=True)
    )

    assert result.exit_code == EXIT_OK, result.text()
    for row in _results(tmp_path / "out"):
        flaky = row["id"] in ("r1", "r3", "r5")
        assert (row["attempts"], row["retries"], row["unknown_submits"]) == (
            (2, 1, 1) if flaky else (1, 0, 0)
        )
    # The emulator saw every request but the 502 and the lost one of each flaky row.
    assert result.summary is not None
    assert result.summary.api_requests == _requests(server.stats()) + 2 * 3
