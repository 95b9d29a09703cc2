"""Stage hand-offs: an item that can pass at once passes without a turn of the loop;
otherwise they wait, end and fail as anyio's own send and receive do."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from batcher import handoff


async def _turned(op: object) -> bool:
    """Whether awaiting ``op`` let another task run (a turn of the event loop)."""
    ran = asyncio.Event()
    other = asyncio.get_running_loop().call_soon(ran.set)
    try:
        await op  # type: ignore[misc]
    finally:
        other.cancel()
    return ran.is_set()


async def test_an_item_with_room_passes_without_a_turn_of_the_loop() -> None:
    send, receive = anyio.create_memory_object_stream[int](1)
    with send, receive:
        assert not await _turned(handoff.send(send, 1))
        assert not await _turned(handoff.receive(receive))
        # anyio's own calls take a turn each time: what the hand-offs save
        assert await _turned(send.send(2))
        assert await _turned(receive.receive())


async def test_a_ready_receiver_takes_the_item_at_once() -> None:
    send, receive = anyio.create_memory_object_stream[str](0)  # a rendezvous
    got: list[str] = []
    with send, receive:
        async with anyio.create_task_group() as tg:

            async def take() -> None:
                got.append(await handoff.receive(receive))

            tg.start_soon(take)
            while not receive.statistics().tasks_waiting_receive:  # noqa: ASYNC110 (not awaitable)
                await asyncio.sleep(0)  # until the receiver waits
            assert not await _turned(handoff.send(send, "job"))
    assert got == ["job"]


async def test_a_full_stream_waits_for_room() -> None:
    send, receive = anyio.create_memory_object_stream[int](0)
    with send, receive:
        async with anyio.create_task_group() as tg:
            sent = asyncio.Event()

            async def put() -> None:
                await handoff.send(send, 7)
                sent.set()

            tg.start_soon(put)
            await asyncio.sleep(0.01)
            assert not sent.is_set()  # nobody to take it: it waits
            assert await handoff.receive(receive) == 7
            await sent.wait()


async def test_an_empty_stream_waits_then_ends_when_closed() -> None:
    send, receive = anyio.create_memory_object_stream[int](4)
    with receive:
        async with anyio.create_task_group() as tg:
            results: list[object] = []

            async def take_all() -> None:
                while True:
                    try:
                        results.append(await handoff.receive(receive))
                    except anyio.EndOfStream:
                        results.append("end")
                        return

            tg.start_soon(take_all)
            await asyncio.sleep(0.01)
            assert results == []  # nothing yet: it waits
            with send:
                await handoff.send(send, 1)
                await handoff.send(send, 2)
    assert results == [1, 2, "end"]


async def test_a_closed_stream_fails_as_anyio_does() -> None:
    send, receive = anyio.create_memory_object_stream[int](1)
    receive.close()
    with send, pytest.raises(anyio.BrokenResourceError):
        await handoff.send(send, 1)
    send2, receive2 = anyio.create_memory_object_stream[int](1)
    receive2.close()
    with send2, pytest.raises(anyio.ClosedResourceError):
        await handoff.receive(receive2)
