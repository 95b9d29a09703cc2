"""Intake: every manifest row validated and recorded in the checkpoint before any submit.

A row that breaks its model's schema, or names a missing or non-image local file,
is recorded INVALID with the reason and never sent. A row whose id is already in
the checkpoint with other parameters means the manifest changed under a run: that
stops the run before anything is sent, so nothing done before is overwritten.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import anyio

from batcher.checkpoint import Checkpoint
from batcher.errors import Interrupted, ManifestError
from batcher.inputs import ImageInputs, InputError
from batcher.jobs import INVALID, PENDING, NewRow
from batcher.manifest import ManifestRow, read_rows
from batcher.schemas import get_model, registry, show, validate

log = logging.getLogger(__name__)

BATCH = 2000
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: INVALID rows, and rows sent with a warning, named on the terminal by a run; the rest
#: are counted (all are in results).
SHOWN_INVALID = 10
#: Rows named by the refusal of rows sent before under another id (the rest are counted).
SHOWN_RENAMED = 5


@dataclass(frozen=True)
class Checked:
    """A manifest row after validation: what to send, or why it cannot be sent."""

    row: ManifestRow
    params: dict[str, Any]
    errors: tuple[str, ...]
    warnings: tuple[str, ...]

    def message(self) -> str:
        return _printable("; ".join(self.errors))

    def warning(self) -> str:
        return _printable("; ".join(self.warnings))


def _printable(text: str) -> str:
    # Manifest values (a path, an id) reach the terminal: never a raw ESC or NUL.
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


async def check_row(row: ManifestRow, inputs: ImageInputs) -> Checked:
    """Validate one row against its model, and its local image files."""
    if row.problems:
        return Checked(row, dict(row.params), row.problems, ())
    model = get_model(row.model)
    result = validate(model, row.params, blanks=row.blanks)
    errors = [str(p) for p in result.errors]
    for name in model.image_params:
        value = result.params.get(name)
        if isinstance(value, str) and not any(p.param == name for p in result.errors):
            try:
                await inputs.resolve(name, value)
            except InputError as exc:
                errors.append(str(exc))
    params = result.params if not errors else dict(row.params)
    return Checked(row, params, tuple(errors), tuple(str(w) for w in result.warnings))


async def check_rows(
    rows: Iterator[ManifestRow],
    inputs: ImageInputs,
    batch: int = BATCH,
    progress: Callable[[int], None] | None = None,
) -> AsyncIterator[list[Checked]]:
    """Batches of checked rows, the manifest read in a worker thread. ``progress`` is
    told the rows so far once the caller is done with each batch (has recorded it)."""
    done = 0
    while chunk := await anyio.to_thread.run_sync(lambda: list(islice(rows, batch))):
        yield [await check_row(row, inputs) for row in chunk]
        done += len(chunk)
        if progress is not None:
            progress(done)


async def load(
    checkpoint: Checkpoint,
    manifest: str,
    default_model: str | None,
    inputs: ImageInputs,
    should_stop: Callable[[], bool] | None = None,
    *,
    reopen_known: bool = False,
    reopen_unknown: bool = False,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Record every row; returns how many were read. Raises ManifestError if rows changed,
    Interrupted when ``should_stop`` says so between batches (the rows recorded so far
    stay; the next run reads the manifest again). A FAILED row edited takes its new
    version when it is to be sent again (see Checkpoint.add_rows). ``progress`` is told
    the rows recorded so far after each batch."""
    rows = read_rows(manifest, default_model=default_model)
    await checkpoint.start_listing()
    changed: list[tuple[str, int]] = []
    invalid: list[str] = []
    warned: list[str] = []  # rows sent all the same (an unlisted style): the user must see
    total = invalid_count = warned_count = 0
    async for checked in check_rows(rows, inputs, progress=progress):
        if should_stop is not None and should_stop():
            raise Interrupted(f"stopped while reading {manifest} (row {total}): nothing was sent")
        total += len(checked)
        for c in checked:
            where = f"row {c.row.number} (id {show(c.row.id)})"
            if c.errors:
                invalid_count += 1
                if len(invalid) < SHOWN_INVALID:
                    invalid.append(f"{where}: {c.message()}")
            elif c.warnings:
                warned_count += 1
                if len(warned) < SHOWN_INVALID:
                    warned.append(f"{where}: {c.warning()}")
        new = [
            NewRow(
                id=c.row.id,
                number=c.row.number,
                model=c.row.model,
                digest=c.row.digest,
                params=_jsonable(c.params),
                state=INVALID if c.errors else PENDING,
                error=c.message() or None,
                warnings="; ".join(c.warnings) or None,
            )
            for c in checked
        ]
        changed += await checkpoint.add_rows(
            new, reopen_known=reopen_known, reopen_unknown=reopen_unknown
        )
    if changed:
        await checkpoint.discard_listing()
        listed = ", ".join(f"row {n} (id {show(i)})" for i, n in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        have = "has" if len(changed) == 1 else "have"
        raise ManifestError(
            f"{manifest}: the manifest changed since this output folder was used: {listed}{more} "
            f"now {have} different parameters. Nothing was sent and nothing was overwritten. "
            "Restore the manifest, or use a new --out folder for the changed rows (a FAILED "
            "row is sent again with its edit by --retry-failed, or --resubmit-unknown if its "
            "submit outcome was unknown)" + _BY_NUMBER * all(i == str(n) for i, n in changed)
        )
    count, renamed = await checkpoint.renamed(SHOWN_RENAMED)
    if count:
        await checkpoint.discard_listing()
        raise ManifestError(_renamed_message(manifest, count, renamed))
    deleted, failed = await checkpoint.drop_unlisted()
    if deleted or failed:
        log.warning(
            "%d rows not yet sent are no longer in the manifest: dropped, not sent%s",
            deleted,
            f"; {failed} more had been sent before and are FAILED, not sent again"
            if failed
            else "",
        )
    await _warn_repeated(checkpoint)
    for line in invalid:
        log.warning("INVALID, not sent: %s", line)
    if invalid_count > len(invalid):
        log.warning(
            "%d more INVALID rows; every reason is in results.parquet", invalid_count - len(invalid)
        )
    for line in warned:
        log.warning("sent with a warning: %s", line)
    if warned_count > len(warned):
        log.warning(
            "%d more rows sent with a warning; every warning is in results.parquet",
            warned_count - len(warned),
        )
    return total


#: Said when every row refused as changed is known by its row number: a row added or
#: taken out above them shifts them (no id column, or its cells left empty).
_BY_NUMBER = (
    ". These rows have no id, so they are known by their row number: a row added or taken "
    "out above them moves every row below onto another's number. Put rows back where they "
    "were and add new ones at the end (or give every row an id)"
)


async def _warn_repeated(checkpoint: Checkpoint) -> None:
    """Say which rows to send repeat another, seed included: each is billed for an image
    the other gives too. Sent all the same: a benchmark may want exactly that."""
    seeds = {slug: s for slug, m in registry().items() if (s := m.seed_when_absent) is not None}
    count, shown = await checkpoint.repeated(seeds, SHOWN_RENAMED)
    if count:
        log.warning("%s", _repeated_message(count, shown, seeds))


def _repeated_message(
    count: int, shown: list[tuple[str, int, str, int]], seeds: dict[str, int]
) -> str:
    """The warning for ``count`` rows alike in every parameter to an earlier row, with a
    fixed seed (``shown``: as Checkpoint.repeated gives them)."""
    listed = "; ".join(
        f"row {n} (id {show(i)}) = row {first_n} (id {show(first)})"
        for i, n, first, first_n in shown
    )
    more = f"; and {count - len(shown)} more" if count > len(shown) else ""
    fixed = ", ".join(f"{slug}'s is {seed}" for slug, seed in sorted(seeds.items()) if seed >= 0)
    defaults = f"; a model's default seed is not random: {fixed}" if fixed else ""
    return (
        f"{count} rows repeat an earlier row in every parameter, the seed included (the "
        f"row's own, or the model's default when it gives none{defaults}): each is billed "
        f"and gives the same image as the earlier row: {listed}{more}. Sent all the same; "
        "give each row its own seed to get different images"
    )


def _renamed_message(manifest: str, count: int, shown: list[tuple[str, int, str, str]]) -> str:
    listed = "; ".join(
        f"row {n} (id {show(i)}) has the parameters of id {show(old)} ({state})"
        for i, n, old, state in shown
    )
    more = f"; and {count - len(shown)} more" if count > len(shown) else ""
    return (
        f"{manifest}: rows new to this output folder are rows sent before under an id the "
        f"manifest no longer has: {listed}{more}. Their ids changed (an id column taken out "
        "or rewritten?): sent, they would be paid for again. Nothing was sent. Give them "
        "their ids back (or change a parameter, a seed, to want another image), or use a "
        "new --out folder"
    )


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as JSON can hold them (typed manifests may carry odd cell types)."""
    return {
        k: v if isinstance(v, str | int | float | bool | None) else str(v)
        for k, v in params.items()
    }
