"""The run's source of truth: one SQLite file (WAL) in the output folder.

Every state change of a job is written here, in order, and each one a next step depends
on is durable before that step (a row is SUBMITTING on disk before its POST goes out);
counts, and states no step waits for, are queued without waiting. Writes from all
stages are group-committed on one worker thread (:mod:`batcher.group_commit`), so the
event loop never blocks on disk and a thousand transitions cost one fsync, not a
thousand. The rows' states and records are in :mod:`batcher.jobs`.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from batcher.errors import BatcherError, CheckpointUnwritable, UsageError
from batcher.group_commit import DISK_CODES
from batcher.jobs import COLUMNS, JOB_COLUMNS, NEW_ATTEMPT_SQL, Job, job_from_row
from batcher.listing import UNKNOWN_OUTCOME_SQL, ManifestListing

#: The checkpoint's file name in the output folder.
CHECKPOINT = "checkpoint.sqlite"
#: Meta key saying whether results.parquet is up to date with the rows ("fresh") or a
#: run changed rows and has not written it yet ("stale").
RESULTS_META, RESULTS_FRESH, RESULTS_STALE = "results", "fresh", "stale"

#: SQLite's companion files of the database (WAL mode; a rollback journal when converting).
_SIDE_FILES = ("-wal", "-shm", "-journal")

#: Ordered migrations: index + 1 is the schema version they bring the file to.
_MIGRATIONS = (
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        number INTEGER NOT NULL,
        model TEXT NOT NULL,
        digest TEXT NOT NULL,
        params TEXT NOT NULL,
        state TEXT NOT NULL,
        error TEXT,
        request_id TEXT,
        status_url TEXT,
        response_url TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        retries INTEGER NOT NULL DEFAULT 0,
        unknown_submits INTEGER NOT NULL DEFAULT 0,
        polls INTEGER NOT NULL DEFAULT 0,
        submitted_at REAL,
        started_at REAL,
        completed_at REAL,
        latency_s REAL,
        notice_lag_s REAL,
        inference_time REAL,
        metrics TEXT,
        outputs TEXT,
        width INTEGER,
        height INTEGER,
        bytes INTEGER,
        sha256 TEXT,
        warnings TEXT
    );
    CREATE INDEX jobs_state_number ON jobs(state, number);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: how many 429 answers each row's requests got (for `batcher report`).
    "ALTER TABLE jobs ADD COLUMN rate_limited INTEGER NOT NULL DEFAULT 0;",
    # 3: a COMPLETED job's output URLs (JSON list), saved when its result is read: they
    # outlive the result (about 7 days against 1 hour), so images that could not be
    # downloaded are tried again from them, by this run or the next, without the API.
    "ALTER TABLE jobs ADD COLUMN output_urls TEXT;",
    # 4: image downloads repeated (cut bodies, lost connections), apart from `retries`,
    # which counts API requests repeated: downloads are neither API requests nor rate
    # limited. Before it, `retries` counted both.
    "ALTER TABLE jobs ADD COLUMN download_retries INTEGER NOT NULL DEFAULT 0;",
    # 5: the row is no longer in the manifest (kept: it was sent): never sent again.
    "ALTER TABLE jobs ADD COLUMN removed INTEGER NOT NULL DEFAULT 0;",
    # 6: result reads (GET /v2/requests/{id}) of each row, for `batcher report`'s request
    # total: a job's result may be read more than once (fresh links, a read that got no
    # usable answer, a stop before its images were saved), or by a row that then FAILED.
    # Rows read before it count one read, as the report assumed then.
    "ALTER TABLE jobs ADD COLUMN result_reads INTEGER NOT NULL DEFAULT 0; "
    "UPDATE jobs SET result_reads = 1 WHERE completed_at IS NOT NULL;",
    # 7: the row's completion was seen by a later run than the one that submitted it: its
    # latency_s and notice_lag_s include the time batcher was stopped, and `batcher
    # report` leaves them out of its latency figures. Rows completed before it read 0:
    # an older checkpoint cannot know which of its latencies span a stop.
    "ALTER TABLE jobs ADD COLUMN spans_stop INTEGER NOT NULL DEFAULT 0;",
)


@functools.cache
def _update_sql(names: tuple[str, ...], added: tuple[str, ...] = ()) -> str:
    """``UPDATE`` by id that sets the columns ``names`` and adds to the columns ``added``;
    built once per set of columns (once per call site)."""
    unknown = (set(names) | set(added)) - COLUMNS
    if unknown:
        raise ValueError(f"not checkpoint columns: {sorted(unknown)}")
    assignments = [f"{n}=?" for n in names] + [f"{n}={n}+?" for n in added]
    return f"UPDATE jobs SET {', '.join(assignments)} WHERE id=?"


class Checkpoint(ManifestListing):
    """Async access to the checkpoint file; all SQLite work runs on one worker thread.
    Loading a manifest's rows into it is :class:`batcher.listing.ManifestListing`'s."""

    def __init__(self, path: Path) -> None:
        super().__init__("checkpoint")
        self.path = path

    # -- opening ----------------------------------------------------------------------------

    def _open(self) -> None:
        """Open (or create) the file; UsageError, naming it, if it cannot be the checkpoint."""
        # SQLite follows a symlink at the database's name (and would create its target):
        # refused, with the WAL's companion files, so nothing is written outside --out.
        for name in [str(self.path), *(f"{self.path}{side}" for side in _SIDE_FILES)]:
            if os.path.islink(name):
                raise UsageError(
                    f"{name} is a symbolic link: the checkpoint must be a regular file in "
                    "--out; remove the link (or use another --out)"
                )
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._unusable(exc) from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: each commit fsyncs the WAL, so a commit outlives a power cut or a
            # kernel crash (a cloud VM stopped hard), not only a crash of batcher. With
            # NORMAL the commits since the last WAL checkpoint can be lost then: a row
            # SUBMITTING before its POST back to PENDING, and its job paid twice. Group
            # commit makes it one fsync for every write of a batch.
            db.execute("PRAGMA synchronous=FULL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
                db.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")
        except sqlite3.Error as exc:
            db.close()
            raise self._unusable(exc) from None
        self._db = db

    def _unusable(self, exc: sqlite3.Error) -> BatcherError:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF in DISK_CODES:
            # The disk, not the file: moved away, its rows would all be sent again.
            return CheckpointUnwritable(
                f"cannot open the checkpoint {self.path} ({exc}): the disk or the folder "
                "refuses it (full, read-only, failing). Keep the file, it holds the run's "
                "work: free space or fix the folder, then run the same command again",
                reason=str(exc),
            )
        # Left as it is: it may hold a run's work (restore it) or be unrelated (move it).
        return UsageError(
            f"{self.path}: cannot open it as batcher's checkpoint ({exc}); move it away "
            "(or use another --out) to start afresh"
        )

    def _unwritable(self, exc: sqlite3.OperationalError) -> CheckpointUnwritable:
        """A write the file refused (full disk, I/O error, read-only): the folder's
        problem, not a row's. Whatever was committed before stays; the batch did not."""
        return CheckpointUnwritable(
            f"cannot write the checkpoint {self.path} ({exc}): its last changes are not "
            "saved, and rows caught mid-way are taken up by the next run as after a crash. "
            "Free space or fix the folder, then run the same command again to resume",
            reason=str(exc),
        )

    # -- meta --------------------------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        def get() -> str | None:
            row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            return None if row is None else str(row[0])

        result: str | None = await self._call(get)
        return result

    @staticmethod
    def read_meta(path: Path, key: str) -> str | None:
        """A meta value of the checkpoint at ``path``, read-only and without opening it
        for a run (another process may be running on it); None when there is none or
        the file is not a readable checkpoint. Blocking."""
        if not path.is_file():
            return None
        try:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            finally:
                db.close()
        except sqlite3.Error:
            return None
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        await self._write("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- reading work ------------------------------------------------------------------------

    async def jobs_in(
        self,
        states: Sequence[str],
        *,
        after: tuple[int, str] = (-1, ""),
        limit: int = 1000,
        model: str | None = None,
    ) -> list[Job]:
        """Rows in the given states (of ``model`` only, if given), in manifest order,
        after ``after`` = (number, id).

        Order and cursor are (number, id): rows added by an edited manifest take their
        line number in it, which a row kept from the earlier version may share, so a
        cursor on the number alone would skip one of them at a page boundary.
        """
        marks = ",".join("?" * len(states))
        of_model = "" if model is None else "AND model = ? "
        sql = (
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) {of_model}"
            "AND number >= ? AND (number > ? OR id > ?) ORDER BY number, id LIMIT ?"
        )
        number, row_id = after
        params = (*states, *([] if model is None else [model]), number, number, row_id, limit)

        def get() -> list[Job]:
            return [job_from_row(r) for r in self._conn.execute(sql, params)]

        result: list[Job] = await self._call(get)
        return result

    async def models_in(self, states: Sequence[str]) -> dict[str, int]:
        """How many rows each model has in ``states``, by model name in sorted order."""
        return await self._count_by_model(f"state IN ({','.join('?' * len(states))})", states)

    async def models_of_work(self, *, retry_failed: bool, resubmit_unknown: bool) -> dict[str, int]:
        """How many rows of each model a run would send or fetch: PENDING and SUBMITTED;
        the FAILED rows :meth:`reopen_failed` would reopen with these flags; rows left
        SUBMITTING if ``resubmit_unknown`` (never rows taken out of the manifest). Read
        before any of them is reopened."""
        work = ["state IN ('PENDING', 'SUBMITTED')"]
        if resubmit_unknown:
            work.append("(state = 'SUBMITTING' AND NOT removed)")
        if reopened := _reopened(known=retry_failed, unknown=resubmit_unknown):
            work.append(f"(state = 'FAILED' AND NOT removed AND ({reopened}))")
        return await self._count_by_model(" OR ".join(work), ())

    async def _count_by_model(self, where: str, params: Sequence[Any]) -> dict[str, int]:
        sql = f"SELECT model, COUNT(*) FROM jobs WHERE {where} GROUP BY model ORDER BY model"

        def get() -> dict[str, int]:
            return {model: n for model, n in self._conn.execute(sql, tuple(params))}

        result: dict[str, int] = await self._call(get)
        return result

    async def counts(self) -> dict[str, int]:
        def get() -> dict[str, int]:
            sql = "SELECT state, COUNT(*) FROM jobs GROUP BY state"
            return {state: n for state, n in self._conn.execute(sql)}

        result: dict[str, int] = await self._call(get)
        return result

    async def any_sent(self) -> bool:
        """Whether any row was ever submitted: a job may exist for it at some service."""

        def get() -> bool:
            sql = (
                "SELECT 1 FROM jobs WHERE attempts > 0 OR unknown_submits > 0 "
                "OR request_id IS NOT NULL LIMIT 1"
            )
            return self._conn.execute(sql).fetchone() is not None

        result: bool = await self._call(get)
        return result

    async def reopen_failed(self, *, known: bool, unknown: bool) -> tuple[int, int]:
        """Send FAILED rows back to PENDING (the user asked to pay for them again): those
        that failed for a known reason (``known``), those whose submit outcome is unknown,
        so that they may exist and be billed already (``unknown``). Returns how many were
        reopened, and how many FAILED rows of an unknown outcome stay FAILED."""
        where = _reopened(known=known, unknown=unknown)

        def run() -> tuple[int, int]:
            db = self._conn
            reopened = 0
            if where:
                reopened = db.execute(
                    # The old job goes, with its output URLs and figures: the new job's
                    # are its own. Its counts stay (the row's requests, all attempts).
                    f"UPDATE jobs SET state='PENDING', error=NULL, {NEW_ATTEMPT_SQL} "
                    f"WHERE state='FAILED' AND NOT removed AND ({where})"
                ).rowcount
            kept = db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE state='FAILED' AND NOT removed "
                f"AND {UNKNOWN_OUTCOME_SQL}"
            ).fetchone()[0]
            return reopened, kept

        result: tuple[int, int] = await self._call(run)
        return result

    # -- transitions -------------------------------------------------------------------------

    async def update(
        self,
        job_id: str,
        *,
        counts: Mapping[str, int] | None = None,
        wait: bool = True,
        **fields: Any,
    ) -> None:
        """Set columns of one row, and add ``counts`` to its counters, in one statement
        (a state and the counts that go with it are never saved apart); durable when
        this returns, or only queued with ``wait=False`` (see GroupCommitDb._write)."""
        for name in ("metrics", "outputs", "output_urls"):
            if name in fields and not isinstance(fields[name], str | None):
                fields[name] = json.dumps(fields[name], sort_keys=True)
        added = {name: by for name, by in (counts or {}).items() if by}
        if not fields and not added:
            return
        await self._write(
            _update_sql(tuple(fields), tuple(added)),
            [*fields.values(), *added.values(), job_id],
            wait=wait,
        )

    async def increment(self, job_id: str, column: str, by: int = 1) -> None:
        if column not in COLUMNS:
            raise ValueError(f"not a checkpoint column: {column}")
        await self._write(f"UPDATE jobs SET {column}={column}+? WHERE id=?", (by, job_id))

    # -- export ------------------------------------------------------------------------------

    def iter_rows_blocking(
        self, columns: Sequence[str], batch: int = 10_000
    ) -> Iterable[list[tuple[Any, ...]]]:
        """Every row in manifest order, in batches; call from a worker thread only.

        Uses its own connection, so it may run beside the writer thread (WAL readers
        never block the writer).
        """
        db = sqlite3.connect(self.path)
        try:
            cur = db.execute(f"SELECT {', '.join(columns)} FROM jobs ORDER BY number")
            while chunk := cur.fetchmany(batch):
                yield chunk
        finally:
            db.close()


def _reopened(*, known: bool, unknown: bool) -> str:
    """The condition on a FAILED row that --retry-failed (``known``) and
    --resubmit-unknown (``unknown``) reopen ('' for neither)."""
    chosen = [f"NOT ({UNKNOWN_OUTCOME_SQL})"] if known else []
    chosen += [f"({UNKNOWN_OUTCOME_SQL})"] if unknown else []
    return " OR ".join(chosen)
