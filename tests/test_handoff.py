"""Stage hand-offs (batcher.handoff.Channel): an item that can pass at once passes without
a turn of the loop; otherwise sends and receives wait; a close ends the receivers once
drained; and a cancel at any point loses no item and delivers none twice."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

from batcher.handoff import Channel


async def _turned(op: object) -> bool:
    """Whether awaiting ``op`` let another task run (a turn of the event loop)."""
    ran = asyncio.Event()
    other = asyncio.get_running_loop().call_soon(ran.set)
    try:
        await op  # type: ignore[misc]
    finally:
        other.cancel()
    return ran.is_set()


async def _until_receivers(channel: Channel[Any], n: int) -> None:
    async with asyncio.timeout(5):
        while channel.receivers_waiting < n:  # noqa: ASYNC110 (not awaitable)
            await asyncio.sleep(0)


def test_a_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Channel[int](-1)


async def test_an_item_with_room_passes_without_a_turn_of_the_loop() -> None:
    channel: Channel[int] = Channel(1)
    assert not await _turned(channel.send(1))
    assert not await _turned(channel.receive())
    assert channel.buffered == 0


async def test_a_ready_receiver_takes_the_item_at_once() -> None:
    channel: Channel[str] = Channel(0)  # a rendezvous
    taker = asyncio.create_task(channel.receive())
    await _until_receivers(channel, 1)
    assert not await _turned(channel.send("job"))
    assert await taker == "job"


async def test_a_full_channel_waits_for_room_and_keeps_the_order() -> None:
    channel: Channel[int] = Channel(1)
    await channel.send(1)
    second = asyncio.create_task(channel.send(2))
    await asyncio.sleep(0.01)
    assert not second.done()  # no room: it waits
    assert await channel.receive() == 1  # makes room: the waiting item goes in behind
    await asyncio.wait_for(second, 5)
    assert await asyncio.wait_for(channel.receive(), 5) == 2


async def test_a_rendezvous_send_waits_for_a_receiver() -> None:
    channel: Channel[int] = Channel(0)
    sent = asyncio.create_task(channel.send(7))
    await asyncio.sleep(0.01)
    assert not sent.done()  # nobody to take it: it waits
    assert await channel.receive() == 7
    await asyncio.wait_for(sent, 5)


async def test_receivers_wait_then_drain_then_end_when_closed() -> None:
    channel: Channel[int] = Channel(4)
    results: list[object] = []

    async def take_all() -> None:
        async for item in channel:
            results.append(item)
        results.append("end")

    waiting = asyncio.create_task(take_all())
    await asyncio.sleep(0.01)
    assert results == []  # nothing yet: it waits
    await channel.send(1)
    await channel.send(2)
    channel.close()
    await asyncio.wait_for(waiting, 5)
    assert results == [1, 2, "end"]


async def test_every_waiting_receiver_ends_at_a_close() -> None:
    channel: Channel[int] = Channel(0)
    takers = [asyncio.create_task(channel.receive()) for _ in range(3)]
    await _until_receivers(channel, 3)
    channel.close()
    for taker in takers:
        with pytest.raises(anyio.EndOfStream):
            await asyncio.wait_for(taker, 5)
    with pytest.raises(anyio.EndOfStream):
        await channel.receive()


async def test_a_closed_channel_refuses_a_send() -> None:
    channel: Channel[int] = Channel(1)
    channel.close()
    with pytest.raises(anyio.ClosedResourceError):
        await channel.send(1)


async def test_a_receiver_cancelled_as_it_is_handed_an_item_gives_it_to_the_next() -> None:
    channel: Channel[str] = Channel(0)
    first = asyncio.create_task(channel.receive())
    await _until_receivers(channel, 1)
    channel.send_nowait("job")  # handed to `first`...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(channel.receive(), 5) == "job"


async def test_a_cancelled_receiver_is_passed_over() -> None:
    channel: Channel[str] = Channel(0)
    gone = asyncio.create_task(channel.receive())
    await _until_receivers(channel, 1)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    taker = asyncio.create_task(channel.receive())
    await _until_receivers(channel, 1)
    assert channel.send_nowait("job")
    assert await asyncio.wait_for(taker, 5) == "job"


async def test_a_sender_cancelled_while_waiting_takes_its_item_back() -> None:
    channel: Channel[int] = Channel(0)
    sender = asyncio.create_task(channel.send(1))
    await asyncio.sleep(0.01)
    sender.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sender
    assert not channel.send_nowait(2)  # no receiver: nothing taken
    taker = asyncio.create_task(channel.receive())
    await _until_receivers(channel, 1)
    await channel.send(3)
    assert await asyncio.wait_for(taker, 5) == 3  # never the cancelled sender's 1


async def test_many_workers_get_every_item_exactly_once() -> None:
    channel: Channel[int] = Channel(2)
    got: list[int] = []

    async def worker() -> None:
        async for item in channel:
            got.append(item)
            await asyncio.sleep(0)

    async def sender() -> None:
        for item in range(500):
            await channel.send(item)
        channel.close()

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(worker)
        tg.start_soon(sender)
    assert sorted(got) == list(range(500))
