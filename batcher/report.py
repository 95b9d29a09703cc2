"""`batcher report DIR`: what a run's results.parquet says about the API's speed and cost.

Here the figures, read from the table (pyarrow only); report_text.py prints them and
report_chart.py draws DIR/report.png (throughput over time, a latency histogram) with
matplotlib, an optional extra (``pip install 'batcher[report]'``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batcher.checkpoint import CHECKPOINT, RESULTS_META, RESULTS_STALE, Checkpoint
from batcher.errors import UsageError, group_reasons
from batcher.report_chart import CHART, CHART_HINT, write_chart
from batcher.report_text import format_report
from batcher.results import RESULTS, SCHEMA, SPANS_STOP, time_scale_of, without_stops

QUANTILES = (0.5, 0.9, 0.95, 0.99)
# Bucket widths, seconds: the smallest giving at most _MAX_BUCKETS buckets is used, so a
# time-scaled emulator run (seconds) and a day-long real run both read well.
_BUCKET_S = (
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
)  # fmt: skip
_MAX_BUCKETS = 24
#: The share of the time from the first submit with no job in flight from which the
#: report also gives the rate over the rest: a stop between runs, not start-up gaps.
IDLE_SHOWN = 0.05
# The per-row count of 429 answers; a results.parquet written before it existed has no
# such column, and the line is left out rather than shown as 0.
_RATE_LIMITED = "rate_limited"
# Image downloads repeated, counted apart from `retries` since checkpoint migration 4;
# before it, `retries` counted them too.
_DOWNLOAD_RETRIES = "download_retries"
# Result reads, counted per row since checkpoint migration 6; before it, the report
# took one per completed row (a read for fresh links, or by a row that then FAILED, went
# uncounted).
_RESULT_READS = "result_reads"
_QUEUE_TIME = r'"queue_time"\s*:\s*(?P<v>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)'
# The columns the report reads; images, params and hashes are left on disk.
_COLUMNS = (
    "status", "error", "attempts", "retries", "unknown_submits", "submitted_at", "completed_at",
    "latency_s", "notice_lag_s", "inference_time", "metrics", "polls", _RATE_LIMITED,
    _DOWNLOAD_RETRIES, _RESULT_READS, SPANS_STOP,
)  # fmt: skip
_LATENCIES = (
    ("queue_time", "queue time (server)"),
    ("inference_time", "inference_time (server)"),
    ("latency_s", "end-to-end latency_s"),
)


@dataclass(frozen=True)
class Spread:
    """Percentiles (linear interpolation) and maximum of one figure over ``n`` rows."""

    n: int
    p50: float
    p90: float
    p95: float
    p99: float
    max: float


@dataclass(frozen=True)
class Throughput:
    """Completions counted in equal time buckets from ``start_s`` (epoch seconds, UTC)."""

    start_s: float
    bucket_s: int
    counts: tuple[int, ...]
    first_submit_s: float | None
    last_s: float
    #: Seconds from the first submit to the last completion with no job in flight (a
    #: stop between runs, or a wait): jobs whose latency spans a stop do not count as in
    #: flight, and a job without both times is not seen.
    idle_s: float = 0.0
    #: Completions of jobs that do not span a stop: those the in-flight time is of.
    busy_count: int = 0

    def per_minute(self, count: int) -> float:
        return count * 60 / self.bucket_s

    @property
    def overall_per_minute(self) -> float | None:
        """Completions per minute from the first submit to the last completion."""
        if self.first_submit_s is None or self.last_s <= self.first_submit_s:
            return None
        return sum(self.counts) * 60 / (self.last_s - self.first_submit_s)

    @property
    def busy_s(self) -> float | None:
        """Seconds from the first submit to the last completion with a job in flight."""
        return (
            None if self.first_submit_s is None else self.last_s - self.first_submit_s - self.idle_s
        )

    def covered_s(self, index: int) -> float:
        """Seconds of bucket ``index`` within the run, from the first submit (when the
        table has submit times) to the last completion: the first and last buckets are
        partly outside it, so their counts read low."""
        begin = self.start_s + index * self.bucket_s
        end = min(begin + self.bucket_s, self.last_s)
        if self.first_submit_s is not None:
            begin = max(begin, self.first_submit_s)
        return max(0.0, end - begin)

    @property
    def busy_per_minute(self) -> float | None:
        """Completions per minute over the time jobs were in flight, when that leaves out
        at least IDLE_SHOWN of the time from the first submit (a stop, mostly). Jobs that
        span a stop are left out of both: their time is the stop's."""
        busy_s = self.busy_s
        if busy_s is None or busy_s <= 0 or self.idle_s < IDLE_SHOWN * (busy_s + self.idle_s):
            return None
        return self.busy_count * 60 / busy_s


