"""Manifest files as a stream of records: CSV, Parquet or JSON Lines, read in batches.

- CSV must be UTF-8 (a BOM is fine). A latin-1 fallback decodes anything, so garbled
  prompts would be sent and paid for; the error names the line of the first bad byte.
- CSV cells are text; Parquet and JSONL cells keep their types (a Parquet decimal reads as
  an int when whole, else a float). Schema validation coerces.
- The manifest must be a regular file: a pipe cannot be read twice.
- A JSONL line that is not a JSON object (or nests past MAX_JSON_DEPTH) is a record of
  its own problem (it counts in the numbering); blank lines are skipped and not counted.
  An object that gives a key twice reads as a :class:`RepeatedKeys`, a row problem.
- A problem of the whole file (unreadable, ragged CSV, duplicated column) raises
  :class:`ManifestError`.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

# pyarrow ships no type information; everything taken from it is Any.
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from batcher.errors import ManifestError

FORMATS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
#: pyarrow's streaming CSV reader reads up to 32 blocks ahead of its consumer, so the
#: block size bounds the reader's memory (32 MiB here, whatever the file's size). A
#: row longer than a block cannot be read with it: such a file is read again with
#: blocks of CSV_LARGE_BLOCK_BYTES (a 10 MB prompt works), skipping the rows given.
CSV_BLOCK_BYTES = 1 << 20
CSV_LARGE_BLOCK_BYTES = 64 << 20
#: Levels of arrays and objects a JSONL line may nest. The API's parameters are flat; a
#: value nested near Python's recursion limit would crash whatever printed or hashed it.
MAX_JSON_DEPTH = 100
_FORMAT_NAMES = {"csv": "CSV", "parquet": "Parquet", "jsonl": "JSON Lines"}
SHOWN = 5  # offending rows or values listed in one message
#: One row as read: its cells, or why its line could not be read.
Record = dict[str, object] | str


@dataclass(frozen=True, kw_only=True)
class Source:
    """An open manifest: its columns (JSONL adds them while streaming) and its records."""

    format: str
    #: Each column, with the row that first gives it: 0 for a header's (CSV, Parquet).
    columns: dict[str, int]
    records: Iterator[Record]


def open_source(path: Path, batch_rows: int) -> Source:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        kind = repr(path.suffix) if path.suffix else "(no extension)"
        raise ManifestError(f"{path}: unknown manifest type {kind}; use {', '.join(FORMATS)}")
    if not regular_file(path).st_size:
        raise ManifestError(f"{path}: the file is empty")
    columns: dict[str, int] = {}
    try:
        if fmt == "csv":
            columns = _unique_columns(path, _csv_header(path))
            records = _csv_records(path, list(columns), batch_rows)
        elif fmt == "parquet":
            with pq.ParquetFile(path) as parquet:
                columns = _unique_columns(path, parquet.schema_arrow.names)
            records = _parquet_records(path, batch_rows)
        else:
            records = _jsonl_records(path, columns)
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, fmt, exc) from None
    return Source(format=fmt, columns=columns, records=_guarded(path, fmt, records))


def regular_file(path: Path) -> os.stat_result:
    """The file's stat, or a :class:`ManifestError` if it is not a regular file: a run
    reads its manifest more than once, which a pipe cannot give (and opening one with no
    writer waits forever)."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot open it ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ManifestError(f"{path}: is a folder, not a manifest file")
    if not stat.S_ISREG(info.st_mode):
        raise ManifestError(
            f"{path}: is not a regular file (a pipe or a device?); batcher reads a manifest "
            "more than once, so give it a file"
        )
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ManifestError(f"{path}: cannot open it ({exc.strerror or exc})") from None
    return info


def _guarded(path: Path, fmt: str, records: Iterator[Record]) -> Iterator[Record]:
    """The records, with any pyarrow or I/O error turned into a :class:`ManifestError`."""
    try:
        yield from records
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, fmt, exc) from None


def _unique_columns(path: Path, names: list[str]) -> dict[str, int]:
    columns = dict.fromkeys(names, 0)
    if len(columns) < len(names):
        twice = next(n for n in columns if names.count(n) > 1)
        raise ManifestError(f"{path}: column {quoted(twice)} appears more than once")
    return columns


