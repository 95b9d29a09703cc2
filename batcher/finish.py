"""How a run ends: the checkpoint's last changes saved, results.parquet written from it,
and the summary read, without a failure here hiding the reason a run stopped."""

from __future__ import annotations

import functools
import logging
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path

import anyio
import pyarrow as pa
import pyarrow.parquet as pq

from batcher.checkpoint import CHECKPOINT, RESULTS_FRESH, RESULTS_META
from batcher.errors import CheckpointUnwritable, UsageError
from batcher.options import RunOptions
from batcher.pipeline import Counters, RunContext
from batcher.progress import Summary, summarize
from batcher.results import RESULTS, summary_table, write_results

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class End:
    results: Path | None
    summary: Summary | None
    notes: tuple[str, ...] = ()


async def finish(ctx: RunContext, elapsed_s: float, *, stopping: bool) -> End:
    """Save the checkpoint's last changes, write results.parquet and read the summary.

    When the run is ``stopping`` (an error, Ctrl-C), a failure here must not take the
    place of the reason it stopped: it becomes a note, said after it; the summary then
    comes from the checkpoint. Otherwise it is the run's error, as it always was."""
    cp, options = ctx.checkpoint, ctx.options
    notes = []
    try:
        # Transitions queued by stages cancelled mid-write belong in the table too.
        await cp.flush()
    except (sqlite3.Error, CheckpointUnwritable) as exc:
        if not stopping:
            raise
        why = exc.reason if isinstance(exc, CheckpointUnwritable) else exc
        notes.append(
            f"{options.out / CHECKPOINT} could not save its last changes ({why}): rows "
            "caught mid-way by the stop are taken up by the next run as after a crash"
        )
    try:
        results = await anyio.to_thread.run_sync(
            functools.partial(
                write_results, cp, options.out, options.manifest.parent, time_scale=options.scale
            )
        )
    except OSError as exc:  # e.g. a folder at results.parquet, a full disk
        if not stopping:
            raise _results_unwritable(options, exc) from None
        notes.append(
            f"{options.out / RESULTS} could not be written either ({exc.strerror or exc}): "
            f"every row is saved in {options.out / CHECKPOINT}, and the next run writes it"
        )
        return End(None, await _checkpoint_summary(ctx, elapsed_s), tuple(notes))
    try:
        await cp.set_meta(RESULTS_META, RESULTS_FRESH)
    except (sqlite3.Error, CheckpointUnwritable) as exc:  # only the next run's shortcut is lost
        log.warning(
            "%s could not be marked up to date (%s): the next run writes it again",
            results,
            exc,
        )
    summary = await anyio.to_thread.run_sync(
        summarize, results, ctx.counters, ctx.gate.limited, elapsed_s
    )
    return End(results, summary, tuple(notes))


def summary_as_is(table: Path, rows: int, elapsed_s: float) -> Summary | None:
    """The summary of a finished run read from its results.parquet as it is, or None when
    the file is not one to read (a link, something else saved over it, a table of other
    rows): the caller writes it anew. Blocking."""
    try:
        if not stat.S_ISREG(table.lstat().st_mode):  # a link is replaced, never read
            return None
        if pq.ParquetFile(table).metadata.num_rows != rows:
            return None
        return summarize(table, Counters(), 0, elapsed_s)
    except (OSError, pa.ArrowException) as exc:
        log.info("%s cannot be read as it is (%s): writing it again", table, exc)
        return None


async def _checkpoint_summary(ctx: RunContext, elapsed_s: float) -> Summary | None:
    """The summary read from the checkpoint (results.parquet could not be written); None
    if even that fails: the run's own error matters more than its figures."""
    try:
        table = await anyio.to_thread.run_sync(summary_table, ctx.checkpoint)
    except (OSError, sqlite3.Error) as exc:
        log.warning("no summary: the checkpoint could not be read (%s)", exc)
        return None
    return await anyio.to_thread.run_sync(
        functools.partial(
            summarize,
            table,
            ctx.counters,
            ctx.gate.limited,
            elapsed_s,
            time_scale=ctx.options.scale,
        )
    )


def _results_unwritable(options: RunOptions, exc: OSError) -> UsageError:
    return UsageError(
        f"cannot write {options.out / RESULTS} ({exc.strerror or exc}): every row is "
        f"saved in {options.out / CHECKPOINT}; make room for the file (move away what "
        "is at its name, free space), then run the same command again"
    )
