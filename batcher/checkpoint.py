"""The run's source of truth: one SQLite file (WAL) in the output folder.

Every state change of a job is written here before the next step happens to it
(a request_id is durable before the job is polled). Writes from all stages are
group-committed on one worker thread (:mod:`batcher.group_commit`), so the event loop
never blocks on disk and a thousand transitions cost one fsync, not a thousand. The
rows' states and records are in :mod:`batcher.jobs`.
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
from batcher.group_commit import DISK_CODES, GroupCommitDb, rollback
from batcher.jobs import (
    COLUMNS,
    FAILED,
    INVALID,
    JOB_COLUMNS,
    PENDING,
    REMOVED,
    Job,
    NewRow,
    job_from_row,
)

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
)

#: The FAILED rows whose error is batcher.jobs.UNKNOWN_OUTCOME, told by its first words.
_UNKNOWN_OUTCOME = "error LIKE 'submit outcome unknown:%'"


def _fields(row: NewRow) -> tuple[Any, ...]:
    """A new row's columns as INSERT INTO jobs takes them (id first)."""
    params = json.dumps(row.params, sort_keys=True)
    return (row.id, row.number, row.model, row.digest, params, row.state, row.error, row.warnings)


@functools.cache
def _update_sql(names: tuple[str, ...], added: tuple[str, ...] = ()) -> str:
    """``UPDATE`` by id that sets the columns ``names`` and adds to the columns ``added``;
    built once per set of columns (once per call site)."""
    unknown = (set(names) | set(added)) - COLUMNS
    if unknown:
        raise ValueError(f"not checkpoint columns: {sorted(unknown)}")
    assignments = [f"{n}=?" for n in names] + [f"{n}={n}+?" for n in added]
    return f"UPDATE jobs SET {', '.join(assignments)} WHERE id=?"