def _csv_header(path: Path) -> list[str]:
    """The header as pyarrow will see it: the first non-blank record, BOM stripped."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            header = next((row for row in csv.reader(f) if row), None)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except csv.Error as exc:
        raise ManifestError(f"{path}: the header is not valid CSV ({exc})") from None
    if header is None:
        raise ManifestError(f"{path}: the file is empty (no header row)")
    if len(header) == 1 and (sep := next((c for c in ";\t|" if c in header[0]), None)):
        raise ManifestError(
            f"{path}: the header is one column, {quoted(header[0])}: batcher reads "
            f"comma-separated CSV, and this file looks separated by {sep!r}"
        )
    unnamed = [n for n, name in enumerate(header, 1) if not name.strip()]
    if unnamed:
        which = ", ".join(map(str, unnamed[:SHOWN])) + (" ..." if len(unnamed) > SHOWN else "")
        few = len(unnamed) > 1
        raise ManifestError(
            f"{path}: column{'s' * few} {which} of the header {'have' if few else 'has'} no "
            f"name (a trailing comma, as spreadsheets write?): name {'them' if few else 'it'}, "
            f"or remove {'them' if few else 'it'} from every line"
        )
    return header


def _csv_records(path: Path, names: list[str], batch_rows: int) -> Iterator[Record]:
    """Every cell as text ("" stays ""); a row with the wrong cell count fails the file."""
    given = 0
    for block in (CSV_BLOCK_BYTES, CSV_LARGE_BLOCK_BYTES):
        ragged: list[str] = []
        try:
            skip = given  # rows already given, when a long row made us start again
            for batch in _csv_reader(path, names, block, ragged):
                if ragged:
                    break
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                for record in _batch_records(batch.slice(skip), batch_rows):
                    given += 1
                    yield record
                skip = 0
        except pa.ArrowInvalid as exc:
            if "straddling" in str(exc) and block < CSV_LARGE_BLOCK_BYTES:
                continue  # a row longer than a block
            raise
        break
    if ragged:
        more = f" and {len(ragged) - SHOWN} more" if len(ragged) > SHOWN else ""
        listed = ", ".join(ragged[:SHOWN])
        raise ManifestError(
            f"{path}: every row needs the header's {len(names)} cells; {listed}{more}"
        )


def _csv_reader(
    path: Path, names: list[str], block: int, ragged: list[str]
) -> pa_csv.CSVStreamingReader:
    def skip(row: object) -> str:
        number, cells = row.number - 1, row.actual_columns  # type: ignore[attr-defined]
        unclosed = (row.text or "").count('"') % 2  # type: ignore[attr-defined]
        why = " (a quote opened in it is never closed: the rest of the file is one cell)"
        ragged.append(f"row {number} has {cells}{why if unclosed else ''}")
        return "skip"

    reader = pa_csv.open_csv(
        path,
        read_options=pa_csv.ReadOptions(block_size=block, use_threads=False),
        parse_options=pa_csv.ParseOptions(invalid_row_handler=skip),
        convert_options=pa_csv.ConvertOptions(
            column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=False
        ),
    )
    if reader.schema.names != names:
        raise ManifestError(f"{path}: the header could not be read consistently as CSV")
    return reader


def _parquet_records(path: Path, batch_rows: int) -> Iterator[Record]:
    given = 0
    with pq.ParquetFile(path) as parquet:
        schema = parquet.schema_arrow
        decimals = [f.name for f in schema if pa.types.is_decimal(f.type)]
        for batch in parquet.iter_batches(batch_size=batch_rows):
            try:
                records = batch.to_pylist()  # at most batch_rows rows
            except UnicodeDecodeError:  # Parquet does not check that strings are UTF-8
                where = _first_not_utf8(batch, given)
                raise ManifestError(
                    f"{path}: not valid UTF-8{where}; batcher reads Parquet strings as UTF-8 "
                    "only, so write them as UTF-8"
                ) from None
            given += len(records)
            if decimals:
                records = [_numbers(record, decimals) for record in records]
            yield from records


def _numbers(record: dict[str, object], columns: list[str]) -> dict[str, object]:
    """Decimal cells as numbers: whole ones as int (exact, as a seed needs), others float."""
    for name in columns:
        value = record[name]
        if isinstance(value, Decimal) and value.is_finite():
            record[name] = int(value) if value == value.to_integral_value() else float(value)
    return record


def _first_not_utf8(batch: Any, given: int) -> str:
    """Where the batch's first string that is not UTF-8 is: cell by cell, so slow, but only
    once the batch has failed."""
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        for i in range(len(column)):
            try:
                column[i].as_py()
            except UnicodeDecodeError as exc:
                byte = exc.object[exc.start]
                return f" (column {quoted(name)}, row {given + i + 1}, byte 0x{byte:02x})"
    return ""


def _batch_records(batch: object, batch_rows: int) -> Iterator[Record]:
    """Python objects for batch_rows rows at a time: a CSV batch is one whole block."""
    for start in range(0, batch.num_rows, batch_rows):  # type: ignore[attr-defined]
        yield from batch.slice(start, batch_rows).to_pylist()  # type: ignore[attr-defined]


def _jsonl_records(path: Path, columns: dict[str, int]) -> Iterator[Record]:
    """Line by line (pyarrow.json reads whole files); adds each key seen to columns, with
    the number of the first row that gives it."""
    number = 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            line = raw.removeprefix(codecs.BOM_UTF8) if line_no == 1 else raw
            if line.strip():
                number += 1
                record = _json_record(line, line_no)
                if isinstance(record, dict):
                    columns.update({k: number for k in record if k not in columns})
                yield record


class RepeatedKeys(dict[str, object]):
    """A JSON object that gives some keys more than once: json.loads keeps the last value
    of each, which silently drops what the writer may have meant."""

    repeated: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    value = dict(pairs)
    if len(value) == len(pairs):
        return value
    seen: set[str] = set()
    repeated: dict[str, None] = {}  # in the order met, once each
    for key, _ in pairs:
        if key in seen:
            repeated[key] = None
        seen.add(key)
    marked = RepeatedKeys(value)
    marked.repeated = tuple(repeated)
    return marked


class _NotJsonNumber(ValueError):
    """NaN, Infinity or -Infinity: Python's json reads them, JSON has no such numbers."""


