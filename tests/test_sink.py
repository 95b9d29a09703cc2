"""Tests for batcher.sink: safe names, output shapes, inline data, downloads, atomic writes."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import os
import re
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import png_of_zeros
from PIL import Image

import batcher.sink
from batcher.imagedata import (
    b64decode_text,
    decode_data_url,
    decode_inline,
    is_base64_image,
    output_items,
)
from batcher.sink import (
    CorruptImage,
    DownloadLimits,
    DownloadTooLarge,
    IncompleteDownload,
    SavedImage,
    download,
    remove_partials,
    safe_stem,
    write_image,
)


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (12, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


PNG = image_bytes()


def truncated_jpeg() -> bytes:
    """Half a JPEG: its header is intact, so only decoding the pixels notices."""
    buffer = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


HOSTILE_IDS = [
    "../../x",
    "/etc/passwd",
    "a\x00b",
    "..",
    ".",
    "",
    "x" * 5000,
    "héllo wörld 🎨",
    "a/b",
    "a_b",
    "..\\..\\windows\\system32",
    "C:\\evil",
    "-rf",
    "...",
    "CON",
    "a\nb",
    "\ud800",  # lone surrogate, as a str from a bad CSV decode could hold
]


# --- safe_stem ---------------------------------------------------------------


@pytest.mark.parametrize("row_id", HOSTILE_IDS)
def test_safe_stem_is_a_plain_name(row_id: str) -> None:
    stem = safe_stem(row_id)
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*_[0-9a-f]{16}", stem), stem
    assert stem.endswith("_" + digest)
    assert stem not in ("", ".", "..")
    assert os.sep not in stem
    assert "/" not in stem
    assert "\x00" not in stem
    assert len(stem) <= 80 + 17


@pytest.mark.parametrize("row_id", HOSTILE_IDS)
def test_hostile_ids_write_inside_images(tmp_path: Path, row_id: str) -> None:
    out = tmp_path / "out"
    saved = write_image(out, row_id, 0, PNG)
    images = (out / "images").resolve()
    written = (out / saved.path).resolve()
    assert written.parent == images
    assert written.read_bytes() == PNG
    assert saved.path == f"images/{safe_stem(row_id)}_0.png"
    assert list(tmp_path.iterdir()) == [out]  # nothing escaped next to the output dir


def test_safe_stem_never_collides() -> None:
    stems = {safe_stem(row_id) for row_id in HOSTILE_IDS}
    assert len(stems) == len(set(HOSTILE_IDS))
    assert safe_stem("a/b") != safe_stem("a_b")


def test_ids_that_clean_alike_and_share_32_hash_bits_write_two_files(tmp_path: Path) -> None:
    """Before, the name kept 8 hex digits (32 bits) of the id's hash: ids that clean to
    one text (any two of three CJK characters, or long ids that share their first 80
    characters) met on one file about once in 10^5 such rows squared over 2^33, and the
    second image replaced the first, paid for, both rows COMPLETED."""
    first, second = "名先七", "名冋乔"  # found by a birthday search: sha256 starts bfc05c0d
    assert (
        hashlib.sha256(first.encode()).hexdigest()[:8]
        == (hashlib.sha256(second.encode()).hexdigest()[:8])
    )
    other = image_bytes(size=(3, 5))
    a = write_image(tmp_path, first, 0, PNG)
    b = write_image(tmp_path, second, 0, other)
    assert a.path != b.path
    assert (tmp_path / a.path).read_bytes() == PNG
    assert (tmp_path / b.path).read_bytes() == other


def test_safe_stem_keeps_readable_ids_and_is_stable() -> None:
    assert safe_stem("row-7.v2").startswith("row-7.v2_")
    assert safe_stem("row-7") == safe_stem("row-7")
    assert safe_stem("..").startswith("row_")  # nothing readable left: a neutral prefix
    assert safe_stem(".hidden").startswith("hidden_")
    assert len(safe_stem("y" * 1000)) == 80 + 17


# --- output_items ------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("https://x/a.png", ["https://x/a.png"]),
        ("  https://x/a.png\n", ["https://x/a.png"]),
        (["https://x/a.png", "https://x/b.png"], ["https://x/a.png", "https://x/b.png"]),
        ({"url": "https://x/a.png"}, ["https://x/a.png"]),
        ({"image": "iVBORw0KGgo="}, ["iVBORw0KGgo="]),
        ([{"url": "u1"}, "u2", {"image": "u3"}], ["u1", "u2", "u3"]),
    ],
)
def test_output_items_shapes(output: object, expected: list[str]) -> None:
    assert output_items(output) == expected


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (None, "NoneType"),
        (42, "int"),
        ([], "empty list"),
        ("", "empty string"),
        (["ok", 3], r"output\[1\] is int"),
        ({"foo": "bar"}, "without 'url' or 'image'"),
        ([["nested"]], "list"),
        ({"url": 5}, "int"),
    ],
)
def test_output_items_rejects(output: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        output_items(output)


# --- decode_inline -----------------------------------------------------------


def test_decode_inline_data_url() -> None:
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert decode_inline(url) == PNG


def test_decode_inline_bare_base64_with_line_breaks() -> None:
    text = base64.encodebytes(PNG).decode()  # MIME style: a newline every 76 chars
    assert "\n" in text
    assert decode_inline(text) == PNG


def test_decode_inline_jpeg_base64_starting_with_slash() -> None:
    jpeg = image_bytes("JPEG")
    text = base64.b64encode(jpeg).decode()
    assert text.startswith("/9j/")  # looks like an absolute path; must still be data
    assert decode_inline(text) == jpeg


@pytest.mark.parametrize("url", ["https://cdn.example/a.png", "HTTP://cdn.example/a.png"])
def test_decode_inline_url_is_none(url: str) -> None:
    assert decode_inline(url) is None


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("hello world", "neither"),
        ("/etc/passwd", "neither"),
        ("/abc/def/ghi/jkl", "neither"),  # valid base64 alphabet, but a path
        ("images/out.png", "neither"),
        ("aGVsbG8gd29ybGQgaGVsbG8gd29ybGQ=", "neither"),  # base64 of text
        ("iVBO", "neither"),  # too short to be an image
        ("ftp://host/a.png", "unsupported output scheme 'ftp:'"),
        ("file:///etc/passwd", "unsupported output scheme 'file:'"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("data:image/png,rawbytes", "not base64"),
        ("data:image/png;base64,!!!notbase64", "not valid base64"),
        ("data:image/png;base64,", "empty"),
    ],
)
def test_decode_inline_rejects(item: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_inline(item)


@pytest.mark.parametrize(
    "item",
    [
        "data:image/png,PAYLOAD-PAYLOAD",
        "data:image/png;base64,PAYLOAD!PAYLOAD",
        "data:image/png;base64",  # no comma: all of it is header
        "data:" + "PAYLOAD" * 100 + ";base64,AAAA",  # a header that is mostly junk
    ],
)
def test_decode_data_url_never_quotes_the_payload(item: str) -> None:
    """Inputs show this message on the terminal; the payload can be megabytes."""
    with pytest.raises(ValueError, match=r"^data URL ") as caught:
        decode_data_url(item)
    assert "PAYLOAD-PAYLOAD" not in str(caught.value)
    assert "PAYLOAD!" not in str(caught.value)
    assert len(str(caught.value)) < 120


def test_is_base64_image_needs_signature() -> None:
    assert is_base64_image(base64.b64encode(PNG).decode())
    assert is_base64_image(base64.b64encode(image_bytes("WEBP")).decode())
    assert not is_base64_image(base64.b64encode(b"just some text, not image").decode())
    assert not is_base64_image("faces/alice.png")


def test_is_base64_image_reads_only_the_head() -> None:
    """Megabytes are not scanned to classify a value: a PNG's head followed by junk is
    taken for image data (its decode then fails), and a line-wrapped one still counts."""
    head = base64.b64encode(PNG).decode()
    assert is_base64_image(head + "!!! not base64 after the head")
    assert is_base64_image("\n".join(head[i : i + 8] for i in range(0, len(head), 8)))
    with pytest.raises(binascii.Error):
        b64decode_text(head + "!!!")


@pytest.mark.parametrize("size", [10, 3 * 1024 * 1024 + 7], ids=["small", "pieces"])
def test_b64decode_text_matches_the_library_in_pieces_and_with_line_breaks(size: int) -> None:
    data = os.urandom(size)
    text = base64.b64encode(data).decode()
    assert b64decode_text(text) == data
    wrapped = "\r\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # MIME style
    assert b64decode_text(" " + wrapped + "\n") == data
    for broken in (text[:-1], text[:100] + "*" + text[101:]):
        with pytest.raises(binascii.Error):
            b64decode_text(broken)


# --- write_image -------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "expected_format", "ext"),
    [("PNG", "png", "png"), ("JPEG", "jpeg", "jpg"), ("WEBP", "webp", "webp")],
)
def test_write_image_record(tmp_path: Path, fmt: str, expected_format: str, ext: str) -> None:
    data = image_bytes(fmt, (33, 21))
    saved = write_image(tmp_path, "row-7", 2, data)
    assert saved == SavedImage(
        path=f"images/{safe_stem('row-7')}_2.{ext}",
        width=33,
        height=21,
        format=expected_format,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    assert (tmp_path / saved.path).read_bytes() == data


def test_write_image_leaves_no_part_file(tmp_path: Path) -> None:
    write_image(tmp_path, "r", 0, PNG)
    write_image(tmp_path, "r", 1, PNG)
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == [f"{safe_stem('r')}_0.png", f"{safe_stem('r')}_1.png"]


def test_write_image_replaces_previous_attempt(tmp_path: Path) -> None:
    first = write_image(tmp_path, "r", 0, PNG)
    other = image_bytes("PNG", (5, 5))
    second = write_image(tmp_path, "r", 0, other)
    assert second.path == first.path
    assert (tmp_path / second.path).read_bytes() == other
    assert len(list((tmp_path / "images").iterdir())) == 1


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", PNG[: len(PNG) // 2], truncated_jpeg()],
    ids=["empty", "text", "truncated-png", "truncated-jpeg"],
)
def test_corrupt_bytes_rejected_and_nothing_written(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(CorruptImage):
        write_image(tmp_path, "r", 0, data)
    images = tmp_path / "images"
    assert not images.exists() or list(images.iterdir()) == []


def test_a_png_is_checked_whole_even_where_pillow_is_lenient(tmp_path: Path) -> None:
    """Pillow decodes a PNG cut after its pixel data (no IEND) without a word; a
    dataset should not keep it. Checked by batcher.pngcheck instead of a decode."""
    cut = PNG[:-12]
    with Image.open(io.BytesIO(cut)) as image:
        image.load()  # Pillow: fine
    with pytest.raises(CorruptImage) as info:
        write_image(tmp_path, "r", 0, cut)
    assert str(info.value) == "not a decodable image (PNG: cut short: no IEND chunk)"
    assert list((tmp_path / "images").iterdir()) == []


def test_corrupt_image_is_a_value_error() -> None:
    assert issubclass(CorruptImage, ValueError)


def test_failed_write_keeps_old_file_and_cleans_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = write_image(tmp_path, "r", 0, PNG)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        write_image(tmp_path, "r", 0, image_bytes("PNG", (3, 3)))
    assert (tmp_path / saved.path).read_bytes() == PNG  # the old image survived intact
    assert list((tmp_path / "images").glob("*.part")) == []


@pytest.mark.parametrize(
    ("width", "height"), [(9000, 9000), (13000, 13000)], ids=["81-mpx", "169-mpx"]
)
def test_an_image_over_the_pixel_cap_is_refused_undecoded_and_nothing_is_printed(
    tmp_path: Path, width: int, height: int
) -> None:
    """Before: 81 Mpx (under Pillow's own limit) was decoded and saved; 169 Mpx was too,
    with Pillow's DecompressionBombWarning printed raw to stderr (~750 MB of memory)."""
    data = png_of_zeros(width, height)
    assert len(data) < 1_000_000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CorruptImage) as info:
            write_image(tmp_path, "r", 0, data)
    assert str(info.value) == (
        f"image is {width}x{height} ({width * height / 1e6:.1f} megapixels), "
        "over the 67.1 megapixel cap: not decoded"
    )
    assert caught == []
    assert list((tmp_path / "images").iterdir()) == []


