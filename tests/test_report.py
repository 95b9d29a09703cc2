"""`batcher report`: figures checked against values computed here; the chart, with and
without matplotlib."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import statistics
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from conftest import StartSim, results_by_id, sim_run_options, url_manifest
from PIL import Image

from batcher.checkpoint import CHECKPOINT, RESULTS_FRESH, RESULTS_META, RESULTS_STALE
from batcher.errors import UsageError, reason_key
from batcher.inputs import ImageInputs
from batcher.pipeline import Counters
from batcher.progress import summarize
from batcher.report import (
    CHART,
    CHART_HINT,
    build_report,
    read_results,
    report_main,
    uncovered,
)
from batcher.report_text import format_report
from batcher.results import (
    RESULTS,
    SCHEMA,
    SUMMARY_COLUMNS,
    TIME_SCALE_KEY,
    _params_for_results,
    time_scale_of,
)
from batcher.run import arun
from batcher.schemas import get_model
from batcher.sim import SimConfig, SimServer

#: A results.parquet from before the 429, download and result read counts and spans_stop.
OLD_SCHEMA = pa.schema([
    f for f in SCHEMA
    if f.name not in ("rate_limited", "download_retries", "result_reads", "spans_stop")
])  # fmt: skip

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
UUID = "{:08x}-1234-4abc-8def-0123456789ab"


def write(out: Path, rows: list[dict[str, Any]], schema: pa.Schema = SCHEMA) -> Path:
    """results.parquet with every SCHEMA column; columns a row does not give are null."""
    out.mkdir(parents=True, exist_ok=True)
    full = [{f.name: r.get(f.name) for f in schema} for r in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=schema), out / RESULTS)
    return out


def completion_times() -> list[float]:
    """150 completions every 2 s for 5 minutes, then 50 every 6 s: 30/min, then 10/min."""
    return [2.0 * i for i in range(150)] + [300.0 + 6.0 * i for i in range(50)]


def run_rows() -> list[dict[str, Any]]:
    rng = random.Random(7)
    rows: list[dict[str, Any]] = []
    for i, t in enumerate(completion_times()):
        latency = rng.lognormvariate(3.0, 0.5)
        inference = latency * rng.uniform(0.3, 0.7)
        metrics: dict[str, float] = {"inference_time": inference}
        if i % 10:  # every 10th server answer lacks queue_time
            metrics["queue_time"] = rng.uniform(0.0, 5.0)
        rows.append({
            "id": f"c{i}", "row": i, "model": "instantid", "status": "COMPLETED",
            "attempts": 2 if i % 25 == 0 else 1, "retries": 1 if i % 40 == 0 else 0,
            "unknown_submits": 0, "polls": rng.randint(1, 8),
            "submitted_at": T0 + timedelta(seconds=t - latency),
            "completed_at": T0 + timedelta(seconds=t),
            "latency_s": latency, "notice_lag_s": rng.uniform(0.0, 4.0),
            "inference_time": inference, "metrics": json.dumps(metrics), "outputs": ["a.png"],
        })  # fmt: skip
    errors = ["FAILED (422): NSFW content detected"] * 3 + [
        f"job {UUID.format(1)} timed out",
        f"job {UUID.format(2)} timed out",
        None,
    ]
    for j, error in enumerate(errors):
        rows.append({
            "id": f"f{j}", "row": 1000 + j, "model": "instantid", "status": "FAILED",
            "error": error, "attempts": 2, "retries": 3, "unknown_submits": 1 if j == 5 else 0,
            "polls": 4, "submitted_at": T0,
        })  # fmt: skip
    for k in range(4):
        rows.append({"id": f"i{k}", "row": 2000 + k, "status": "INVALID", "error": "bad seed",
                     "attempts": 0, "retries": 0, "unknown_submits": 0, "polls": 0})  # fmt: skip
    rows.append({"id": "p0", "row": 3000, "status": "PENDING", "attempts": 0, "polls": 0})
    return rows


def pct(values: list[float]) -> list[float]:
    """p50, p90, p95, p99, max, by linear interpolation, independently of the module."""
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return [cuts[49], cuts[89], cuts[94], cuts[98], max(values)]


def figures(text: str, prefix: str) -> list[float]:
    """The numbers on the line of ``text`` that starts with ``prefix``."""
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(prefix)]
    return [float(w) for w in line[len(line) - len(line.lstrip()) + len(prefix) :].split()]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write(tmp_path / "run", run_rows(), OLD_SCHEMA)


def test_text_report_numbers(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_rows()
    done = [r for r in rows if r["status"] == "COMPLETED"]
    assert report_main(run_dir, chart=False) == 0
    text = capsys.readouterr().out
    assert f"{run_dir / RESULTS}: {len(rows)} rows" in text
    assert "completed 200, failed 6, invalid 4, not finished 1" in text

    # Failed reasons: ids masked so both timeouts group; the missing text has its own group.
    assert "       3  FAILED (422): NSFW content detected" in text
    assert "       2  job <id> timed out" in text
    assert "       1  (no error text)" in text

    # Throughput: 30 s buckets, ten of 15 completions (30/min) then ten of 5 (10/min).
    assert "in 30 s buckets" in text
    buckets = [ln.split() for ln in text.splitlines() if ln.startswith("  12:")]
    assert [b[0] for b in buckets[:3]] == ["12:00:00", "12:00:30", "12:01:00"]
    assert [int(b[1]) for b in buckets] == [15] * 10 + [5] * 10
    assert [b[2] for b in buckets] == ["30.0/min"] * 10 + ["10.0/min"] * 10
    first_submit = min(r["submitted_at"] for r in rows if r.get("submitted_at"))
    span = (T0 + timedelta(seconds=594) - first_submit).total_seconds()
    assert f"the last at 2024-05-01 12:09:54 UTC, {200 * 60 / span:.1f}/min" in text

    # Latency percentiles over completed rows, each figure to the printed 2 decimals.
    queue = [json.loads(r["metrics"])["queue_time"] for i, r in enumerate(done) if i % 10]
    for prefix, values in (
        ("queue time (server)", queue),
        ("inference_time (server)", [r["inference_time"] for r in done]),
        ("end-to-end latency_s", [r["latency_s"] for r in done]),
    ):
        n, *printed = figures(text, prefix)
        assert n == len(values)
        assert printed == pytest.approx(pct(values), abs=0.0051)

    polls = [r["polls"] for r in done]
    assert (
        f"polls per completed job: mean {statistics.fmean(polls):.2f}, "
        f"p95 {pct(polls)[2]:.2f}, max {max(polls)}" in text
    )
    lags = [r["notice_lag_s"] for r in done]
    assert f"mean {statistics.fmean(lags):.2f} s, p95 {pct(lags)[2]:.2f} s" in text

    submits = sum(r.get("attempts") or 0 for r in rows)
    all_polls = sum(r.get("polls") or 0 for r in rows)
    retries = sum(r.get("retries") or 0 for r in rows)
    total = submits + all_polls + 200 + retries
    # An older file, no 429 or download_retries column: the line says what it leaves
    # out, not "0 answered 429", and what its repeats may hold.
    assert (
        f"API requests: {total} ({submits} submits + {all_polls} polls + 200 results, "
        f"{retries} repeated after a 5xx or a lost connection): "
        f"{total / 200:.2f} per completed job, not counting requests repeated after a 429, "
        "the repeats may include image downloads (a results.parquet from an earlier batcher "
        "counted them together), results counted as one per completed job (a "
        "results.parquet from an earlier batcher did not count them)\n"
        "unknown submit outcomes 1\n" in text
    )
    assert "stop" not in text  # an older file: no word of stops it cannot tell


#: The note of a table whose completed rows include one seen done after a stop.
STOP_NOTE = (
    "1 completed job was submitted before a stop and seen done after it: its latency_s and "
    "notice_lag_s include the stop and are left out of those figures"
)


def spanning_rows() -> list[dict[str, Any]]:
    """run_rows() and a job submitted before an 8-hour stop, seen done after it, and a
    FAILED one that a resumed run saw fail."""
    night = 8 * 3600.0
    return [
        *run_rows(),
        {"id": "night", "row": 4000, "status": "COMPLETED", "attempts": 1, "polls": 3,
         "submitted_at": T0, "completed_at": T0 + timedelta(seconds=594),
         "latency_s": night, "notice_lag_s": night - 20.0, "inference_time": 11.0,
         "metrics": json.dumps({"queue_time": 9.0, "inference_time": 11.0}),
         "outputs": ["n.png"], "spans_stop": True},
        {"id": "night-failed", "row": 4001, "status": "FAILED", "error": "NSFW",
         "attempts": 1, "polls": 2, "submitted_at": T0, "spans_stop": True},
    ]  # fmt: skip


def test_latencies_that_span_a_stop_are_left_out_of_the_latency_figures_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: one job seen done 8 hours after its submit (the run was stopped overnight)
    set the max and moved p99 of the end-to-end latency and notice lag by hours. The
    server's times (queue, inference) and every count keep it."""
    rows = spanning_rows()
    kept = [r for r in rows if r["status"] == "COMPLETED" and not r.get("spans_stop")]
    done = [r for r in rows if r["status"] == "COMPLETED"]
    out = write(tmp_path / "run", rows)

    assert report_main(out, chart=False) == 0
    text = capsys.readouterr().out
    assert "completed 201, failed 7" in text
    n, *printed = figures(text, "end-to-end latency_s")
    assert (n, printed) == (200, pytest.approx(pct([r["latency_s"] for r in kept]), abs=0.0051))
    lags = [r["notice_lag_s"] for r in kept]
    assert f"mean {statistics.fmean(lags):.2f} s, p95 {pct(lags)[2]:.2f} s\n{STOP_NOTE}\n" in text
    n, *printed = figures(text, "inference_time (server)")
    assert (n, printed) == (
        201,
        pytest.approx(pct([r["inference_time"] for r in done]), abs=0.0051),
    )
    assert figures(text, "queue time (server)")[0] == 181  # 180 of run_rows(), and its own
    assert "throughput: 201 completions" in text
    report = build_report(*read_results(out))
    assert report.spanning == 1
    assert sorted(report.latency_values.to_pylist()) == sorted(r["latency_s"] for r in kept)
    assert report_main(out) == 0  # the chart, its histogram without the row, draws