def _refuse_constant(name: str) -> object:
    raise _NotJsonNumber(name)


#: One decoder for every line: json.loads with options builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=_object)


def _json_record(line: bytes, line_no: int) -> Record:
    try:
        value = _DECODER.decode(line.decode("utf-8"))
    except UnicodeDecodeError:
        return f"line {line_no} is not valid UTF-8"
    except _NotJsonNumber as exc:
        # Before: NaN was dropped as "not given" (the server's default was used, silently)
        # and Infinity was sent as the text "inf".
        return (
            f"line {line_no} is not valid JSON ({exc} is not a JSON number; write null for "
            "a value not given)"
        )
    except json.JSONDecodeError as exc:
        return f"line {line_no} is not valid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return _too_deep(line_no)
    if not isinstance(value, dict):
        return f"line {line_no} is not a JSON object (it is {type(value).__name__})"
    # Fewer brackets than the limit cannot nest past it: most lines skip the walk.
    if line.count(b"[") + line.count(b"{") > MAX_JSON_DEPTH and _deeper(value, MAX_JSON_DEPTH):
        return _too_deep(line_no)
    return value


def _too_deep(line_no: int) -> str:
    return f"line {line_no} is nested too deeply (more than {MAX_JSON_DEPTH} levels of [ and {{)"


def _deeper(value: dict[str, object], limit: int) -> bool:
    """Whether lists and dicts nest in value more than limit levels (value is level 1)."""
    stack: list[tuple[Iterable[object], int]] = [(value.values(), 1)]
    while stack:  # not recursive: that is what is being guarded against
        children, depth = stack.pop()
        for child in children:
            if isinstance(child, dict | list):
                if depth == limit:
                    return True
                stack.append((child.values() if isinstance(child, dict) else child, depth + 1))
    return False


def _unreadable(path: Path, fmt: str, exc: Exception) -> ManifestError:
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    if "UTF8" in text:
        return _not_utf8(path)
    if "straddl" in text:
        limit = f"{CSV_LARGE_BLOCK_BYTES / 2**20:g} MiB"
        return ManifestError(f"{path}: a CSV row is larger than {limit}, the most batcher reads")
    text = text if len(text) <= 200 else text[:197] + "..."
    return ManifestError(f"{path}: cannot be read as {_FORMAT_NAMES[fmt]} ({text})")


def _not_utf8(path: Path) -> ManifestError:
    """Name the line of the first byte that is not UTF-8 (splitting on newlines is safe)."""
    where = ""
    with path.open("rb") as f:
        for line_no, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                where = f" (line {line_no}, byte 0x{line[exc.start]:02x})"
                break
    return ManifestError(
        f"{path}: not valid UTF-8{where}; batcher reads CSV as UTF-8 only, "
        'so re-save it as UTF-8 (in Excel: "CSV UTF-8")'
    )


def quoted(text: str) -> str:
    """A name or id in double quotes, control characters escaped, long ones cut."""
    return json.dumps(text if len(text) <= 60 else text[:57] + "...", ensure_ascii=False)
