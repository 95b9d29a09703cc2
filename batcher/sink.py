"""Turn a finished job's outputs into verified image files on disk.

Each output is inline image data (:mod:`batcher.imagedata`) or a public URL
(:func:`download`); :func:`write_image` checks the bytes (a PNG whole by
:mod:`batcher.pngcheck`, any other format by a full Pillow decode) and writes them
atomically under ``<out_dir>/images/``. The file work is blocking on purpose: callers
run it in a worker thread (``anyio.to_thread.run_sync``).

File names come from :func:`safe_stem`, which can never leave the images folder
whatever the row id holds, and never maps two row ids to one name.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import logging
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from PIL import Image, ImageFile, UnidentifiedImageError

from batcher import pngcheck
from batcher.atomic import remove_abandoned, write_all

__all__ = [
    "IMAGE_FORMATS",
    "MAX_PIXELS",
    "CorruptImage",
    "DownloadLimits",
    "DownloadTooLarge",
    "IncompleteDownload",
    "SavedImage",
    "download",
    "remove_partials",
    "safe_stem",
    "write_image",
]

logger = logging.getLogger(__name__)

#: Pillow formats batcher accepts, with (format, extension) as written to disk.
#: Opening is restricted to these so a hostile file cannot reach an obscure decoder.
#: MPO is how Pillow names some multi-frame JPEGs; the file is a valid JPEG.
IMAGE_FORMATS: dict[str, tuple[str, str]] = {
    "PNG": ("png", "png"),
    "JPEG": ("jpeg", "jpg"),
    "MPO": ("jpeg", "jpg"),
    "WEBP": ("webp", "webp"),
    "GIF": ("gif", "gif"),
    "BMP": ("bmp", "bmp"),
    "TIFF": ("tiff", "tiff"),
    "AVIF": ("avif", "avif"),
}

#: Largest output image accepted, in pixels: far above any model's output (InfiniteYou's
#: largest is 1280x1280), far below what would exhaust memory once decoded (~270 MB RGBA).
MAX_PIXELS = 8192 * 8192

_STEM_MAX = 80
#: Hex digits of the id's hash in a file name: two ids meet on one name with odds of
#: n^2 / 2^65 for n ids that clean alike (a million: 3 in 10^8).
_HASH_HEX = 16
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_CHUNK = 64 * 1024


class CorruptImage(ValueError):
    """The bytes are not an image Pillow can decode (or not one of IMAGE_FORMATS)."""


class IncompleteDownload(Exception):
    """The body ended before its declared length: transient, safe to retry."""


class DownloadTooLarge(ValueError):
    """The body is (or declares itself) larger than ``DownloadLimits.max_bytes``."""


@dataclass(frozen=True, kw_only=True)
class SavedImage:
    """One image written to disk; ``path`` is POSIX and relative to the output dir."""

    path: str
    width: int
    height: int
    format: str
    bytes: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class DownloadLimits:
    """Bounds on fetching one output URL."""

    max_bytes: int = 50 * 1024 * 1024
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


def safe_stem(row_id: str) -> str:
    """A file-name stem for ``row_id`` that cannot escape a folder or collide.

    Characters outside ``[A-Za-z0-9._-]`` become ``_``; leading dots and dashes go
    (no hidden files, nothing a shell tool reads as an option); the readable part is
    capped at 80 characters. The first 16 hex digits (64 bits) of the id's SHA-256 are
    always appended, so ids that clean to the same text ("a/b", "a_b", ids in another
    script, long ids alike in their first 80 characters) stay distinct: 8 digits met on
    one file about once among 10^5 such ids, and the second image replaced the first.
    """
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX]
    readable = _UNSAFE.sub("_", row_id).lstrip(".-")[:_STEM_MAX] or "row"
    return f"{readable}_{digest}"


async def download(session: aiohttp.ClientSession, url: str, limits: DownloadLimits) -> bytes:
    """Fetch a public output URL into memory, within ``limits``.

    ``session`` must NOT carry the ``x-api-key`` header: output URLs are public
    (often a CDN or a signed bucket URL) and the key must never leave for another
    host; a session that has it is refused. A non-2xx answer raises
    ``aiohttp.ClientResponseError``; a body cut short raises :class:`IncompleteDownload`
    (retry it); a body over the cap raises :class:`DownloadTooLarge`; the whole fetch
    past ``timeout_s`` raises ``TimeoutError``.
    """
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        raise ValueError(f"refusing to download {scheme or 'scheme-less'!r} URL: only http(s)")
    if any(name.lower() == "x-api-key" for name in session.headers):
        raise ValueError("download session carries x-api-key; output URLs need no key")

    shown = url.partition("?")[0]  # a signed URL's query is a credential: keep it out of errors
    # aiohttp's own timer for the whole fetch (one timer, not one more beside the session's).
    timeout = aiohttp.ClientTimeout(total=limits.timeout_s)
    async with session.get(url, timeout=timeout) as response:
        response.raise_for_status()
        declared = response.content_length
        if declared is not None and declared > limits.max_bytes:
            raise DownloadTooLarge(
                f"{shown}: Content-Length {declared} is over the {limits.max_bytes} byte cap"
            )
        encoded = "Content-Encoding" in response.headers
        if declared is None or encoded:
            return await _read_counted(response, limits.max_bytes, shown)
        # A plain body of a declared length (under the cap): read whole, in one call.
        try:
            body = await response.read()
        except aiohttp.ClientPayloadError as exc:
            raise IncompleteDownload(
                f"{shown}: body cut short (the connection ended before its {declared} bytes)"
            ) from exc
        # aiohttp checks the length itself; this guards it.
        if len(body) != declared:
            raise IncompleteDownload(f"{shown}: got {len(body)} of {declared} bytes")
    return body


async def _read_counted(response: aiohttp.ClientResponse, max_bytes: int, shown: str) -> bytes:
    """A body of no declared length, or compressed: counted as it comes (decompressed),
    up to ``max_bytes``."""
    body = bytearray()
    try:
        async for chunk in response.content.iter_chunked(_CHUNK):
            body += chunk
            if len(body) > max_bytes:
                raise DownloadTooLarge(f"{shown}: body passed the {max_bytes} byte cap")
    except aiohttp.ClientPayloadError as exc:
        raise IncompleteDownload(f"{shown}: body cut short after {len(body)} bytes") from exc
    return bytes(body)


@functools.cache
def _pillow_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(name for name in IMAGE_FORMATS if name in Image.OPEN)


def _open_header(data: bytes) -> ImageFile.ImageFile:
    """``Image.open`` restricted to IMAGE_FORMATS, reading the header only, without its
    decompression-bomb check: between 89 and 179 megapixels that check prints a raw
    warning (which a worker thread cannot silence for one call: catch_warnings is not
    thread-safe), and :func:`_identify` applies a lower cap of its own."""
    fp = io.BytesIO(data)
    for name in _pillow_formats():
        factory, accept = Image.OPEN[name]
        fits = accept(data[:16]) if accept else True
        if not fits or isinstance(fits, str):  # a str: "this format, but unsupported"
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # as Image.open: next
            continue
    raise UnidentifiedImageError("not an image of an accepted format")


def _identify(data: bytes) -> tuple[int, int, str]:
    """Check ``data`` decodes as an allowed image; return width, height, Pillow format."""
    if data.startswith(pngcheck.SIGNATURE):
        return _identify_png(data)
    # Pillow's plugins raise a zoo of types for bad data (OSError, SyntaxError,
    # struct.error, DecompressionBomb*...): any of them means "not a usable image".
    try:
        with _open_header(data) as image:
            width, height = image.size
            fmt = image.format
            _refuse_oversized(width, height)
            # A full decode: a cut or corrupt body fails here (verify() alone would
            # pass a truncated JPEG, and a second pass costs as much again).
            image.load()
    except CorruptImage:
        raise
    except Exception as exc:
        raise CorruptImage(f"not a decodable image ({type(exc).__name__}: {exc})") from exc
    if fmt not in IMAGE_FORMATS:
        raise CorruptImage(f"unsupported image format {fmt!r}")
    return width, height, fmt


def _identify_png(data: bytes) -> tuple[int, int, str]:
    """A PNG checked by :mod:`batcher.pngcheck`, which refuses all that a decode would,
    for a fraction of the GIL time."""
    try:
        header = pngcheck.png_header(data)
        _refuse_oversized(header.width, header.height)
        pngcheck.check_png(data, header)
    except pngcheck.BrokenPng as exc:
        raise CorruptImage(f"not a decodable image (PNG: {exc})") from exc
    return header.width, header.height, "PNG"


def _refuse_oversized(width: int, height: int) -> None:
    """A few KB can declare gigabytes of pixels: refused before decoding."""
    if width * height > MAX_PIXELS:
        raise CorruptImage(
            f"image is {width}x{height} ({width * height / 1e6:.1f} megapixels), over the "
            f"{MAX_PIXELS / 1e6:.1f} megapixel cap: not decoded"
        )


def write_image(out_dir: Path, row_id: str, index: int, data: bytes) -> SavedImage:
    """Verify ``data`` and write it atomically as ``images/<stem>_<index>.<ext>``. Blocking.

    The bytes go to a ``.part`` file in the same folder, are made durable, then renamed over
    the final name, so a crash leaves either the old file or the new one, never half
    (leftover ``.part`` files are swept by :func:`remove_partials`). Rewriting the same
    row and sample replaces the file: retries are idempotent.
    """
    (result,) = write_images(out_dir, [(row_id, index, data)])
    if isinstance(result, Exception):
        raise result
    return result


def write_images(
    out_dir: Path, items: Sequence[tuple[str, int, bytes]]
) -> list[SavedImage | Exception]:
    """Each ``(row_id, index, data)`` verified and written as :func:`write_image` says,
    made durable together (:func:`batcher.atomic.write_all`), then one fsync of the
    folder for all the renames: each item's record, or the error that refused it.
    Blocking.
    """
    folder = _images_folder(out_dir)
    results: list[SavedImage | Exception] = []
    to_write: list[tuple[int, str, bytes]] = []  # (position in results, final path, data)
    for row_id, index, data in items:
        try:
            final, checked = _checked(folder, row_id, index, data)
        except Exception as exc:  # this image's own problem: the others still go
            results.append(exc)
            continue
        to_write.append((len(results), final, data))
        results.append(checked)
    errors = write_all([(final, data) for _, final, data in to_write])
    for (position, final, data), error in zip(to_write, errors, strict=True):
        if error is not None:
            results[position] = error
        else:
            logger.debug("saved %s (%d bytes)", os.path.basename(final), len(data))
    if any(isinstance(r, SavedImage) for r in results):
        _fsync_dir(folder)
    return results


def _images_folder(out_dir: Path) -> str:
    folder = os.path.join(out_dir, "images")
    os.makedirs(folder, exist_ok=True)
    _refuse_link(folder)
    return folder


def _refuse_link(folder: str | Path) -> None:
    """A symlink at ``images`` would send the run's writes (and the sweep) outside --out."""
    if os.path.islink(folder):
        raise NotADirectoryError(errno.ENOTDIR, "a symbolic link, not a folder", str(folder))


