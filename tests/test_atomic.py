"""batcher.atomic: files written together are durable before any is renamed; temporary
files a killed writer left are swept by the next writer, and only those: not a live
writer's, not a name of the user's, never through a link."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import batcher.atomic
from batcher.atomic import (
    PART,
    STALE_AFTER_S,
    SYNC_TOGETHER_MIN,
    create_temp,
    remove_abandoned,
    replacing,
    write_all,
)

#: Names the writer never makes for ``report.png``: each must survive a sweep.
NOT_OURS = (
    "report.png.part",  # no token
    "report.png.0badc0d.part",  # 7 hex digits
    "report.png.0badc0de0.part",  # 9
    "report.png.0BADC0DE.part",  # upper case: token_hex never writes it
    "report.png.notahex!.part",
    "report.png.0badc0de.part.bak",
    "report.png.0badc0de.partial",
    "xreport.png.0badc0de.part",
    "report.pngx.0badc0de.part",
    "other.png.0badc0de.part",  # another target's
)


def plant(path: Path, *, age_s: float = 2 * STALE_AFTER_S) -> Path:
    """A file at ``path`` last written ``age_s`` ago, as a killed writer leaves it."""
    path.write_bytes(b"half a file")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_dead_writers_file_goes_and_no_other_name_does(tmp_path: Path) -> None:
    stale = plant(tmp_path / "report.png.0badc0de.part")
    for name in NOT_OURS:
        plant(tmp_path / name)

    assert remove_abandoned(tmp_path, "report.png") == 1

    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(NOT_OURS)


def test_a_link_or_folder_at_a_temporary_name_is_left_and_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = plant(elsewhere / "report.png.0badc0de.part")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.png.1badc0de.part").symlink_to(victim)
    (out / "report.png.2badc0de.part").symlink_to(elsewhere)
    (out / "report.png.3badc0de.part").mkdir()

    assert remove_abandoned(out, "report.png") == 0

    assert victim.read_bytes() == b"half a file"
    assert (out / "report.png.1badc0de.part").is_symlink()
    assert (out / "report.png.2badc0de.part").is_symlink()
    assert (out / "report.png.3badc0de.part").is_dir()


def test_a_live_writers_file_is_left_however_old(tmp_path: Path) -> None:
    fd, temp = create_temp(tmp_path / "results.parquet")
    try:
        then = time.time() - 10 * STALE_AFTER_S  # a writer stalled for ten minutes
        os.utime(temp, (then, then))
        assert remove_abandoned(tmp_path, "results.parquet", min_age_s=0) == 0
        assert os.path.exists(temp)
    finally:
        os.close(fd)
    # Its writer gone, the same file is a leftover.
    assert remove_abandoned(tmp_path, "results.parquet", min_age_s=0) == 1
    assert not os.path.exists(temp)


def test_a_new_file_is_left_until_it_is_old_enough(tmp_path: Path) -> None:
    """A writer between creating its file and locking it holds nothing yet."""
    young = plant(tmp_path / "report.png.0badc0de.part", age_s=1.0)
    assert remove_abandoned(tmp_path, "report.png") == 0
    assert young.exists()
    assert remove_abandoned(tmp_path, "report.png", min_age_s=0) == 1


def test_the_file_being_written_is_locked_until_it_is_renamed(tmp_path: Path) -> None:
    final = tmp_path / "report.png"
    with replacing(final) as f:
        f.write(b"new")
        (temp,) = tmp_path.iterdir()
        probe = os.open(temp, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(probe)
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]
    assert final.read_bytes() == b"new"


def test_a_writer_killed_mid_write_leaves_a_file_the_next_sweep_removes(tmp_path: Path) -> None:
    final = tmp_path / "report.png"
    killed = (
        "import os, signal, sys\n"
        "from batcher.atomic import replacing\n"
        "with replacing(sys.argv[1]) as f:\n"
        "    f.write(b'half'); f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", killed, str(final)], check=False, timeout=60)
    assert done.returncode == -9
    (left,) = tmp_path.iterdir()
    assert left.name.startswith("report.png.")
    assert left.name.endswith(".part")
    then = time.time() - 2 * STALE_AFTER_S
    os.utime(left, (then, then))

    assert remove_abandoned(tmp_path, "report.png") == 1
    assert list(tmp_path.iterdir()) == []


# -- files written together ------------------------------------------------------------


def _files(folder: Path, n: int) -> list[tuple[str, bytes]]:
    """``n`` files for ``folder``, one of them 3 MiB (more than one write call)."""
    return [
        (str(folder / f"f{i}.png"), os.urandom(3 * 2**20 if i == 1 else 100 + i)) for i in range(n)
    ]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(PART))


@pytest.fixture
def local(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every folder counts as on ext4, whatever the test machine's /tmp is."""
    monkeypatch.setattr(batcher.atomic, "_fs_type", lambda device: "ext4")


