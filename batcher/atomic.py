"""Files replaced whole, never written through a link planted at their name.

Every file batcher writes under --out is first written to a new temporary file beside
it, opened with ``O_EXCL | O_NOFOLLOW`` under a random name (whatever already sits at a
name, a symlink included, is an error, never a target), fsynced, then renamed over the
final name: a crash leaves the old file or the new one, never half, and a symlink at the
final name is replaced, not followed. Files written together (:func:`write_all`) share
one flush of their file system instead of an fsync each.

A killed writer leaves its temporary file behind; :func:`remove_abandoned` lets the next
writer delete it. The writer holds an ``flock`` on its temporary file from creation to
rename, and the kernel drops it when the process dies however it dies, so a file nobody
holds is a dead writer's.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import platform
import re
import secrets
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

__all__ = ["PART", "STALE_AFTER_S", "create_temp", "remove_abandoned", "replacing", "write_all"]

#: Suffix of every temporary file (leftovers of a killed process are swept by name).
PART = ".part"
#: Random hex digits in a temporary file's name, between the final name and PART.
_TOKEN_BYTES = 4
#: Age (by mtime) below which a temporary file is never taken for a dead writer's, held
#: or not: it covers the instant between a writer creating its file and locking it.
STALE_AFTER_S = 60.0


def create_temp(final: str | Path) -> tuple[int, str]:
    """A new ``<final>.<8 hex digits>.part`` open for writing and exclusively flock-ed
    (the mark of a live writer, see :func:`remove_abandoned`): its descriptor and name."""
    temp = f"{final}.{secrets.token_hex(_TOKEN_BYTES)}{PART}"
    # os.open rather than tempfile: the mode then follows the umask like any output file.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(temp, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)
    # A file system without locks (ENOLCK...) still gets the file written; the sweep
    # there cannot lock either, so it leaves every temporary file alone. Non-blocking:
    # nobody can hold a file just made with O_EXCL, and a hung lock daemon (NFS) must
    # not hang every image write.
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd, temp


@contextlib.contextmanager
def replacing(final: str | Path) -> Iterator[BinaryIO]:
    """A binary file for ``final``'s new content: fsynced and renamed over ``final`` when
    the block ends cleanly, deleted when it raises. Its lock is held until it is renamed
    or deleted. Blocking."""
    fd, temp = create_temp(final)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            yield f
            f.flush()
            os.fsync(fd)
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    finally:
        os.close(fd)


#: Files written together from which one flush of their file system (``syncfs``) makes
#: them durable, instead of an fsync each. Below it the fsyncs are few, and bounded to
#: the files themselves: ``syncfs`` also writes back whatever else is pending there.
SYNC_TOGETHER_MIN = 4
#: File systems whose ``syncfs`` writes back every file and reports write-back errors (on
#: the kernels :func:`_syncfs` accepts). Elsewhere (FUSE, network and overlay file
#: systems...) each file is fsynced, which those pass on to where the data lives.
SYNCFS_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs"})


def write_all(files: Sequence[tuple[str, bytes]]) -> list[OSError | None]:
    """Each ``(final, data)`` replaced whole as :func:`replacing` does: each file's
    error, or None; a file that failed leaves no temporary file and its final name as it
    was. The folders' own fsync (making the renames durable) is the caller's. Blocking.

    :data:`SYNC_TOGETHER_MIN` files or more in one folder of a local file system (see
    :data:`SYNCFS_TYPES`) are made durable together: every temporary file is written,
    then one ``syncfs`` flushes them all, then each is renamed. Otherwise each file is
    written, fsynced and renamed in turn, one open at a time."""
    syncfs = _syncfs() if len(files) >= SYNC_TOGETHER_MIN else None
    if syncfs is not None and _one_local_folder([final for final, _ in files]):
        return _write_together(files, syncfs)
    return [_write_one(final, data) for final, data in files]


def _write_one(final: str, data: bytes) -> OSError | None:
    try:
        with replacing(final) as f:
            f.write(data)
    except OSError as exc:
        return exc
    return None


def _write_together(
    files: Sequence[tuple[str, bytes]], syncfs: Callable[[int], None]
) -> list[OSError | None]:
    errors: list[OSError | None] = [None] * len(files)
    staged: list[tuple[int, int, str]] = []  # (position, descriptor, temporary name)
    renamed: set[int] = set()
    try:
        for i, (final, data) in enumerate(files):
            try:
                fd, temp = create_temp(final)
            except OSError as exc:
                errors[i] = exc
                continue
            staged.append((i, fd, temp))
            try:
                _write_fully(fd, data)
            except OSError as exc:
                errors[i] = exc
        written = [(i, fd) for i, fd, _ in staged if errors[i] is None]
        if written:
            try:
                # Through the first file opened: syncfs reports a write-back error to a
                # descriptor opened before it, even one another caller has seen already.
                syncfs(written[0][1])
            except OSError as exc:  # which file's write-back failed is not known: none kept
                for i, _ in written:
                    errors[i] = exc
        for i, _, temp in staged:
            if errors[i] is None:
                try:
                    os.replace(temp, files[i][0])
                    renamed.add(i)
                except OSError as exc:
                    errors[i] = exc
    finally:
        for i, fd, temp in staged:  # every one, whatever fails here
            if i not in renamed:  # unlinked while still locked: never taken for abandoned
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            with contextlib.suppress(OSError):
                os.close(fd)
    return errors


def _write_fully(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _one_local_folder(finals: Sequence[str]) -> bool:
    """Whether every path is in one folder, on a file system of :data:`SYNCFS_TYPES`."""
    folders = {os.path.dirname(final) for final in finals}
    if len(folders) != 1:
        return False
    try:
        device = os.stat(folders.pop() or ".").st_dev
    except OSError:
        return False
    return _fs_type(device) in SYNCFS_TYPES


@functools.cache
def _fs_type(device: int) -> str | None:
    """The type of the file system mounted from ``device`` (Linux: /proc/self/mountinfo),
    or None when it cannot be told."""
    wanted = f"{os.major(device)}:{os.minor(device)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[2] == wanted and "-" in fields[3:]:
                    after = fields.index("-", 3) + 1
                    return fields[after] if after < len(fields) else None
    except OSError:
        return None
    return None


@functools.cache
def _syncfs() -> Callable[[int], None] | None:
    """``syncfs(fd)``, raising OSError, where the kernel reports write-back errors to it
    (Linux 5.8 and later; before, it returned 0 whatever happened); else None."""
    found = re.match(r"(\d+)\.(\d+)", platform.release())
    if sys.platform != "linux" or not found or (int(found[1]), int(found[2])) < (5, 8):
        return None
    import ctypes  # here, not at import: ~8 ms that only a batch of image writes needs

    try:
        libc_syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    libc_syncfs.argtypes = [ctypes.c_int]
    libc_syncfs.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if libc_syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"syncfs: {os.strerror(code)}")

    return syncfs


def remove_abandoned(
    folder: str | Path, final_name: str | None = None, *, min_age_s: float = STALE_AFTER_S
) -> int:
    """Delete the temporary files killed writers left in ``folder``; return how many.
    Blocking.

    Only names :func:`create_temp` makes (``<final_name>.<8 hex digits>.part``; any final
    name when ``final_name`` is None), only regular files (a symlink or folder at such a
    name is not ours and is left, never followed), and only files no live writer holds
    (a writer's flock) that are at least ``min_age_s`` old. The age covers the instant
    between a writer's create and its lock; a caller that excludes every other writer of
    these names (the run's ``.lock``) may pass 0. A file that cannot be opened or locked
    (a file system without locks) is left: it cannot be told from a live one.
    """
    token = rf"\.[0-9a-f]{{{2 * _TOKEN_BYTES}}}{re.escape(PART)}"
    final = ".+" if final_name is None else re.escape(final_name)
    pattern = re.compile(final + token, re.DOTALL)
    removed = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if (
                pattern.fullmatch(entry.name)
                and entry.is_file(follow_symlinks=False)
                and _remove_if_abandoned(entry.path, min_age_s)
            ):
                removed += 1
    return removed


def _remove_if_abandoned(path: str, min_age_s: float) -> bool:
    """Unlink ``path`` if it is a regular file at least ``min_age_s`` old that no process
    holds a lock on (checked through a descriptor, then that the name is still the same
    file, so a file renamed or swapped in meanwhile is not the one removed)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # gone, or a link or something unreadable put there since the listing
        return False
    try:
        seen = os.fstat(fd)
        if not stat.S_ISREG(seen.st_mode) or time.time() - seen.st_mtime < min_age_s:
            return False
        # Shared, so a reader-only descriptor may take it; a writer's exclusive lock
        # refuses it. Held until close: a writer cannot take this file meanwhile.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino):
            return False
        os.unlink(path)
        return True
    except OSError:  # held by its live writer, or gone meanwhile
        return False
    finally:
        os.close(fd)
