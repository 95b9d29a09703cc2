"""Progress while a run goes (a tqdm bar, or plain log lines), and its final summary."""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from batcher.errors import group_reasons
from batcher.pipeline import Counters, RunContext
from batcher.results import (
    SPANS_STOP,
    SUMMARY_COLUMNS,
    scale_note,
    stop_note,
    time_scale_of,
    without_stops,
)

log = logging.getLogger(__name__)


#: The span of the pace a progress line gives: recent enough to show a slowdown (429s, an
#: outage), long enough not to swing with each batch.
PACE_WINDOW_S = 300.0


class Progress:
    """Updates a bar (or logs a line every ``log_every_s``) from the run's live counters;
    ``before`` is the rows' states as the run started."""

    def __init__(
        self,
        ctx: RunContext,
        *,
        before: Mapping[str, int],
        enabled: bool | None,
        log_every_s: float,
    ) -> None:
        self._ctx = ctx
        self._total = sum(before.values())
        self._done_before = sum(before.get(s, 0) for s in _TERMINAL)
        self._failed_before = before.get("FAILED", 0)
        self._bar_on = sys.stderr.isatty() if enabled is None else enabled
        self._log_every = log_every_s
        self._bar: tqdm[None] | None = None
        #: (monotonic time, rows done) at the progress lines of the last PACE_WINDOW_S.
        self._pace: deque[tuple[float, int]] = deque()

    def _done(self) -> int:
        c = self._ctx.counters
        return self._done_before + c.completed + c.failed

    def _figures(self) -> dict[str, int]:
        ctx = self._ctx
        states = [f.state for f in ctx.flights.values()]
        return {
            # Submitted, not yet finished: idle submit workers hold slots too (ctx.in_flight).
            "in_flight": len(ctx.flights),
            "queued": states.count("QUEUED"),
            "processing": states.count("PROCESSING"),
            "failed": self._failed_before + ctx.counters.failed,
            "resubmitted": sum(ctx.counters.resubmitted_failed.values())
            + ctx.counters.resubmitted_expired,
            "429s": ctx.gate.limited,
        }

    async def run(self) -> None:
        if self._bar_on:
            self._bar = tqdm(
                total=self._total,
                initial=self._done_before,
                unit="job",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        last_log = time.monotonic()
        self._pace.append((last_log, self._done()))  # the first line's pace: since the start
        try:
            while True:
                await anyio.sleep(0.5)
                if self._bar is not None:
                    self._bar.update(self._done() - self._bar.n)
                    self._bar.set_postfix(self._figures(), refresh=False)
                elif time.monotonic() - last_log >= self._log_every:
                    last_log = time.monotonic()
                    log.info("%s", self.line(last_log))
        finally:
            self.close()

    def line(self, now: float) -> str:
        """The progress line for a log file: rows done, the pace over the last
        PACE_WINDOW_S and the time left at it, then the live figures. ``now`` is
        monotonic; the first line (no pace yet) says so."""
        done = self._done()
        pace = self._pace
        pace.append((now, done))
        while len(pace) > 1 and now - pace[1][0] >= PACE_WINDOW_S:
            pace.popleft()
        since, done_then = pace[0]
        per_min = (done - done_then) * 60.0 / (now - since) if now > since else None
        left = self._total - done
        if per_min is None:
            pace_text = "pace not known yet"
        elif per_min <= 0:
            pace_text = "0/min, time left unknown" if left else "0/min"
        else:
            shown = f"{per_min:.0f}" if per_min >= 100 else f"{per_min:.3g}"
            pace_text = f"{shown}/min, {time_left(60.0 * left / per_min)} left"
        figures = " ".join(f"{k}={v}" for k, v in self._figures().items())
        return f"progress: {done}/{self._total} done, {pace_text}; {figures}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._done() - self._bar.n)
            self._bar.close()
            self._bar = None


@dataclass(frozen=True)
class Summary:
    """The final figures of a run, over the whole results table."""

    counts: dict[str, int]
    failed_reasons: dict[str, int]
    completed_this_run: int
    elapsed_s: float
    latency_p50: float | None
    latency_p95: float | None
    inference_total_s: float
    api_requests: int
    rate_limited: int
    unknown_submits: int
    #: Status polls' start after their planned time, p50 and p90 (s), this run's polls.
    poll_late: tuple[float, float] | None = None
    #: Polls ran late by a large share of their gaps at some point (see lateness.py).
    polls_fell_behind: bool = False
    #: Jobs FAILED and submitted again this run, by reason (most first).
    resubmitted_failed: dict[str, int] = field(default_factory=dict)
    #: The run's time scale: its durations are this x the service's (see results.scale_note).
    time_scale: float = 1.0
    #: Completed jobs whose latency spans a stop, left out of the latency figures.
    spanning: int = 0

    def text(self) -> str:
        c = self.counts
        rate = self.completed_this_run / self.elapsed_s if self.elapsed_s > 0 else 0.0
        per_job = self.api_requests / self.completed_this_run if self.completed_this_run else 0.0
        lines = [
            f"rows: {sum(c.values())}  completed: {c.get('COMPLETED', 0)}  "
            f"failed: {c.get('FAILED', 0)}  invalid: {c.get('INVALID', 0)}  "
            f"not finished: {sum(n for s, n in c.items() if s not in _TERMINAL)}",
            *filter(None, [scale_note(self.time_scale)]),
            f"this run: {self.completed_this_run} completed in {self.elapsed_s:.1f} s "
            f"({rate * 60:.1f} jobs/min), {self.api_requests} API requests "
            f"({per_job:.2f} per completed job), {self.rate_limited} answered 429",
        ]
        if self.latency_p50 is not None:
            lines.append(
                f"latency p50 {self.latency_p50:.2f} s, p95 {self.latency_p95:.2f} s; "
                f"total inference_time {self.inference_total_s:.1f} s"
            )
        elif self.spanning:  # every latency was left out; the server's time was not
            lines.append(f"total inference_time {self.inference_total_s:.1f} s")
        lines += filter(None, [stop_note(self.spanning)])
        if self.poll_late is not None:
            p50, p90 = self.poll_late
            lines.append(
                f"status polls started {1e3 * p50:.1f} ms (p50), {1e3 * p90:.1f} ms (p90) "
                "after their planned time"
                + (
                    "; the client fell behind: polls per job and detection lag include its delay"
                    if self.polls_fell_behind
                    else ""
                )
            )
        if self.unknown_submits:
            lines.append(
                f"submits with an unknown outcome: {self.unknown_submits} "
                "(see README: 'Unknown submit outcomes')"
            )
        for reason, n in list(self.failed_reasons.items())[:10]:  # most rows first
            lines.append(f"  failed x{n}: {reason}")
        if self.resubmitted_failed:
            lines.append(
                f"jobs FAILED and submitted again: {sum(self.resubmitted_failed.values())} "
                "(--max-failed-retries)"
            )
            for reason, n in list(self.resubmitted_failed.items())[:10]:
                lines.append(f"  again x{n}: {reason}")
        return "\n".join(lines)


_TERMINAL = ("COMPLETED", "FAILED", "INVALID")


def time_left(seconds: float) -> str:
    """A duration as a person reads it in a log: minutes, hours or days."""
    if seconds < 60:
        return "under a minute"
    if seconds < 90 * 60:
        return f"about {seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"about {seconds / 3600:.1f} h"
    return f"about {seconds / 86400:.0f} days"


def summarize(
    results: Path | pa.Table,
    counters: Counters,
    rate_limited: int,
    elapsed_s: float,
    *,
    time_scale: float | None = None,
) -> Summary:
    """Figures from results.parquet (or a table of its SUMMARY_COLUMNS) and the run's
    counters; ``time_scale`` None: the file's own. Blocking: use a worker thread."""
    table = results if isinstance(results, pa.Table) else _read_summary_columns(results)
    counts = {str(k): int(v) for k, v in zip(*_value_counts(table.column("status")), strict=True)}
    failed = table.filter(pc.equal(table.column("status"), "FAILED"))
    reasons = dict(group_reasons(failed.column("error").to_pylist()))
    # Over COMPLETED rows, as `batcher report`: a FAILED job's time to its failure is
    # not how long a job takes.
    done = table.filter(pc.equal(table.column("status"), "COMPLETED"))
    timed, spanning = without_stops(done)
    latency = timed.column("latency_s").drop_null()
    p50 = p95 = None
    if len(latency):
        p50, p95 = (float(x) for x in pc.quantile(latency, q=[0.5, 0.95]).to_pylist())
    inference = pc.sum(table.column("inference_time")).as_py() or 0.0
    unknown = pc.sum(table.column("unknown_submits")).as_py() or 0
    c = counters
    return Summary(
        counts=counts,
        failed_reasons=reasons,
        completed_this_run=c.completed,
        elapsed_s=elapsed_s,
        latency_p50=p50,
        latency_p95=p95,
        inference_total_s=float(inference),
        api_requests=sum(c.api_requests.values()),
        rate_limited=rate_limited,
        unknown_submits=int(unknown),
        poll_late=c.poll_lateness.percentiles(),
        polls_fell_behind=c.poll_lateness.fell_behind,
        resubmitted_failed=dict(c.resubmitted_failed.most_common()),
        time_scale=time_scale_of(table.schema) if time_scale is None else time_scale,
        spanning=spanning,
    )


def _read_summary_columns(path: Path) -> pa.Table:
    """results.parquet's SUMMARY_COLUMNS; an older file may lack spans_stop. Blocking."""
    with pq.ParquetFile(path) as file:
        names = set(file.schema_arrow.names)
        return file.read(columns=[c for c in SUMMARY_COLUMNS if c in names or c != SPANS_STOP])


def _value_counts(column: object) -> tuple[list[str], list[int]]:
    vc = pc.value_counts(column)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()