def test_the_pixel_cap_is_inclusive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batcher.sink, "MAX_PIXELS", 12 * 8)
    assert write_image(tmp_path, "r", 0, PNG).width == 12  # PNG is 12x8
    with pytest.raises(CorruptImage, match=r"over the 0\.0 megapixel cap"):
        write_image(tmp_path, "r", 1, image_bytes("PNG", (13, 8)))


def test_write_image_rejects_negative_index(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="index"):
        write_image(tmp_path, "r", -1, PNG)


def test_remove_partials(tmp_path: Path) -> None:
    assert remove_partials(tmp_path) == 0  # no images folder yet
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png.1234abcd.part").write_bytes(b"half")
    (images / "b.jpg.deadbeef.part").write_bytes(b"")
    (images / "keep.png").write_bytes(PNG)
    assert remove_partials(tmp_path) == 2
    assert [p.name for p in images.iterdir()] == ["keep.png"]


def test_a_symlinked_images_folder_is_neither_swept_nor_written(tmp_path: Path) -> None:
    """A link at ``images`` would take the sweep and the writes outside the output folder
    (before: another program's ``.part`` file there was deleted, images written there)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "theirs.part").write_text("another program's partial file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "images").symlink_to(elsewhere)

    with pytest.raises(NotADirectoryError, match="symbolic link"):
        remove_partials(out)
    with pytest.raises(NotADirectoryError, match="symbolic link"):
        write_image(out, "r", 0, PNG)

    assert [p.name for p in elsewhere.iterdir()] == ["theirs.part"]


# --- download ----------------------------------------------------------------

BIG = b"z" * 3000


class Recorder:
    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.release = asyncio.Event()


@pytest.fixture
async def server() -> AsyncIterator[tuple[TestServer, Recorder]]:
    recorder = Recorder()

    async def ok(request: web.Request) -> web.Response:
        recorder.headers.append(dict(request.headers))
        return web.Response(body=PNG, content_type="image/png")

    async def big_declared(request: web.Request) -> web.Response:
        return web.Response(body=BIG)

    async def big_chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(BIG), 500):
            await response.write(BIG[start : start + 500])
        await response.write_eof()
        return response

    async def truncated(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"x" * 100)
        assert request.transport is not None
        request.transport.close()
        return response

    async def truncated_chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"y" * 300)
        await asyncio.sleep(0.05)  # the chunk reaches the client before the cut
        assert request.transport is not None
        request.transport.close()
        return response

    async def slow(request: web.Request) -> web.Response:
        await recorder.release.wait()
        return web.Response(body=PNG)

    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text="gone")

    app = web.Application()
    app.router.add_get("/ok.png", ok)
    app.router.add_get("/big-declared", big_declared)
    app.router.add_get("/big-chunked", big_chunked)
    app.router.add_get("/truncated", truncated)
    app.router.add_get("/truncated-chunked", truncated_chunked)
    app.router.add_get("/slow", slow)
    app.router.add_get("/missing", missing)
    test_server = TestServer(app, host="127.0.0.1", port=0)
    await test_server.start_server()
    try:
        yield test_server, recorder
    finally:
        recorder.release.set()
        await test_server.close()


LIMITS = DownloadLimits(max_bytes=1000, timeout_s=5.0)


async def test_download_ok_without_api_key(server: tuple[TestServer, Recorder]) -> None:
    test_server, recorder = server
    async with aiohttp.ClientSession() as session:
        data = await download(session, str(test_server.make_url("/ok.png")), LIMITS)
    assert data == PNG
    assert len(recorder.headers) == 1
    assert all(name.lower() != "x-api-key" for name in recorder.headers[0])


async def test_download_refuses_session_with_api_key(
    server: tuple[TestServer, Recorder],
) -> None:
    test_server, recorder = server
    async with aiohttp.ClientSession(headers={"X-Api-Key": "sk-secret"}) as session:
        with pytest.raises(ValueError, match="x-api-key") as caught:
            await download(session, str(test_server.make_url("/ok.png")), LIMITS)
    assert "sk-secret" not in str(caught.value)
    assert recorder.headers == []  # nothing left the process


@pytest.mark.parametrize("path", ["/big-declared", "/big-chunked"])
async def test_download_over_cap(server: tuple[TestServer, Recorder], path: str) -> None:
    test_server, _ = server
    async with aiohttp.ClientSession() as session:
        with pytest.raises(DownloadTooLarge, match="1000 byte cap"):
            await download(session, str(test_server.make_url(path)), LIMITS)


async def test_download_declared_length_rejected_up_front(
    server: tuple[TestServer, Recorder],
) -> None:
    test_server, _ = server
    async with aiohttp.ClientSession() as session:
        with pytest.raises(DownloadTooLarge, match="Content-Length 3000"):
            await download(session, str(test_server.make_url("/big-declared")), LIMITS)


async def test_download_under_cap_passes(server: tuple[TestServer, Recorder]) -> None:
    test_server, _ = server
    async with aiohttp.ClientSession() as session:
        limits = DownloadLimits(max_bytes=len(BIG), timeout_s=5.0)
        assert await download(session, str(test_server.make_url("/big-chunked")), limits) == BIG


async def test_download_truncated_body(server: tuple[TestServer, Recorder]) -> None:
    test_server, _ = server
    async with aiohttp.ClientSession() as session:
        url = str(test_server.make_url("/truncated")) + "?X-Amz-Signature=s3cr3t"
        with pytest.raises(
            IncompleteDownload, match=r"cut short .*before its 1000 bytes"
        ) as caught:
            await download(session, url, LIMITS)
    assert "s3cr3t" not in str(caught.value)  # a signed URL's query stays out of messages


async def test_download_truncated_chunked_body(server: tuple[TestServer, Recorder]) -> None:
    """No declared length: the body is counted as it comes, and a cut says how far it got."""
    test_server, _ = server
    async with aiohttp.ClientSession() as session:
        url = str(test_server.make_url("/truncated-chunked")) + "?X-Amz-Signature=s3cr3t"
        with pytest.raises(IncompleteDownload, match="cut short after 300 bytes") as caught:
            await download(session, url, LIMITS)
    assert "s3cr3t" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "scheme"),
    [("ftp://h/a.png", "ftp"), ("file:///etc/passwd", "file"), ("/relative/a.png", "scheme-less")],
)
async def test_download_rejects_other_schemes(url: str, scheme: str) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ValueError, match=f"refusing to download '{scheme}'"):
            await download(session, url, LIMITS)


async def test_download_timeout(server: tuple[TestServer, Recorder]) -> None:
    test_server, _ = server
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TimeoutError):
            await download(
                session, str(test_server.make_url("/slow")), DownloadLimits(timeout_s=0.2)
            )
    assert loop.time() - started < 3.0


async def test_download_http_error_status(server: tuple[TestServer, Recorder]) -> None:
    test_server, _ = server
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientResponseError) as caught:
            await download(session, str(test_server.make_url("/missing")), LIMITS)
    assert caught.value.status == 404


@pytest.mark.parametrize("kwargs", [{"max_bytes": 0}, {"timeout_s": 0.0}, {"timeout_s": -1.0}])
def test_download_limits_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        DownloadLimits(**kwargs)  # type: ignore[arg-type]
