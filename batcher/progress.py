"""Progress while a run goes (a tqdm bar, or plain log lines), and its final summary."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from batcher.errors import group_reasons
from batcher.pipeline import Counters, RunContext
from batcher.results import SUMMARY_COLUMNS

log = logging.getLogger(__name__)


class Progress:
    """Updates a bar (or logs a line every ``log_every_s``) from the run's live counters."""

    def __init__(
        self,
        ctx: RunContext,
        *,
        total: int,
        done_before: int,
        enabled: bool | None,
        log_every_s: float,
    ) -> None:
        self._ctx = ctx
        self._total = total
        self._done_before = done_before
        self._bar_on = sys.stderr.isatty() if enabled is None else enabled
        self._log_every = log_every_s
        self._bar: tqdm[None] | None = None

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
            "failed": ctx.counters.failed,
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
        try:
            while True:
                await anyio.sleep(0.5)
                if self._bar is not None:
                    self._bar.update(self._done() - self._bar.n)
                    self._bar.set_postfix(self._figures(), refresh=False)
                elif time.monotonic() - last_log >= self._log_every:
                    last_log = time.monotonic()
                    figures = " ".join(f"{k}={v}" for k, v in self._figures().items())
                    log.info("progress: %d/%d done, %s", self._done(), self._total, figures)
        finally:
            self.close()

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

    def text(self) -> str:
        c = self.counts
        rate = self.completed_this_run / self.elapsed_s if self.elapsed_s > 0 else 0.0
        per_job = self.api_requests / self.completed_this_run if self.completed_this_run else 0.0
        lines = [
            f"rows: {sum(c.values())}  completed: {c.get('COMPLETED', 0)}  "
            f"failed: {c.get('FAILED', 0)}  invalid: {c.get('INVALID', 0)}  "
            f"not finished: {sum(n for s, n in c.items() if s not in _TERMINAL)}",
            f"this run: {self.completed_this_run} completed in {self.elapsed_s:.1f} s "
            f"({rate * 60:.1f} jobs/min), {self.api_requests} API requests "
            f"({per_job:.2f} per completed job), {self.rate_limited} answered 429",
        ]
        if self.latency_p50 is not None:
            lines.append(
                f"latency p50 {self.latency_p50:.2f} s, p95 {self.latency_p95:.2f} s; "
                f"total inference_time {self.inference_total_s:.1f} s"
            )
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


def summarize(
    results: Path | pa.Table, counters: Counters, rate_limited: int, elapsed_s: float
) -> Summary:
    """Figures from results.parquet (or a table of its SUMMARY_COLUMNS) and the run's
    counters. Blocking: use a worker thread."""
    if isinstance(results, pa.Table):
        table = results
    else:
        table = pq.read_table(results, columns=list(SUMMARY_COLUMNS))
    counts = {str(k): int(v) for k, v in zip(*_value_counts(table.column("status")), strict=True)}
    failed = table.filter(pc.equal(table.column("status"), "FAILED"))
    reasons = dict(group_reasons(failed.column("error").to_pylist()))
    latency = table.column("latency_s").drop_null()
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
    )


def _value_counts(column: object) -> tuple[list[str], list[int]]:
    vc = pc.value_counts(column)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()
