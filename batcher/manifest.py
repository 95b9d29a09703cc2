"""Read a job manifest (one row = one job) as a stream, and check it before anything is sent.

Formats, by extension: ``.csv``, ``.parquet``, ``.jsonl`` / ``.ndjson``. Rows are read in
batches, so a million-row manifest never sits in memory. :func:`scan` is the preflight
pass that raises :class:`ManifestError` for problems of the whole file; :func:`read_rows`
streams the rows, with problems of a single row in :attr:`ManifestRow.problems`.

Decisions:

- CSV must be UTF-8 (a BOM is fine). A latin-1 fallback decodes anything, so garbled
  prompts would be sent and paid for; the error names the line of the first bad byte.
- CSV cells are text; Parquet and JSONL cells keep their types. Schema validation coerces.
- A JSONL line that is not a JSON object (or nests past MAX_JSON_DEPTH) is a row (it
  counts in the numbering) whose problem names the line; blank lines are skipped and
  not counted.
- Ids are stripped of surrounding spaces; a whole-number id (``7`` or ``7.0``) reads as ``"7"``.
- A string with a lone surrogate (JSON's ``"\\udce9"``, half of a character) is a row
  problem: no UTF-8 file or database can hold it. Such an id reads as the row number.
- An unknown ``--model`` is a :class:`UsageError`; an unknown model in a cell is a row
  problem, but a manifest where no row at all can be sent fails the scan.
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# pyarrow ships no type information; everything taken from it is Any.
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from batcher.errors import Interrupted, ManifestError, UsageError
from batcher.schemas import ModelSpec, did_you_mean, get_model, registry, show

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
#: pyarrow's streaming CSV reader reads up to 32 blocks ahead of its consumer, so the
#: block size bounds the reader's memory (32 MiB here, whatever the file's size). A
#: row longer than a block cannot be read with it: such a file is read again with
#: blocks of CSV_LARGE_BLOCK_BYTES (a 10 MB prompt works), skipping the rows given.
CSV_BLOCK_BYTES = 1 << 20
CSV_LARGE_BLOCK_BYTES = 64 << 20
MAX_ID_CHARS = 512
#: Levels of arrays and objects a JSONL line may nest. The API's parameters are flat; a
#: value nested near Python's recursion limit would crash whatever printed or hashed it.
MAX_JSON_DEPTH = 100

_FORMAT_NAMES = {"csv": "CSV", "parquet": "Parquet", "jsonl": "JSON Lines"}
_SHOWN = 5  # offending rows or values listed in one message
_STOP_EVERY = 4096  # rows between two looks at a scan's should_stop
_CANDIDATES = 64  # duplicated id hashes resolved to real ids by the second pass
_EDGE = 64 << 10  # bytes hashed at each end of the file by fingerprint()
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # in a str, every surrogate is a lone one
_CUT_IN_HALF = "contains an unpaired surrogate (a character cut in half), not valid Unicode"
_NO_MODEL = "has no model (fill its model cell or pass --model)"
_canonical = functools.partial(
    json.dumps, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr
)

#: One row as read: its cells, or why its line could not be read.
Record = dict[str, object] | str


@dataclass(frozen=True, kw_only=True)
class ManifestRow:
    """One job as read from the manifest, before schema validation."""

    number: int  # 1-based data row number, used in messages
    id: str  # the id cell if given, else str(number)
    model: str  # the model cell if given, else the default model ("" when neither)
    params: dict[str, object]  # every other non-empty cell, typed as the file typed it
    problems: tuple[str, ...] = ()  # what made the row unreadable (not schema problems)

    @property
    def digest(self) -> str:
        """sha256 of the canonical (model, params): tells a changed manifest on resume."""
        text = _canonical([self.model, self.params])
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, kw_only=True)
class ManifestInfo:
    """What the preflight scan learned about a manifest that passed it."""

    path: Path
    format: str  # "csv" | "parquet" | "jsonl"
    columns: tuple[str, ...]
    rows: int
    models: tuple[str, ...]  # distinct known models used, sorted


@dataclass(frozen=True, kw_only=True)
class _Source:
    """An open manifest: its columns (JSONL adds them while streaming) and its records."""

    format: str
    columns: dict[str, None]
    records: Iterator[Record]


def read_rows(
    path: str | Path, *, default_model: str | None, batch_rows: int = 4096
) -> Iterator[ManifestRow]:
    """Stream the manifest's rows; run :func:`scan` first, as this checks single rows only."""
    if batch_rows < 1:
        raise UsageError(f"batch_rows must be at least 1, not {batch_rows}")
    if default_model is not None:
        get_model(default_model)
    source = _open(Path(path), batch_rows)
    known = registry()
    return (_row(n, r, default_model, known) for n, r in enumerate(source.records, 1))


