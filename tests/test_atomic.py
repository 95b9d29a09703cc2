"""batcher.atomic: temporary files a killed writer left are swept by the next writer, and
only those: not a live writer's, not a name of the user's, never through a link."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batcher.atomic import STALE_AFTER_S, create_temp, remove_abandoned, replacing

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
