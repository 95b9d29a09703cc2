"""results.parquet: one row per manifest row, written from the checkpoint.

Written in batches (a million rows never sit in memory) to a temporary file that
replaces the old one in one rename (batcher.atomic), so the file on disk is always
complete and valid, whenever and however the run ends.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batcher.atomic import remove_abandoned, replacing
from batcher.checkpoint import Checkpoint
from batcher.inputs import ImageInputs
from batcher.schemas import registry

RESULTS = "results.parquet"
#: The file's schema metadata key for the time scale of the run that wrote it: its
#: durations are wall seconds, ``time_scale`` x the service's (1 against the real API).
TIME_SCALE_KEY = b"batcher.time_scale"

#: The column saying a row's completion was seen by a later run than its submit: its
#: latency_s and notice_lag_s include the stop (see checkpoint migration 7).
SPANS_STOP = "spans_stop"

_TS = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("row", pa.int64()),
    ("model", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("request_id", pa.string()),
    ("attempts", pa.int64()),
    ("retries", pa.int64()),
    ("download_retries", pa.int64()),
    ("unknown_submits", pa.int64()),
    ("rate_limited", pa.int64()),
    ("submitted_at", _TS),
    ("completed_at", _TS),
    ("latency_s", pa.float64()),
    ("notice_lag_s", pa.float64()),
    #: Completion seen by a later run than the submit (checkpoint migration 7): latency_s
    #: and notice_lag_s include the stop. Absent from older files; false for older rows.
    (SPANS_STOP, pa.bool_()),
    ("inference_time", pa.float64()),
    ("metrics", pa.string()),
    ("polls", pa.int64()),
    ("result_reads", pa.int64()),
    ("outputs", pa.list_(pa.string())),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
    ("params", pa.string()),
    ("warnings", pa.string()),
])  # fmt: skip

_SOURCE = (
    "id", "number", "model", "state", "error", "request_id", "attempts", "retries",
    "download_retries", "unknown_submits", "rate_limited", "submitted_at", "completed_at",
    "latency_s", "notice_lag_s", "spans_stop", "inference_time", "metrics", "polls",
    "result_reads", "outputs", "width", "height", "bytes", "sha256", "params", "warnings",
)  # fmt: skip


def _params_for_results(
    raw: str, model: str, inputs: ImageInputs, image_params: dict[str, tuple[str, ...]]
) -> str:
    """The parameters as sent, image values shortened to a reference."""
    params: dict[str, Any] = json.loads(raw)
    changed = False
    for name in image_params.get(model, ()):
        value = params.get(name)
        if isinstance(value, str):
            shown = inputs.reference(name, value)
            changed = changed or shown != value
            params[name] = shown
    if not changed and "\\u" not in raw:
        # The checkpoint's text is json.dumps(sort_keys=True) of these very values, and
        # with no \u escape in it, ensure_ascii=False would write it the same.
        return raw
    text = json.dumps(params, sort_keys=True, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # An INVALID row's lone surrogate (a JSON "\udce9" in the manifest): Parquet
        # strings must be UTF-8, so it stays the escape it was written as.
        return json.dumps(params, sort_keys=True)
    return text


def write_results(
    checkpoint: Checkpoint, out: Path, manifest_dir: Path, *, time_scale: float = 1.0
) -> Path:
    """Write ``out/results.parquet`` atomically, its ``time_scale`` in the schema's
    metadata. Blocking: call from a worker thread.

    First deletes the temporary files of results.parquet a killed run left, of any age:
    the caller holds the run's ``.lock``, so no other process is writing this file (and
    a temporary file still flock-held is left all the same)."""
    final = out / RESULTS
    remove_abandoned(out, RESULTS, min_age_s=0)
    inputs = ImageInputs(manifest_dir)
    image_params = {slug: m.image_params for slug, m in registry().items()}
    schema = SCHEMA.with_metadata({TIME_SCALE_KEY: repr(float(time_scale)).encode()})
    with replacing(final) as f, pq.ParquetWriter(f, schema) as writer:
        for chunk in checkpoint.iter_rows_blocking(_SOURCE):
            cols = list(zip(*chunk, strict=True))
            data = dict(zip(_SOURCE, cols, strict=True))
            data["params"] = tuple(
                _params_for_results(p, m, inputs, image_params)
                for p, m in zip(data["params"], data["model"], strict=True)
            )
            data["outputs"] = tuple(json.loads(o) if o else [] for o in data["outputs"])
            data["submitted_at"] = tuple(_us(t) for t in data["submitted_at"])
            data["completed_at"] = tuple(_us(t) for t in data["completed_at"])
            data["status"] = data.pop("state")
            data["row"] = data.pop("number")
            table = pa.table({f.name: _array(data[f.name], f.type) for f in SCHEMA}, schema=schema)
            writer.write_table(table)
    return final


def time_scale_of(schema: pa.Schema) -> float:
    """The time scale a results table was written at (1.0 when it does not say: a file
    of an older batcher, or saved again by another tool)."""
    raw = (schema.metadata or {}).get(TIME_SCALE_KEY)
    try:
        scale = float(raw) if raw is not None else 1.0
    except ValueError:
        return 1.0
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def scale_note(time_scale: float) -> str | None:
    """A line saying a table's durations and rates are not the service's (None at 1)."""
    if time_scale == 1.0:
        return None
    return (
        f"emulated at time scale {time_scale:g}: job durations here are {time_scale:g} x "
        f"the real service's, and rates {1 / time_scale:g} x"
    )


def without_stops(table: pa.Table) -> tuple[pa.Table, int]:
    """The rows of ``table`` whose latencies do not span a stop, and how many do. A table
    from before the column cannot tell: all its rows are kept."""
    if SPANS_STOP not in table.column_names:
        return table, 0
    spans = pc.fill_null(table.column(SPANS_STOP), False)
    return table.filter(pc.invert(spans)), int(pc.sum(spans.cast(pa.int64())).as_py() or 0)


def stop_note(spanning: int) -> str | None:
    """A line saying ``spanning`` completed rows' latencies are left out (None at 0)."""
    if not spanning:
        return None
    rows, their = (
        ("1 completed job was", "its")
        if spanning == 1
        else (f"{spanning} completed jobs were", "their")
    )
    return (
        f"{rows} submitted before a stop and seen done after it: {their} latency_s and "
        "notice_lag_s include the stop and are left out of those figures"
    )


