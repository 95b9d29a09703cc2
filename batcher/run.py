"""A whole run: manifest -> intake -> submit -> poll -> fetch -> sink, resumable.

``arun`` is the async API, ``run`` the blocking one (with Ctrl-C/SIGTERM handling);
the CLI is a thin layer over ``run``. The checkpoint in the output folder makes the
same call, repeated, a resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVarTuple, Unpack

import aiohttp
import anyio

from batcher.checkpoint import CHECKPOINT, RESULTS_FRESH, RESULTS_META, Checkpoint
from batcher.client import ApiClient
from batcher.collector import fewer_collections
from batcher.errors import (
    ApiUnreachable,
    BatcherError,
    ConnectionsLost,
    Interrupted,
    OutputUnwritable,
    UsageError,
)
from batcher.feed import feed
from batcher.fetch import save_outputs
from batcher.fetch import work as fetch_work
from batcher.finish import finish, summary_as_is
from batcher.flight import Flight
from batcher.gate import RequestGate
from batcher.handoff import Channel
from batcher.inputs import ImageInputs
from batcher.interrupt import STOP_SIGNALS, Interrupt, abandoned_note, exit_at_once, wire_wait_s
from batcher.jobs import Job
from batcher.options import RunOptions
from batcher.pipeline import RunContext
from batcher.poll import Poller
from batcher.preflight import api_key, check_service, lock
from batcher.progress import Progress, Summary
from batcher.reconcile import mark_results_stale, reconcile, scan_manifest
from batcher.redownload import Redownloads
from batcher.results import RESULTS
from batcher.resume import resume
from batcher.sink import remove_partials
from batcher.submit import lost_connections
from batcher.submit import work as submit_work

log = logging.getLogger(__name__)

Ts = TypeVarTuple("Ts")
EXIT_OK, EXIT_USAGE, EXIT_FAILED_ROWS, EXIT_STOPPED = 0, 2, 3, 4
#: Result fetches at once. A fetch mostly waits (result GET, image download, the image
#: write and the checkpoint commit), so 16 left the event loop idle at 300 jobs/s.
FETCH_WORKERS = 64


@dataclass(frozen=True)
class RunResult:
    """How a run ended."""

    exit_code: int
    summary: Summary | None
    results: Path | None
    stop_reason: str | None
    #: What else failed as the stopped run ended (results.parquet not written...): said
    #: after the stop, which alone decides the exit code.
    notes: tuple[str, ...] = ()

    def text(self) -> str:
        parts = [self.summary.text()] if self.summary else []
        if self.results:
            parts.append(f"results: {self.results}")
        if self.stop_reason:
            parts.append(f"stopped: {self.stop_reason}")
        parts.extend(self.notes)
        return "\n".join(parts)


@contextlib.asynccontextmanager
async def _service(options: RunOptions) -> AsyncIterator[str]:
    """The base URL to talk to: the in-process emulator with --simulate, else the option."""
    if not options.simulate:
        yield options.base_url
        return
    from batcher.sim import SimServer  # only with --simulate: ~4 MB of code otherwise

    async with SimServer(options.sim_config()) as sim:
        yield sim.base_url


async def arun(options: RunOptions, *, interrupted: asyncio.Event | None = None) -> RunResult:
    """Run (or resume) the job described by ``options``; see :func:`run`."""
    out = options.out
    # A bad key, option or manifest is refused before anything is written: not even the
    # output folder is left behind. Scanning only reads the manifest; a run resumed on
    # the manifest it was made from needs no second scan (see reconcile).
    key = api_key(options)
    stop = interrupted.is_set if interrupted is not None else None
    scanned: int | None = None  # the manifest's rows, once scanned
    try:
        with fewer_collections():
            if not (out / CHECKPOINT).exists():
                scanned = await scan_manifest(options, stop)
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(
                    f"--out {out}: cannot create the folder ({exc.strerror})"
                ) from None
            with lock(out):
                async with Checkpoint(out / CHECKPOINT) as cp:
                    await check_service(cp, options)
                    inputs = ImageInputs(options.manifest.parent)
                    await reconcile(cp, options, inputs, scanned=scanned, stop=stop)
                    return await _work(options, cp, inputs, key, interrupted)
    except Interrupted as exc:  # Ctrl-C while the manifest was read: seconds, not minutes
        reason = f"interrupted: {exc}. Run the same command again to start"
        log.warning("%s", reason)
        return RunResult(EXIT_STOPPED, None, None, reason)


async def _work(
    options: RunOptions,
    cp: Checkpoint,
    inputs: ImageInputs,
    key: str,
    interrupted: asyncio.Event | None,
) -> RunResult:
    started = time.monotonic()
    counts = await cp.counts()
    total = sum(counts.values())
    done_before = sum(counts.get(s, 0) for s in ("COMPLETED", "FAILED", "INVALID"))
    table = options.out / RESULTS
    if done_before == total and await cp.get_meta(RESULTS_META) == RESULTS_FRESH:
        # A finished job run again: every row is final and the table already says so
        # (unless it was replaced since: then it is written again).
        as_is = await anyio.to_thread.run_sync(
            summary_as_is, table, total, time.monotonic() - started
        )
        if as_is is not None:
            log.info("nothing to do: every row is COMPLETED, FAILED or INVALID")
            return RunResult(_exit_code(as_is, None), as_is, table, None)
    await mark_results_stale(cp)
    try:
        await anyio.to_thread.run_sync(remove_partials, options.out)
    except NotADirectoryError as exc:  # images is a symlink: writes would land outside --out
        raise UsageError(
            f"{exc.filename} is {exc.strerror}: batcher writes images only into a folder "
            "of its own inside --out; put a folder there and run again"
        ) from None
    gate = RequestGate(options.rate.scaled(options.scale), retry=options.scaled_retry())
    error: BatcherError | None = None
    other: BaseException | None = None
    async with (
        _service(options) as base_url,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as api_session,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as downloads,
    ):
        ctx = RunContext(
            options=options,
            checkpoint=cp,
            api=ApiClient(api_session, base_url, key),
            downloads=downloads,
            gate=gate,
            inputs=inputs,
            rng=random.Random(),
        )
        if isinstance(interrupted, Interrupt):
            interrupted.context = ctx
        try:
            await _pipeline(ctx, counts, interrupted)
        except BatcherError as exc:
            error = exc
        except BaseException as exc:  # a bug, a cancel: raised as it is, whatever follows
            other = exc
            raise
        finally:
            stopping = error is not None or other is not None or ctx.stop_reason is not None
            with anyio.CancelScope(shield=True):
                end = await finish(ctx, time.monotonic() - started, stopping=stopping)
            if other is not None:
                for note in end.notes:
                    other.add_note(note)
    notes = end.notes
    if ctx.abandoned:
        notes = (abandoned_note(ctx.abandoned), *notes)
    if isinstance(error, ConnectionsLost):
        # Said with the final count: submits on the wire when it stopped were lost too.
        error = lost_connections(ctx)
    if isinstance(error, ApiUnreachable | OutputUnwritable):  # stopped, resumable: exit 4
        if ctx.stop_reason is not None and ctx.stop_reason != str(error):
            notes = (str(error), *notes)  # came while stopping (Ctrl-C, out of credits)
        ctx.stop(str(error))
    elif error is not None:
        # The error that stopped the run is the one raised (a disk that refuses images
        # often refuses results.parquet too): what failed after it is a note under it.
        for note in end.notes:
            error.add_note(note)
        raise error
    for note in notes:
        log.warning("%s", note)
    summary = end.summary
    code = EXIT_STOPPED if summary is None else _exit_code(summary, ctx.stop_reason)
    return RunResult(code, summary, end.results, ctx.stop_reason, notes)


def _exit_code(summary: Summary, stop_reason: str | None) -> int:
    c = summary.counts
    unfinished = sum(n for s, n in c.items() if s not in ("COMPLETED", "FAILED", "INVALID"))
    if stop_reason or unfinished:
        return EXIT_STOPPED
    if c.get("FAILED", 0) or c.get("INVALID", 0):
        return EXIT_FAILED_ROWS
    return EXIT_OK


async def _pipeline(
    ctx: RunContext, before: dict[str, int], interrupted: asyncio.Event | None
) -> None:
    to_submit: Channel[Job] = Channel(0)
    to_fetch: Channel[Flight] = Channel(FETCH_WORKERS)
    poller = Poller(ctx, to_fetch)
    redownloads = Redownloads(ctx)
    progress = Progress(
        ctx,
        before=before,
        enabled=ctx.options.progress,
        log_every_s=ctx.options.log_every_s,
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stage, ctx, ctx.gate.serve)
            tg.start_soon(_stage, ctx, ctx.images.run)
            tg.start_soon(_stage, ctx, poller.run)
            tg.start_soon(_stage, ctx, progress.run)
            tg.start_soon(_stage, ctx, redownloads.run, lambda f: save_outputs(ctx, f, redownloads))
            for _ in range(FETCH_WORKERS):
                tg.start_soon(_stage, ctx, fetch_work, ctx, to_fetch, poller.track, redownloads)
            await resume(ctx, poller, redownloads)
            tg.start_soon(_stage, ctx, feed, ctx, to_submit)
            for _ in range(ctx.options.submit_concurrency):
                tg.start_soon(_stage, ctx, submit_work, ctx, to_submit, poller.track)
            await _until_done(ctx, interrupted)
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        found = _first_batcher_error(group)
        if not isinstance(found, BatcherError) and ctx.stop_error is not None:
            raise ctx.stop_error from group  # another error came up during its grace
        raise found from None
    if ctx.stop_error is not None:
        # Its stage was cancelled in its grace (the run ended meanwhile, or Ctrl-C), and
        # the cancel replaced the error: it still decides how the run ends.
        raise ctx.stop_error


async def _stage(
    ctx: RunContext, work: Callable[[Unpack[Ts]], Awaitable[None]], *args: *Ts
) -> None:
    """One of the pipeline's tasks. An error that stops the run (a refused key, an API
    down...) would cancel every other task at once, cutting off other rows' submits on
    the wire, which a resumed run must then count as maybe billed: they get their answer
    first (see RunContext.wind_down)."""
    try:
        await work(*args)
    except BaseException as exc:
        found = _first_batcher_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if isinstance(found, BatcherError):  # an error that stops the run
            ctx.record_stop(found)
            await ctx.wind_down(ctx.api.timeout_s)
        raise


async def _until_done(ctx: RunContext, interrupted: asyncio.Event | None) -> None:
    """Return when nothing is left to do, or soon after an interrupt."""
    while True:
        if interrupted is not None and interrupted.is_set():
            ctx.stop(
                "interrupted: jobs in flight are saved in the checkpoint. Run the same "
                "command again to resume"
            )
            sig = interrupted.signal if isinstance(interrupted, Interrupt) else None
            wait_s = wire_wait_s(sig, ctx.api.timeout_s)
            if ctx.on_wire:
                log.warning(
                    "waiting up to %g s for %d submits already sent; Ctrl-C again to stop "
                    "now (they would be left as 'outcome unknown', maybe billed)",
                    wait_s,
                    ctx.on_wire,
                )
            await ctx.wind_down(wait_s)
            return
        if ctx.feed_done and ctx.active == 0:
            return
        ctx.requeue_signal.clear()
        with anyio.move_on_after(0.2):
            await ctx.requeue_signal.wait()


def _first_batcher_error(group: BaseExceptionGroup) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_batcher_error(exc)
            if isinstance(found, BatcherError):
                return found
        elif isinstance(exc, BatcherError):
            return exc
    return group


def run(options: RunOptions) -> RunResult:
    """Run (or resume) a job, blocking. Ctrl-C or SIGTERM stops submitting and exits soon
    with everything saved; a second Ctrl-C exits at once (the checkpoint stays valid)."""

    async def main() -> RunResult:
        interrupted = Interrupt()
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, interrupted.on_signal, sig)
        try:
            return await arun(options, interrupted=interrupted)
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
                # Everything is saved by now: a signal while the loop shuts down exits
                # at once instead of raising KeyboardInterrupt out of asyncio.run.
                signal.signal(sig, exit_at_once)

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        return asyncio.run(main())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
