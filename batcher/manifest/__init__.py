"""Read a job manifest (one row = one job) as a stream, and check it before anything is sent.

Formats, by extension: ``.csv``, ``.parquet``, ``.jsonl`` / ``.ndjson``. Rows are read in
batches, so a million-row manifest never sits in memory. The flow:

- :mod:`~batcher.manifest.records`: the file, as a stream of records (cells by column);
- :mod:`~batcher.manifest.rows`: each record as a :class:`ManifestRow` (id, model,
  params), with problems of that row alone in :attr:`ManifestRow.problems`;
- :mod:`~batcher.manifest.preflight`: :func:`scan`, the pass over the whole file that
  raises :class:`~batcher.errors.ManifestError` before anything is sent.

A manifest where no row at all can be sent fails the scan.
"""

from batcher.manifest.preflight import ManifestInfo, fingerprint, scan
from batcher.manifest.records import FORMATS, MAX_JSON_DEPTH
from batcher.manifest.rows import MAX_ID_CHARS, ManifestRow, read_rows

__all__ = [
    "FORMATS",
    "MAX_ID_CHARS",
    "MAX_JSON_DEPTH",
    "ManifestInfo",
    "ManifestRow",
    "fingerprint",
    "read_rows",
    "scan",
]