@dataclass(frozen=True)
class Report:
    """Every figure of the report; ``None`` where results.parquet cannot tell."""

    path: Path
    rows: int
    counts: dict[str, int]
    failed_reasons: tuple[tuple[str, int], ...]
    throughput: Throughput | None
    latency: dict[str, Spread]
    polls: tuple[float, Spread] | None
    notice_lag: tuple[float, Spread] | None
    #: (submits, status polls, result reads) over every row.
    requests: tuple[int, int, int] | None
    retries: int | None
    unknown_submits: int | None
    rate_limited: int | None
    #: None: a results.parquet from before downloads were counted apart (``retries``
    #: holds them too, and the API request total may be over by as many).
    download_retries: int | None
    #: False: a results.parquet from before result reads were counted (one per completed
    #: row is assumed: a result read again after a stop or a refused link is not in it).
    result_reads_counted: bool = True
    #: The run's time scale (results.time_scale_of): 1 against the real API.
    time_scale: float = 1.0
    #: Completed rows whose latency_s and notice_lag_s span a stop, left out of those
    #: figures and the histogram (0 for a table from before the column: it cannot tell).
    spanning: int = 0
    # End-to-end latencies of completed rows for the chart's histogram, a pyarrow array.
    latency_values: Any = field(default=None, repr=False)

    @property
    def api_requests(self) -> int | None:
        """Submits, polls and results with their repeats and 429s; None when the table
        cannot tell (no attempts or polls column)."""
        if self.requests is None:
            return None
        return sum(self.requests) + (self.retries or 0) + (self.rate_limited or 0)


def read_results(out_dir: Path) -> tuple[Path, pa.Table]:
    """DIR/results.parquet (or that file itself) as a table; UsageError if unusable."""
    # The file itself, or a folder standing at its name: not an --out folder (no checkpoint).
    given = out_dir.suffix == ".parquet" and not (out_dir / CHECKPOINT).exists()
    path = out_dir if given and (out_dir.is_file() or out_dir.is_dir()) else out_dir / RESULTS
    if path.is_dir():
        again = (
            ". Run the same `batcher run` command again to write the table"
            if (path.parent / CHECKPOINT).is_file()
            else ""
        )
        raise UsageError(
            f"{path}: is a folder, not the results file a run writes (a Parquet dataset "
            f"written by another tool?): move it away{again}"
        )
    if path.exists() and not path.is_file():
        raise UsageError(f"{path}: is not a regular file (a pipe or a device?)")
    if not path.is_file():
        if (path.parent / CHECKPOINT).is_file():
            raise UsageError(
                f"{path}: not written yet: the run in {path.parent} was stopped before its "
                "end (results.parquet is written when a run ends). Run the same `batcher "
                "run` command again to finish it, or to write the table"
            )
        raise UsageError(f"{path}: no such file; pass the --out DIR of a `batcher run`")
    try:
        names = pq.read_schema(path).names
        if "status" not in names:
            raise UsageError(f"{path}: not a batcher results file (no status column)")
        table = pq.read_table(path, columns=[n for n in names if n in _COLUMNS])
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{path}: not a readable Parquet file ({exc})") from None
    return path, _as_written(path, table)


