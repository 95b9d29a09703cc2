"""batcher.pngcheck: a PNG checked whole without decoding it, never more lenient than
Pillow's full decode (which it replaces for PNGs in batcher.sink)."""

from __future__ import annotations

import io
import random
import struct
import tracemalloc
import zlib

import pytest
from conftest import png_chunk, png_of_zeros
from PIL import Image

import batcher.pngcheck
from batcher.pngcheck import BrokenPng, PngHeader, check_png, png_header


def handmade(
    raw: bytes,
    *,
    width: int,
    height: int,
    depth: int = 8,
    colour: int = 0,
    interlace: int = 0,
    idat_pieces: int = 1,
    before: bytes = b"",
    after: bytes = b"",
    end: bytes | None = None,
) -> bytes:
    """A PNG with ``raw`` (filter bytes and pixels) as its inflated data, cut into
    ``idat_pieces`` IDAT chunks, with chunks ``before`` and ``after`` them."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    packed = zlib.compress(raw)
    size = -(-len(packed) // idat_pieces)
    idats = b"".join(png_chunk(b"IDAT", packed[i : i + size]) for i in range(0, len(packed), size))
    tail = png_chunk(b"IEND", b"") if end is None else end
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + before + idats + after + tail


def pillow_png(mode: str, size: tuple[int, int], seed: int = 0, **params: object) -> bytes:
    rng = random.Random(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    bytes_per_band = 2 if mode.startswith("I;16") else 1
    pixels = rng.randbytes(size[0] * size[1] * bands * bytes_per_band)
    image = Image.frombytes(mode, size, pixels) if mode not in ("1", "P") else None
    if mode == "1":
        image = Image.frombytes("1", size, rng.randbytes(-(-size[0] // 8) * size[1]))
    if mode == "P":
        image = Image.frombytes("P", size, rng.randbytes(size[0] * size[1]))
        image.putpalette(rng.randbytes(768))
    assert image is not None
    out = io.BytesIO()
    image.save(out, "PNG", **params)
    return out.getvalue()


def _animated_png() -> bytes:
    """APNG: the default image in IDAT, the other frames in fdAT chunks after it."""
    frames = [Image.new("RGB", (20, 10), (60 * i, 0, 0)) for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, "PNG", save_all=True, append_images=frames[1:])
    assert b"fdAT" in out.getvalue()
    return out.getvalue()


def pillow_decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:
        return False
    return True


def check(data: bytes) -> PngHeader:
    header = png_header(data)
    check_png(data, header)
    return header


VALID = {
    "rgb": pillow_png("RGB", (64, 64)),
    "rgba-odd": pillow_png("RGBA", (33, 17)),
    "grey-tall": pillow_png("L", (5, 70)),
    "grey-alpha": pillow_png("LA", (7, 3)),
    "rgb-interlaced": pillow_png("RGB", (64, 64), interlace=1),
    "interlaced-odd": pillow_png("RGB", (301, 203), interlace=1),
    "interlaced-tiny": pillow_png("L", (3, 2), interlace=1),  # Adam7 passes left empty
    "1-bit": pillow_png("1", (13, 9)),
    "palette": pillow_png("P", (10, 10)),
    "16-bit": pillow_png("I;16", (9, 9)),
    "one-pixel": pillow_png("RGB", (1, 1)),
    "animated": _animated_png(),
}


@pytest.mark.parametrize("data", VALID.values(), ids=VALID.keys())
def test_a_valid_png_passes_with_the_size_pillow_reads(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        assert (check(data).width, check(data).height) == image.size


def test_pixel_data_in_many_idat_chunks_with_other_chunks_around_and_bytes_after_iend() -> None:
    raw = b"".join(b"\x00" + bytes(range(i, i + 10)) for i in range(6))
    text = png_chunk(b"tEXt", b"Comment\x00hello")
    data = handmade(raw, width=10, height=6, idat_pieces=5, before=text, after=text)
    assert pillow_decodes(data + b"trailing")
    assert check(data + b"trailing").height == 6


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:-12], "cut short: no IEND chunk"),
        (lambda d: d[:-20], "cut short in a IDAT chunk"),
        (lambda d: d[:45] + bytes([d[45] ^ 1]) + d[46:], "a IDAT chunk fails its CRC"),
    ],
    ids=["no-iend", "cut-in-idat", "bit-flip"],
)
def test_a_damaged_file_is_refused_with_what_is_wrong(mutate: object, message: str) -> None:
    data = handmade(b"\x00" + bytes(64) * 1, width=64, height=1)
    assert callable(mutate)
    with pytest.raises(BrokenPng, match=message):
        check(mutate(data))


def _refusal(data: bytes) -> str:
    with pytest.raises(BrokenPng) as info:
        check(data)
    return str(info.value)


def test_an_unknown_filter_type_is_refused_in_any_row() -> None:
    rows = [b"\x01" + bytes(8)] * 40
    assert check(handmade(b"".join(rows), width=8, height=40)).height == 40
    rows[39] = b"\x05" + bytes(8)
    data = handmade(b"".join(rows), width=8, height=40)
    assert not pillow_decodes(data)
    assert _refusal(data) == "a scanline has an unknown filter type"


def test_pixel_data_of_the_wrong_size_is_refused() -> None:
    row = b"\x00" + bytes(8)
    assert _refusal(handmade(row * 3, width=8, height=4)) == "pixel data cut short: 27 of 36 bytes"
    assert _refusal(handmade(row * 5, width=8, height=4)) == (
        "more pixel data than the 36 bytes declared"
    )


def test_a_stream_that_does_not_inflate_is_refused() -> None:
    good = handmade(b"\x00" + bytes(8), width=8, height=1)
    header_end = 8 + 25
    garbage = png_chunk(b"IDAT", b"\xff" * 20)
    data = good[:header_end] + garbage + png_chunk(b"IEND", b"")
    assert _refusal(data).startswith("the pixel data does not inflate")


def test_pixel_data_split_by_another_chunk_is_refused() -> None:
    raw = (b"\x00" + bytes(8)) * 4
    packed = zlib.compress(raw)
    header = struct.pack(">IIBBBBB", 8, 4, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", packed[:5])
        + png_chunk(b"tEXt", b"a\x00b")
        + png_chunk(b"IDAT", packed[5:])
        + png_chunk(b"IEND", b"")
    )
    assert _refusal(data) == "IDAT chunks are not consecutive"


def test_no_pixel_data_or_a_palette_image_without_its_palette_is_refused() -> None:
    header = struct.pack(">IIBBBBB", 8, 1, 8, 0, 0, 0, 0)
    empty = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")
    assert _refusal(empty) == "no pixel data (IDAT chunk)"
    paletted = handmade(b"\x00" + bytes(8), width=8, height=1, colour=3)
    assert _refusal(paletted) == "a palette image without its palette (PLTE chunk)"
    with_palette = handmade(
        b"\x00" + bytes(8), width=8, height=1, colour=3, before=png_chunk(b"PLTE", bytes(3))
    )
    assert check(with_palette).width == 8


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ((0, 5, 8, 0, 0, 0, 0), "IHDR declares 0x5 pixels"),
        ((5, 5, 16, 3, 0, 0, 0), "IHDR declares colour type 3 at bit depth 16"),
        ((5, 5, 8, 1, 0, 0, 0), "IHDR declares colour type 1 at bit depth 8"),
        ((5, 5, 8, 0, 1, 0, 0), "unknown compression, filter or interlace method"),
        ((5, 5, 8, 0, 0, 0, 2), "unknown compression, filter or interlace method"),
    ],
)
def test_a_header_out_of_the_specification_is_refused(
    fields: tuple[int, ...], message: str
) -> None:
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", *fields))
    with pytest.raises(BrokenPng, match=message):
        png_header(data + png_chunk(b"IEND", b""))


def test_the_first_chunk_must_be_the_header() -> None:
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"tEXt", b"a\x00b") + png_chunk(b"IEND", b"")
    with pytest.raises(BrokenPng, match="first chunk is not a 13-byte IHDR"):
        png_header(data)


@pytest.mark.parametrize("seed", range(4))
def test_never_more_lenient_than_a_pillow_decode(seed: int) -> None:
    """Cut, flipped and inserted bytes anywhere in valid PNGs of every kind: whatever
    passes the check, Pillow decodes. (The check is stricter, never laxer.)"""
    rng = random.Random(seed)
    passed = refused_by_both = 0
    for data in VALID.values():
        for _ in range(150):
            damaged = bytearray(data)
            where = rng.randrange(len(damaged))
            match rng.randrange(3):
                case 0:
                    del damaged[where:]
                case 1:
                    damaged[where] ^= 1 << rng.randrange(8)
                case _:
                    damaged[where:where] = rng.randbytes(rng.randrange(1, 4))
            try:
                check(bytes(damaged))
            except BrokenPng:
                refused_by_both += not pillow_decodes(bytes(damaged))
                continue
            passed += 1
            assert pillow_decodes(bytes(damaged)), f"passed but Pillow refuses: {bytes(damaged)!r}"
    assert refused_by_both > 500  # the damage was real: most is refused by both


@pytest.mark.parametrize("piece", [1, 7, 64])
@pytest.mark.parametrize("name", ["interlaced-odd", "interlaced-tiny", "grey-tall"])
def test_filter_types_are_checked_across_pieces_of_any_size(
    monkeypatch: pytest.MonkeyPatch, piece: int, name: str
) -> None:
    """Each pass's rows are found however the inflated stream is cut; a bad filter type
    in the last row of the last pass is still seen."""
    monkeypatch.setattr(batcher.pngcheck, "_PIECE", piece)
    data = VALID[name]
    header = check(data)
    raw = bytearray(zlib.decompress(b"".join(c[8:-4] for k, c in _chunks_of(data) if k == b"IDAT")))
    _, last_width = header.rows()[-1]
    raw[len(raw) - last_width] = 9
    damaged = handmade(
        bytes(raw),
        width=header.width,
        height=header.height,
        depth=header.bit_depth,
        colour=header.colour_type,
        interlace=int(header.interlaced),
        before=b"".join(c for k, c in _chunks_of(data) if k == b"PLTE"),
    )
    assert _refusal(damaged) == "a scanline has an unknown filter type"


def _chunks_of(data: bytes) -> list[tuple[bytes, bytes]]:
    """Each chunk's type and whole bytes, in order."""
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        chunks.append((data[pos + 4 : pos + 8], data[pos : pos + 12 + length]))
        pos += 12 + length
    return chunks


def test_a_large_image_is_checked_in_little_memory() -> None:
    """A 6,000 x 6,000 greyscale image (36 MB of pixels, 35 KB on disk) checked with a
    peak of a few MB; Pillow's decode holds all 36 MB."""
    width = height = 6000
    data = png_of_zeros(width, height)
    tracemalloc.start()
    try:
        assert check(data).width == width
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20
