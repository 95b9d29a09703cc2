"""A manifest's rows brought into the checkpoint: new rows added, edits taken or refused,
rows taken out marked, so that no job is sent (and paid for) that the manifest does not
want. :class:`batcher.checkpoint.Checkpoint` is the one user."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from batcher.group_commit import GroupCommitDb, transaction
from batcher.jobs import FAILED, INVALID, NEW_ATTEMPT_SQL, PENDING, REMOVED, NewRow

__all__ = ["UNKNOWN_OUTCOME_SQL", "ManifestListing"]

#: The FAILED rows whose error is batcher.jobs.UNKNOWN_OUTCOME, told by its first words.
UNKNOWN_OUTCOME_SQL = "error LIKE 'submit outcome unknown:%'"


def _fields(row: NewRow) -> tuple[Any, ...]:
    """A new row's columns as INSERT INTO jobs takes them (id first)."""
    params = json.dumps(row.params, sort_keys=True)
    return (row.id, row.number, row.model, row.digest, params, row.state, row.error, row.warnings)


class ManifestListing(GroupCommitDb):
    """The jobs table's rows loaded from a manifest: between :meth:`start_listing` and
    :meth:`drop_unlisted` (or :meth:`discard_listing`) every id given is noted."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._listing = False

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
            with transaction(self._conn) as db:
                changed: list[tuple[str, int]] = []
                ids = [r.id for r in rows]
                known: dict[str, tuple[str, str, int, bool]] = {}
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    for rid, digest, state, number, unsent, unknown in db.execute(
                        "SELECT id, digest, state, number, attempts = 0 AND unknown_submits = 0,"
                        f" {UNKNOWN_OUTCOME_SQL} FROM jobs WHERE id IN ({marks})",
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
                        f"error=?, warnings=?, {NEW_ATTEMPT_SQL} WHERE id=?",
                        edited,
                    )
                if self._listing:  # fresh: an id this folder did not know before
                    db.executemany(
                        "INSERT OR IGNORE INTO temp.listed(id, fresh) VALUES (?, ?)",
                        ((i, i not in known) for i in ids),
                    )
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

    async def repeated(
        self, seeds: Mapping[str, int], limit: int
    ) -> tuple[int, list[tuple[str, int, str, int]]]:
        """Rows to send that repeat an earlier row to send, model and parameters alike,
        with a seed >= 0: the one given, or else the model's in ``seeds`` (slug: seed the
        server uses when none is given, -1 for a random one). Each is billed and gives the
        same image. Their count, and up to ``limit`` of them as (id, number, id of the
        first row alike, its number)."""
        alike = (
            "SELECT id, number, FIRST_VALUE(id) OVER w AS first_id, "
            "FIRST_VALUE(number) OVER w AS first_number FROM jobs "
            "WHERE state = ? AND model = ? AND COALESCE(json_extract(params, '$.seed'), ?) >= 0 "
            "WINDOW w AS (PARTITION BY params ORDER BY number)"
        )

        def find() -> tuple[int, list[tuple[str, int, str, int]]]:
            db = self._conn
            count, shown = 0, list[tuple[str, int, str, int]]()
            for model, seed in seeds.items():
                db.execute("DROP TABLE IF EXISTS temp.alike")
                db.execute(
                    f"CREATE TEMP TABLE alike AS SELECT * FROM ({alike}) "
                    "WHERE number != first_number",
                    (PENDING, model, seed),
                )
                try:
                    count += db.execute("SELECT COUNT(*) FROM temp.alike").fetchone()[0]
                    shown += db.execute(
                        "SELECT * FROM temp.alike ORDER BY number LIMIT ?", (limit,)
                    ).fetchall()
                finally:
                    db.execute("DROP TABLE temp.alike")
            return count, sorted(shown, key=lambda row: row[1])[:limit]

        result: tuple[int, list[tuple[str, int, str, int]]] = await self._call(find)
        return result

    async def discard_listing(self) -> None:
        """The manifest being loaded is refused: the rows it added are taken out again
        (never sent; a later run must find them new, and refuse them again)."""

        def discard() -> None:
            with transaction(self._conn) as db:
                db.execute("DELETE FROM jobs WHERE id IN (SELECT id FROM temp.listed WHERE fresh)")
                db.execute("DROP TABLE temp.listed")

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
            with transaction(self._conn) as db:
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
            return deleted, failed

        self._listing = False
        result: tuple[int, int] = await self._call(drop)
        return result
