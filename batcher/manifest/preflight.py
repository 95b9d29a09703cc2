"""The preflight pass: read the whole manifest once and refuse it before anything is sent.

It raises :class:`ManifestError` for problems of the whole file: no rows, no model,
unknown or missing columns, duplicated ids (found in bounded memory), or no row that
can be sent. A manifest where only some rows have problems passes: those rows end
INVALID with their reasons.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from batcher.errors import Interrupted, ManifestError
from batcher.manifest.records import SHOWN, Source, open_source, quoted, regular_file
from batcher.manifest.rows import NO_MODEL, read_rows, to_row, unknown_model
from batcher.schemas import ModelSpec, did_you_mean, get_model, registry

log = logging.getLogger(__name__)

_STOP_EVERY = 4096  # rows between two looks at a scan's should_stop (and progress)
_CANDIDATES = 64  # duplicated id hashes resolved to real ids by the second pass
_EDGE = 64 << 10  # bytes hashed at each end of the file by fingerprint()


@dataclass(frozen=True, kw_only=True)
class ManifestInfo:
    """What the preflight scan learned about a manifest that passed it."""

    path: Path
    format: str  # "csv" | "parquet" | "jsonl"
    columns: tuple[str, ...]
    rows: int
    models: tuple[str, ...]  # distinct known models used, sorted


def scan(
    path: str | Path,
    *,
    default_model: str | None,
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ManifestInfo:
    """Stream the whole manifest once and raise :class:`ManifestError` if it is unusable.
    ``should_stop`` is asked every few thousand rows; True raises :class:`Interrupted`.
    ``progress`` is told the rows read so far as often (a :class:`RowTicker`)."""
    path = Path(path)
    if default_model is not None:
        get_model(default_model)
    known = registry()
    source = open_source(path, 4096)
    with _IdHashes() as hashes:
        return _scan(path, source, default_model, known, hashes, should_stop, progress)


def _scan(
    path: Path,
    source: Source,
    default_model: str | None,
    known: Mapping[str, ModelSpec],
    hashes: _IdHashes,
    should_stop: Callable[[], bool] | None,
    progress: Callable[[int], None] | None,
) -> ManifestInfo:
    per_model: dict[str, int] = {}
    no_model: list[int] = []  # the first few rows without a model, then their count
    no_model_count = 0
    unknown_models: list[str] = []  # the first few rows with an unknown model cell
    unknown_model_count = 0
    first_problem = ""
    for number, record in enumerate(source.records, 1):
        if not number % _STOP_EVERY:
            if should_stop is not None and should_stop():
                raise Interrupted(f"stopped while reading {path} (row {number}): nothing was sent")
            if progress is not None:
                progress(number)
        row = to_row(number, record, default_model, known)
        hashes.add(_id_hash(row.id), number)
        if isinstance(record, dict) and row.model in known:
            per_model[row.model] = per_model.get(row.model, 0) + 1
        elif NO_MODEL in row.problems:
            no_model_count += 1
            no_model += [number] if len(no_model) < SHOWN else []
        elif not first_problem:
            first_problem = f"row {number}: {row.problems[0]}"
        if isinstance(record, dict) and row.model and row.model not in known:
            unknown_model_count += 1
            if len(unknown_models) < SHOWN:
                unknown_models.append(f"row {number}: {unknown_model(row.model, known)}")
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
        column_problems = _column_problems(source.columns, [known[m] for m in used], per_model)
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
    stat = regular_file(path)
    try:
        with path.open("rb") as f:
            digest.update(f.read(_EDGE))
            if stat.st_size > 2 * _EDGE:
                f.seek(-_EDGE, os.SEEK_END)
            digest.update(f.read(_EDGE))
    except OSError as exc:
        raise ManifestError(f"{path}: cannot open it ({exc.strerror or exc})") from None
    return f"size={stat.st_size} mtime_ns={stat.st_mtime_ns} sha256={digest.hexdigest()}"


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
            if len(shown) < SHOWN:
                shown.append(row.number)
    found = [i for i, n in seen.items() if n > 1]
    if not found:  # every candidate was a 64-bit hash collision
        return None
    lines = [f"{quoted(i)} on {_rows_text(rows[i], seen[i])}" for i in found[:SHOWN]]
    if repeated > SHOWN:
        lines.append(f"and {repeated - SHOWN} more duplicated ids")
    return "duplicate ids (each row needs its own id):\n  " + "\n  ".join(lines)


def _column_problems(
    columns: Mapping[str, int], models: list[ModelSpec], per_model: Mapping[str, int]
) -> list[str]:
    """Unknown and missing columns. ``columns`` maps each to the row that first gives it
    (0: the header's): a JSONL key may be in one line of a million, so that row is named."""
    problems: list[str] = []
    allowed = {name for m in models for name in m.params}
    unknown = [c for c in columns if c not in allowed and c not in ("id", "model")]
    if unknown:
        choices = allowed | {"id", "model"}
        named = ", ".join(
            f"{quoted(c)}{_first_on(columns[c])}{did_you_mean(c, choices)}" for c in unknown[:SHOWN]
        )
        more = f" and {len(unknown) - SHOWN} more" if len(unknown) > SHOWN else ""
        problems.append(
            f"unknown column{_s(unknown)} {named}{more}; columns must be parameter names "
            f"of {', '.join(m.slug for m in models)}, or id, model"
        )
    for model in models:
        missing = [p for p in model.required_params if p not in columns]
        if missing:
            n = per_model[model.slug]
            problems.append(
                f"missing required column{_s(missing)} {', '.join(map(quoted, missing))}: "
                f"{model.slug} needs {'them' if len(missing) > 1 else 'it'} "
                f"(used by {n} row{'' if n == 1 else 's'})"
            )
    return problems


def _first_on(row: int) -> str:
    return f" first on row {row}" if row else ""


def _rows_text(numbers: list[int], total: int) -> str:
    more = f" and {total - len(numbers)} more" if total > len(numbers) else ""
    return f"row{'' if total == 1 else 's'} {', '.join(map(str, numbers))}{more}"


def _s(items: list[str]) -> str:
    return "s" if len(items) > 1 else ""


def _failure(path: Path, problems: list[str]) -> ManifestError:
    if len(problems) == 1:
        return ManifestError(f"{path}: {problems[0]}")
    body = "\n".join("  - " + p.replace("\n", "\n    ") for p in problems)
    return ManifestError(f"{path}: {len(problems)} problems\n{body}")
