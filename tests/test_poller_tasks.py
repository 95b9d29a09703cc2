"""The poller's polls run as tasks of its own group: a poll's error ends the poller with
the other polls cancelled, and the poller cancelled cancels the polls it has running."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from conftest import a_flight

from batcher.flight import Flight
from batcher.lateness import PollLateness
from batcher.poll import Poller


def _flight(row_id: str, now: float) -> Flight:
    base = "http://127.0.0.1:9/v2/requests/"
    return a_flight(row_id, f"{base}{row_id}/status", f"{base}{row_id}", now_mono=now)


class Boom(Exception):
    pass


def _poller(polls: dict[str, str]) -> tuple[Poller, list[Flight]]:
    """A poller whose polls hang until cancelled (recorded in ``polls``), but row "bad"'s,
    which raises Boom once the others have started."""
    loop = asyncio.get_running_loop()
    ctx: Any = SimpleNamespace(
        now=loop.time,
        counters=SimpleNamespace(poll_lateness=PollLateness()),
        options=SimpleNamespace(simulate=False),
    )
    poller = Poller(ctx, to_fetch=None)  # type: ignore[arg-type]
    started = anyio.Event()

    async def poll(self: Poller, flight: Flight) -> None:
        polls[flight.job.id] = "started"
        if len(polls) == 3:
            started.set()
        if flight.job.id == "bad":
            await started.wait()
            raise Boom("a poll's error")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            polls[flight.job.id] = "cancelled"
            raise

    poller.poll = poll.__get__(poller)  # type: ignore[method-assign]
    flights = [_flight(row_id, loop.time()) for row_id in ("a", "b")]
    return poller, flights


async def test_a_polls_error_ends_the_poller_and_cancels_the_other_polls() -> None:
    polls: dict[str, str] = {}
    poller, flights = _poller(polls)
    for flight in [*flights, _flight("bad", asyncio.get_running_loop().time())]:
        poller._schedule(flight, delay=0.0)
    with pytest.raises(BaseExceptionGroup) as raised:
        with anyio.fail_after(5):
            await poller.run()
    assert raised.group_contains(Boom)
    assert polls == {"a": "cancelled", "b": "cancelled", "bad": "started"}


async def test_the_poller_cancelled_cancels_its_polls_and_leaves_no_task() -> None:
    polls: dict[str, str] = {}
    poller, flights = _poller(polls)
    for flight in flights:
        poller._schedule(flight, delay=0.0)
    before = asyncio.all_tasks()
    with anyio.move_on_after(0.2) as scope:  # the pipeline's cancel, as a run ends
        await poller.run()
    assert scope.cancelled_caught
    assert polls == {"a": "cancelled", "b": "cancelled"}
    assert asyncio.all_tasks() <= before  # every poll's task ended with the poller