def _as_written(path: Path, table: pa.Table) -> pa.Table:
    """``table`` with the column types batcher writes (a file saved again by another tool
    may hold whole numbers as floats, or dictionary-encoded text); UsageError naming the
    first column that cannot be read as such."""
    for i, name in enumerate(table.column_names):
        column, wanted = table.column(i), SCHEMA.field(name).type
        if column.type == wanted:
            continue
        try:
            table = table.set_column(i, name, column.cast(wanted))
        except pa.ArrowException:
            raise UsageError(
                f"{path}: column {name} holds {column.type}, not {wanted}: not a batcher "
                "results file"
            ) from None
    return table


def build_report(path: Path, table: pa.Table) -> Report:
    """The report's figures. Percentiles and throughput are over COMPLETED rows."""
    status = table.column("status")
    found = pc.value_counts(status)
    counts = dict(zip(*(found.field(f).to_pylist() for f in ("values", "counts")), strict=True))
    done = table.filter(pc.equal(status, "COMPLETED"))
    failed = table.filter(pc.equal(status, "FAILED"))
    timed, spanning = without_stops(done)
    e2e = _col(timed, "latency_s")
    # The server's times do not count a stop of the client's: every completed row.
    values = {"queue_time": _queue_times(done), "inference_time": _col(done, "inference_time")}
    latency = {
        label: s
        for name, label in _LATENCIES
        if (s := _spread(e2e if name == "latency_s" else values[name]))
    }
    polls = _col(done, "polls")
    attempts = _col(table, "attempts")
    all_polls = _col(table, "polls")
    reads = _optional_sum(table, _RESULT_READS)
    requests = None
    if attempts is not None and all_polls is not None:
        requests = (_sum(attempts), _sum(all_polls), done.num_rows if reads is None else reads)
    return Report(
        path=path,
        rows=table.num_rows,
        counts={str(k): int(n) for k, n in counts.items()},
        failed_reasons=_reasons(_col(failed, "error")),
        throughput=_throughput(table, done, timed.num_rows),
        latency=latency,
        polls=_mean_spread(polls),
        notice_lag=_mean_spread(_col(timed, "notice_lag_s")),
        requests=requests,
        retries=_optional_sum(table, "retries"),
        unknown_submits=_optional_sum(table, "unknown_submits"),
        rate_limited=_optional_sum(table, _RATE_LIMITED),
        download_retries=_optional_sum(table, _DOWNLOAD_RETRIES),
        result_reads_counted=reads is not None,
        time_scale=time_scale_of(table.schema),
        spanning=spanning,
        latency_values=None if e2e is None else pc.drop_null(e2e),
    )


def report_main(out_dir: Path, *, chart: bool = True) -> int:
    """Print the report of ``out_dir/results.parquet``; write report.png next to it."""
    path, table = read_results(out_dir)
    report = build_report(path, table)
    if results_stale(path.parent / CHECKPOINT):
        print(
            "note: this table is older than the run's checkpoint (the last run was stopped "
            "before its end, or is running): run the same `batcher run` command again to "
            "bring it up to date"
        )
    print(format_report(report))
    if chart:
        if report.throughput is None and not report.latency:
            print("no chart: no completed rows")
        elif (written := write_chart(report, path.with_name(CHART))) is None:
            print(CHART_HINT)
        else:
            print(f"chart: {written}")
    return 0


def results_stale(checkpoint: Path) -> bool:
    """Whether the checkpoint beside a results table says the table is out of date (a run
    changed rows and did not get to write it). Read-only; False when there is none."""
    return Checkpoint.read_meta(checkpoint, RESULTS_META) == RESULTS_STALE


def _col(table: pa.Table, name: str) -> Any:
    return table.column(name) if name in table.column_names else None


def _sum(column: Any) -> int:
    return int(pc.sum(column).as_py() or 0)


def _optional_sum(table: pa.Table, name: str) -> int | None:
    column = _col(table, name)
    return None if column is None else _sum(column)


