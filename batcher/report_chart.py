"""`batcher report`'s chart, DIR/report.png: throughput over time and a latency histogram.

It needs matplotlib, an optional extra (``pip install 'batcher[report]'``); without it
the report is text only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from batcher.atomic import remove_abandoned, replacing
from batcher.errors import UsageError
from batcher.report_text import bucket_width

if TYPE_CHECKING:  # report.py imports this module to draw what it measured
    from batcher.report import Report

__all__ = ["CHART", "CHART_HINT", "write_chart"]

CHART = "report.png"
CHART_HINT = "no chart: matplotlib is not installed (pip install 'batcher[report]')"


def write_chart(report: Report, path: Path) -> Path | None:
    """Throughput over time and a latency histogram as a PNG; None without matplotlib.

    Drawn on an explicit Agg canvas, never through pyplot: no display and no global state.
    The temporary files of ``path`` that killed reports left are deleted first. No lock
    keeps two reports of a folder apart, so only those no live writer holds and older
    than a minute go (see :func:`batcher.atomic.remove_abandoned`); a run's files are
    never touched.
    """
    try:
        # matplotlib is an optional extra: CI's type check may run without it.
        from matplotlib.backends.backend_agg import (  # type: ignore[import-not-found, unused-ignore]
            FigureCanvasAgg,
        )
        from matplotlib.figure import Figure  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    fig = Figure(figsize=(10, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1)
    t = report.throughput
    if t is not None:
        unit, name = (1, "seconds") if t.bucket_s < 120 else (60, "minutes")
        if t.bucket_s >= 7200:
            unit, name = 3600, "hours"
        x = [i * t.bucket_s / unit for i in range(len(t.counts))]
        top.bar(x, [t.per_minute(n) for n in t.counts], width=t.bucket_s / unit,
                align="edge", color="tab:blue")  # fmt: skip
        start = datetime.fromtimestamp(t.start_s, UTC).strftime("%Y-%m-%d %H:%M:%S")
        top.set_xlabel(f"{name} since {start} UTC ({bucket_width(t.bucket_s)} buckets)")
    top.set_ylabel("completions / min")
    top.set_title("Throughput")
    values = report.latency_values
    if values is not None and len(values):
        # numpy comes with matplotlib; hist() of a Python list is slow for a million rows.
        bottom.hist(values.to_numpy(), bins=min(50, max(10, len(values) // 20)),
                    color="tab:gray")  # fmt: skip
        e2e = report.latency.get("end-to-end latency_s")
        if e2e is not None:
            for q, value, color in (("p50", e2e.p50, "tab:green"), ("p95", e2e.p95, "tab:orange"),
                                    ("p99", e2e.p99, "tab:red")):  # fmt: skip
                bottom.axvline(value, color=color, linestyle="--", label=f"{q} {value:.2f} s")
            bottom.legend()
        bottom.yaxis.get_major_locator().set_params(integer=True)
    bottom.set_xlabel("submit to completion seen, s")
    bottom.set_ylabel("completed jobs")
    left_out = f" ({report.spanning} seen done after a stop left out)" if report.spanning else ""
    bottom.set_title(f"End-to-end latency{left_out}")
    try:
        remove_abandoned(path.parent, path.name)
        with replacing(path) as f:
            fig.savefig(f, format="png")
    except OSError as exc:  # the folder's problem (a folder at the name, permissions...)
        raise UsageError(f"{path}: cannot write the chart ({exc.strerror or exc})") from None
    return path
