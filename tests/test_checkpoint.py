"""The checkpoint: group-committed transitions, manifest rows and their digests, and
ordered schema migrations."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import Statements, before_each_commit, offline_context

import batcher.checkpoint as checkpoint_module
import batcher.group_commit as group_commit
from batcher.checkpoint import Checkpoint
from batcher.errors import CheckpointUnwritable
from batcher.jobs import (
    COMPLETED,
    FAILED,
    INVALID,
    PENDING,
    REMOVED,
    SUBMITTED,
    SUBMITTING,
    UNKNOWN_OUTCOME,
    NewRow,
)


def _row(n: int, *, digest: str = "d", state: str = PENDING, **params: Any) -> NewRow:
    return NewRow(
        id=f"r{n}",
        number=n,
        model="instantid",
        digest=f"{digest}{n}",
        params={"prompt": f"p{n}", **params},
        state=state,
        error="bad" if state == INVALID else None,
    )


def _read(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """What another process would see on disk right now."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


@pytest.fixture
async def cp(tmp_path: Path) -> AsyncIterator[Checkpoint]:
    async with Checkpoint(tmp_path / "checkpoint.sqlite") as checkpoint:
        yield checkpoint


# -- group commit ------------------------------------------------------------------------------


async def test_concurrent_transitions_are_group_committed_and_durable_on_return(
    cp: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    await cp.add_rows([_row(n) for n in range(300)])
    batches: list[int] = []
    before_each_commit(monkeypatch, lambda statements: batches.append(len(statements)))

    await asyncio.gather(
        *(cp.update(f"r{n}", state=SUBMITTED, request_id=f"q{n}") for n in range(300))
    )

    assert sum(batches) == 300
    assert len(batches) <= 3, batches  # not one transaction per transition
    on_disk = _read(cp.path, "SELECT COUNT(*) FROM jobs WHERE state=? AND request_id LIKE 'q%'",
                    SUBMITTED)  # fmt: skip
    assert on_disk == [(300,)]


async def test_close_commits_what_was_queued(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path / "c.sqlite")
    await cp.__aenter__()
    await cp.add_rows([_row(n) for n in range(20)])
    writers = [asyncio.create_task(cp.update(f"r{n}", state=COMPLETED)) for n in range(20)]
    await asyncio.sleep(0)  # queued, maybe not committed

    await cp.close()

    async with asyncio.timeout(5):  # every writer got its answer: none waits for ever
        await asyncio.gather(*writers)
    assert _read(tmp_path / "c.sqlite", "SELECT COUNT(*) FROM jobs WHERE state=?", COMPLETED) == [
        (20,)
    ]


# -- transitions ------------------------------------------------------------------------------


async def test_transitions_read_back_in_manifest_order(cp: Checkpoint) -> None:
    await cp.add_rows([_row(n) for n in (5, 1, 3, 2, 4)] + [_row(6, state=INVALID)])

    await cp.update("r1", state=SUBMITTING, attempts=1)
    await cp.update(
        "r1",
        state=SUBMITTED,
        request_id="q1",
        status_url="http://h/s",
        response_url="http://h/r",
        submitted_at=100.0,
    )
    await cp.update("r2", state=COMPLETED, metrics={"inference_time": 1.5}, outputs=["a.png"])
    await cp.increment("r3", "polls", 4)

    assert [j.id for j in await cp.jobs_in([PENDING])] == ["r3", "r4", "r5"]
    assert [j.id for j in await cp.jobs_in([PENDING], after=(3, "r3"), limit=1)] == ["r4"]
    (job,) = await cp.jobs_in([SUBMITTED])
    assert (job.request_id, job.status_url, job.attempts, job.submitted_at) == (
        "q1",
        "http://h/s",
        1,
        100.0,
    )
    assert _read(cp.path, "SELECT polls FROM jobs WHERE id='r3'") == [(4,)]
    assert await cp.counts() == {PENDING: 3, SUBMITTED: 1, COMPLETED: 1, INVALID: 1}
    metrics, outputs = _read(cp.path, "SELECT metrics, outputs FROM jobs WHERE id='r2'")[0]
    assert (json.loads(metrics), json.loads(outputs)) == ({"inference_time": 1.5}, ["a.png"])


async def test_pages_read_every_row_once_when_row_numbers_repeat(cp: Checkpoint) -> None:
    """An edited manifest's new rows take their line numbers in it, which rows kept from
    the earlier version may hold too: paging must still read each row exactly once."""
    kept = [_row(n) for n in range(1, 8)]
    added = [replace(_row(n), id=f"new{n}") for n in range(1, 8)]
    await cp.add_rows(kept + added)
    seen: list[str] = []
    cursor = (-1, "")
    while page := await cp.jobs_in([PENDING], after=cursor, limit=3):
        seen += [j.id for j in page]
        cursor = (page[-1].number, page[-1].id)
    assert sorted(seen) == sorted(r.id for r in kept + added)  # none skipped, none twice


async def test_pages_of_one_model_skip_the_rows_of_others(cp: Checkpoint) -> None:
    """The feeder reads each model's rows apart (a model held by its queue must not hold
    up the others): pages of one model, in manifest order, and the models pending (a run
    checks them against the models it knows)."""
    rows = [
        replace(_row(n), model="infinite-you" if n % 3 == 0 else "instantid") for n in range(1, 10)
    ]
    await cp.add_rows([*rows, replace(_row(10, state=INVALID), model="other")])
    await cp.update("r6", state=SUBMITTED)
    assert await cp.models_in([PENDING]) == {"infinite-you": 2, "instantid": 6}
    assert await cp.models_in([PENDING, SUBMITTED, INVALID]) == {
        "infinite-you": 3, "instantid": 6, "other": 1}  # fmt: skip
    assert [j.id for j in await cp.jobs_in([PENDING], model="infinite-you")] == ["r3", "r9"]
    page = await cp.jobs_in([PENDING], model="instantid", after=(2, "r2"), limit=3)
    assert [j.id for j in page] == ["r4", "r5", "r7"]
    assert [j.model for j in page] == ["instantid"] * 3


async def test_the_rows_a_run_would_work_on_by_model_follow_its_flags(cp: Checkpoint) -> None:
    """What a run checks against the models it knows before it changes anything: rows
    left SUBMITTING end FAILED unless --resubmit-unknown; FAILED rows count only when a
    flag would reopen them; rows taken out of the manifest never."""
    models = ["a", "a", "b", "b", "c", "c", "d"]
    await cp.add_rows([replace(_row(n), model=m) for n, m in enumerate(models, start=1)])
    await cp.update("r1", state=SUBMITTED)
    await cp.update("r3", state=SUBMITTING)
    await cp.update("r4", state=FAILED, error="HTTP 400: bad seed")
    await cp.update("r5", state=FAILED, error=UNKNOWN_OUTCOME, unknown_submits=1)
    await cp.update("r6", state=SUBMITTING)
    await cp.update("r7", state=COMPLETED)
    with contextlib.closing(sqlite3.connect(cp.path)) as db, db:  # taken out of the manifest
        db.execute("UPDATE jobs SET removed=1 WHERE id='r6'")

    assert await cp.models_of_work(retry_failed=False, resubmit_unknown=False) == {"a": 2}
    assert await cp.models_of_work(retry_failed=True, resubmit_unknown=False) == {"a": 2, "b": 1}
    assert await cp.models_of_work(retry_failed=False, resubmit_unknown=True) == {
        "a": 2, "b": 1, "c": 1}  # fmt: skip
    assert await cp.models_of_work(retry_failed=True, resubmit_unknown=True) == {
        "a": 2, "b": 2, "c": 1}  # fmt: skip


async def test_rows_not_listed_by_the_manifest_loaded_again_go_unless_they_were_sent(
    cp: Checkpoint,
) -> None:
    await cp.add_rows([_row(n) for n in range(1, 7)] + [_row(7, state=INVALID)])
    await cp.update("r1", state=COMPLETED, attempts=1)  # sent and done
    await cp.update("r2", state=PENDING, attempts=1)  # sent, its result gone: to go again
    await cp.update("r3", state=SUBMITTED, attempts=1)  # in flight
    await cp.start_listing()
    await cp.add_rows([_row(4)])  # the manifest now holds r4 only (and nothing new)
    assert await cp.drop_unlisted() == (3, 1)  # r5, r6, r7 deleted; r2 FAILED
    rows = dict(_read(cp.path, "SELECT id, state FROM jobs"))
    assert rows == {"r1": COMPLETED, "r2": FAILED, "r3": SUBMITTED, "r4": PENDING}
    assert _read(cp.path, "SELECT error FROM jobs WHERE id='r2'") == [(REMOVED,)]


async def test_a_kept_row_takes_its_new_line_number(cp: Checkpoint) -> None:
    """Rows inserted above a kept row move it down the manifest: its row number follows
    (results.parquet's ``row``), its state and parameters stay."""
    await cp.add_rows([_row(n) for n in (1, 2, 3)])
    await cp.update("r2", state=COMPLETED, attempts=1)
    assert await cp.add_rows([replace(_row(2), number=5), replace(_row(1), id="new1")]) == []
    rows = {r[0]: r[1:] for r in _read(cp.path, "SELECT id, number, state FROM jobs")}
    assert rows["r2"] == (5, COMPLETED)
    assert rows["r1"] == (1, PENDING)


async def test_an_update_sets_the_state_and_adds_the_counts_in_one_statement(
    cp: Checkpoint,
) -> None:
    await cp.add_rows([_row(1)])
    await cp.increment("r1", "retries", 2)
    statements: list[str] = []
    apply = cp._apply

    def spy(batch: Any) -> None:
        batch = list(batch)
        statements.extend(sql for sql, _ in batch)
        apply(batch)

    cp._apply = spy  # type: ignore[method-assign]
    await cp.update(
        "r1", counts={"retries": 3, "rate_limited": 1, "polls": 0}, state=PENDING, attempts=1
    )
    await cp.update("r1", counts={"rate_limited": 0})  # nothing to set, nothing to add

    assert statements[0] == (
        "UPDATE jobs SET state=?, attempts=?, retries=retries+?, "
        "rate_limited=rate_limited+? WHERE id=?"
    )
    assert _read(cp.path, "SELECT state, attempts, retries, rate_limited, polls FROM jobs") == [
        (PENDING, 1, 5, 1, 0)
    ]
    with pytest.raises(ValueError, match="not checkpoint columns"):
        await cp.update("r1", counts={"sneaky": 1})


async def test_update_refuses_a_column_that_does_not_exist(cp: Checkpoint) -> None:
    await cp.add_rows([_row(1)])
    with pytest.raises(ValueError, match="not checkpoint columns"):
        await cp.update("r1", state=COMPLETED, sneaky="x")
    with pytest.raises(ValueError, match="not a checkpoint column"):
        await cp.increment("r1", "id")
    assert _read(cp.path, "SELECT state FROM jobs") == [(PENDING,)]


async def test_reopen_failed_sends_back_only_what_was_asked(cp: Checkpoint) -> None:
    await cp.add_rows([_row(n) for n in range(1, 5)])
    await cp.update("r1", state=FAILED, error="No face detected", request_id="q1")
    # r2: an unknown outcome, though it kept an older job's request id (before: counted as
    # known, sent again by --retry-failed). r3: unknown once, then FAILED for a reason.
    await cp.update("r2", state=FAILED, error=UNKNOWN_OUTCOME, unknown_submits=1, request_id="q0")
    await cp.update("r3", state=FAILED, error="No face", unknown_submits=1)
    await cp.update("r4", state=COMPLETED)

    assert await cp.reopen_failed(known=False, unknown=False) == (0, 1)
    assert await cp.reopen_failed(known=True, unknown=False) == (2, 1)  # r2 may be billed
    assert [j.id for j in await cp.jobs_in([PENDING])] == ["r1", "r3"]
    assert await cp.reopen_failed(known=False, unknown=True) == (1, 0)
    assert [j.id for j in await cp.jobs_in([PENDING])] == ["r1", "r2", "r3"]
    assert _read(cp.path, "SELECT COUNT(*) FROM jobs WHERE error IS NOT NULL") == [(0,)]


async def test_reopen_failed_both_ways_at_once(cp: Checkpoint) -> None:
    await cp.add_rows([_row(n) for n in range(1, 3)])
    await cp.update("r1", state=FAILED, error="No face detected", request_id="q1")
    await cp.update("r2", state=FAILED, error=UNKNOWN_OUTCOME, unknown_submits=1)
    assert await cp.reopen_failed(known=True, unknown=True) == (2, 0)


_ANSWERED = {
    "request_id": "q1", "status_url": "http://h/s", "response_url": "http://h/r",
    "output_urls": ["http://h/o.png"], "completed_at": 1.5, "latency_s": 9.0,
    "notice_lag_s": 0.5, "inference_time": 7.0, "metrics": {"inference_time": 7.0},
    "spans_stop": 1, "outputs": ["images/a.png"], "width": 8, "height": 8, "bytes": 99,
    "sha256": "ab",
}  # fmt: skip


def _answered_columns(path: Path, row_id: str) -> dict[str, Any]:
    names = list(_ANSWERED)
    (values,) = _read(path, f"SELECT {', '.join(names)} FROM jobs WHERE id=?", row_id)
    return {n: v for n, v in zip(names, values, strict=True) if v not in (None, 0)}


async def test_a_reopened_row_keeps_its_counts_and_nothing_of_its_last_job(cp: Checkpoint) -> None:
    await cp.add_rows([_row(1)])
    await cp.update("r1", state=FAILED, error="images lost", counts={"polls": 3}, **_ANSWERED)
    assert await cp.reopen_failed(known=True, unknown=False) == (1, 0)
    assert _answered_columns(cp.path, "r1") == {}
    assert _read(cp.path, "SELECT state, error, polls FROM jobs") == [(PENDING, None, 3)]


async def test_an_edited_failed_row_sent_again_has_nothing_of_its_last_job(
    cp: Checkpoint,
) -> None:
    await cp.add_rows([_row(1)])
    await cp.update("r1", state=FAILED, error="images lost", **_ANSWERED)
    edited = _row(1, digest="other", prompt="new")
    assert await cp.add_rows([edited], reopen_known=True) == []
    assert _answered_columns(cp.path, "r1") == {}
    assert _read(cp.path, "SELECT state, digest FROM jobs") == [(PENDING, "other1")]


async def test_a_requeued_row_has_nothing_of_its_last_job(tmp_path: Path, cp: Checkpoint) -> None:
    """RunContext.requeue: the job is gone at the API; the row goes back to be sent."""
    await cp.add_rows([_row(1)])
    await cp.update("r1", state=SUBMITTED, counts={"polls": 2}, **_ANSWERED)
    (job,) = await cp.jobs_in([SUBMITTED])
    ctx = offline_context(tmp_path, cp)
    ctx.active = 1  # as the feeder counted it
    await ctx.requeue(job)
    assert _answered_columns(cp.path, "r1") == {}
    assert _read(cp.path, "SELECT state, polls FROM jobs") == [(PENDING, 2)]
    assert [j.id for j in ctx.requeued] == ["r1"]


# -- manifest rows -----------------------------------------------------------------------------


async def test_add_rows_reports_a_changed_digest_and_overwrites_nothing(cp: Checkpoint) -> None:
    assert await cp.add_rows([_row(n) for n in range(1, 4)]) == []
    await cp.update("r2", state=COMPLETED, request_id="q2")

    same = await cp.add_rows([_row(n) for n in range(1, 4)] + [_row(4)])
    changed = await cp.add_rows([_row(1), _row(2, digest="other", prompt="new"), _row(3)])

    assert same == []  # the same rows again, and one new row
    assert changed == [("r2", 2)]
    rows = _read(cp.path, "SELECT id, digest, state, request_id, params FROM jobs ORDER BY number")
    assert [r[0] for r in rows] == ["r1", "r2", "r3", "r4"]
    assert rows[1][1:4] == ("d2", COMPLETED, "q2")  # the first run's row stands
    assert json.loads(rows[1][4]) == {"prompt": "p2"}


async def test_add_rows_finds_conflicts_across_many_ids(cp: Checkpoint) -> None:
    await cp.add_rows([_row(n) for n in range(1200)])  # more than one IN (...) chunk
    for n in (3, 700, 1199):  # sent: an edit is a change (a row never sent takes it)
        await cp.update(f"r{n}", state=COMPLETED, attempts=1)
    edited = [_row(n, digest="x", seed=1) if n in (3, 700, 1199) else _row(n) for n in range(1200)]

    assert sorted(await cp.add_rows(edited)) == [("r1199", 1199), ("r3", 3), ("r700", 700)]


# -- migrations --------------------------------------------------------------------------------


async def test_a_new_file_is_brought_to_the_latest_schema(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    async with Checkpoint(path) as cp:
        await cp.add_rows([_row(1)])
        await cp.set_meta("manifest", "size=1")

    assert _read(path, "PRAGMA user_version") == [(len(checkpoint_module._MIGRATIONS),)]
    assert _read(path, "PRAGMA journal_mode") == [("wal",)]
    async with Checkpoint(path) as again:  # reopening runs no migration twice
        assert await again.get_meta("manifest") == "size=1"
        assert await again.counts() == {PENDING: 1}


async def test_migrations_run_in_order_from_the_files_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.sqlite"
    async with Checkpoint(path) as cp:
        await cp.add_rows([_row(1)])
    first = len(checkpoint_module._MIGRATIONS)
    monkeypatch.setattr(
        checkpoint_module,
        "_MIGRATIONS",
        (
            *checkpoint_module._MIGRATIONS,
            "ALTER TABLE jobs ADD COLUMN note TEXT; UPDATE jobs SET note = 'v2';",
            "UPDATE jobs SET note = note || '+v3';",
        ),
    )

    async with Checkpoint(path) as cp:
        assert await cp.counts() == {PENDING: 1}

    assert _read(path, "PRAGMA user_version") == [(first + 2,)]
    assert _read(path, "SELECT id, note FROM jobs") == [("r1", "v2+v3")]


async def test_flush_commits_the_writes_of_cancelled_writers(cp: Checkpoint) -> None:
    """A stage cancelled while its transition waits for the commit: the transition was
    queued, and flush() (before results are written) makes it count."""
    await cp.add_rows([_row(1), _row(2)])
    writers = [
        asyncio.create_task(cp.update("r1", state=SUBMITTED, request_id="q1")),
        asyncio.create_task(cp.update("r2", state=COMPLETED)),
    ]
    await asyncio.sleep(0)  # both queued
    for writer in writers:
        writer.cancel()

    await cp.flush()

    assert _read(cp.path, "SELECT id, state, request_id FROM jobs ORDER BY number") == [
        ("r1", SUBMITTED, "q1"),
        ("r2", COMPLETED, None),
    ]


async def test_a_write_not_waited_for_is_queued_and_committed_in_order(cp: Checkpoint) -> None:
    """``wait=False``: the caller goes on at once (no turn of the loop, so nothing is on
    disk yet), and a write waited for after it returns only once it is committed too."""
    await cp.add_rows([_row(1)])

    await cp.update("r1", state=SUBMITTED, request_id="q1", wait=False)
    await cp.update("r1", counts={"polls": 1}, wait=False)
    assert _read(cp.path, "SELECT state, request_id, polls FROM jobs") == [(PENDING, None, 0)]

    await cp.update("r1", state=COMPLETED, counts={"result_reads": 1})
    assert _read(cp.path, "SELECT state, request_id, polls, result_reads FROM jobs") == [
        (COMPLETED, "q1", 1, 1)
    ]


async def test_writes_not_waited_for_wait_once_too_many_are_queued(
    cp: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that stalls must not turn every count of a run into memory: past
    MAX_QUEUED statements queued, a write waits for its commit whatever its caller says."""
    monkeypatch.setattr(group_commit, "MAX_QUEUED", 3)
    await cp.add_rows([_row(1)])
    loop = asyncio.get_running_loop()
    applying = asyncio.Event()
    release = threading.Event()

    def stalled(statements: Statements) -> None:
        loop.call_soon_threadsafe(applying.set)
        release.wait(5)

    before_each_commit(monkeypatch, stalled)
    first = asyncio.create_task(cp.update("r1", counts={"polls": 1}))
    await applying.wait()  # the disk holds the first batch
    for _ in range(3):
        await cp.update("r1", counts={"polls": 1}, wait=False)  # queued, at once
    fourth = asyncio.create_task(cp.update("r1", counts={"polls": 1}, wait=False))
    await asyncio.sleep(0.05)
    assert not fourth.done()  # three queued: this one waits for its commit

    release.set()
    async with asyncio.timeout(5):
        await asyncio.gather(first, fourth)
    assert _read(cp.path, "SELECT polls FROM jobs") == [(5,)]


def _refuse_disk(self: Checkpoint, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = 13  # SQLITE_FULL
    raise exc


async def test_a_refused_commit_refuses_every_write_after_it(
    cp: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch the disk refused is lost, a write nobody waited for with it: the next
    write or flush raises the error (the run stops, resumable) rather than going on
    with a checkpoint that is behind, even once the disk takes writes again."""
    await cp.add_rows([_row(1), _row(2)])
    with monkeypatch.context() as patch:
        patch.setattr(Checkpoint, "_apply", _refuse_disk)
        await cp.update("r1", counts={"polls": 1}, wait=False)  # nobody waits for it
        with pytest.raises(CheckpointUnwritable, match="full"):
            await cp.flush()

    with pytest.raises(CheckpointUnwritable, match="full"):
        await cp.update("r2", state=COMPLETED)
    with pytest.raises(CheckpointUnwritable, match="full"):
        await cp.update("r2", counts={"polls": 1}, wait=False)
    assert _read(cp.path, "SELECT id, state, polls FROM jobs ORDER BY number") == [
        ("r1", PENDING, 0),
        ("r2", PENDING, 0),
    ]


async def _a_doomed_batch(
    cp: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Task[None], threading.Event]:
    """Row r1's SUBMITTED (its writer: the task returned) in a batch the disk refuses once
    the event returned is set, held on the worker thread until then, and its COMPLETED
    queued behind it, nobody waiting."""
    await cp.add_rows([_row(1)])
    loop = asyncio.get_running_loop()
    refusing = asyncio.Event()
    release = threading.Event()

    def refuse_later(self: Checkpoint, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        loop.call_soon_threadsafe(refusing.set)  # on the checkpoint's worker thread
        release.wait(5)
        _refuse_disk(self, statements)

    monkeypatch.setattr(Checkpoint, "_apply", refuse_later)
    first = asyncio.create_task(cp.update("r1", state=SUBMITTED, request_id="q1"))
    await refusing.wait()
    await cp.update("r1", state=COMPLETED, wait=False)  # queued behind the doomed batch
    monkeypatch.undo()
    return first, release


async def test_writes_queued_before_a_refusal_was_known_are_not_applied_after_it(
    cp: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Statements queued while the refused batch was being applied are lost with it:
    applied later, they would stand on writes that never happened."""
    first, release = await _a_doomed_batch(cp, monkeypatch)
    release.set()
    with pytest.raises(CheckpointUnwritable):
        await first
    with pytest.raises(CheckpointUnwritable):
        await cp.flush()
    assert _read(cp.path, "SELECT state, request_id FROM jobs") == [(PENDING, None)]


async def test_closing_during_a_refused_batch_applies_nothing_queued_behind_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of a run (close) while a batch is being applied waits for its outcome:
    cancelled in the middle, its refusal went unrecorded and close applied the
    statements queued behind it on top of writes that never happened."""
    cp = Checkpoint(tmp_path / "c.sqlite")
    await cp.__aenter__()
    first, release = await _a_doomed_batch(cp, monkeypatch)
    closing = asyncio.create_task(cp.close())
    await asyncio.sleep(0.05)  # close is under way while the batch is still applied
    release.set()
    async with asyncio.timeout(5):
        await closing
        with pytest.raises(CheckpointUnwritable):
            await first  # its writer hears the refusal
    assert _read(cp.path, "SELECT state, request_id FROM jobs") == [(PENDING, None)]


async def test_every_commit_is_synced_to_disk(cp: Checkpoint) -> None:
    """synchronous=FULL: a commit outlives a power cut, not only a crash of batcher (a
    SUBMITTING row lost that way would be sent, and paid for, again)."""
    level = await cp._call(lambda: cp._conn.execute("PRAGMA synchronous").fetchone()[0])
    assert level == 2  # FULL


@contextlib.asynccontextmanager
async def _as_version(
    path: Path, version: int, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Checkpoint]:
    """The checkpoint at ``path`` opened by a batcher whose schema stopped at ``version``."""
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module, "_MIGRATIONS", checkpoint_module._MIGRATIONS[:version])
        async with Checkpoint(path) as cp:
            yield cp


async def test_a_checkpoint_from_before_the_429_count_gains_the_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.sqlite"
    async with _as_version(path, 1, monkeypatch) as cp:
        await cp.add_rows([_row(1)])

    async with Checkpoint(path) as cp:  # resumed by this version
        await cp.increment("r1", "rate_limited", 2)

    assert _read(path, "SELECT id, rate_limited FROM jobs") == [("r1", 2)]


async def test_a_checkpoint_from_before_saved_output_urls_gains_the_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.sqlite"
    async with _as_version(path, 2, monkeypatch) as cp:
        await cp.add_rows([_row(1)])
        await cp.update("r1", state=SUBMITTED, request_id="q1")

    async with Checkpoint(path) as cp:  # resumed by this version
        (before,) = await cp.jobs_in([SUBMITTED])
        await cp.update("r1", output_urls=["https://cdn/x.png?sig=s"])
        (after,) = await cp.jobs_in([SUBMITTED])

    assert before.output_urls is None
    assert after.output_urls == '["https://cdn/x.png?sig=s"]'


async def test_a_checkpoint_from_before_result_reads_counts_one_per_result_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows whose result was read (it set completed_at) count one read, as `batcher
    report` assumed before the column; the new reads add to it."""
    path = tmp_path / "c.sqlite"
    async with _as_version(path, 5, monkeypatch) as cp:
        await cp.add_rows([_row(1), _row(2), _row(3)])
        await cp.update("r1", state=COMPLETED, completed_at=1.0)
        await cp.update("r2", state=SUBMITTED, completed_at=1.0, output_urls=["u"])

    async with Checkpoint(path) as cp:  # resumed by this version
        await cp.update("r2", counts={"result_reads": 1})

    assert _read(path, "SELECT id, result_reads FROM jobs ORDER BY id") == [
        ("r1", 1), ("r2", 2), ("r3", 0),
    ]  # fmt: skip


async def test_a_checkpoint_from_before_spans_stop_reads_every_row_as_not_spanning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older file cannot tell which completions a stop came between: 0 for all rows."""
    path = tmp_path / "c.sqlite"
    async with _as_version(path, 6, monkeypatch) as cp:
        await cp.add_rows([_row(1), _row(2)])
        await cp.update("r1", state=COMPLETED, completed_at=1.0, latency_s=9.0)

    async with Checkpoint(path) as cp:  # resumed by this version
        await cp.update("r2", state=COMPLETED, latency_s=8.0, spans_stop=True)

    assert _read(path, "SELECT id, spans_stop FROM jobs ORDER BY id") == [("r1", 0), ("r2", 1)]


async def test_a_failed_row_reopened_forgets_its_old_jobs_output_urls(cp: Checkpoint) -> None:
    """--retry-failed submits a new job: a resume must never download the old one's."""
    await cp.add_rows([_row(1)])
    await cp.update("r1", state="FAILED", error="images lost", output_urls=["https://cdn/x"])

    assert await cp.reopen_failed(known=True, unknown=False) == (1, 0)

    assert _read(cp.path, "SELECT state, output_urls FROM jobs") == [(PENDING, None)]