def test_a_table_from_before_spans_stop_reports_every_latency_and_no_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A results.parquet of an older batcher cannot tell which latencies span a stop:
    each is kept, and nothing is said about stops."""
    out = write(tmp_path / "run", spanning_rows(), OLD_SCHEMA)

    assert report_main(out, chart=False) == 0
    text = capsys.readouterr().out
    assert figures(text, "end-to-end latency_s")[0] == 201
    assert figures(text, "end-to-end latency_s")[-1] == 8 * 3600.0
    assert "stop" not in text
    assert build_report(*read_results(out)).spanning == 0


def test_the_run_summary_leaves_latencies_that_span_a_stop_out_and_says_so(
    tmp_path: Path,
) -> None:
    """Before: the summary's p50/p95 took the 8-hour latency in. An older file (no
    column) keeps it, and says nothing of stops."""
    rows = spanning_rows()
    kept = [r["latency_s"] for r in rows if r.get("latency_s") and not r.get("spans_stop")]
    cuts = statistics.quantiles(kept, n=100, method="inclusive")
    inference = sum(r.get("inference_time") or 0.0 for r in rows)  # the night's too

    summary = summarize(write(tmp_path / "new", rows) / RESULTS, Counters(), 0, 1.0)
    old = summarize(write(tmp_path / "old", rows, OLD_SCHEMA) / RESULTS, Counters(), 0, 1.0)

    assert (summary.latency_p50, summary.latency_p95) == pytest.approx((cuts[49], cuts[94]))
    assert summary.inference_total_s == pytest.approx(inference)
    lines = summary.text().splitlines()
    assert lines[lines.index(STOP_NOTE) - 1].startswith("latency p50 ")
    assert old.spanning == 0
    assert old.latency_p95 is not None
    assert old.latency_p95 > cuts[94]
    assert "stop" not in old.text()


def test_a_summary_whose_every_latency_spans_a_stop_still_gives_the_inference_time() -> None:
    table = pa.table(
        {"status": ["COMPLETED"], "error": [None], "latency_s": [28800.0],
         "inference_time": [11.0], "unknown_submits": [0], "spans_stop": [True]},
        schema=pa.schema([SCHEMA.field(name) for name in SUMMARY_COLUMNS]),
    )  # fmt: skip
    summary = summarize(table, Counters(), 0, 1.0)
    assert summary.latency_p50 is None
    assert summary.text().splitlines()[-2:] == ["total inference_time 11.0 s", STOP_NOTE]


def test_report_object_matches_independent_percentiles(run_dir: Path) -> None:
    path, table = read_results(run_dir)
    report = build_report(path, table)
    latencies = [r["latency_s"] for r in run_rows() if r["status"] == "COMPLETED"]
    s = report.latency["end-to-end latency_s"]
    assert [s.p50, s.p90, s.p95, s.p99, s.max] == pytest.approx(pct(latencies), rel=1e-9)
    assert report.throughput is not None
    assert report.throughput.bucket_s == 30
    assert report.rate_limited is None


def test_rate_limited_column_is_reported_when_present(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{"id": "a", "status": "COMPLETED", "rate_limited": 3},
            {"id": "b", "status": "FAILED", "rate_limited": 2}]  # fmt: skip
    out = write(tmp_path, rows)
    path, table = read_results(out)
    assert build_report(path, table).rate_limited == 5
    assert report_main(out, chart=False) == 0
    assert "5 answered 429)" in capsys.readouterr().out


def test_empty_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = write(tmp_path, [])
    assert report_main(out) == 0
    text = capsys.readouterr().out
    assert "0 rows" in text
    assert "completed 0, failed 0, invalid 0" in text
    assert "throughput: no completed rows" in text
    assert "no chart: no completed rows" in text
    assert "latency of completed jobs" not in text
    assert not (out / CHART).exists()


def test_all_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"id": str(i), "row": i, "status": "FAILED", "error": "FAILED (422): boom",
             "attempts": 2, "polls": 3, "retries": 0, "unknown_submits": 0,
             "submitted_at": T0} for i in range(5)]  # fmt: skip
    out = write(tmp_path, rows)
    assert report_main(out) == 0
    text = capsys.readouterr().out
    assert "completed 0, failed 5, invalid 0" in text
    assert "       5  FAILED (422): boom" in text
    assert "throughput: no completed rows" in text
    assert (
        "API requests: 25 (10 submits + 15 polls + 0 results, 0 repeated after a 5xx or a "
        "lost connection, 0 answered 429)\n" in text
    )
    assert "per completed job" not in text
    assert "polls per completed job" not in text
    assert not (out / CHART).exists()


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"results\.parquet: no such file"):
        report_main(tmp_path / "nowhere")
    (tmp_path / RESULTS).write_text("not parquet")
    with pytest.raises(UsageError, match="not a readable Parquet file"):
        report_main(tmp_path)
    pq.write_table(pa.table({"x": [1]}), tmp_path / RESULTS)
    with pytest.raises(UsageError, match="not a batcher results file"):
        report_main(tmp_path)


def test_a_column_of_another_type_is_a_clear_error_or_read_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a traceback (ArrowNotImplementedError: "Function 'quantile' has no kernel
    matching input types (string)") for a table whose columns are not batcher's types.
    A table saved again by another tool (whole numbers as floats, text dictionary-
    encoded, timestamps without a zone) is read as batcher wrote it."""
    pq.write_table(pa.table({"status": ["COMPLETED"], "latency_s": ["fast"]}), tmp_path / RESULTS)
    with pytest.raises(UsageError) as info:
        report_main(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / RESULTS}: column latency_s holds string, not double: not a batcher "
        "results file"
    )
    resaved = pa.table({
        "status": pa.array(["COMPLETED", "FAILED"]).dictionary_encode(),
        "attempts": [1.0, 2.0], "polls": [2.0, 3.0], "latency_s": [4, 5],
        "completed_at": pa.array([T0.replace(tzinfo=None), None], pa.timestamp("ns")),
    })  # fmt: skip
    pq.write_table(resaved, tmp_path / RESULTS)
    assert report_main(tmp_path, chart=False) == 0
    text = capsys.readouterr().out
    assert "completed 1, failed 1, invalid 0" in text
    assert "throughput: 1 completions, the last at 2024-05-01 12:00:00 UTC" in text
    assert "API requests: 9 (3 submits + 5 polls + 1 results)" in text