def scan(
    path: str | Path,
    *,
    default_model: str | None,
    should_stop: Callable[[], bool] | None = None,
) -> ManifestInfo:
    """Stream the whole manifest once and raise :class:`ManifestError` if it is unusable.
    ``should_stop`` is asked every few thousand rows; True raises :class:`Interrupted`."""
    path = Path(path)
    if default_model is not None:
        get_model(default_model)
    known = registry()
    source = _open(path, 4096)
    with _IdHashes() as hashes:
        return _scan(path, source, default_model, known, hashes, should_stop)


def _scan(
    path: Path,
    source: _Source,
    default_model: str | None,
    known: Mapping[str, ModelSpec],
    hashes: _IdHashes,
    should_stop: Callable[[], bool] | None,
) -> ManifestInfo:
    per_model: dict[str, int] = {}
    no_model: list[int] = []  # the first few rows without a model, then their count
    no_model_count = 0
    unknown_models: list[str] = []  # the first few rows with an unknown model cell
    unknown_model_count = 0
    first_problem = ""
    for number, record in enumerate(source.records, 1):
        if should_stop is not None and not number % _STOP_EVERY and should_stop():
            raise Interrupted(f"stopped while reading {path} (row {number}): nothing was sent")
        row = _row(number, record, default_model, known)
        hashes.add(_id_hash(row.id), number)
        if isinstance(record, dict) and row.model in known:
            per_model[row.model] = per_model.get(row.model, 0) + 1
        elif _NO_MODEL in row.problems:
            no_model_count += 1
            no_model += [number] if len(no_model) < _SHOWN else []
        elif not first_problem:
            first_problem = f"row {number}: {row.problems[0]}"
        if isinstance(record, dict) and row.model and row.model not in known:
            unknown_model_count += 1
            if len(unknown_models) < _SHOWN:
                unknown_models.append(f"row {number}: {_unknown_model(row.model, known)}")
    columns = tuple(source.columns)
    if not hashes.rows:
        empty = "has a header but no rows" if source.format == "csv" else "has no rows"
        raise ManifestError(f"{path}: {empty}")

    problems: list[str] = []
    if no_model_count and "model" not in columns:
        problems.append(
            'no model given: there is no "model" column, so pass --model '
            f"(known models: {', '.join(sorted(known))})"
        )
    elif no_model_count:
        had = "has" if no_model_count == 1 else "have"
        text = _rows_text(no_model, no_model_count)
        problems.append(f"{text} {had} no model; fill the model cell or pass --model")
    used = tuple(sorted(per_model))
    if used:
        column_problems = _column_problems(columns, [known[m] for m in used], per_model)
        if column_problems and unknown_models:
            # A misspelt model's columns are unknown to the models spelt right: say the
            # typo first, or the message blames a column that is fine.
            more = unknown_model_count - len(unknown_models)
            listed = unknown_models + ([f"and {more} more"] if more else [])
            problems.append(
                f"unknown model{'s' if unknown_model_count > 1 else ''} (columns are checked "
                "against the known models only):\n  " + "\n  ".join(listed)
            )
        problems += column_problems
    elif first_problem:
        problems.append(f"no row can be sent; the first, {first_problem}")
    duplicates = _duplicates(path, hashes, default_model, known)
    if duplicates:
        problems.append(duplicates)
    if problems:
        raise _failure(path, problems)
    log.debug("%s: %d rows, models %s", path, hashes.rows, ", ".join(used))
    return ManifestInfo(
        path=path, format=source.format, columns=columns, rows=hashes.rows, models=used
    )


