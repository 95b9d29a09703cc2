"""Files replaced whole, never written through a link planted at their name.

Every file batcher writes under --out is first written to a new temporary file beside
it, opened with ``O_EXCL | O_NOFOLLOW`` under a random name (whatever already sits at a
name, a symlink included, is an error, never a target), fsynced, then renamed over the
final name: a crash leaves the old file or the new one, never half, and a symlink at the
final name is replaced, not followed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["PART", "create_temp", "replacing"]

#: Suffix of every temporary file (leftovers of a killed process are swept by name).
PART = ".part"


def create_temp(final: str | Path) -> tuple[int, str]:
    """A new ``<final>.<random>.part`` open for writing: its descriptor and its name."""
    temp = f"{final}.{secrets.token_hex(4)}{PART}"
    # os.open rather than tempfile: the mode then follows the umask like any output file.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return os.open(temp, flags | getattr(os, "O_NOFOLLOW", 0), 0o666), temp


@contextlib.contextmanager
def replacing(final: str | Path) -> Iterator[BinaryIO]:
    """A binary file for ``final``'s new content: fsynced and renamed over ``final`` when
    the block ends cleanly, deleted when it raises. Blocking."""
    fd, temp = create_temp(final)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
