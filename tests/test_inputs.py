"""Tests for batcher.inputs: passthrough, one read per file, inline data checked once,
rejections, references."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import struct
import threading
import zlib
from pathlib import Path

import anyio
import anyio.from_thread
import pytest
from conftest import png_chunk
from PIL import Image

import batcher.inputs as inputs_module
from batcher.errors import InvalidRow
from batcher.inputs import ImageInputs, InputError


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (16, 16), color: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (color, 100, 200)).save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares huge dimensions (a decompression bomb, cheaply)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture
def faces(tmp_path: Path) -> Path:
    folder = tmp_path / "faces"
    folder.mkdir()
    (folder / "alice.png").write_bytes(image_bytes("PNG", color=10))
    (folder / "bob.jpg").write_bytes(image_bytes("JPEG", color=200))
    return tmp_path


def decoded(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def noise_png(side: int) -> bytes:
    """A PNG that does not compress: ``side`` x ``side`` random pixels."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, "PNG")
    return buffer.getvalue()


# --- passthrough -------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "https://segmind-sd-models.s3.amazonaws.com/outputs/instantid_input.jpg",
        "HTTP://example.com/face.png",
        "data:image/png;base64," + base64.b64encode(image_bytes()).decode(),
        base64.b64encode(image_bytes()).decode(),
        base64.b64encode(image_bytes("JPEG")).decode(),  # starts with "/9j/": not a path
    ],
)
async def test_passthrough(tmp_path: Path, value: str) -> None:
    inputs = ImageInputs(tmp_path)
    assert await inputs.resolve("face_image", value) == value
    assert inputs.reads == 0


@pytest.mark.parametrize(
    "value", [" https://example.com/face.png", "https://example.com/face.png \t", "\nHTTPS://x/y"]
)
async def test_spaces_around_a_url_are_not_sent(tmp_path: Path, value: str) -> None:
    """A URL holds no spaces at its ends: a hand-written CSV puts one after its commas.
    Before, " https://..." was taken for a file ("file not found (looked in .../ https:/
    example.com/face.png)") and "https://... " was sent with its space, for Segmind to
    fetch a URL that is not the image's."""
    inputs = ImageInputs(tmp_path)
    assert await inputs.resolve("face_image", value) == value.strip()
    assert inputs.reference("face_image", value) == value.strip()
    with pytest.raises(InputError, match=r"^face_image=ftp://x/y.png: unsupported URL scheme"):
        await inputs.resolve("face_image", " ftp://x/y.png")


# --- inline data -------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "data:image/png;base64," + b64(image_bytes()),
        "data:IMAGE/JPEG;BASE64," + b64(image_bytes("JPEG")),
        "data:image/png;base64," + base64.encodebytes(image_bytes()).decode(),  # line breaks
        base64.encodebytes(image_bytes("WEBP")).decode(),
    ],
    ids=["data-url", "data-url-upper-case", "data-url-line-breaks", "bare-line-breaks"],
)
async def test_valid_inline_is_checked_and_sent_unchanged(tmp_path: Path, value: str) -> None:
    inputs = ImageInputs(tmp_path)
    assert await inputs.resolve("id_image", value) is value
    assert inputs.inline_checks == 1
    assert inputs.reads == 0


TEXT = b"these are words, not pixels\n" * 4


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("data:image/png;base64,!!!notbase64", "data URL payload is not valid base64: "),
        ("data:image/png;base64," + b64(image_bytes())[:-1], "data URL payload is not valid base"),
        ("data:,hello", "data URL is not base64-encoded (expected data:image/...;base64,...)"),
        ("data:image/png," + b64(image_bytes()), "data URL is not base64-encoded"),
        ("data:image/png;base64,", "data URL payload is empty"),
        ("data:text/plain;base64," + b64(image_bytes()), "data URL holds 'text/plain', not an"),
        ("data:image/png;base64," + b64(TEXT), "not an image (avif, bmp, gif, jpeg, png, tiff, "),
        (b64(image_bytes("PNG", (64, 64))[:-30]), "not an image"),  # a cut PNG
        (b64(png_header_only(8_000, 8_000)), "image is 8000x8000 (64.0 megapixels), over the 50"),
        (b64(png_header_only(100_000, 100_000)), "image dimensions are absurd"),
    ],
    ids=[
        "bad-base64",
        "bad-padding",
        "data-url-not-base64",
        "image-data-url-not-base64",
        "empty-payload",
        "text-media-type",
        "text-not-an-image",
        "truncated-image",
        "too-many-pixels",
        "bomb",
    ],
)
async def test_bad_inline_is_refused_without_quoting_it(
    tmp_path: Path, value: str, problem: str
) -> None:
    inputs = ImageInputs(tmp_path)
    with pytest.raises(InputError) as caught:
        await inputs.resolve("face_image", value)
    message = str(caught.value)
    assert message.startswith(f"face_image=<inline data, {len(value)} characters>: {problem}")
    payload = value.partition(",")[2] or value
    assert payload[:12] not in message
    assert isinstance(caught.value, InvalidRow)
    assert inputs.reads == 0