#: The columns a run's summary reads (batcher.progress.summarize).
SUMMARY_COLUMNS = (
    "status", "error", "latency_s", "inference_time", "unknown_submits", SPANS_STOP,
)  # fmt: skip


def summary_table(checkpoint: Checkpoint) -> pa.Table:
    """results.parquet's SUMMARY_COLUMNS, read from the checkpoint: the summary of a run
    that could not write the file. Blocking: call from a worker thread."""
    schema = pa.schema([SCHEMA.field(name) for name in SUMMARY_COLUMNS])
    source = [_SOURCE[SCHEMA.get_field_index(name)] for name in SUMMARY_COLUMNS]
    tables = []
    for chunk in checkpoint.iter_rows_blocking(source):
        cols = zip(*chunk, strict=True)
        arrays = [_array(col, f.type) for col, f in zip(cols, schema, strict=True)]
        tables.append(pa.Table.from_arrays(arrays, schema=schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _array(values: Sequence[Any], type_: pa.DataType) -> pa.Array:
    """A column of checkpoint values as ``type_``; SQLite keeps booleans as 0 and 1."""
    if type_ == pa.bool_():
        return pa.array(values, type=pa.int64()).cast(type_)
    return pa.array(values, type=type_)


def _us(epoch: float | None) -> int | None:
    return None if epoch is None else round(epoch * 1_000_000)