@pytest.mark.parametrize("n", [1, SYNC_TOGETHER_MIN - 1, SYNC_TOGETHER_MIN, 12])
def test_files_written_together_are_each_whole(tmp_path: Path, n: int) -> None:
    files = _files(tmp_path, n)  # on an ext4 /tmp, the larger batches take the syncfs path
    assert write_all(files) == [None] * n
    for final, data in files:
        assert Path(final).read_bytes() == data
    assert _leftovers(tmp_path) == []


class _Barrier:
    """Stands in for syncfs: records the calls, and checks at each that every file of
    the batch is written and none renamed yet."""

    def __init__(self, folder: Path, files: list[tuple[str, bytes]], fail: bool = False):
        self.folder, self.fail = folder, fail
        self.expected = len(files)
        self.new = [final for final, _ in files if not Path(final).exists()]
        self.calls: list[int] = []

    def __call__(self, fd: int) -> None:
        self.calls.append(fd)
        assert not any(Path(final).exists() for final in self.new)  # nothing renamed yet
        assert len(_leftovers(self.folder)) == self.expected  # every file written first
        if self.fail:
            raise OSError(errno.EIO, "syncfs: Input/output error")


def test_a_batch_is_durable_in_one_flush_before_any_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local: None
) -> None:
    files = _files(tmp_path, SYNC_TOGETHER_MIN + 2)
    barrier = _Barrier(tmp_path, files)
    fsyncs: list[int] = []
    opened: list[int] = []
    real_create = batcher.atomic.create_temp

    def create(final: str | Path) -> tuple[int, str]:
        fd, temp = real_create(final)
        opened.append(fd)
        return fd, temp

    monkeypatch.setattr(batcher.atomic, "create_temp", create)
    monkeypatch.setattr(batcher.atomic, "_syncfs", lambda: barrier)
    monkeypatch.setattr(os, "fsync", fsyncs.append)

    assert write_all(files) == [None] * len(files)

    # One flush for all, through the first file opened: syncfs reports a write-back
    # error only to a descriptor opened before it (another may have seen it first).
    assert barrier.calls == [opened[0]]
    assert fsyncs == []
    assert all(Path(final).read_bytes() == data for final, data in files)


@pytest.mark.parametrize(
    ("n", "syncfs_there", "fs_type"),
    [
        (SYNC_TOGETHER_MIN - 1, True, "ext4"),  # a few files
        (SYNC_TOGETHER_MIN + 2, False, "ext4"),  # an old kernel, or not Linux
        (SYNC_TOGETHER_MIN + 2, True, "fuse.sshfs"),  # syncfs never reaches the daemon
        (SYNC_TOGETHER_MIN + 2, True, "nfs4"),
        (SYNC_TOGETHER_MIN + 2, True, None),  # a folder mountinfo does not name
    ],
)
def test_otherwise_each_file_is_fsynced_before_its_own_rename_one_at_a_time(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    n: int,
    syncfs_there: bool,
    fs_type: str | None,
) -> None:
    files = _files(tmp_path, n)
    flushes: list[int] = []
    fsynced: list[str] = []

    def fsync(fd: int) -> None:
        (temp,) = _leftovers(tmp_path)  # the one file being written, and only it
        final = temp.split(".")[0] + ".png"
        assert not (tmp_path / final).exists()  # not renamed before it is durable
        fsynced.append(final)

    monkeypatch.setattr(batcher.atomic, "_syncfs", lambda: flushes.append if syncfs_there else None)
    monkeypatch.setattr(batcher.atomic, "_fs_type", lambda device: fs_type)
    monkeypatch.setattr(os, "fsync", fsync)

    assert write_all(files) == [None] * n

    assert fsynced == [Path(final).name for final, _ in files]
    assert flushes == []