def fingerprint(path: str | Path) -> str:
    """A cheap identity of the file for logs: size, mtime and a hash of both ends."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        stat = path.stat()
        with path.open("rb") as f:
            digest.update(f.read(_EDGE))
            if stat.st_size > 2 * _EDGE:
                f.seek(-_EDGE, os.SEEK_END)
            digest.update(f.read(_EDGE))
    except OSError as exc:
        raise ManifestError(f"{path}: cannot open it ({exc.strerror or exc})") from None
    return f"size={stat.st_size} mtime_ns={stat.st_mtime_ns} sha256={digest.hexdigest()}"


def _row(
    number: int, record: Record, default_model: str | None, known: Mapping[str, ModelSpec]
) -> ManifestRow:
    if isinstance(record, str):
        model = default_model or ""
        return ManifestRow(
            number=number, id=str(number), model=model, params={}, problems=(record,)
        )
    problems: list[str] = []
    row_id = _id_of(record.get("id"), number, problems)
    model = _model_of(record.get("model"), default_model, known, problems)
    params = {k: v for k, v in record.items() if k not in ("id", "model") and not _is_blank(v)}
    problems += [f"column {_printable(k)}: {_CUT_IN_HALF}" for k, v in params.items() if _cut(v)]
    return ManifestRow(
        number=number, id=row_id, model=model, params=params, problems=tuple(problems)
    )


def _is_blank(value: object) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _id_of(raw: object, number: int, problems: list[str]) -> str:
    if _is_blank(raw):
        return str(number)
    if _cut(raw):
        problems.append(f"column id: {_CUT_IN_HALF}")
        return str(number)
    if isinstance(raw, str):
        text = raw.strip() or str(number)
    elif isinstance(raw, int | float) and not isinstance(raw, bool) and float(raw).is_integer():
        text = str(int(raw))
    else:
        problems.append(f"id={show(raw)} is not text or a whole number")
        return str(number)
    if len(text) > MAX_ID_CHARS:
        problems.append(f"id is {len(text)} characters long; the limit is {MAX_ID_CHARS}")
    elif _CONTROL.search(text):
        problems.append(f"id {_quoted(text)} contains a control character")
    return text


def _model_of(
    raw: object, default_model: str | None, known: Mapping[str, ModelSpec], problems: list[str]
) -> str:
    text = "" if _is_blank(raw) else str(raw).strip()
    if _cut(text):
        problems.append(f"column model: {_CUT_IN_HALF}")
        return ""
    if not text:
        if default_model is None:
            problems.append(_NO_MODEL)
        return default_model or ""
    if text not in known:
        problems.append(_unknown_model(text, known))
    return text


def _unknown_model(text: str, known: Mapping[str, ModelSpec]) -> str:
    return f"model={show(text)} is not a known model{did_you_mean(text, known)}"


def _cut(value: object) -> bool:
    """Whether a string in value (or in its lists and dicts, keys too) has a lone surrogate."""
    if isinstance(value, str):
        return not value.isascii() and _SURROGATE.search(value) is not None
    stack = [value]
    while stack:  # not recursive: JSON nests as deep as the parser allowed
        item = stack.pop()
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple):
            stack += item
        elif isinstance(item, str) and _cut(item):
            return True
    return False


def _printable(name: str) -> str:
    """A column name safe to write anywhere (its own surrogates escaped)."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _id_hash(row_id: str) -> int:
    """64 bits of the id: a million of them fit in 8 MB, unlike a set of strings."""
    raw = hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(raw, "little", signed=True)