@pytest.mark.parametrize("wrap", [False, True])
async def test_long_base64_of_text_is_inline_not_a_path(tmp_path: Path, wrap: bool) -> None:
    text = TEXT * 100
    value = base64.encodebytes(text).decode() if wrap else b64(text)
    assert len(value) > 4096  # longer than any path
    inputs = ImageInputs(tmp_path)
    with pytest.raises(InputError) as caught:
        await inputs.resolve("face_image", value)
    assert str(caught.value) == (
        f"face_image=<inline data, {len(value)} characters>: not an image (avif, bmp, gif, "
        "jpeg, png, tiff, webp): its content matches none of these formats"
    )
    digest = hashlib.sha256(text).hexdigest()[:16]
    assert inputs.reference("face_image", value) == f"base64:{digest} ({len(text)} bytes)"


async def test_inline_over_the_size_limit(tmp_path: Path) -> None:
    data = image_bytes()
    inputs = ImageInputs(tmp_path, max_file_bytes=len(data) - 1)
    with pytest.raises(InputError) as caught:
        await inputs.resolve("face_image", "data:image/png;base64," + b64(data))
    assert str(caught.value).endswith(
        f": image data is {len(data)} bytes, over the {len(data) - 1} byte limit"
    )


async def test_inline_pixel_limit_is_configurable(tmp_path: Path) -> None:
    inputs = ImageInputs(tmp_path, max_pixels=100)  # the 16x16 image has 256
    with pytest.raises(InputError, match="16x16"):
        await inputs.resolve("face_image", b64(image_bytes()))


async def test_each_inline_value_checked_once_across_rows(tmp_path: Path) -> None:
    good = [b64(image_bytes(color=c)) for c in (1, 2)]
    bad = "data:image/png;base64," + b64(TEXT)
    inputs = ImageInputs(tmp_path)
    for row in range(100):
        value = good[row % 2]
        # A new string each row, as the manifest reader makes: equal, not identical.
        assert await inputs.resolve("face_image", "".join(value)) == value
        with pytest.raises(InputError, match="not an image"):
            await inputs.resolve("id_image", "".join(bad))
    assert inputs.inline_checks == 3


async def test_inline_verdicts_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("batcher.inputs._MAX_VERDICTS", 2)
    values = [b64(image_bytes(color=c)) for c in (1, 2, 3)]
    inputs = ImageInputs(tmp_path)
    for value in [*values, values[2], values[0]]:
        await inputs.resolve("face_image", value)
    assert inputs.inline_checks == 4  # the first evicted by the third, checked again
    assert len(inputs._verdicts) == 2


async def test_large_inline_is_checked_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []
    original = ImageInputs._check_inline

    def spy(self: ImageInputs, value: str) -> str | None:
        threads.append(threading.current_thread())
        return original(self, value)

    monkeypatch.setattr(ImageInputs, "_check_inline", spy)
    large = b64(noise_png(200))
    assert len(large) > 100_000
    inputs = ImageInputs(tmp_path)
    assert await inputs.resolve("face_image", large) == large
    assert await inputs.resolve("face_image", b64(image_bytes())) == b64(image_bytes())
    assert threads[0] is not threading.current_thread()  # decoded in a worker
    assert threads[1] is threading.current_thread()  # small: not worth the hop


async def test_concurrent_first_checks_of_one_value_decode_it_once(tmp_path: Path) -> None:
    """On a resume the submit workers meet a shared face at once, with no verdict yet:
    one checks it, the others wait for its verdict instead of each decoding it."""
    good, bad = b64(noise_png(200)), "data:image/png;base64," + b64(TEXT)
    inputs = ImageInputs(tmp_path)
    outcomes: list[str] = []

    async def resolve(value: str) -> None:
        try:
            outcomes.append(await inputs.resolve("face_image", "".join(value)))
        except InputError as exc:
            outcomes.append(str(exc))

    async with anyio.create_task_group() as tg:
        for value in [good] * 16 + [bad] * 16:
            tg.start_soon(resolve, value)
    assert inputs.inline_checks == 2
    assert outcomes.count(good) == 16
    assert sum("not an image" in o for o in outcomes) == 16


