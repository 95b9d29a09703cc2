"""`batcher validate`: every check `batcher run` makes before sending, and nothing sent."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from batcher.collector import fewer_collections
from batcher.inputs import ImageInputs
from batcher.intake import check_rows
from batcher.manifest import read_rows, scan
from batcher.manifest.ticker import checking, reading
from batcher.schemas import show


async def _check(manifest: Path, model: str | None, max_errors: int) -> int:
    ticker = reading(manifest)
    info = await asyncio.to_thread(lambda: scan(manifest, default_model=model, progress=ticker))
    inputs = ImageInputs(manifest.parent)
    invalid = warned = 0
    rows = read_rows(manifest, default_model=model)
    async for batch in check_rows(rows, inputs, progress=checking(manifest, info.rows)):
        for checked in batch:
            where = f"row {checked.row.number} (id {show(checked.row.id)})"
            if checked.errors:
                invalid += 1
                if invalid <= max_errors:
                    print(f"{manifest}: {where}: {checked.message()}", file=sys.stderr)
            for warning in checked.warnings:
                warned += 1
                if warned <= max_errors:
                    print(f"{manifest}: {where}: warning: {warning}", file=sys.stderr)
    print(
        f"{manifest}: {info.rows} rows ({info.format}; models: {', '.join(info.models)}): "
        f"{info.rows - invalid} valid, {invalid} invalid, {warned} warnings"
    )
    return 3 if invalid else 0


def validate_manifest(manifest: Path, model: str | None, max_errors: int) -> int:
    """Print every problem of the manifest; the exit status says whether all rows are valid."""
    with fewer_collections():
        return asyncio.run(_check(manifest, model, max_errors))
