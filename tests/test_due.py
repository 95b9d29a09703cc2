"""DueHeap: items come out earliest first once due; a push of an earlier item wakes the
wait; a cancelled wait leaves its items and no timer behind."""

from __future__ import annotations

import asyncio

import pytest

from batcher.due import DueHeap


async def test_items_come_out_earliest_first_once_due() -> None:
    loop = asyncio.get_running_loop()
    heap: DueHeap[str] = DueHeap(loop.time)
    now = loop.time()
    heap.push(now + 0.06, "late")
    heap.push(now + 0.02, "soon")
    heap.push(now + 0.02, "soon, pushed second")
    taken = [await heap.next_due() for _ in range(3)]
    assert [item for _, item in taken] == ["soon", "soon, pushed second", "late"]
    for due, _ in taken:
        assert loop.time() >= due  # never handed out before its time
    assert len(heap) == 0


async def test_a_push_of_an_earlier_item_wakes_the_wait() -> None:
    loop = asyncio.get_running_loop()
    heap: DueHeap[str] = DueHeap(loop.time)
    heap.push(loop.time() + 3600, "an hour away")
    waiting = asyncio.create_task(heap.next_due())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    heap.push(loop.time(), "now")
    _, item = await asyncio.wait_for(waiting, 5)
    assert item == "now"
    assert len(heap) == 1


async def test_an_empty_heap_waits_for_a_push() -> None:
    loop = asyncio.get_running_loop()
    heap: DueHeap[str] = DueHeap(loop.time)
    waiting = asyncio.create_task(heap.next_due())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    heap.push(loop.time() + 0.01, "pushed")
    assert (await asyncio.wait_for(waiting, 5))[1] == "pushed"


async def test_a_cancelled_wait_keeps_its_items_and_leaves_no_timer() -> None:
    loop = asyncio.get_running_loop()
    heap: DueHeap[str] = DueHeap(loop.time)
    heap.push(loop.time() + 3600, "an hour away")
    timers_before = len(loop._scheduled)  # type: ignore[attr-defined]
    waiting = asyncio.create_task(heap.next_due())
    await asyncio.sleep(0.01)
    assert len(loop._scheduled) == timers_before + 1  # type: ignore[attr-defined]
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    live = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
    assert len(live) == timers_before
    assert list(heap.drain()) == ["an hour away"]
