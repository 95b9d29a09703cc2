"""A *finished* run of N rows, made without running N jobs, for the re-run benchmark.

Producing a finished million-row run for real takes hours on this machine (batcher
completes a few hundred jobs a second against the zero-latency emulator). So:

1. the intake is batcher's own (``intake.load`` + the manifest fingerprint in the
   checkpoint's meta, as ``reconcile.reconcile`` does): every row is in the checkpoint
   exactly as a real run would have put it;
2. every row is then marked COMPLETED with the result columns of a real completed row
   (taken from a real run, request id and timestamps made unique per row), and the run's
   end is batcher's own too: results.parquet written, marked fresh;
3. each row gets its image file in ``images/``, named as batcher names it
   (``sink.safe_stem``), as a hard link to one real PNG, so the folder has the real
   number of entries (a re-run lists it) without a million copies.

The re-run benchmark checks this against a finished run made for real at a smaller size.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from batcher.checkpoint import Checkpoint
from batcher.inputs import ImageInputs
from batcher.intake import load
from batcher.preflight import manifest_identity
from batcher.results import write_results
from batcher.run import CHECKPOINT, RESULTS_FRESH, RESULTS_META
from batcher.sink import safe_stem

_RESULT_COLUMNS = (
    "attempts",
    "retries",
    "unknown_submits",
    "polls",
    "latency_s",
    "notice_lag_s",
    "inference_time",
    "metrics",
    "width",
    "height",
    "bytes",
    "sha256",
    "status_url",
    "response_url",
    "submitted_at",
    "completed_at",
)


_LINKS_PER_FILE = 50_000


def template_row(real_out: Path) -> tuple[dict[str, Any], Path]:
    """The result columns of one COMPLETED row of a real run, and its image file."""
    db = sqlite3.connect(real_out / CHECKPOINT)
    try:
        db.row_factory = sqlite3.Row
        row = db.execute(
            f"SELECT outputs, {', '.join(_RESULT_COLUMNS)} FROM jobs "
            "WHERE state='COMPLETED' ORDER BY number LIMIT 1"
        ).fetchone()
    finally:
        db.close()
    if row is None:
        raise RuntimeError(f"{real_out}: no COMPLETED row to copy")
    image = real_out / json.loads(row["outputs"])[0]
    return {k: row[k] for k in _RESULT_COLUMNS}, image


async def _intake(manifest: Path, out: Path, model: str) -> None:
    async with Checkpoint(out / CHECKPOINT) as cp:
        await load(cp, str(manifest), model, ImageInputs(manifest.parent))
        identity = await asyncio.to_thread(manifest_identity, manifest, model)
        await cp.set_meta("manifest", identity)


async def _end(manifest: Path, out: Path) -> None:
    """What a run's end does: write results.parquet from the checkpoint, mark it fresh."""
    async with Checkpoint(out / CHECKPOINT) as cp:
        await asyncio.to_thread(write_results, cp, out, manifest.parent)
        await cp.set_meta(RESULTS_META, RESULTS_FRESH)


def make(manifest: Path, out: Path, model: str, real_out: Path) -> dict[str, float]:
    """Turn ``out`` into a finished run of ``manifest``; returns the seconds each step took."""
    template, image = template_row(real_out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    asyncio.run(_intake(manifest, out, model))
    timings["intake_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    images = out / "images"
    images.mkdir(exist_ok=True)
    db = sqlite3.connect(out / CHECKPOINT, isolation_level=None)
    try:
        db.execute("BEGIN")
        sets = ", ".join(f"{c}=:{c}" for c in _RESULT_COLUMNS)
        db.execute(
            f"UPDATE jobs SET state='COMPLETED', error=NULL, {sets}, "
            "request_id=printf('bench-%010d', number), "
            "submitted_at=:submitted_at + number * 0.001, "
            "completed_at=:completed_at + number * 0.001 "
            "WHERE state='PENDING'",
            template,
        )
        rows = db.execute("SELECT id FROM jobs ORDER BY number").fetchall()
        updates = []
        source = image
        for i, (row_id,) in enumerate(rows):
            if i % _LINKS_PER_FILE == 0:  # ext4 allows 65,000 links to one file
                source = out / f".bench-image-{i // _LINKS_PER_FILE}.png"
                shutil.copyfile(image, source)
            name = f"{safe_stem(row_id)}_0.png"
            target = images / name
            if not target.exists():
                os.link(source, target)
            updates.append((json.dumps([f"images/{name}"]), row_id))
        db.executemany("UPDATE jobs SET outputs=? WHERE id=?", updates)
        db.execute("COMMIT")
    finally:
        db.close()
    timings["complete_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    asyncio.run(_end(manifest, out))
    timings["results_s"] = time.perf_counter() - t0
    return timings


if __name__ == "__main__":
    out = make(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    print(json.dumps(out))