class _IdHashes:
    """(id hash, row number) of every row, spilled to a temporary SQLite file: repeated
    ids are found in bounded memory however long the manifest (a million rows held in
    memory would cost tens of MB, and a hash table over them as much again)."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="batcher-ids-")
        self._db = sqlite3.connect(Path(self._folder.name) / "ids.sqlite", isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-8192"):
            self._db.execute(f"PRAGMA {pragma}")  # scratch data: 8 MiB of cache, no journal
        self._db.execute("CREATE TABLE h (v INTEGER NOT NULL, n INTEGER NOT NULL)")
        self._pending: list[tuple[int, int]] = []
        self.rows = 0

    def __enter__(self) -> _IdHashes:
        return self

    def __exit__(self, *exc: object) -> None:
        self._db.close()
        self._folder.cleanup()

    def add(self, value: int, number: int) -> None:
        self._pending.append((value, number))
        self.rows += 1
        if len(self._pending) >= 8192:
            self._flush()

    def _flush(self) -> None:
        with self._db:  # one transaction per batch, not one per row
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO h VALUES (?, ?)", self._pending)
        self._pending.clear()

    def repeated(self, limit: int) -> tuple[int, set[int], int]:
        """How many hashes occur more than once; up to ``limit`` of them; and the last
        row number on which one of those occurs."""
        self._flush()
        self._db.execute("CREATE INDEX h_v ON h(v)")
        repeated = "SELECT v FROM h GROUP BY v HAVING COUNT(*) > 1"
        (count,) = self._db.execute(f"SELECT COUNT(*) FROM ({repeated})").fetchone()
        shown = {v for (v,) in self._db.execute(f"{repeated} LIMIT ?", (limit,))}
        last = 0
        for value in shown:
            (most,) = self._db.execute("SELECT MAX(n) FROM h WHERE v = ?", (value,)).fetchone()
            last = max(last, most)
        return int(count), shown, last


def _duplicates(
    path: Path, hashes: _IdHashes, default_model: str | None, known: Mapping[str, ModelSpec]
) -> str | None:
    """The duplicate-id problem, or None: hashes find candidates, a second pass names them."""
    repeated, wanted, last = hashes.repeated(_CANDIDATES)
    if not repeated:
        return None
    rows: dict[str, list[int]] = {}
    seen: dict[str, int] = {}
    for row in read_rows(path, default_model=default_model):
        if row.number > last:
            break
        if _id_hash(row.id) in wanted:
            seen[row.id] = seen.get(row.id, 0) + 1
            shown = rows.setdefault(row.id, [])
            if len(shown) < _SHOWN:
                shown.append(row.number)
    found = [i for i, n in seen.items() if n > 1]
    if not found:  # every candidate was a 64-bit hash collision
        return None
    lines = [f"{_quoted(i)} on {_rows_text(rows[i], seen[i])}" for i in found[:_SHOWN]]
    if repeated > _SHOWN:
        lines.append(f"and {repeated - _SHOWN} more duplicated ids")
    return "duplicate ids (each row needs its own id):\n  " + "\n  ".join(lines)


def _column_problems(
    columns: tuple[str, ...], models: list[ModelSpec], per_model: Mapping[str, int]
) -> list[str]:
    problems: list[str] = []
    allowed = {name for m in models for name in m.params}
    unknown = [c for c in columns if c not in allowed and c not in ("id", "model")]
    if unknown:
        named = ", ".join(f"{_quoted(c)}{did_you_mean(c, allowed)}" for c in unknown[:_SHOWN])
        more = f" and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else ""
        problems.append(
            f"unknown column{_s(unknown)} {named}{more}; columns must be parameter names "
            f"of {', '.join(m.slug for m in models)}, or id, model"
        )
    for model in models:
        missing = [p for p in model.required_params if p not in columns]
        if missing:
            n = per_model[model.slug]
            problems.append(
                f"missing required column{_s(missing)} {', '.join(map(_quoted, missing))}: "
                f"{model.slug} needs {'them' if len(missing) > 1 else 'it'} "
                f"(used by {n} row{'' if n == 1 else 's'})"
            )
    return problems


def _open(path: Path, batch_rows: int) -> _Source:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        kind = repr(path.suffix) if path.suffix else "(no extension)"
        raise ManifestError(f"{path}: unknown manifest type {kind}; use {', '.join(FORMATS)}")
    try:
        with path.open("rb") as f:
            empty = not f.read(1)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot open it ({exc.strerror or exc})") from None
    if empty:
        raise ManifestError(f"{path}: the file is empty")
    columns: dict[str, None] = {}
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
    return _Source(format=fmt, columns=columns, records=_guarded(path, fmt, records))


def _guarded(path: Path, fmt: str, records: Iterator[Record]) -> Iterator[Record]:
    """The records, with any pyarrow or I/O error turned into a :class:`ManifestError`."""
    try:
        yield from records
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, fmt, exc) from None


def _unique_columns(path: Path, names: list[str]) -> dict[str, None]:
    columns = dict.fromkeys(names)
    if len(columns) < len(names):
        twice = next(n for n in columns if names.count(n) > 1)
        raise ManifestError(f"{path}: column {_quoted(twice)} appears more than once")
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
        more = f" and {len(ragged) - _SHOWN} more" if len(ragged) > _SHOWN else ""
        listed = ", ".join(ragged[:_SHOWN])
        raise ManifestError(
            f"{path}: every row needs the header's {len(names)} cells; {listed}{more}"
        )


def _csv_reader(
    path: Path, names: list[str], block: int, ragged: list[str]
) -> pa_csv.CSVStreamingReader:
    def skip(row: object) -> str:
        number, cells = row.number - 1, row.actual_columns  # type: ignore[attr-defined]
        ragged.append(f"row {number} has {cells}")
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
            yield from records


def _first_not_utf8(batch: Any, given: int) -> str:
    """Where the batch's first string that is not UTF-8 is: cell by cell, so slow, but only
    once the batch has failed."""
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        for i in range(len(column)):
            try:
                column[i].as_py()
            except UnicodeDecodeError as exc:
                byte = exc.object[exc.start]
                return f" (column {_quoted(name)}, row {given + i + 1}, byte 0x{byte:02x})"
    return ""


def _batch_records(batch: object, batch_rows: int) -> Iterator[Record]:
    """Python objects for batch_rows rows at a time: a CSV batch is one whole block."""
    for start in range(0, batch.num_rows, batch_rows):  # type: ignore[attr-defined]
        yield from batch.slice(start, batch_rows).to_pylist()  # type: ignore[attr-defined]


def _jsonl_records(path: Path, columns: dict[str, None]) -> Iterator[Record]:
    """Line by line (pyarrow.json reads whole files); adds each key seen to columns."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            line = raw.removeprefix(codecs.BOM_UTF8) if line_no == 1 else raw
            if line.strip():
                record = _json_record(line, line_no)
                if isinstance(record, dict):
                    columns.update(dict.fromkeys(record))
                yield record


class _NotJsonNumber(ValueError):
    """NaN, Infinity or -Infinity: Python's json reads them, JSON has no such numbers."""


def _refuse_constant(name: str) -> object:
    raise _NotJsonNumber(name)


def _json_record(line: bytes, line_no: int) -> Record:
    try:
        value = json.loads(line.decode("utf-8"), parse_constant=_refuse_constant)
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


def _rows_text(numbers: list[int], total: int) -> str:
    more = f" and {total - len(numbers)} more" if total > len(numbers) else ""
    return f"row{'' if total == 1 else 's'} {', '.join(map(str, numbers))}{more}"


def _s(items: list[str]) -> str:
    return "s" if len(items) > 1 else ""


def _quoted(text: str) -> str:
    """A name or id in double quotes, control characters escaped, long ones cut."""
    return json.dumps(text if len(text) <= 60 else text[:57] + "...", ensure_ascii=False)


def _failure(path: Path, problems: list[str]) -> ManifestError:
    if len(problems) == 1:
        return ManifestError(f"{path}: {problems[0]}")
    body = "\n".join("  - " + p.replace("\n", "\n    ") for p in problems)
    return ManifestError(f"{path}: {len(problems)} problems\n{body}")