def _spread(values: Any) -> Spread | None:
    if values is None:
        return None
    values = pc.drop_null(values)
    if not len(values):
        return None
    p50, p90, p95, p99 = (float(q) for q in pc.quantile(values, q=list(QUANTILES)).to_pylist())
    return Spread(len(values), p50, p90, p95, p99, float(pc.max(values).as_py()))


def _mean_spread(values: Any) -> tuple[float, Spread] | None:
    spread = _spread(values)
    return None if spread is None else (float(pc.mean(values).as_py()), spread)


def _queue_times(done: pa.Table) -> Any:
    """``queue_time`` from each completed row's metrics JSON, where the server sent one."""
    metrics = _col(done, "metrics")
    if metrics is None:
        return None
    # A regex over the JSON text, not json.loads per row: a million rows in well under a
    # second. results.parquet's metrics are flat objects of numbers, as json.dumps wrote them.
    found = pc.struct_field(pc.extract_regex(metrics, _QUEUE_TIME), "v")
    return pc.cast(pc.drop_null(found), pa.float64())


def _reasons(errors: Any) -> tuple[tuple[str, int], ...]:
    if errors is None:
        return ()
    return tuple(group_reasons(errors.to_pylist()))


def _epoch_us(column: Any) -> Any:
    """A UTC timestamp column as int64 epoch microseconds, nulls dropped (no tz database)."""
    return pc.cast(pc.drop_null(column), pa.timestamp("us", tz="UTC")).cast(pa.int64())


def _throughput(table: pa.Table, done: pa.Table, busy_count: int) -> Throughput | None:
    """``busy_count``: the completed rows that do not span a stop."""
    completed = _col(done, "completed_at")
    if completed is None or not len(us := _epoch_us(completed)):
        return None
    bounds = pc.min_max(us)
    first_us, last_us = int(bounds["min"].as_py()), int(bounds["max"].as_py())
    span_s = (last_us - first_us) / 1e6
    bucket_s = next(
        (b for b in _BUCKET_S if span_s / b < _MAX_BUCKETS), math.ceil(span_s / _MAX_BUCKETS)
    )
    width_us = bucket_s * 1_000_000
    start_us = first_us // width_us * width_us  # aligned: buckets start on round times
    counts = [0] * ((last_us - start_us) // width_us + 1)
    found = pc.value_counts(pc.divide(pc.subtract(us, start_us), width_us))
    for i, n in zip(*(found.field(f).to_pylist() for f in ("values", "counts")), strict=True):
        counts[i] = n
    submitted = _col(table, "submitted_at")
    submits = None if submitted is None else pc.min(_epoch_us(submitted)).as_py()
    idle_s = 0.0
    if submits is not None:
        idle_s = uncovered(_in_flight_us(without_stops(table)[0]), submits, last_us) / 1e6
    return Throughput(
        start_us / 1e6, bucket_s, tuple(counts),
        None if submits is None else submits / 1e6, last_us / 1e6, idle_s, busy_count,
    )  # fmt: skip


def _in_flight_us(table: pa.Table) -> list[tuple[int, int]]:
    """Each row's (submitted_at, completed_at) in epoch microseconds, where it has both."""
    if "submitted_at" not in table.column_names or "completed_at" not in table.column_names:
        return []
    submitted, completed = table.column("submitted_at"), table.column("completed_at")
    both = table.filter(pc.and_(pc.is_valid(submitted), pc.is_valid(completed)))
    starts = _epoch_us(both.column("submitted_at")).to_pylist()
    ends = _epoch_us(both.column("completed_at")).to_pylist()
    return list(zip(starts, ends, strict=True))


def uncovered(spans: list[tuple[int, int]], start: int, end: int) -> int:
    """The length of ``[start, end]`` covered by none of ``spans`` (same unit); a span
    that ends before it begins covers nothing."""
    if end <= start:
        return 0
    idle = 0
    reached = start
    for begin, finish in sorted(spans):
        if finish <= max(begin, reached):
            continue
        if begin > reached:
            idle += min(begin, end) - reached
        reached = finish
        if reached >= end:
            return idle
    return idle + end - reached
