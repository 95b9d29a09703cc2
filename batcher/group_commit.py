"""SQLite on one worker thread, writes group-committed: no disk on the event loop, few fsyncs."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Self

#: SQLite's (primary) result codes of a disk that refuses the file: read-only, I/O error,
#: full; and of a file it cannot open (a journal or WAL file, once the database is open).
DISK_CODES = frozenset({8, 10, 13})
_UNWRITABLE_CODES = DISK_CODES | {14}
#: Statements queued, not yet taken by a commit, past which a write waits for its commit
#: even when its caller would not: a disk that stalls holds up the writers, not the memory.
MAX_QUEUED = 4096


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back when the block raises, if still
    open: SQLite ends it itself on some errors (a full disk), and a ROLLBACK then would
    hide the error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class GroupCommitDb(abc.ABC):
    """An SQLite connection used from one worker thread only. Writes queued by any task
    commit together, in order, in one transaction: a thousand transitions cost one fsync,
    not a thousand. A subclass opens the file (:meth:`_open`) and says what a refused
    write means (:meth:`_unwritable`); :class:`batcher.checkpoint.Checkpoint` is the one."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._db: sqlite3.Connection | None = None
        #: Statements to commit, in order, each with its writer's future (None: nobody waits).
        self._pending: list[tuple[str, Sequence[Any], asyncio.Future[None] | None]] = []
        #: What a batch the file refused raised: its statements are lost, so every write
        #: after it is refused too (a checkpoint behind its run must not go on).
        self._failed: Exception | None = None
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False

    @abc.abstractmethod
    def _open(self) -> None:
        """Open (or create) the file as ``self._db``; called on the worker thread."""

    @abc.abstractmethod
    def _unwritable(self, exc: sqlite3.OperationalError) -> Exception:
        """What every writer of a batch the file refused gets raised."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await self._call(self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        self._flusher = asyncio.create_task(self._flush_forever(), name=f"{self._name}-flush")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._flusher is not None:
            # The flusher ends once the batch it is applying has its outcome: cancelled
            # in the middle, that batch's refusal would go unrecorded, and the statements
            # queued behind it would be applied on top of writes that never happened.
            self._closing = True
            self._wake.set()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        await self._flush_once()  # whatever was queued when the flusher stopped
        if self._db is not None:
            await self._call(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:  # the disk, not a bug: the run stops, resumable
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _UNWRITABLE_CODES:
                raise self._unwritable(exc) from None
            raise

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"{self._name} is not open")
        return self._db

    # -- group-committed writes --------------------------------------------------------------

    async def _write(self, sql: str, params: Sequence[Any], *, wait: bool = True) -> None:
        """Queue one statement; returns once it is committed with whatever else was queued.

        ``wait=False`` returns at once, without a turn of the loop: for writes nothing
        depends on being on disk yet (counts, a state no step waits for). Such a write is
        still committed in order with the others: a write waited for after it returns
        only once it is committed too. Should its batch fail, the next write (or
        :meth:`flush`) raises the error. Past MAX_QUEUED statements queued it waits all
        the same."""
        if self._failed is not None:
            raise self._failed.with_traceback(None)
        if not wait and len(self._pending) < MAX_QUEUED:
            self._pending.append((sql, params, None))
            self._wake.set()
            return
        future = asyncio.get_running_loop().create_future()
        self._pending.append((sql, params, future))
        self._wake.set()
        await future

    async def flush(self) -> None:
        """Return once every write queued so far is committed, including writes whose
        callers were cancelled while they waited (the statement was queued all the same)."""
        await self._write("SELECT 1", ())  # batches commit in order: after it, all before it

    async def _flush_forever(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            await self._flush_once()

    async def _flush_once(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        error = self._failed  # set: queued before the failure was known, lost with it
        if error is None:
            try:
                await self._call(self._apply, [(sql, params) for sql, params, _ in batch])
            except Exception as exc:  # surface to every writer that waited on this batch
                error = self._unwritable(exc) if isinstance(exc, sqlite3.OperationalError) else exc
                self._failed = error
        for *_, future in batch:
            if future is None or future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    def _apply(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        with transaction(self._conn) as db:
            for sql, params in statements:
                db.execute(sql, params)