def test_files_in_several_folders_are_fsynced_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local: None
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = _files(tmp_path / "a", 2) + _files(tmp_path / "b", SYNC_TOGETHER_MIN)
    flushes: list[int] = []
    fsyncs: list[int] = []
    monkeypatch.setattr(batcher.atomic, "_syncfs", lambda: flushes.append)
    monkeypatch.setattr(os, "fsync", fsyncs.append)

    assert write_all(files) == [None] * len(files)
    assert (len(flushes), len(fsyncs)) == (0, len(files))


def test_the_file_system_of_a_folder_is_read_from_mountinfo(tmp_path: Path) -> None:
    if not Path("/proc/self/mountinfo").exists():
        pytest.skip("no /proc/self/mountinfo: not Linux (write_all fsyncs each file there)")
    assert batcher.atomic._fs_type(os.stat("/proc").st_dev) == "proc"
    assert batcher.atomic._fs_type(os.stat(tmp_path).st_dev)  # whatever /tmp is, named


def test_a_failed_flush_keeps_no_file_of_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local: None
) -> None:
    files = _files(tmp_path, SYNC_TOGETHER_MIN)
    Path(files[0][0]).write_bytes(b"the old image")
    barrier = _Barrier(tmp_path, files, fail=True)
    monkeypatch.setattr(batcher.atomic, "_syncfs", lambda: barrier)

    errors = write_all(files)

    assert barrier.calls  # the checks ran
    assert all(isinstance(e, OSError) and e.errno == errno.EIO for e in errors)
    assert Path(files[0][0]).read_bytes() == b"the old image"  # left as it was
    assert not any(Path(final).exists() for final, _ in files[1:])
    assert _leftovers(tmp_path) == []


def test_one_file_that_cannot_be_made_does_not_stop_the_others(tmp_path: Path) -> None:
    files = _files(tmp_path, SYNC_TOGETHER_MIN + 1)
    files[2] = (str(tmp_path / "no such folder" / "f2.png"), b"x")

    errors = write_all(files)

    assert isinstance(errors[2], FileNotFoundError)
    assert [e is None for i, e in enumerate(errors) if i != 2] == [True] * (len(files) - 1)
    assert all(Path(f).read_bytes() == d for i, (f, d) in enumerate(files) if i != 2)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("platform_name", "release", "used"),
    [
        ("linux", "6.18.44-fc", True),
        ("linux", "5.8.0-generic", True),
        ("linux", "5.4.0-150-generic", False),  # syncfs returned 0 whatever failed
        ("linux", "not a version", False),
        ("darwin", "23.1.0", False),
    ],
)
def test_syncfs_is_used_only_where_it_reports_errors(
    monkeypatch: pytest.MonkeyPatch, platform_name: str, release: str, used: bool
) -> None:
    monkeypatch.setattr(sys, "platform", platform_name)
    monkeypatch.setattr(batcher.atomic.platform, "release", lambda: release)
    batcher.atomic._syncfs.cache_clear()
    try:
        assert (batcher.atomic._syncfs() is not None) is used
    finally:
        batcher.atomic._syncfs.cache_clear()


@pytest.mark.skipif(sys.platform != "linux", reason="syncfs is Linux's")
def test_the_real_syncfs_raises_on_a_bad_descriptor(tmp_path: Path) -> None:
    syncfs = batcher.atomic._syncfs()
    assert syncfs is not None  # this kernel reports errors to it
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        syncfs(fd)  # a flush that works returns quietly
    finally:
        os.close(fd)
    with pytest.raises(OSError, match="Bad file descriptor") as caught:
        syncfs(fd)  # closed now
    assert caught.value.errno == errno.EBADF


def test_a_cleanup_that_fails_still_closes_every_file_and_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local: None
) -> None:
    """A file system gone read-only after an I/O error: renames and unlinks fail. Each
    file gets its error, and no descriptor (nor its lock) is left open."""
    files = _files(tmp_path, SYNC_TOGETHER_MIN + 2)
    monkeypatch.setattr(batcher.atomic, "_syncfs", lambda: lambda fd: None)

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr(os, "unlink", read_only)
    errors = write_all(files)
    monkeypatch.undo()

    assert all(isinstance(e, OSError) and e.errno == errno.EROFS for e in errors)
    assert len(os.listdir("/proc/self/fd")) == before
