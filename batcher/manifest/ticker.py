"""A log line now and then while a long manifest is read before a run: a million rows
take a minute or two to scan and check before the first submit, and a terminal that
says nothing meanwhile looks hung."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: Seconds between two lines (the first comes this long after the reading starts, so a
#: manifest read in less says nothing).
EVERY_S = 10.0


class RowTicker:
    """``ticker(rows)`` as rows are read: logs ``"<what>: <rows>[ of <total>] rows so far"``
    when ``every_s`` (default :data:`EVERY_S`) has passed since the start or the last
    line. Called from one thread at a time."""

    def __init__(
        self,
        what: str,
        *,
        total: int | None = None,
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._what = what
        self._total = total
        self._every_s = EVERY_S if every_s is None else every_s
        self._clock = clock
        self._next = clock() + self._every_s

    def __call__(self, rows: int) -> None:
        now = self._clock()
        if now < self._next:
            return
        self._next = now + self._every_s
        of = f" of {self._total:,}" if self._total is not None else ""
        log.info("%s: %s%s rows so far", self._what, f"{rows:,}", of)


def reading(manifest: Path) -> RowTicker:
    """The scan's ticker (``batcher run`` and ``batcher validate`` alike)."""
    return RowTicker(f"reading {manifest.name}")


def checking(manifest: Path, rows: int) -> RowTicker:
    """The check's ticker, once the scan has counted the ``rows``."""
    return RowTicker(f"checking the rows of {manifest.name}", total=rows)
