"""Every error batcher raises derives from :class:`BatcherError`.

::

    BatcherError
    ├── UsageError                 a bad flag or option: exit 2, one line, no traceback
    ├── ManifestError              the manifest as a whole is unusable (exit 2, nothing sent)
    ├── SchemaError                a model registry file is malformed
    ├── OutputUnwritable           images cannot be written (disk full...): stop, resumable
    ├── Interrupted                Ctrl-C while the manifest is read: stop, resumable
    ├── RowError                   one row failed; carries .row_id, .request_id, .status
    │   └── InvalidRow             the row broke the model's schema; never sent
    └── ApiError                   the API answered something the run cannot go on with
        ├── AuthError              401 / 403: stop at once
        ├── OutOfCredits           406: stop submitting, finish in-flight work
        ├── UnknownModel           404 on submit: the model slug does not exist
        └── ApiUnreachable         no answer after every retry: stop, resumable
            └── ConnectionsLost    submits lost after sending, many in a row: stop

Messages never contain the API key: the key lives only in the HTTP client's
headers and is never formatted into text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

#: Longest failure reason shown in a summary or report before it is cut.
REASON_CHARS = 100
_URLS = re.compile(r"https?://\S+", re.I)
_IDS = re.compile(
    r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b|\b[0-9a-f]{16,}\b", re.I
)


#: A count of tries in a reason ("15 tries in a row", "submitted 2 times").
_COUNT = re.compile(r"\b\d+(?= (?:tries|times|attempts)\b)")


def reason_key(error: str | None) -> str:
    """What row failures are grouped by in summaries and reports: URLs and request ids
    masked (30 rows failed for one reason are one line, not 30), whitespace folded,
    length capped."""
    return _cut(_masked(error))


def _masked(error: str | None) -> str:
    text = " ".join((error or "(no error text)").split())
    return _IDS.sub("<id>", _URLS.sub("<url>", text))


def _cut(text: str) -> str:
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def group_reasons(errors: Iterable[str | None]) -> list[tuple[str, int]]:
    """Row failures as summaries and reports list them, (reason, rows), most rows first:
    by :func:`reason_key`, and reasons that differ only in a count of tries as one line,
    the counts shown as a range ("15-17 tries in a row"), not a line per count."""
    shapes: dict[str, tuple[int, list[tuple[int, int]]]] = {}
    for error, rows in Counter(errors).items():
        text = _masked(error).replace("\0", "")
        # Cut with each count as one character, "\0": which counts it keeps is known.
        shape = _cut(_COUNT.sub("\0", text))
        counts = [int(n) for n in _COUNT.findall(text)][: shape.count("\0")]
        seen, ranges = shapes.get(shape, (0, [(n, n) for n in counts]))
        ranges = [(min(lo, n), max(hi, n)) for (lo, hi), n in zip(ranges, counts, strict=True)]
        shapes[shape] = (seen + rows, ranges)
    grouped = []
    for shape, (rows, ranges) in shapes.items():
        first, *rest = shape.split("\0")
        shown = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges]
        grouped.append((first + "".join(n + t for n, t in zip(shown, rest, strict=True)), rows))
    return sorted(grouped, key=lambda kv: (-kv[1], kv[0]))


class BatcherError(Exception):
    """Base of every error batcher raises on purpose."""


class UsageError(BatcherError):
    """A command-line flag or API option is wrong."""


class ManifestError(BatcherError):
    """The manifest cannot be used at all (unreadable, duplicate ids, unknown columns)."""


class SchemaError(BatcherError):
    """A model registry file is malformed."""


class OutputUnwritable(BatcherError):
    """The output folder refuses image files (disk full, permissions, ``images`` not a
    folder): every row would fail the same way, so the run stops, resumable."""


class CheckpointUnwritable(OutputUnwritable):
    """The checkpoint cannot be written (disk full, I/O error, made read-only): the run
    stops, resumable, as when images cannot be written. ``reason``: SQLite's words."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RowError(BatcherError):
    """A single row ended in failure; the context travels as attributes."""

    def __init__(
        self,
        message: str,
        *,
        row_id: str | None = None,
        request_id: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.row_id = row_id
        self.request_id = request_id
        self.status = status


class InvalidRow(RowError):
    """The row broke its model's parameter schema; it is never submitted."""


class ApiError(BatcherError):
    """The API answered in a way that stops the run (not a single row)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthError(ApiError):
    """401 or 403: the key is missing, wrong, or lacks permission."""


class OutOfCredits(ApiError):
    """406: the account has no credits left for new jobs."""


class UnknownModel(ApiError):
    """404 on submit: no such model slug."""


class ApiUnreachable(ApiError):
    """The API could not be reached at all after every retry: stop, resumable."""


class Interrupted(BatcherError):
    """A stop signal came while the manifest was being read: nothing was sent."""


class ConnectionsLost(ApiUnreachable):
    """Submits lost after sending, ``in_a_row``, with nothing answered 2xx since the
    first: a connection-reset storm. Stop, resumable; each lost submit is maybe billed."""

    def __init__(self, message: str, *, in_a_row: int) -> None:
        super().__init__(message)
        self.in_a_row = in_a_row