def test_accepts_the_parquet_file_itself(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_main(run_dir / RESULTS, chart=False) == 0
    assert "completed 200" in capsys.readouterr().out


def test_chart_png(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    assert report_main(run_dir) == 0
    assert f"chart: {run_dir / CHART}" in capsys.readouterr().out
    with Image.open(run_dir / CHART) as image:
        assert image.format == "PNG"
        assert image.size == (1000, 700)
        image.load()  # decodes every pixel, not just the header
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None
        assert len(colors) > 10  # bars, text and lines drawn, not a blank canvas
    assert not list(run_dir.glob("*.part"))


def test_the_chart_goes_through_a_new_temporary_file_never_a_planted_link(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the chart was written through ``report.png.part``, a fixed name, so a link
    there had its target overwritten (and report.png became a link to it)."""
    pytest.importorskip("matplotlib")
    victim = tmp_path / "precious.txt"
    victim.write_text("precious")
    (run_dir / f"{CHART}.part").symlink_to(victim)

    assert report_main(run_dir) == 0

    assert victim.read_text() == "precious"
    assert not (run_dir / CHART).is_symlink()
    with Image.open(run_dir / CHART) as image:
        assert image.format == "PNG"
    assert [p.name for p in run_dir.glob("*.part")] == [f"{CHART}.part"]  # only the link


def test_a_killed_reports_temporary_file_goes_with_the_next_report(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: each report killed while writing the chart left a ``report.png.*.part``
    for ever. Only that writer's own names go: not a user's file, not through a link."""
    pytest.importorskip("matplotlib")
    stale = aged(run_dir / f"{CHART}.0badc0de.part")
    theirs = [aged(run_dir / n) for n in (f"{CHART}.draft.part", f"{CHART}.0badc0d.part")]
    victim = aged(tmp_path / "precious.part")
    (run_dir / f"{CHART}.1badc0de.part").symlink_to(victim)

    assert report_main(run_dir) == 0

    assert not stale.exists()
    assert all(p.read_bytes() == b"half a chart" for p in theirs)
    assert victim.read_bytes() == b"half a chart"
    assert (run_dir / f"{CHART}.1badc0de.part").is_symlink()
    with Image.open(run_dir / CHART) as image:
        assert image.format == "PNG"


def aged(path: Path) -> Path:
    """A file at ``path`` last written an hour ago."""
    path.write_bytes(b"half a chart")
    then = (datetime.now(UTC) - timedelta(hours=1)).timestamp()
    os.utime(path, (then, then))
    return path


def test_a_folder_at_the_charts_name_is_a_clear_error(run_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    (run_dir / CHART).mkdir()
    with pytest.raises(UsageError, match=r"report\.png: cannot write the chart"):
        report_main(run_dir)
    assert not list(run_dir.glob("*.part"))


def test_no_chart_flag(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_main(run_dir, chart=False) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not [ln for ln in lines if ln.startswith(("chart:", "no chart:"))]
    assert not (run_dir / CHART).exists()


def test_without_matplotlib(
    run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes any import of that name raise ImportError.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert report_main(run_dir) == 0
    text = capsys.readouterr().out
    assert "completed 200" in text
    assert text.rstrip().endswith(CHART_HINT)
    assert "pip install 'batcher[report]'" in CHART_HINT
    assert not (run_dir / CHART).exists()


def test_queue_time_only_where_the_server_sent_a_number(tmp_path: Path) -> None:
    metrics = ['{"queue_time": 1.5e-05, "inference_time": 2}', '{"queue_time": null}',
               '{"queue_time": "3"}', '{"total_time": 4}', None]  # fmt: skip
    rows = [{"id": str(i), "status": "COMPLETED", "metrics": m} for i, m in enumerate(metrics)]
    path, table = read_results(write(tmp_path, rows))
    spread = build_report(path, table).latency["queue time (server)"]
    assert (spread.n, spread.p50, spread.max) == (1, 1.5e-05, 1.5e-05)


def test_long_run_with_a_gap_keeps_empty_buckets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two sessions two days apart (a resumed run): the quiet hours show as zero buckets.
    days = [0.0, 60.0, 2 * 86400.0, 2 * 86400.0 + 7200.0]
    rows = [{"id": str(i), "status": "COMPLETED", "submitted_at": T0 + timedelta(seconds=t),
             "completed_at": T0 + timedelta(seconds=t + 30), "latency_s": 30.0}
            for i, t in enumerate(days)]  # fmt: skip
    assert report_main(write(tmp_path, rows), chart=False) == 0
    text = capsys.readouterr().out
    assert "in 3 h buckets" in text
    buckets = [ln.split() for ln in text.splitlines() if ln.startswith("  05-")]
    assert buckets[0][:3] == ["05-01", "12:00", "2"]
    assert buckets[-1][:3] == ["05-03", "12:00", "2"]
    assert sum(int(b[2]) for b in buckets) == 4
    assert len(buckets) == 17  # 05-01 12:00 to 05-03 14:00:30 in 3 h buckets


def test_the_first_and_last_buckets_say_how_much_of_them_the_run_covers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Buckets start on round times, so the first begins before the first submit and the
    last ends after the last completion: their counts read low with nothing to say so,
    and a benchmark's first minute looked slower than it was."""
    # Submitted at 12:00:40; one completion a minute from 12:01:10 to 12:30:10: 2 min
    # buckets from 12:00 to 12:32, the first with 80 s of run, the last with 10 s.
    rows = [{"id": str(i), "status": "COMPLETED", "submitted_at": T0 + timedelta(seconds=40),
             "completed_at": T0 + timedelta(seconds=70 + 60 * i), "latency_s": 30.0 + 60 * i}
            for i in range(30)]  # fmt: skip
    assert report_main(write(tmp_path, rows), chart=False) == 0
    text = capsys.readouterr().out
    assert "in 2 min buckets" in text
    buckets = [ln for ln in text.splitlines() if ln.startswith("  12:")]
    assert len(buckets) == 16
    assert buckets[0].split()[:3] == ["12:00:00", "1", "0.5/min"]
    assert buckets[0].endswith("  (partial: 80 s of it in the run)")
    assert buckets[-1].split()[:3] == ["12:30:00", "1", "0.5/min"]
    assert buckets[-1].endswith("  (partial: 10 s of it in the run)")
    assert not any("partial" in b for b in buckets[1:-1])


def _checkpoint_saying(folder: Path, results: str) -> None:
    """A checkpoint beside the table whose meta says the table is ``results``."""
    db = sqlite3.connect(folder / CHECKPOINT)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES (?, ?)", (RESULTS_META, results))
    db.commit()
    db.close()


def test_a_table_older_than_its_checkpoint_says_so(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _checkpoint_saying(run_dir, RESULTS_STALE)
    assert report_main(run_dir, chart=False) == 0
    text = capsys.readouterr().out
    assert text.startswith("note: this table is older than the run's checkpoint")
    assert "completed 200" in text  # and the report follows


def test_an_up_to_date_table_has_no_note(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _checkpoint_saying(run_dir, RESULTS_FRESH)
    assert report_main(run_dir, chart=False) == 0
    assert "note:" not in capsys.readouterr().out


def test_a_run_stopped_before_its_first_table_says_how_to_get_one(tmp_path: Path) -> None:
    _checkpoint_saying(tmp_path, RESULTS_STALE)
    with pytest.raises(UsageError, match=r"not written yet: the run in .* was stopped before"):
        report_main(tmp_path)


@pytest.mark.parametrize(
    ("error", "key"),
    [
        (
            "request 3f2a9c1e-5d2b-4c1a-9e7f-0123456789ab is gone (expired or unknown)",
            "request <id> is gone (expired or unknown)",
        ),
        (
            "output could not be downloaded: HTTP 503 Service Unavailable from "
            "http://127.0.0.1:8601/outputs/ab12/x.png",
            "output could not be downloaded: HTTP 503 Service Unavailable from <url>",
        ),
        ("  two\n  lines ", "two lines"),
        (None, "(no error text)"),
        ("x" * 150, "x" * 97 + "..."),
    ],
)
def test_failures_group_by_their_reason_not_their_ids_or_urls(error: str | None, key: str) -> None:
    assert reason_key(error) == key


def _gave_up(tries: int, last: str) -> str:
    return (
        f"no usable answer about this job within half its result's retention ({tries} tries "
        f"in a row; last: {last}); it may have been billed. --retry-failed submits it again"
    )


def test_failures_that_differ_only_in_their_count_of_tries_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "failed x10 ... (15 tries ...)" and "failed x5 ... (17 tries ...)", a line
    per count, in the report and in the run's summary."""
    errors = [_gave_up(15, f"HTTP 503 from http://h/{i}") for i in range(10)]
    errors += [_gave_up(17, "HTTP 503 from http://h/x")] * 5 + [_gave_up(16, "HTTP 502")]
    errors += ["gave up after 8 attempts: HTTP 500", "gave up after 3 attempts: HTTP 500"]
    rows = [{"id": str(i), "status": "FAILED", "error": e} for i, e in enumerate(errors)]
    out = write(tmp_path, rows)

    assert report_main(out, chart=False) == 0
    text = capsys.readouterr().out
    said = "no usable answer about this job within half its result's retention (15-17 tries"
    # The last reason (503, 502) is past the cut: the 16 rows read alike, so one line.
    assert (
        f"failed by reason:\n      16  {said} in a row; last: HTTP ...\n"
        "       2  gave up after 3-8 attempts: HTTP 500\nthroughput" in text
    )

    summary = summarize(out / RESULTS, Counters(), 0, 1.0).text()
    assert summary.splitlines()[-2:] == [
        f"  failed x16: {said} in a row; last: HTTP ...",
        "  failed x2: gave up after 3-8 attempts: HTTP 500",
    ]


def test_repeated_image_downloads_are_counted_apart_from_api_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Image downloads go to the image host, not the API, and no rate limit counts them:
    their repeats are a line of their own, never in the API request total."""
    rows = [{"id": str(i), "row": i, "status": "COMPLETED", "attempts": 1, "polls": 2,
             "retries": 1 if i == 0 else 0, "download_retries": 3, "rate_limited": 0,
             "result_reads": 1, "submitted_at": T0, "completed_at": T0 + timedelta(seconds=10 + i),
             "latency_s": 10.0} for i in range(4)]  # fmt: skip
    out = write(tmp_path, rows)
    report = build_report(*read_results(out))
    assert report.api_requests == 4 + 8 + 4 + 1  # submits, polls, results, one 5xx repeat
    assert report.download_retries == 12
    assert report_main(out, chart=False) == 0
    text = capsys.readouterr().out
    assert (
        "API requests: 17 (4 submits + 8 polls + 4 results, 1 repeated after a 5xx or a lost "
        "connection, 0 answered 429): 4.25 per completed job\n"
        "image downloads repeated after a cut body, a lost connection or a timeout: 12 (not "
        "API requests)\n" in text
    )


def test_requests_after_an_outage_count_the_repeated_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run stopped by a 5xx outage: no submit got a job, every request was answered 5xx
    and repeated. Before: "API requests: 0 (0 submits + 0 polls + 0 results), not counting
    requests repeated after a 429, 5xx or lost connection", the 125 on another line."""
    rows = [{"id": str(i), "status": "PENDING", "attempts": 0, "polls": 0,
             "retries": 7 if i < 5 else 6, "rate_limited": 0} for i in range(20)]  # fmt: skip
    out = write(tmp_path, rows)
    assert report_main(out, chart=False) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3:] == [
        "API requests: 125 (0 submits + 0 polls + 0 results, 125 repeated after a 5xx or a "
        "lost connection, 0 answered 429)",
        "unknown submit outcomes 0",
    ]


def test_a_folder_at_the_results_name_is_named_as_a_folder(tmp_path: Path) -> None:
    """Before: "results.parquet: no such file; pass the --out DIR of a `batcher run`"."""
    out = tmp_path / "out"
    (out / RESULTS).mkdir(parents=True)
    with pytest.raises(UsageError) as info:
        report_main(out)
    assert str(info.value) == (
        f"{out / RESULTS}: is a folder, not the results file a run writes (a Parquet dataset "
        "written by another tool?): move it away"
    )
    sqlite3.connect(out / CHECKPOINT).close()  # a run's folder: its next run writes the file
    for given in (out, out / RESULTS):
        with pytest.raises(UsageError) as info:
            report_main(given)
        assert str(info.value) == (
            f"{out / RESULTS}: is a folder, not the results file a run writes (a Parquet "
            "dataset written by another tool?): move it away. Run the same `batcher run` "
            "command again to write the table"
        )
    fifo = tmp_path / "pipe" / RESULTS
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(UsageError) as info:
        report_main(fifo.parent)
    assert str(info.value) == f"{fifo}: is not a regular file (a pipe or a device?)"


def _api_requests_seen(server: SimServer) -> int:
    """API requests the emulator answered or dropped (image downloads are not API requests)."""
    requests = server.stats()["requests"]
    return sum(n for endpoint, by in requests.items() if endpoint != "output" for n in by.values())


async def test_every_result_read_is_counted_not_one_per_completed_row(
    tmp_path: Path, sim: StartSim, api_key: str
) -> None:
    """Before: the report took one result read per COMPLETED row. Links that refuse (a
    CDN without the file yet) make the run read the result again for fresh links: 10
    rows, 20 result reads at the emulator, "API requests: 31" for its 41."""
    server = await sim(time_scale=0.002, output_delay_s=100.0, image_size=(16, 16), seed=3)
    options = sim_run_options(url_manifest(tmp_path, 10), server, api_key, model="instantid")

    result = await arun(options)

    assert result.exit_code == 0, result.text()
    reads = sum(server.stats()["requests"]["result"].values())
    assert reads > 10  # some results were read again
    report = build_report(*read_results(options.out))
    assert report.requests is not None
    assert report.requests[2] == reads
    assert report.api_requests == _api_requests_seen(server)
    assert f": {report.api_requests / 10:.2f} per completed job" in format_report(report)


async def test_notice_lag_ends_at_the_poll_that_saw_the_job_done_not_at_its_result(
    tmp_path: Path, api_key: str
) -> None:
    """Before: latency_s and notice_lag_s ("how late polling noticed") ran to the end of
    the result read that follows the poll, so its wait at a binding rate limit (a token:
    1.25 s at 48/min) or a slow answer (inline images) counted as polling lag. Here each
    result answer takes 0.3 s: every row's lag was the emulator's + 0.3 s."""
    slow_s = 0.3

    @web.middleware
    async def slow_results(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/v2/requests/") and not request.path.endswith("/status"):
            await asyncio.sleep(slow_s)
        response: web.StreamResponse = await handler(request)
        return response

    config = SimConfig(time_scale=0.002, retention_s=1e6, image_size=(16, 16), seed=3)
    async with SimServer(config, middlewares=[slow_results]) as server:
        options = sim_run_options(url_manifest(tmp_path, 6), server, api_key, model="instantid")
        result = await arun(options)
        rows = results_by_id(options.out).values()
        jobs = {r["id"]: server.emulator.jobs.get(r["request_id"]) for r in rows}

    assert result.exit_code == 0, result.text()
    for row in rows:
        job = jobs[row["id"]]
        assert job is not None
        assert job.first_seen_done is not None
        # The poll's answer left the emulator at first_seen_done: a few ms of travel.
        assert row["notice_lag_s"] == pytest.approx(job.first_seen_done - job.done_at, abs=0.1)
        assert row["latency_s"] == pytest.approx(job.first_seen_done - job.submitted_at, abs=0.1)


async def test_a_time_scaled_run_says_its_durations_are_not_the_services(
    tmp_path: Path, sim: StartSim, api_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, `batcher run --simulate` and `batcher report` of its folder gave InstantID
    an inference_time of 0.07 s and 1,500 jobs/min, with no word that the emulator ran
    100 x faster than the service: a newcomer's first figures were wrong by 100 x."""
    server = await sim(time_scale=0.01, latency_median_s={"instantid": 0.5}, image_size=(8, 8))
    options = sim_run_options(url_manifest(tmp_path, 3), server, api_key, model="instantid")

    result = await arun(options)

    assert result.exit_code == 0, result.text()
    note = "emulated at time scale 0.01: job durations here are 0.01 x the real service's, and "
    note += "rates 100 x"
    assert result.summary is not None
    assert result.summary.text().splitlines()[1] == note
    assert report_main(options.out, chart=False) == 0
    assert capsys.readouterr().out.splitlines()[2] == note


def test_a_table_at_the_services_pace_or_of_another_tool_has_no_scale_note(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert time_scale_of(pq.read_schema(run_dir / RESULTS)) == 1.0  # written by pyarrow here
    assert report_main(run_dir, chart=False) == 0
    assert "time scale" not in capsys.readouterr().out
    for junk in (b"", b"x", b"nan", b"-1", b"0"):
        assert time_scale_of(SCHEMA.with_metadata({TIME_SCALE_KEY: junk})) == 1.0
    assert time_scale_of(SCHEMA.with_metadata({TIME_SCALE_KEY: b"0.25"})) == 0.25


def test_uncovered_time_is_the_time_no_span_covers() -> None:
    assert uncovered([], 0, 10) == 10
    assert uncovered([(2, 4), (3, 6), (8, 9)], 0, 10) == 2 + 2 + 1
    assert uncovered([(5, 7), (0, 6)], 0, 10) == 3  # unsorted, overlapping
    assert uncovered([(-5, 1), (9, 20)], 0, 10) == 8  # spans past either end
    assert uncovered([(1, 2)], 0, 1) == 1  # a span after the end
    assert uncovered([(0, 10), (2, 3)], 0, 10) == 0
    assert uncovered([(10, 5), (12, 20)], 0, 20) == 12  # a span ending before it begins
    assert uncovered([(11, 12)], 10, 5) == 0  # an empty window (was -5)


def test_throughput_over_the_time_jobs_were_in_flight_leaves_out_a_stop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """run_rows() (10 minutes), an 8-hour stop, then 60 jobs in 10 minutes, and a job
    submitted before the stop and seen done after it (its span is the stop itself, not
    time the run worked). Before: only 200-odd completions over 8 h 20 min."""
    night = timedelta(hours=8)
    resumed = T0 + timedelta(seconds=594) + night
    later = [{
        "id": f"r{k}", "row": 5000 + k, "status": "COMPLETED", "attempts": 1, "polls": 2,
        "submitted_at": resumed + timedelta(seconds=10 * k),
        "completed_at": resumed + timedelta(seconds=10 * k + 20), "latency_s": 20.0,
    } for k in range(60)]  # fmt: skip
    spanning = {"id": "night", "row": 4000, "status": "COMPLETED", "attempts": 1,
                "submitted_at": T0 + timedelta(seconds=500), "completed_at": resumed,
                "latency_s": night.total_seconds(), "spans_stop": True}  # fmt: skip
    rows = [*run_rows(), *later, spanning]
    out = write(tmp_path / "run", rows)

    report = build_report(*read_results(out))
    t = report.throughput
    assert t is not None
    first = min(r["submitted_at"] for r in rows if r.get("submitted_at"))
    last = resumed + timedelta(seconds=610)
    first_run_end = T0 + timedelta(seconds=594)  # its last completion
    idle = (resumed - first_run_end).total_seconds()
    assert t.idle_s == pytest.approx(idle)
    completions = 200 + 60 + 1
    busy = (last - first).total_seconds() - idle
    in_flight = 200 + 60  # the spanning job's time is the stop's: left out of both
    assert t.busy_per_minute == pytest.approx(in_flight * 60 / busy)
    assert report_main(out, chart=False) == 0
    text = capsys.readouterr().out
    overall = completions * 60 / (last - first).total_seconds()
    assert (
        f"{overall:.1f}/min from the first submit ({in_flight * 60 / busy:.1f}/min over the "
        f"{busy / 60:.1f} min with jobs in flight, 1 spanning a stop left out; the other "
        f"{idle / 3600:.1f} h had none: a stop between runs, or a wait)" in text
    )


def test_a_run_without_a_stop_gives_one_rate() -> None:
    """Start-up and short waits (under 5% of the time) are not worth a second figure."""
    rows = run_rows()
    report = build_report(Path("r"), pa.Table.from_pylist(
        [{f.name: r.get(f.name) for f in SCHEMA} for r in rows], schema=SCHEMA))  # fmt: skip
    assert report.throughput is not None
    assert report.throughput.busy_per_minute is None
    assert "with jobs in flight" not in format_report(report)


def test_the_run_summary_and_the_report_take_latency_over_the_same_completed_rows(
    tmp_path: Path,
) -> None:
    """Before: the summary's p50/p95 took every row with a latency_s, so a job that failed
    at the service after 15 minutes (its time to the failure recorded) moved the
    summary's p95 and not the report's."""
    failed_late = [{
        "id": f"late{k}", "row": 6000 + k, "status": "FAILED", "error": "FAILED (422): NSFW",
        "attempts": 1, "polls": 9, "submitted_at": T0, "completed_at": T0 + timedelta(seconds=900),
        "latency_s": 900.0,
    } for k in range(20)]  # fmt: skip
    out = write(tmp_path / "run", [*run_rows(), *failed_late])
    done = [r["latency_s"] for r in run_rows() if r["status"] == "COMPLETED"]
    cuts = statistics.quantiles(done, n=100, method="inclusive")

    summary = summarize(out / RESULTS, Counters(), 0, 1.0)
    report = build_report(*read_results(out)).latency["end-to-end latency_s"]

    assert (summary.latency_p50, summary.latency_p95) == pytest.approx((cuts[49], cuts[94]))
    assert (summary.latency_p50, summary.latency_p95) == pytest.approx((report.p50, report.p95))


def test_params_in_results_are_the_full_rewrite_of_the_checkpoint_text(tmp_path: Path) -> None:
    """results.parquet's params column returns the checkpoint's text as it is when there
    is nothing to shorten and no escape to undo (a round of JSON per row saved); every
    case is what decoding and encoding again gives."""
    (tmp_path / "face.png").write_bytes(b"not read: a path is only named")
    inline = "data:image/png;base64," + "iVBORw0KGgo" * 4
    cases = [
        {"prompt": "a portrait", "face_image": "https://x.example/f.jpg", "seed": 7},
        {"prompt": "café, naïve", "face_image": "https://x.example/f.jpg"},
        {"prompt": 'tab\there, quote " and back\\slash \\u0041', "face_image": "https://x/f"},
        {"prompt": "p", "face_image": "face.png", "guidance_scale": 0.1 + 0.2},
        {"prompt": "p", "face_image": inline},
        {"prompt": "p", "face_image": "https://x.example/" + "a" * 300},
        {"prompt": "\udce9 lone surrogate", "face_image": "https://x/f"},
        {"prompt": "p", "face_image": None, "nan": float("nan")},
    ]
    images = {"instantid": get_model("instantid").image_params}
    for params in cases:
        raw = json.dumps(params, sort_keys=True)  # as the checkpoint keeps them
        inputs = ImageInputs(tmp_path)
        decoded = json.loads(raw)
        for name in images["instantid"]:
            if isinstance(decoded.get(name), str):
                decoded[name] = inputs.reference(name, decoded[name])
        try:
            expected = json.dumps(decoded, sort_keys=True, ensure_ascii=False)
            expected.encode("utf-8")
        except UnicodeEncodeError:
            expected = json.dumps(decoded, sort_keys=True)
        shown = _params_for_results(raw, "instantid", ImageInputs(tmp_path), images)
        assert shown == expected, params
    same = json.dumps(cases[0], sort_keys=True)
    assert _params_for_results(same, "instantid", ImageInputs(tmp_path), images) is same