class Checkpoint(GroupCommitDb):
    """Async access to the checkpoint file; all SQLite work runs on one worker thread."""

    def __init__(self, path: Path) -> None:
        super().__init__("checkpoint")
        self.path = path
        self._listing = False

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
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes
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

    # -- loading the manifest ----------------------------------------------------------------

    async def add_rows(
        self, rows: Sequence[NewRow], *, reopen_known: bool = False, reopen_unknown: bool = False
    ) -> list[tuple[str, int]]:
        """Insert rows not yet known; return (id, number) of known ids that changed: other
        parameters or model than the row recorded under that id.

        A row is the same job when what it sends is (its validated parameters: the same
        rows in CSV, JSON Lines or Parquet are the same jobs). A row never sent takes its
        new version: an INVALID one (fixed, or its missing image file now there), a
        PENDING one never submitted; so does a FAILED one that is to be sent again, as
        :meth:`reopen_failed` chooses (``reopen_known``, ``reopen_unknown``): its counts
        stay, its job goes.
        """

        def add() -> list[tuple[str, int]]:
            db = self._conn
            db.execute("BEGIN IMMEDIATE")
            try:
                changed: list[tuple[str, int]] = []
                ids = [r.id for r in rows]
                known: dict[str, tuple[str, str, int, bool]] = {}
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    for rid, digest, state, number, unsent, unknown in db.execute(
                        "SELECT id, digest, state, number, attempts = 0 AND unknown_submits = 0,"
                        f" {_UNKNOWN_OUTCOME} FROM jobs WHERE id IN ({marks})",
                        chunk,
                    ):
                        editable = (state == PENDING and bool(unsent)) or (
                            state == FAILED and (reopen_unknown if unknown else reopen_known)
                        )
                        known[rid] = (digest, state, number, editable)
                fresh = []
                moved = []
                edited = []
                for r in rows:
                    if r.id not in known:
                        fresh.append(_fields(r))
                        continue
                    digest, state, number, editable = known[r.id]
                    if state == INVALID:  # never sent: the new version replaces it
                        db.execute("DELETE FROM jobs WHERE id=?", (r.id,))
                        fresh.append(_fields(r))
                    elif digest == r.digest or self._sends_alike(r):
                        if (digest, number) != (r.digest, r.number):  # moved, or rewritten
                            moved.append((r.number, r.digest, r.id))
                    elif editable:
                        edited.append((*_fields(r)[1:], r.id))
                    else:
                        changed.append((r.id, r.number))
                db.executemany(
                    "INSERT INTO jobs(id, number, model, digest, params, state, error, warnings)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    fresh,
                )
                db.executemany("UPDATE jobs SET number=?, digest=? WHERE id=?", moved)
                if edited:
                    db.executemany(
                        "UPDATE jobs SET number=?, model=?, digest=?, params=?, state=?, "
                        "error=?, warnings=?, request_id=NULL, status_url=NULL, "
                        "response_url=NULL, output_urls=NULL WHERE id=?",
                        edited,
                    )
                if self._listing:  # fresh: an id this folder did not know before
                    db.executemany(
                        "INSERT OR IGNORE INTO temp.listed(id, fresh) VALUES (?, ?)",
                        ((i, i not in known) for i in ids),
                    )
            except BaseException:
                rollback(db)
                raise
            db.execute("COMMIT")
            return changed

        result: list[tuple[str, int]] = await self._call(add)
        return result

    def _sends_alike(self, row: NewRow) -> bool:
        """Whether the valid row ``row`` sends what its id's row sends (read only when
        the digests differ: parameters may hold megabytes of inline images)."""
        if row.state == INVALID:
            return False
        found = self._conn.execute("SELECT model, params FROM jobs WHERE id=?", (row.id,))
        model, params = found.fetchone()
        return bool(model == row.model and params == json.dumps(row.params, sort_keys=True))

    async def start_listing(self) -> None:
        """Note every id :meth:`add_rows` gets from now on: the manifest being loaded."""

        def start() -> None:
            self._conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS listed (id TEXT PRIMARY KEY, fresh INTEGER)"
            )
            self._conn.execute("DELETE FROM temp.listed")

        await self._call(start)
        self._listing = True

    async def renamed(self, limit: int) -> tuple[int, list[tuple[str, int, str, str]]]:
        """Rows new to the folder in the manifest being loaded that are, parameters and
        model alike, a row sent before whose id the manifest no longer holds: its id
        changed (an id column taken out or rewritten), and sending it would pay for that
        job again. Their count, and up to ``limit`` of them as (id, number, old id, old
        state)."""
        gone = (
            "SELECT id, state, model, params FROM jobs WHERE (attempts > 0 OR "
            "unknown_submits > 0) AND id NOT IN (SELECT id FROM temp.listed)"
        )
        pairs = (
            "FROM temp.listed l JOIN jobs j ON j.id = l.id JOIN temp.gone g "
            "ON g.model = j.model AND g.params = j.params WHERE l.fresh AND j.state = 'PENDING'"
        )

        def find() -> tuple[int, list[tuple[str, int, str, str]]]:
            db = self._conn
            db.execute("DROP TABLE IF EXISTS temp.gone")
            db.execute(f"CREATE TEMP TABLE gone AS {gone}")
            try:
                if db.execute("SELECT 1 FROM temp.gone LIMIT 1").fetchone() is None:
                    return 0, []  # nothing sent was taken out: the usual case
                db.execute("CREATE INDEX temp.gone_key ON gone(model, params)")
                (count,) = db.execute(f"SELECT COUNT(DISTINCT j.id) {pairs}").fetchone()
                shown = db.execute(
                    f"SELECT j.id, j.number, MIN(g.id), g.state {pairs} "  # g.state: MIN's row
                    "GROUP BY j.id ORDER BY j.number, j.id LIMIT ?",
                    (limit,),
                ).fetchall()
                return int(count), [tuple(r) for r in shown]
            finally:
                db.execute("DROP TABLE temp.gone")

        result: tuple[int, list[tuple[str, int, str, str]]] = await self._call(find)
        return result

    async def discard_listing(self) -> None:
        """The manifest being loaded is refused: the rows it added are taken out again
        (never sent; a later run must find them new, and refuse them again)."""

        def discard() -> None:
            db = self._conn
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM jobs WHERE id IN (SELECT id FROM temp.listed WHERE fresh)")
                db.execute("DROP TABLE temp.listed")
            except BaseException:
                rollback(db)
                raise
            db.execute("COMMIT")

        self._listing = False
        await self._call(discard)

    async def drop_unlisted(self) -> tuple[int, int]:
        """Rows the loaded manifest no longer holds: never sent (PENDING or INVALID with no
        submit) are deleted; PENDING ones submitted before (a result gone, to be sent
        again) are FAILED instead, since they were paid. The others kept are marked
        removed, so that no retry sends them again; rows listed again lose the mark, and
        those it had FAILED are PENDING again. Returns (deleted, failed)."""
        unlisted = "id NOT IN (SELECT id FROM temp.listed)"

        def drop() -> tuple[int, int]:
            db = self._conn
            db.execute("BEGIN IMMEDIATE")
            try:
                deleted = db.execute(
                    f"DELETE FROM jobs WHERE state IN (?, ?) AND attempts = 0 AND {unlisted}",
                    (PENDING, INVALID),
                ).rowcount
                failed = db.execute(
                    f"UPDATE jobs SET state=?, error=? WHERE state=? AND {unlisted}",
                    (FAILED, REMOVED, PENDING),
                ).rowcount
                db.execute(f"UPDATE jobs SET removed=1 WHERE NOT removed AND {unlisted}")
                db.execute(  # put back: it goes on from where its removal stopped it
                    "UPDATE jobs SET state=?, error=NULL WHERE removed AND state=? AND "
                    f"substr(error, -{len(REMOVED)}) = ? AND NOT ({unlisted})",
                    (PENDING, FAILED, REMOVED),
                )
                db.execute(f"UPDATE jobs SET removed=0 WHERE removed AND NOT ({unlisted})")
                db.execute("DROP TABLE temp.listed")
            except BaseException:
                rollback(db)
                raise
            db.execute("COMMIT")
            return deleted, failed

        self._listing = False
        result: tuple[int, int] = await self._call(drop)
        return result

    # -- reading work ------------------------------------------------------------------------

    async def jobs_in(
        self, states: Sequence[str], *, after: tuple[int, str] = (-1, ""), limit: int = 1000
    ) -> list[Job]:
        """Rows in the given states, in manifest order, after ``after`` = (number, id).

        Order and cursor are (number, id): rows added by an edited manifest take their
        line number in it, which a row kept from the earlier version may share, so a
        cursor on the number alone would skip one of them at a page boundary.
        """
        marks = ",".join("?" * len(states))
        sql = (
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) "
            "AND number >= ? AND (number > ? OR id > ?) ORDER BY number, id LIMIT ?"
        )
        number, row_id = after

        def get() -> list[Job]:
            return [
                job_from_row(r)
                for r in self._conn.execute(sql, (*states, number, number, row_id, limit))
            ]

        result: list[Job] = await self._call(get)
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
        chosen = [f"NOT ({_UNKNOWN_OUTCOME})"] if known else []
        chosen += [f"({_UNKNOWN_OUTCOME})"] if unknown else []
        where = " OR ".join(chosen)

        def run() -> tuple[int, int]:
            db = self._conn
            reopened = 0
            if where:
                reopened = db.execute(
                    # The old job's output URLs go: the new job's images are its own.
                    f"UPDATE jobs SET state='PENDING', error=NULL, output_urls=NULL "
                    f"WHERE state='FAILED' AND NOT removed AND ({where})"
                ).rowcount
            kept = db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE state='FAILED' AND NOT removed "
                f"AND {_UNKNOWN_OUTCOME}"
            ).fetchone()[0]
            return reopened, kept

        result: tuple[int, int] = await self._call(run)
        return result

    # -- transitions -------------------------------------------------------------------------

    async def update(
        self, job_id: str, *, counts: Mapping[str, int] | None = None, **fields: Any
    ) -> None:
        """Set columns of one row, and add ``counts`` to its counters, in one statement
        (a state and the counts that go with it are never saved apart); durable when
        this returns."""
        for name in ("metrics", "outputs", "output_urls"):
            if name in fields and not isinstance(fields[name], str | None):
                fields[name] = json.dumps(fields[name], sort_keys=True)
        added = {name: by for name, by in (counts or {}).items() if by}
        if not fields and not added:
            return
        await self._write(
            _update_sql(tuple(fields), tuple(added)), [*fields.values(), *added.values(), job_id]
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
