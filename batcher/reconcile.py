"""Before a run: the checkpoint brought up to the manifest and flags, rows read only if needed."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from batcher.checkpoint import RESULTS_META, RESULTS_STALE, Checkpoint
from batcher.errors import UsageError
from batcher.inputs import ImageInputs
from batcher.intake import load
from batcher.jobs import SUBMITTED
from batcher.manifest import scan
from batcher.manifest.ticker import checking, reading
from batcher.options import RunOptions
from batcher.preflight import manifest_identity
from batcher.schemas import registry

log = logging.getLogger(__name__)


async def scan_manifest(options: RunOptions, stop: Callable[[], bool] | None = None) -> int:
    """Raise ManifestError for a manifest that cannot be run at all (nothing is sent);
    return its number of rows."""
    ticker = reading(options.manifest)
    info = await anyio.to_thread.run_sync(
        lambda: scan(
            options.manifest, default_model=options.model, should_stop=stop, progress=ticker
        )
    )
    return info.rows


async def reconcile(
    cp: Checkpoint,
    options: RunOptions,
    inputs: ImageInputs,
    *,
    scanned: int | None,
    stop: Callable[[], bool] | None = None,
) -> None:
    """Bring the checkpoint up to the manifest: rows read again only if it changed (or
    some are INVALID, and might be fixed now); FAILED rows reopened if asked. ``scanned``:
    the manifest's rows when the caller has scanned it, else None."""
    # First, while the checkpoint is as the last run left it: its rows of a model gone
    # from BATCHER_MODEL_DIRS would fail a scan of the manifest (as "not a known model")
    # or the run, and must not be reopened by a run that stops at once.
    await refuse_unknown_models(cp, options)
    identity = await anyio.to_thread.run_sync(manifest_identity, options.manifest, options.model)
    counts = await cp.counts()
    if await cp.get_meta("manifest") != identity or counts.get("INVALID", 0):
        rows = scanned if scanned is not None else await scan_manifest(options, stop)
        # A manifest refused here (rows changed) leaves the checkpoint as it was; one
        # interrupted keeps the rows read so far, and no identity is recorded meanwhile:
        # the next run reads its manifest again, and drops those rows if they are not in
        # it (the old file put back as it was would otherwise not be read).
        await cp.set_meta("manifest", "")
        await load(
            cp,
            str(options.manifest),
            options.model,
            inputs,
            stop,
            reopen_known=options.retry_failed,
            reopen_unknown=options.resubmit_unknown,
            progress=checking(options.manifest, rows),
        )
        await mark_results_stale(cp)
        await cp.set_meta("manifest", identity)
    if options.retry_failed or options.resubmit_unknown:
        await mark_results_stale(cp)
        reopened, kept = await cp.reopen_failed(
            known=options.retry_failed, unknown=options.resubmit_unknown
        )
        asked = " ".join(
            flag
            for flag, on in (
                ("--retry-failed", options.retry_failed),
                ("--resubmit-unknown", options.resubmit_unknown),
            )
            if on
        )
        log.info("%s: %d FAILED rows will be submitted again", asked, reopened)
        if kept:
            # At-most-once holds unless asked for by name: --retry-failed is for rows that
            # failed for a reason, and would pay these a second time.
            log.warning(
                "%d FAILED rows whose submit outcome is unknown (their jobs may exist and "
                "be billed) are not sent again; add --resubmit-unknown to send them too",
                kept,
            )


async def refuse_unknown_models(cp: Checkpoint, options: RunOptions) -> None:
    """Raise UsageError, before anything is sent or changed, when rows this run would
    send or fetch (see :meth:`Checkpoint.models_of_work`) are of a model batcher does not
    know now: one read from a folder of BATCHER_MODEL_DIRS when they were taken, and
    that folder is gone from it since."""
    known = registry()
    work = await cp.models_of_work(
        retry_failed=options.retry_failed, resubmit_unknown=options.resubmit_unknown
    )
    missing = {model: n for model, n in work.items() if model not in known}
    if not missing:
        return
    in_flight = await cp.models_in([SUBMITTED])
    told = "; ".join(
        f"{n} rows of model {model!r} still to send or fetch ({in_flight.get(model, 0)} of "
        "them in flight at the service)"
        for model, n in missing.items()
    )
    which = "a model" if len(missing) == 1 else "models"
    raise UsageError(
        f"the checkpoint holds {told}: {which} batcher does not know now (known: "
        f"{', '.join(sorted(known))}). Model files beyond the built-in ones come from the "
        "folders in BATCHER_MODEL_DIRS: set it as it was when those rows were taken, and "
        "run again. Nothing was sent or changed"
    )


# results.parquet is "fresh" when it was written after the checkpoint's last change: a
# run that changes a row marks it stale first, and a run that ends writes it and marks
# it fresh. A killed run leaves it stale; a run with nothing to do and a fresh table
# (re-running a finished job) reads nothing and rewrites nothing.


async def mark_results_stale(cp: Checkpoint) -> None:
    if await cp.get_meta(RESULTS_META) != RESULTS_STALE:
        await cp.set_meta(RESULTS_META, RESULTS_STALE)
