"""One manifest record as a job: its id, its model and its parameters, or its problems.

- Ids are stripped of surrounding spaces; a whole-number id (``7`` or ``7.0``) reads as ``"7"``.
- A string with a lone surrogate (JSON's ``"\\udce9"``, half of a character) is a row
  problem: no UTF-8 file or database can hold it. Such an id reads as the row number.
- An unknown model in a cell is a row problem (an unknown ``--model`` is a
  :class:`UsageError`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from batcher.errors import UsageError
from batcher.manifest.records import Record, RepeatedKeys, open_source, quoted
from batcher.schemas import ModelSpec, did_you_mean, get_model, registry, show

MAX_ID_CHARS = 512
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # in a str, every surrogate is a lone one
_CUT_IN_HALF = "contains an unpaired surrogate (a character cut in half), not valid Unicode"
NO_MODEL = "has no model (fill its model cell or pass --model)"
_canonical = functools.partial(
    json.dumps, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr
)


@dataclass(frozen=True, kw_only=True)
class ManifestRow:
    """One job as read from the manifest, before schema validation."""

    number: int  # 1-based data row number, used in messages
    id: str  # the id cell if given, else str(number)
    model: str  # the model cell if given, else the default model ("" when neither)
    params: dict[str, object]  # every other non-empty cell, typed as the file typed it
    problems: tuple[str, ...] = ()  # what made the row unreadable (not schema problems)
    #: Cells given empty (None, "" or NaN): not sent, but named if the model needs them.
    blanks: Mapping[str, object] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """sha256 of the canonical (model, params): tells a changed manifest on resume."""
        text = _canonical([self.model, self.params])
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def read_rows(
    path: str | Path, *, default_model: str | None, batch_rows: int = 4096
) -> Iterator[ManifestRow]:
    """Stream the manifest's rows; run :func:`scan` first, as this checks single rows only."""
    if batch_rows < 1:
        raise UsageError(f"batch_rows must be at least 1, not {batch_rows}")
    if default_model is not None:
        get_model(default_model)
    source = open_source(Path(path), batch_rows)
    known = registry()
    return (to_row(n, r, default_model, known) for n, r in enumerate(source.records, 1))


def to_row(
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
    params: dict[str, object] = {}
    blanks: dict[str, object] = {}
    for name, value in record.items():
        if name not in ("id", "model"):
            (blanks if _is_blank(value) else params)[name] = value
    problems += [f"column {_printable(k)}: {_CUT_IN_HALF}" for k, v in params.items() if _cut(v)]
    if isinstance(record, RepeatedKeys):
        # json keeps the last of them: which one the writer meant cannot be known.
        problems += [
            f"the key {quoted(_printable(k))} is given more than once in the line (only the "
            "last would be read): give it once"
            for k in record.repeated
        ]
    return ManifestRow(
        number=number,
        id=row_id,
        model=model,
        params=params,
        problems=tuple(problems),
        blanks=blanks,
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
        problems.append(f"id {quoted(text)} contains a control character")
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
            problems.append(NO_MODEL)
        return default_model or ""
    if text not in known:
        problems.append(unknown_model(text, known))
    return text


def unknown_model(text: str, known: Mapping[str, ModelSpec]) -> str:
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
