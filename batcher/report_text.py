"""`batcher report`'s text: one figure per line, for a terminal or a log file."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from batcher.results import scale_note, stop_note

if TYPE_CHECKING:  # report.py imports this module to print what it measured
    from batcher.report import Report, Throughput

__all__ = ["bucket_width", "format_report"]

#: Failure reasons shown one per line; the rest are summed on one more.
_TOP_REASONS = 10


def format_report(report: Report) -> str:
    """The report as text, one figure per line, for a terminal or a file."""
    c = report.counts
    unfinished = sum(n for s, n in c.items() if s not in ("COMPLETED", "FAILED", "INVALID"))
    lines = [
        f"{report.path}: {report.rows} rows",
        f"completed {c.get('COMPLETED', 0)}, failed {c.get('FAILED', 0)}, "
        f"invalid {c.get('INVALID', 0)}" + (f", not finished {unfinished}" if unfinished else ""),
    ]
    if (note := scale_note(report.time_scale)) is not None:
        lines.append(note)
    if report.failed_reasons:
        lines.append("failed by reason:")
        shown = report.failed_reasons[:_TOP_REASONS]
        lines += [f"  {n:>6}  {reason}" for reason, n in shown]
        rest = report.failed_reasons[_TOP_REASONS:]
        if rest:
            lines.append(f"  {sum(n for _, n in rest):>6}  ({len(rest)} other reasons)")
    lines += _throughput_lines(report.throughput)
    if report.latency:
        lines.append(f"latency of completed jobs, s {'n':>8} {'p50':>9} {'p90':>9} "
                     f"{'p95':>9} {'p99':>9} {'max':>9}")  # fmt: skip
        for label, s in report.latency.items():
            figures = " ".join(f"{v:>9.2f}" for v in (s.p50, s.p90, s.p95, s.p99, s.max))
            lines.append(f"  {label:<26} {s.n:>8} {figures}")
    if report.polls:
        mean, s = report.polls
        lines.append(f"polls per completed job: mean {mean:.2f}, p95 {s.p95:.2f}, max {s.max:g}")
    if report.notice_lag:
        mean, s = report.notice_lag
        lines.append(
            f"notice_lag_s (completion seen minus server total_time): "
            f"mean {mean:.2f} s, p95 {s.p95:.2f} s"
        )
    if (note := stop_note(report.spanning)) is not None:
        lines.append(note)
    if report.requests:
        lines.append(_requests_line(report, report.requests))
    if report.download_retries:
        lines.append(
            f"image downloads repeated after a cut body, a lost connection or a timeout: "
            f"{report.download_retries} (not API requests)"
        )
    extras = [
        f"{label} {n}"
        for label, n in (
            ("transient retries", None if report.requests else report.retries),
            ("unknown submit outcomes", report.unknown_submits),
            ("429 answers", None if report.requests else report.rate_limited),
        )
        if n is not None
    ]
    if extras:
        lines.append(", ".join(extras))
    return "\n".join(lines)


def _requests_line(report: Report, first: tuple[int, int, int]) -> str:
    """Every API request the table counts, repeats included: a run stopped by a 5xx
    outage made no request that got its answer, and "API requests: 0" read as nothing
    sent. Image downloads are not API requests (nor rate limited): not in it."""
    submits, polls, results = first
    parts = [f"{submits} submits + {polls} polls + {results} results"]
    missing = []
    if report.retries is not None:
        parts.append(f"{report.retries} repeated after a 5xx or a lost connection")
    else:
        missing.append("a 5xx or lost connection")
    if report.rate_limited is not None:
        parts.append(f"{report.rate_limited} answered 429")
    else:
        missing.append("a 429")
    total = report.api_requests or 0
    completed = report.counts.get("COMPLETED", 0)
    per_job = f": {total / completed:.2f} per completed job" if completed else ""
    # An older results.parquet lacks a count: say what the total leaves out, or holds.
    caveats = []
    if missing:
        caveats.append(f"not counting requests repeated after {' or '.join(missing)}")
    if report.retries and report.download_retries is None:
        caveats.append(
            "the repeats may include image downloads (a results.parquet from an earlier "
            "batcher counted them together)"
        )
    if not report.result_reads_counted:
        caveats.append(
            "results counted as one per completed job (a results.parquet from an earlier "
            "batcher did not count them)"
        )
    return f"API requests: {total} ({', '.join(parts)}){per_job}" + "".join(
        f", {c}" for c in caveats
    )


def _throughput_lines(t: Throughput | None) -> list[str]:
    if t is None:
        return ["throughput: no completed rows"]
    total = sum(t.counts)
    overall = t.overall_per_minute
    since = "" if overall is None else f", {overall:.1f}/min from the first submit"
    busy, busy_s = t.busy_per_minute, t.busy_s
    if busy is not None and busy_s is not None:
        spanning = total - t.busy_count
        left_out = f", {spanning} spanning a stop left out" if spanning else ""
        since += (
            f" ({busy:.1f}/min over the {duration(busy_s)} with jobs in flight{left_out}; "
            f"the other {duration(t.idle_s)} had none: a stop between runs, or a wait)"
        )
    end = datetime.fromtimestamp(t.last_s, UTC).strftime("%Y-%m-%d %H:%M:%S")
    lines = [f"throughput: {total} completions, the last at {end} UTC{since}",
             f"  completions per minute in {bucket_width(t.bucket_s)} buckets (UTC):"]  # fmt: skip
    peak = max(t.counts)
    many_days = t.last_s - t.start_s >= 86400
    for i, n in enumerate(t.counts):
        when = datetime.fromtimestamp(t.start_s + i * t.bucket_s, UTC)
        label = when.strftime("%m-%d %H:%M" if many_days else "%H:%M:%S")
        bar = "#" * round(30 * n / peak)
        covered = t.covered_s(i)
        partial = (
            f"  (partial: {duration(covered)} of it in the run)"
            if covered < t.bucket_s - 0.5
            else ""
        )
        lines.append(f"  {label}  {n:>6}  {t.per_minute(n):>8.1f}/min  {bar}{partial}")
    return lines


def duration(seconds: float) -> str:
    """A length of time to a few figures: 45 s, 12.5 min, 8.0 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def bucket_width(seconds: int) -> str:
    """A bucket's length as people say it: 30 s, 5 min, 2 h."""
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} s"
