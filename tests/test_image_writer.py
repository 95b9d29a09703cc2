"""Tests for batcher.image_writer: image writes batched onto worker threads."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

import batcher.image_writer
import batcher.sink
from batcher.image_writer import ImageWriter
from batcher.sink import CorruptImage, SavedImage, safe_stem, write_images


def _png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 6), (shade, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[ImageWriter]:
    images = ImageWriter(tmp_path, lanes=2, max_batch=16)
    task = asyncio.create_task(images.run())
    yield images
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_many_writes_share_few_thread_calls_and_all_land(
    writer: ImageWriter, tmp_path: Path
) -> None:
    saved = await asyncio.gather(*(writer.write(f"r{i}", 0, _png(i)) for i in range(100)))

    assert [s.path for s in saved] == [f"images/{safe_stem(f'r{i}')}_0.png" for i in range(100)]
    for i, record in enumerate(saved):
        with Image.open(tmp_path / record.path) as image:
            assert image.size == (10, 6)
            assert image.getpixel((0, 0)) == (i, 40, 90)
    # Batched: 100 images in at most ceil(100 / 16) + lanes calls, not 100.
    assert 1 <= writer.batches <= 100 // 16 + 1 + 2


async def test_a_bad_image_fails_its_own_write_only(writer: ImageWriter, tmp_path: Path) -> None:
    good = [writer.write(f"g{i}", 0, _png(i)) for i in range(5)]
    bad = writer.write("bad", 0, b"not an image")

    results = await asyncio.gather(*good, bad, return_exceptions=True)

    assert all(isinstance(r, SavedImage) for r in results[:5])
    assert isinstance(results[5], CorruptImage)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(
        f"{safe_stem(f'g{i}')}_0.png" for i in range(5)
    )


async def test_a_write_cancelled_before_its_batch_is_not_made(tmp_path: Path) -> None:
    images = ImageWriter(tmp_path, lanes=1)
    cancelled = asyncio.create_task(images.write("gone", 0, _png(1)))
    kept = asyncio.create_task(images.write("kept", 0, _png(2)))
    await asyncio.sleep(0)  # both queued, no lane running yet
    cancelled.cancel()
    runner = asyncio.create_task(images.run())
    try:
        await kept
    finally:
        runner.cancel()
        await asyncio.gather(runner, cancelled, return_exceptions=True)

    assert [p.name for p in (tmp_path / "images").iterdir()] == [f"{safe_stem('kept')}_0.png"]


def test_a_batch_syncs_the_folder_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    monkeypatch.setattr(batcher.sink, "_fsync_dir", synced.append)

    results = write_images(tmp_path, [(f"r{i}", 0, _png(i)) for i in range(5)])

    assert all(isinstance(r, SavedImage) for r in results)
    assert synced == [str(tmp_path / "images")]  # once for the five renames, not five times


def test_a_batch_of_only_refused_images_syncs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    monkeypatch.setattr(batcher.sink, "_fsync_dir", synced.append)

    results = write_images(tmp_path, [("a", 0, b""), ("b", 0, b"junk")])

    assert all(isinstance(r, CorruptImage) for r in results)
    assert synced == []


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lanes"):
        ImageWriter(tmp_path, lanes=0)


async def test_a_second_lane_joins_only_for_a_backlog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow_write(out: Path, items: list[tuple[str, int, bytes]]) -> list[SavedImage]:
        time.sleep(0.02)  # a slow disk: the queue builds up behind the first lane
        return [
            SavedImage(
                path=f"images/{r}_{i}.png", width=1, height=1, format="png", bytes=len(d), sha256=""
            )
            for r, i, d in items
        ]

    monkeypatch.setattr(batcher.image_writer, "write_images", slow_write)
    images = ImageWriter(tmp_path, lanes=2, max_batch=4, spill=8)
    task = asyncio.create_task(images.run())
    try:
        # 5 at once, below the spill of 8: the first lane takes 4, then the last one
        await asyncio.gather(*(images.write(f"few{i}", 0, b"x") for i in range(5)))
        assert images.peak_busy == 1

        await asyncio.gather(*(images.write(f"many{i}", 0, b"x") for i in range(40)))
        assert images.peak_busy == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_folder_failure_answers_every_waiter_and_the_lane_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = [True]
    real = batcher.image_writer.write_images

    def flaky(out: Path, items: list[tuple[str, int, bytes]]) -> list[SavedImage | Exception]:
        if broken[0]:
            raise OSError(28, "No space left on device")
        return real(out, items)

    monkeypatch.setattr(batcher.image_writer, "write_images", flaky)
    images = ImageWriter(tmp_path, lanes=2, max_batch=4, spill=2)
    task = asyncio.create_task(images.run())
    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(images.write(f"r{i}", 0, _png(i)) for i in range(6)), return_exceptions=True
            ),
            timeout=10,
        )
        assert all(isinstance(o, OSError) and o.errno == 28 for o in outcomes)
        broken[0] = False  # space freed: the same writer writes again
        saved = await asyncio.wait_for(images.write("after", 0, _png(7)), timeout=10)
        assert (tmp_path / saved.path).is_file()
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