# --- local files ---------------------------------------------------------------
# --- local files ---------------------------------------------------------------


async def test_file_is_sent_as_plain_base64(faces: Path) -> None:
    inputs = ImageInputs(faces)
    value = await inputs.resolve("face_image", "faces/alice.png")
    assert not value.startswith("data:")
    assert decoded(value) == (faces / "faces" / "alice.png").read_bytes()


async def test_absolute_path_allowed(faces: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("manifest")
    inputs = ImageInputs(elsewhere)
    value = await inputs.resolve("id_image", str(faces / "faces" / "bob.jpg"))
    assert decoded(value) == (faces / "faces" / "bob.jpg").read_bytes()


async def test_each_file_read_once_across_rows(faces: Path) -> None:
    inputs = ImageInputs(faces)
    for row in range(100):
        name = "faces/alice.png" if row % 2 else "faces/bob.jpg"
        value = await inputs.resolve("face_image", name)
        assert decoded(value) == (faces / name).read_bytes()
    assert inputs.reads == 2


async def test_concurrent_resolves_share_one_read(faces: Path) -> None:
    inputs = ImageInputs(faces)
    results: dict[int, str] = {}

    async def one(row: int) -> None:
        name = "faces/alice.png" if row % 2 else "faces/bob.jpg"
        results[row] = await inputs.resolve("face_image", name)

    async with anyio.create_task_group() as tg:
        for row in range(100):
            tg.start_soon(one, row)
    assert inputs.reads == 2
    assert len(results) == 100
    assert {decoded(v) for v in results.values()} == {
        (faces / "faces" / "alice.png").read_bytes(),
        (faces / "faces" / "bob.jpg").read_bytes(),
    }


async def test_failed_reader_does_not_strand_waiters(
    faces: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that dies unexpectedly (not an InputError) lets a waiter read for itself."""
    gate = threading.Event()
    entered = anyio.Event()
    original = ImageInputs._load
    calls: list[str] = []

    def flaky_load(self: ImageInputs, path: str) -> str:
        calls.append(path)
        if len(calls) == 1:
            anyio.from_thread.run_sync(entered.set)
            gate.wait(5)
            raise MemoryError("simulated")
        return original(self, path)

    monkeypatch.setattr(ImageInputs, "_load", flaky_load)
    inputs = ImageInputs(faces)
    outcome: dict[str, object] = {}

    async def leader() -> None:
        try:
            await inputs.resolve("face_image", "faces/alice.png")
        except MemoryError as exc:
            outcome["leader"] = exc

    async def waiter() -> None:
        outcome["waiter"] = await inputs.resolve("id_image", "faces/alice.png")

    async with anyio.create_task_group() as tg:
        tg.start_soon(leader)
        await entered.wait()  # the leader is inside its read
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()  # the waiter waits on the leader
        gate.set()
    assert isinstance(outcome["leader"], MemoryError)
    waited = outcome["waiter"]
    assert isinstance(waited, str)
    assert decoded(waited) == (faces / "faces" / "alice.png").read_bytes()
    assert inputs.reads == 2  # the waiter took over the read


async def test_spellings_of_one_file_share_the_cache(faces: Path) -> None:
    (faces / "link.png").symlink_to(faces / "faces" / "alice.png")
    inputs = ImageInputs(faces)
    spellings = [
        "faces/alice.png",
        "./faces/alice.png",
        "faces/../faces/alice.png",
        str(faces / "faces" / "alice.png"),
        "link.png",
    ]
    values = {await inputs.resolve("face_image", s) for s in spellings}
    assert len(values) == 1
    assert inputs.reads == 1


async def test_cache_is_bounded_lru(faces: Path) -> None:
    alice = len(base64.b64encode((faces / "faces" / "alice.png").read_bytes()))
    bob = len(base64.b64encode((faces / "faces" / "bob.jpg").read_bytes()))
    inputs = ImageInputs(faces, cache_bytes=max(alice, bob))  # room for one at a time
    for name in ["faces/alice.png", "faces/bob.jpg", "faces/alice.png", "faces/alice.png"]:
        await inputs.resolve("face_image", name)
    assert inputs.reads == 3  # alice evicted by bob, re-read once, then a hit


async def test_file_bigger_than_cache_is_not_cached(faces: Path) -> None:
    inputs = ImageInputs(faces, cache_bytes=10)
    first = await inputs.resolve("face_image", "faces/alice.png")
    second = await inputs.resolve("face_image", "faces/alice.png")
    assert first == second
    assert inputs.reads == 2


# --- rejections --------------------------------------------------------------


async def test_missing_file(tmp_path: Path) -> None:
    inputs = ImageInputs(tmp_path)
    with pytest.raises(InputError) as caught:
        await inputs.resolve("face_image", "faces/x.png")
    looked = await anyio.Path(tmp_path).resolve() / "faces" / "x.png"
    assert str(caught.value) == f"face_image=faces/x.png: file not found (looked in {looked})"
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, InvalidRow)


async def test_failure_is_not_cached(tmp_path: Path) -> None:
    inputs = ImageInputs(tmp_path)
    with pytest.raises(InputError, match="not found"):
        await inputs.resolve("face_image", "late.png")
    (tmp_path / "late.png").write_bytes(image_bytes())
    assert decoded(await inputs.resolve("face_image", "late.png")) == image_bytes()


async def test_concurrent_failure_names_each_parameter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    entered = anyio.Event()
    original = ImageInputs._load
    calls: list[str] = []

    def gated_load(self: ImageInputs, path: str) -> str:
        calls.append(path)
        anyio.from_thread.run_sync(entered.set)
        gate.wait(5)  # hold the read until every resolve is waiting on it
        return original(self, path)

    monkeypatch.setattr(ImageInputs, "_load", gated_load)
    inputs = ImageInputs(tmp_path)
    errors: list[str] = []

    async def one(param: str) -> None:
        try:
            await inputs.resolve(param, "gone.png")
        except InputError as exc:
            errors.append(str(exc))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "face_image")
        await entered.wait()  # the first resolve is inside its read
        tg.start_soon(one, "id_image")
        tg.start_soon(one, "pose_image")
        await anyio.wait_all_tasks_blocked()  # ... and the others wait on it
        gate.set()
    assert sorted(e.split("=")[0] for e in errors) == ["face_image", "id_image", "pose_image"]
    assert all("gone.png: file not found" in e for e in errors)
    assert inputs.reads == 1


async def test_non_image_file(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("these are not pixels")
    inputs = ImageInputs(tmp_path)
    with pytest.raises(InputError, match=r"^face_image=notes.png: not an image"):
        await inputs.resolve("face_image", "notes.png")


async def test_truncated_image_file(tmp_path: Path) -> None:
    data = image_bytes("PNG", (64, 64))
    (tmp_path / "cut.png").write_bytes(data[: len(data) - 30])
    inputs = ImageInputs(tmp_path)
    with pytest.raises(InputError, match="not an image"):
        await inputs.resolve("face_image", "cut.png")


async def test_oversized_file(faces: Path) -> None:
    inputs = ImageInputs(faces, max_file_bytes=40)
    with pytest.raises(InputError, match=r"faces/alice.png: file is \d+ bytes, over the 40 byte"):
        await inputs.resolve("face_image", "faces/alice.png")
    assert inputs.reads == 1


@pytest.mark.parametrize(
    "size",
    [(100_000, 100_000), (10_000, 10_000), (8_000, 8_000)],
    ids=["pillow-bomb-error", "pillow-bomb-warning", "over-50-megapixels"],
)
async def test_decompression_bomb(tmp_path: Path, size: tuple[int, int]) -> None:
    bomb = png_header_only(*size)
    assert len(bomb) < 100  # cheap: only the header claims the size
    (tmp_path / "bomb.png").write_bytes(bomb)
    inputs = ImageInputs(tmp_path)
    with pytest.raises(InputError, match=r"bomb.png: image (dimensions are absurd|is 8000x8000)"):
        await inputs.resolve("face_image", "bomb.png")


async def test_pixel_limit_is_configurable(faces: Path) -> None:
    inputs = ImageInputs(faces, max_pixels=100)  # the 16x16 faces have 256
    with pytest.raises(InputError, match="16x16"):
        await inputs.resolve("face_image", "faces/alice.png")


async def test_directory_rejected(faces: Path) -> None:
    inputs = ImageInputs(faces)
    with pytest.raises(InputError, match="is a folder"):
        await inputs.resolve("face_image", "faces")


async def test_fifo_rejected_without_blocking(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(tmp_path / "pipe.png")
    inputs = ImageInputs(tmp_path)
    with anyio.fail_after(5), pytest.raises(InputError, match="not a regular file"):
        await inputs.resolve("face_image", "pipe.png")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ftp://host/face.png", "unsupported URL scheme 'ftp'"),
        ("http://", "the URL names no host"),
        ("https:///face.png", "the URL names no host"),
        ("http://[::1/face.png", r"not a valid URL \(Invalid IPv6 URL\)"),
        ("file:///etc/passwd", "unsupported URL scheme 'file'"),
        ("", "empty value"),
        ("   ", "empty value"),
    ],
)
async def test_bad_values(tmp_path: Path, value: str, message: str) -> None:
    inputs = ImageInputs(tmp_path)
    with pytest.raises(InputError, match=message):
        await inputs.resolve("face_image", value)
    assert inputs.reads == 0


@pytest.mark.parametrize("kwargs", [{"max_file_bytes": 0}, {"cache_bytes": -1}, {"max_pixels": 0}])
def test_limits_validated(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        ImageInputs(tmp_path, **kwargs)


# --- reference ---------------------------------------------------------------


def test_reference_url_kept_and_truncated(tmp_path: Path) -> None:
    inputs = ImageInputs(tmp_path)
    short = "https://example.com/face.png"
    assert inputs.reference("face_image", short) == short
    long = "https://example.com/" + "a" * 500
    ref = inputs.reference("face_image", long)
    assert ref == long[:200] + "..."


def test_reference_path_as_given(tmp_path: Path) -> None:
    inputs = ImageInputs(tmp_path)
    assert inputs.reference("face_image", "faces/alice.png") == "file:faces/alice.png"
    assert inputs.reference("face_image", "/abs/x.png") == "file:/abs/x.png"


@pytest.mark.parametrize("data_url", [False, True])
def test_reference_never_holds_base64_body(tmp_path: Path, data_url: bool) -> None:
    data = image_bytes("PNG", (64, 64))
    body = base64.b64encode(data).decode()
    value = ("data:image/png;base64," + body) if data_url else body
    ref = ImageInputs(tmp_path).reference("face_image", value)
    assert ref == f"base64:{hashlib.sha256(data).hexdigest()[:16]} ({len(data)} bytes)"
    assert body[:24] not in ref
    assert body[-24:] not in ref
    assert len(ref) < 50


def test_reference_of_a_shared_inline_value_decodes_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The results table is rewritten at each run's end: a face inlined on every row
    would be decoded for its sha256 once per row (20 ms for 3 MB) without the memo."""
    decodes: list[int] = []
    real = inputs_module._decode_inline

    def counting(value: str) -> bytes:
        decodes.append(len(value))
        return real(value)

    monkeypatch.setattr(inputs_module, "_decode_inline", counting)
    faces = [b64(image_bytes(color=c)) for c in (1, 2)]
    inputs = ImageInputs(tmp_path)
    seen = {inputs.reference("face_image", "".join(faces[n % 2])) for n in range(100)}
    assert len(seen) == 2
    assert len(decodes) == 2
    room = len(faces[0]) + len(faces[1]) - 1  # one value at a time: each evicts the other
    monkeypatch.setattr(inputs_module, "_REFERENCE_MEMO_CHARS", room)
    inputs = ImageInputs(tmp_path)
    for n in range(4):
        inputs.reference("face_image", faces[n % 2])
    assert len(decodes) == 2 + 4


def test_reference_is_pure(tmp_path: Path) -> None:
    inputs = ImageInputs(tmp_path)
    inputs.reference("face_image", "missing/on/disk.png")  # no disk access, no error
    assert inputs.reads == 0


@pytest.mark.parametrize("value", ["faces/a\x00.png", "\x00"])
async def test_a_nul_in_a_path_is_a_row_problem_not_a_crash(tmp_path: Path, value: str) -> None:
    """Before, os.path's ValueError ("embedded null byte") escaped: `batcher validate` and
    `batcher run` ended in a traceback on a JSON Lines "\\u0000" or a CSV NUL byte."""
    inputs = ImageInputs(tmp_path)
    with pytest.raises(InputError, match="contains a NUL character"):
        await inputs.resolve("face_image", value)


async def test_spaces_around_a_path_are_shown(tmp_path: Path) -> None:
    """Before, `face_image= faces/x.png : file not found` hid the spaces a hand-written
    CSV puts after its commas: the path seemed right."""
    (tmp_path / "x.png").write_bytes(image_bytes())
    inputs = ImageInputs(tmp_path)
    with pytest.raises(InputError) as caught:
        await inputs.resolve("face_image", " x.png")
    assert str(caught.value).startswith("face_image=' x.png' (spaces are part of the name): ")