def _checked(folder: str, row_id: str, index: int, data: bytes) -> tuple[str, SavedImage]:
    """Verify one image for ``folder``: the path to write it at, and its record. Plain
    string paths, no resolving: this runs once per image on a worker thread that shares
    the GIL with the loop."""
    if isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be a sample number >= 0, got {index!r}")
    width, height, pillow_format = _identify(data)
    fmt, ext = IMAGE_FORMATS[pillow_format]
    name = f"{safe_stem(row_id)}_{index}.{ext}"
    # safe_stem already guarantees a bare file name; checked again so a future change
    # cannot regress. (A symlink at the final name is replaced, never written through.)
    if os.sep in name or (os.altsep and os.altsep in name) or name.startswith("."):
        raise ValueError(f"refusing to write {name!r} outside {folder}")
    record = SavedImage(
        path=f"images/{name}",
        width=width,
        height=height,
        format=fmt,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return os.path.join(folder, name), record


def _fsync_dir(folder: str | Path) -> None:
    """Make the rename itself durable (POSIX only; Windows cannot open a folder)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partials(out_dir: Path) -> int:
    """Delete the temporary files a crash left in ``out_dir/images``; return how many.
    Blocking.

    Only files named as batcher.atomic names them, of any age: the caller holds the
    run's ``.lock``, so no other process writes images here. ``images`` being a symlink
    is a NotADirectoryError: nothing outside --out is swept.
    """
    images_dir = out_dir / "images"
    _refuse_link(images_dir)
    if not images_dir.is_dir():
        return 0
    removed = remove_abandoned(images_dir, min_age_s=0)
    if removed:
        logger.info("removed %d partial file(s) from %s", removed, images_dir)
    return removed
