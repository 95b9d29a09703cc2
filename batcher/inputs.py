"""A job's image parameters (``face_image``, ``id_image``, ...) as the API wants them.

A manifest value is one of:

- an ``http(s)`` URL: sent unchanged but for spaces around it (Segmind fetches it);
- a ``data:`` URL or bare base64 image data ("inline"): decoded and checked like a
  file, then sent unchanged, byte for byte. A data URL must be ``;base64``. Bare
  base64 is known by an image signature, or by being too long to be a path;
- a local file path, relative to the manifest's folder (absolute paths allowed):
  read, checked with Pillow, and sent as **plain base64** (no ``data:`` prefix).
  Plain base64 is what Segmind's docs describe for image inputs; a data URL would
  only add a guess about the media type.

Files and inline data pass the same checks (an image Pillow identifies, within
``max_file_bytes`` and ``max_pixels``), so a row that would fail at Segmind, perhaps
after being paid for, is INVALID before anything is sent. A problem names the
parameter; it never quotes inline data, which can be megabytes.

Each distinct file is read and encoded once per run, however many rows use it. The
cache is keyed by the resolved absolute path and bounded in bytes (least recently
used goes first), so a manifest with a million distinct files cannot exhaust memory.
Each distinct inline value is likewise checked once: its verdict is kept under a
hash of the value in a cache bounded in entries. Large values are hashed and
decoded in a worker thread, off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
from PIL import Image, UnidentifiedImageError

from batcher.errors import InvalidRow
from batcher.imagedata import (
    INLINE_ON_LOOP,
    b64decode_text,
    decode_data_url,
    is_base64_image,
    is_url,
)
from batcher.offload import run_sized
from batcher.sink import IMAGE_FORMATS

__all__ = ["ImageInputs", "InputError"]

_OTHER_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: Longest path Linux resolves (PATH_MAX): a longer value cannot name a file.
_PATH_MAX = 4096
_REFERENCE_MAX = 200
#: Resolved-path memo entries kept (a name -> path map; small next to the data cache).
_MAX_ALIASES = 65_536
#: Characters of inline values whose results-table reference is kept (the values are
#: the keys: a dict lookup hashes a 3 MB one in about a millisecond, decoding it for
#: its sha256 takes ten times that, for every row that uses it).
_REFERENCE_MEMO_CHARS = 64 * 1024 * 1024
#: Inline verdicts kept (a digest -> problem map, a few MB at most).
_MAX_VERDICTS = 65_536

Kind = Literal["url", "inline", "other-url", "path"]


class InputError(InvalidRow, ValueError):
    """An image parameter cannot be used; the message names the parameter and the file
    (inline data by its length only).

    It is an :class:`~batcher.errors.InvalidRow` (the row is never sent) and a
    ValueError; the caller fills in ``row_id`` when it knows it.
    """


class _Problem(Exception):
    """What is wrong with a file or inline value, without the parameter name (several
    may share it)."""


@dataclass(eq=False)
class _Pending:
    """One in-flight read that concurrent resolves of the same file wait on."""

    done: anyio.Event = field(default_factory=anyio.Event)
    encoded: str | None = None
    problem: str | None = None


def _unspaced(value: str) -> str:
    """A URL without the spaces around it (a CSV's, after a comma: no URL ends in one);
    anything else as given, since a file name may hold them."""
    head = value[:64].lstrip()  # not the whole value: inline data can be megabytes
    return value.strip() if is_url(head) or _OTHER_URL.match(head) else value


def _kind(value: str) -> Kind:
    if is_url(value):
        return "url"
    if value[:5].lower() == "data:" or is_base64_image(value):
        return "inline"
    if len(value) > _PATH_MAX:
        # No file has so long a name: data (base64 of something that is not an image,
        # or junk), refused as inline data rather than quoted whole as a file name.
        return "inline"
    if _OTHER_URL.match(value):
        return "other-url"
    return "path"


class ImageInputs:
    """Resolves image parameters for a whole run, reading each local file once."""

    def __init__(
        self,
        base_dir: Path,
        *,
        max_file_bytes: int = 20 * 1024 * 1024,
        cache_bytes: int = 512 * 1024 * 1024,
        max_pixels: int = 50_000_000,
    ) -> None:
        for name, limit in (
            ("max_file_bytes", max_file_bytes),
            ("cache_bytes", cache_bytes),
            ("max_pixels", max_pixels),
        ):
            if limit <= 0:
                raise ValueError(f"{name} must be positive, got {limit}")
        self._base = os.path.abspath(base_dir)
        self._max_file_bytes = max_file_bytes
        self._cache_bytes = cache_bytes
        self._max_pixels = max_pixels
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._cached = 0
        self._aliases: OrderedDict[str, str] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        #: Inline value digest -> its problem, or None when it is a usable image.
        self._verdicts: OrderedDict[bytes, str | None] = OrderedDict()
        #: Inline value -> its reference for the results table (one decode per value).
        self._references: OrderedDict[str, str] = OrderedDict()
        self._referenced = 0
        #: Inline value digest -> set when its first check ends (the others wait for it).
        self._checking: dict[bytes, anyio.Event] = {}
        #: File reads performed so far (cache hits and shared reads do not count).
        self.reads = 0
        #: Inline values decoded and checked so far (cache hits do not count).
        self.inline_checks = 0

    def __repr__(self) -> str:
        return (
            f"ImageInputs(base_dir={self._base!r}, max_file_bytes={self._max_file_bytes}, "
            f"cache_bytes={self._cache_bytes}, max_pixels={self._max_pixels})"
        )

    async def resolve(self, param: str, value: str) -> str:
        """The value to send for ``param``: a URL or inline data as given, else the file's base64.

        Raises :class:`InputError` for a missing, unreadable, oversized or non-image
        file or inline value, or a URL scheme other than http(s).
        """
        if not value.strip():
            raise InputError(f"{param}: empty value")
        value = _unspaced(value)
        kind = _kind(value)
        if kind == "url":
            try:
                host = urlsplit(value).hostname
            except ValueError as exc:  # "Invalid IPv6 URL": a bracket left open
                raise InputError(f"{param}={value}: not a valid URL ({exc})") from None
            if not host:
                raise InputError(f"{param}={value}: the URL names no host")
            return value
        if kind == "inline":
            if (problem := await self._inline_problem(value)) is not None:
                raise InputError(f"{param}=<inline data, {len(value)} characters>: {problem}")
            return value
        if kind == "other-url":
            scheme = value.partition(":")[0]
            raise InputError(f"{param}={value}: unsupported URL scheme {scheme!r} (http(s) only)")
        given = f"{param}={value}"
        if value != value.strip():  # a space after a CSV comma, invisible in the message
            given = f"{param}={value!r} (spaces are part of the name)"
        try:
            path = await self._resolved(os.path.join(self._base, value))
        except _Problem as exc:
            raise InputError(f"{given}: {exc}") from None

        while (pending := self._pending.get(path)) is not None:
            await pending.done.wait()
            if pending.problem is not None:
                raise InputError(f"{given}: {pending.problem}")
            if pending.encoded is not None:
                return pending.encoded
            # The reader died without a verdict (an unexpected error): look again, and
            # read for ourselves if nobody else has started.
        if (hit := self._cache.get(path)) is not None:
            self._cache.move_to_end(path)
            return hit

        pending = self._pending[path] = _Pending()
        try:
            self.reads += 1
            encoded = await anyio.to_thread.run_sync(self._load, path)
            pending.encoded = encoded
            self._store(path, encoded)
        except _Problem as exc:
            pending.problem = str(exc)
            raise InputError(f"{given}: {exc}") from None
        finally:
            del self._pending[path]
            pending.done.set()
        return encoded

    def reference(self, param: str, value: str) -> str:
        """A short, body-free record of ``value`` for the results table.

        A URL stays (cut at 200 characters); a local path becomes ``file:<path as
        given>``; inline data becomes ``base64:<sha256[:16]> (<n> bytes)`` of the decoded
        image (of the text itself if it does not decode). ``param`` is accepted so the
        call mirrors :meth:`resolve`; the reference does not depend on it.
        """
        value = _unspaced(value)
        kind = _kind(value)
        if kind == "path":
            return "file:" + value
        if kind == "inline":
            if (known := self._references.get(value)) is not None:
                return known  # a face shared by many rows is decoded once, not per row
            try:
                body = _decode_inline(value)
            except ValueError:
                body = value.encode("utf-8", "surrogatepass")
            reference = f"base64:{hashlib.sha256(body).hexdigest()[:16]} ({len(body)} bytes)"
            self._remember(value, reference)
            return reference
        if len(value) > _REFERENCE_MAX:
            return value[:_REFERENCE_MAX] + "..."
        return value

    def _remember(self, value: str, reference: str) -> None:
        """Keep the reference of an inline value, the values kept bounded in characters."""
        if len(value) > _REFERENCE_MEMO_CHARS:
            return
        self._references[value] = reference
        self._referenced += len(value)
        while self._referenced > _REFERENCE_MEMO_CHARS:
            evicted, _ = self._references.popitem(last=False)
            self._referenced -= len(evicted)

    async def _resolved(self, joined: str) -> str:
        """The resolved absolute path for ``joined``; memoised so cache hits skip a thread."""
        if (known := self._aliases.get(joined)) is not None:
            self._aliases.move_to_end(joined)
            return known
        path = await anyio.to_thread.run_sync(_resolve_path, joined)
        self._aliases[joined] = path
        if len(self._aliases) > _MAX_ALIASES:
            self._aliases.popitem(last=False)
        return path

    async def _inline_problem(self, value: str) -> str | None:
        """What is wrong with inline ``value`` (None: a usable image), checked once a run:
        concurrent first checks of one value (32 submit workers on a resume) wait for
        the one that runs, as file reads do."""
        large = len(value) > INLINE_ON_LOOP
        key = await run_sized(large, _digest, value)
        while (running := self._checking.get(key)) is not None:
            await running.wait()  # if that check was cancelled, there is no verdict: run it
        if key in self._verdicts:
            self._verdicts.move_to_end(key)
            return self._verdicts[key]
        done = self._checking[key] = anyio.Event()
        try:
            self.inline_checks += 1
            problem = await run_sized(large, self._check_inline, value)
            self._verdicts[key] = problem  # a value cannot change: problems are kept too
            if len(self._verdicts) > _MAX_VERDICTS:
                self._verdicts.popitem(last=False)
        finally:
            del self._checking[key]
            done.set()
        return problem

    def _check_inline(self, value: str) -> str | None:
        """Decode and check one inline value. Blocking when large: run it in a thread."""
        try:
            data = _decode_inline(value)
        except ValueError as exc:  # binascii.Error is one
            return str(exc)
        try:
            _check_size(len(data), self._max_file_bytes, "image data")
            _check_image(data, self._max_pixels)
        except _Problem as exc:
            return str(exc)
        return None

    def _store(self, path: str, encoded: str) -> None:
        size = len(encoded)  # ASCII: one byte a character
        if size > self._cache_bytes:
            return
        self._cache[path] = encoded
        self._cached += size
        while self._cached > self._cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._cached -= len(evicted)

    def _load(self, path: str) -> str:
        """Read, check and encode one file. Blocking: runs in a worker thread."""
        data = _read_capped(path, self._max_file_bytes)
        _check_image(data, self._max_pixels)
        return base64.b64encode(data).decode("ascii")


def _resolve_path(joined: str) -> str:
    if "\x00" in joined:  # no file name holds one; os.path raises a bare ValueError
        raise _Problem("the path contains a NUL character: no file can have that name")
    try:
        return str(Path(joined).resolve())
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise _Problem(f"cannot resolve the path ({joined}): {exc}") from None


def _read_capped(path: str, max_bytes: int) -> bytes:
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise _Problem(f"is a folder, not a file ({path})")
        # Checked before opening: opening a FIFO or a device could block for ever.
        if not stat.S_ISREG(info.st_mode):
            raise _Problem(f"not a regular file ({path})")
        _check_size(info.st_size, max_bytes, "file")
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)  # +1: a file that grew since stat is caught
    except FileNotFoundError:
        raise _Problem(f"file not found (looked in {path})") from None
    except PermissionError:
        raise _Problem(f"permission denied ({path})") from None
    except OSError as exc:
        raise _Problem(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise _Problem(f"file is over the {max_bytes} byte limit")
    if not data:
        raise _Problem(f"file is empty ({path})")
    return data


def _check_size(size: int, max_bytes: int, what: str) -> None:
    if size > max_bytes:
        raise _Problem(f"{what} is {size} bytes, over the {max_bytes} byte limit")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def _decode_inline(value: str) -> bytes:
    """The bytes of an inline value; a ValueError (never quoting the data) if it has none."""
    if value[:5].lower() == "data:":
        return decode_data_url(value)
    try:
        return b64decode_text(value)
    except binascii.Error as exc:
        raise ValueError(f"not valid base64: {exc}") from None


def _check_image(data: bytes, max_pixels: int) -> None:
    Image.init()
    formats = [name for name in IMAGE_FORMATS if name in Image.OPEN]
    try:
        with Image.open(io.BytesIO(data), formats=formats) as image:
            width, height = image.size
            image.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning arrives here as an exception only when warnings are errors (as in
        # the tests); otherwise Pillow prints it and the pixel check below rejects.
        raise _Problem(f"image dimensions are absurd ({exc})") from None
    except Exception as exc:  # Pillow's plugins raise many types for "not an image"
        accepted = ", ".join(sorted({fmt for fmt, _ in IMAGE_FORMATS.values()}))
        # Pillow's "cannot identify image file <_io.BytesIO object at 0x...>" names our
        # buffer, not the user's file: say what it means instead.
        why = (
            "its content matches none of these formats"
            if isinstance(exc, UnidentifiedImageError)
            else f"{type(exc).__name__}: {exc}"
        )
        raise _Problem(f"not an image ({accepted}): {why}") from None
    if width * height > max_pixels:
        raise _Problem(
            f"image is {width}x{height} ({width * height / 1e6:.1f} megapixels), "
            f"over the {max_pixels / 1e6:g} megapixel limit"
        )
