"""A PNG checked whole without decoding it to pixels.

For a PNG, a full decode with Pillow (what :mod:`batcher.sink` does to every other
format) finds nothing this check does not: every chunk's CRC, the header's fields, the
zlib stream inflated to its end (its Adler-32 checked by zlib) and to exactly the size
the header declares, and each scanline's filter type. What the decode adds is the
unfiltering into pixels, which cannot fail once those hold. This is stricter than
Pillow where Pillow is lenient (a file without its closing IEND chunk, a broken CRC in
a chunk after the pixels), and much cheaper: a few C calls (CRC, inflate; both let go
of the GIL on large buffers) where Pillow runs ~70 Python calls per image on the
worker thread that shares the GIL with the event loop. The pixels are inflated in
pieces, so memory stays small however large the image.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["SIGNATURE", "BrokenPng", "PngHeader", "check_png", "png_header"]

SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Colour type: (samples per pixel, allowed bit depths), from the PNG specification.
_COLOUR_TYPES = {
    0: (1, (1, 2, 4, 8, 16)),  # greyscale
    2: (3, (8, 16)),  # truecolour
    3: (1, (1, 2, 4, 8)),  # palette
    4: (2, (8, 16)),  # greyscale and alpha
    6: (4, (8, 16)),  # truecolour and alpha
}
#: Adam7 passes: (first column, first row, column step, row step).
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
#: Largest filter type (None, Sub, Up, Average, Paeth).
_MAX_FILTER = 4
#: Inflated bytes looked at per step: bounds the memory a large image takes here.
_PIECE = 1 << 20
_HEAD = struct.Struct(">I4s")
_CRC = struct.Struct(">I")
_IHDR = struct.Struct(">IIBBBBB")
_MAX_LENGTH = 0x7FFF_FFFF


class BrokenPng(ValueError):
    """The bytes are not a whole, valid PNG; the message says what is wrong."""


@dataclass(frozen=True)
class PngHeader:
    """What the IHDR chunk says."""

    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlaced: bool

    def rows(self) -> list[tuple[int, int]]:
        """(rows, bytes per row with its filter byte) of each pass that has pixels, in
        the order they are stored: one pass, or Adam7's seven."""
        samples, _ = _COLOUR_TYPES[self.colour_type]
        bits = samples * self.bit_depth
        if not self.interlaced:
            sizes = [(self.width, self.height)]
        else:
            sizes = [
                (_ceil_div(self.width - x0, dx), _ceil_div(self.height - y0, dy))
                for x0, y0, dx, dy in _ADAM7
            ]
        return [(rows, 1 + _ceil_div(cols * bits, 8)) for cols, rows in sizes if cols and rows]


def _ceil_div(a: int, b: int) -> int:
    return max(0, -(-a // b))


def png_header(data: bytes) -> PngHeader:
    """The header of a PNG, checked; :class:`BrokenPng` if ``data`` does not start as a valid
    one. Reads the signature and the first chunk only."""
    if not data.startswith(SIGNATURE):
        raise BrokenPng("no PNG signature")
    kind, body = next(_chunks(data))
    if kind != b"IHDR" or len(body) != _IHDR.size:
        raise BrokenPng("the first chunk is not a 13-byte IHDR")
    width, height, depth, colour, compression, filtering, interlace = _IHDR.unpack(body)
    if not 0 < width <= _MAX_LENGTH or not 0 < height <= _MAX_LENGTH:
        raise BrokenPng(f"IHDR declares {width}x{height} pixels")
    if colour not in _COLOUR_TYPES or depth not in _COLOUR_TYPES[colour][1]:
        raise BrokenPng(f"IHDR declares colour type {colour} at bit depth {depth}")
    if compression or filtering or interlace > 1:
        raise BrokenPng("IHDR declares an unknown compression, filter or interlace method")
    return PngHeader(width, height, depth, colour, bool(interlace))


def check_png(data: bytes, header: PngHeader) -> None:
    """Check the whole of ``data``, a PNG whose :func:`png_header` is ``header``:
    :class:`BrokenPng` saying what is wrong, if anything."""
    passes = header.rows()
    expected = sum(rows * width for rows, width in passes)
    inflater = zlib.decompressobj()
    filters = _FilterBytes(passes)
    inflated = 0
    state = "before"  # the pixel data (IDAT chunks): before, in, after
    palette = False
    chunks = _chunks(data)
    next(chunks)  # IHDR, checked by png_header
    for kind, body in chunks:
        if kind == b"IDAT":
            if state == "after":
                raise BrokenPng("IDAT chunks are not consecutive")
            state = "in"
            pending: bytes | memoryview = body
            while pending and not inflater.eof:  # data after the stream's end: ignored
                try:
                    piece = inflater.decompress(pending, _PIECE)
                except zlib.error as exc:
                    raise BrokenPng(f"the pixel data does not inflate ({exc})") from None
                pending = inflater.unconsumed_tail
                if inflated + len(piece) > expected:
                    raise BrokenPng(f"more pixel data than the {expected} bytes declared")
                filters.check(piece, inflated)
                inflated += len(piece)
            continue
        if state == "in":
            state = "after"
        if kind == b"PLTE":
            palette = True
    if state == "before":
        raise BrokenPng("no pixel data (IDAT chunk)")
    if not inflater.eof or inflated != expected:
        raise BrokenPng(f"pixel data cut short: {inflated} of {expected} bytes")
    if header.colour_type == 3 and not palette:
        raise BrokenPng("a palette image without its palette (PLTE chunk)")


def _chunks(data: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """Each chunk's type and body after the signature, its CRC checked, up to and with
    IEND (bytes after it are ignored, as decoders do)."""
    view = memoryview(data)
    end = len(data)
    pos = len(SIGNATURE)
    while True:
        if pos + 12 > end:
            raise BrokenPng("cut short: no IEND chunk")
        length, kind = _HEAD.unpack_from(data, pos)
        stop = pos + 8 + length
        if length > _MAX_LENGTH or stop + 4 > end:
            raise BrokenPng(f"cut short in a {_name(kind)} chunk")
        if zlib.crc32(view[pos + 4 : stop]) != _CRC.unpack_from(data, stop)[0]:
            raise BrokenPng(f"a {_name(kind)} chunk fails its CRC")
        yield kind, view[pos + 8 : stop]
        if kind == b"IEND":
            return
        pos = stop + 4


def _name(kind: bytes) -> str:
    return kind.decode("ascii", "backslashreplace")


class _FilterBytes:
    """Checks the filter type that starts each scanline, piece by piece of the inflated
    stream (a slice with a step per piece and pass: no Python loop over rows)."""

    def __init__(self, passes: list[tuple[int, int]]) -> None:
        self._passes = passes
        self._index = 0  # the pass the next filter byte is in
        self._next = 0  # the next filter byte's offset in the inflated stream
        self._pass_end = passes[0][0] * passes[0][1] if passes else 0

    def check(self, piece: bytes, offset: int) -> None:
        end = offset + len(piece)
        while self._next < end and self._index < len(self._passes):
            step = self._passes[self._index][1]
            stop = min(end, self._pass_end)
            if max(piece[self._next - offset : stop - offset : step]) > _MAX_FILTER:
                raise BrokenPng("a scanline has an unknown filter type")
            self._next += -(-(stop - self._next) // step) * step
            if self._next >= self._pass_end:
                self._next = self._pass_end
                self._index += 1
                if self._index < len(self._passes):
                    rows, width = self._passes[self._index]
                    self._pass_end += rows * width
