"""RequestGate: one request at a time at the account's rate, paid work first, and a 429
that pauses everyone."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable

import pytest

from batcher.backoff import RetryConfig
from batcher.errors import UsageError
from batcher.gate import Priority, RateConfig, RequestGate, binds, parse_rate

FETCH, POLL, SUBMIT = Priority.FETCH, Priority.POLL, Priority.SUBMIT


def _gate(per_second: float, *, bind_s: float = 1.0) -> RequestGate:
    return RequestGate(
        RateConfig(requests=per_second, period_s=1.0, bind_s=bind_s),
        retry=RetryConfig(base_s=0.01, cap_s=0.02),
        rng=random.Random(1),
    )


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[RequestGate], None]]:
    """``serve(gate)`` runs the gate until the test ends."""
    tasks: list[asyncio.Task[None]] = []

    def start(gate: RequestGate) -> None:
        tasks.append(asyncio.create_task(gate.serve()))

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _acquire(gate: RequestGate, priority: Priority, granted: list[Priority]) -> None:
    await gate.acquire(priority)
    granted.append(priority)


async def test_waiters_are_granted_fetch_then_poll_then_submit(
    serve: Callable[[RequestGate], None],
) -> None:
    gate = _gate(1000)
    granted: list[Priority] = []
    order = [SUBMIT, POLL, FETCH, SUBMIT, FETCH, POLL, SUBMIT]
    tasks = [asyncio.create_task(_acquire(gate, p, granted)) for p in order]
    await asyncio.sleep(0)  # every waiter is queued before the gate opens
    assert gate.waiting(SUBMIT) == 3

    serve(gate)
    await asyncio.gather(*tasks)

    assert granted == [FETCH, FETCH, POLL, POLL, SUBMIT, SUBMIT, SUBMIT]
    assert gate.granted == len(order)


async def test_a_later_fetch_goes_before_submits_already_waiting(
    serve: Callable[[RequestGate], None],
) -> None:
    gate = _gate(40)  # a grant every 25 ms
    granted: list[Priority] = []
    late: list[asyncio.Task[None]] = []

    async def first_submit() -> None:
        await _acquire(gate, SUBMIT, granted)
        # Queued as the first grant lands, before the next token comes: a test that polled
        # for the grant could wake past it (25 ms) on a loaded machine, after a 2nd submit.
        late.extend(asyncio.create_task(_acquire(gate, p, granted)) for p in (POLL, FETCH))

    submits = [asyncio.create_task(first_submit())]
    submits += [asyncio.create_task(_acquire(gate, SUBMIT, granted)) for _ in range(2)]
    serve(gate)
    await submits[0]  # granted: `late` is queued
    await asyncio.gather(*submits, *late)

    assert granted == [SUBMIT, FETCH, POLL, SUBMIT, SUBMIT]


def _pressure_after(*starved: int) -> float:
    """The gate's pressure after grants that did (1) or did not (0) leave the limit
    binding: its moving average, 1/20 of each new grant."""
    pressure = 0.0
    for s in starved:
        pressure += 0.05 * (s - pressure)
    return pressure


async def test_a_backlog_of_submits_that_takes_bind_s_to_drain_is_pressure(
    serve: Callable[[RequestGate], None],
) -> None:
    gate = _gate(40, bind_s=0.05)  # 2 submits waiting take 50 ms at 40/s
    tasks = [asyncio.create_task(gate.acquire(SUBMIT)) for _ in range(6)]
    await asyncio.sleep(0)
    serve(gate)
    await asyncio.gather(*tasks)

    # Grants 1-4 left 5, 4, 3, 2 submits behind (the limit binds), 5 and 6 left 1 and 0.
    assert gate.pressure == pytest.approx(_pressure_after(1, 1, 1, 1, 0, 0))
    assert gate.pressure > 0.1


async def test_grants_made_back_to_back_after_a_stall_count_the_backlog_exactly(
    serve: Callable[[RequestGate], None],
) -> None:
    """After the loop stalls, the bucket holds tokens and serve() grants twice without
    yielding: the second grant must not count the first, already granted, submit (its
    done-callback has not run yet)."""
    gate = _gate(40, bind_s=0.05)  # 2 submits waiting take 50 ms: the limit binds
    tasks = [asyncio.create_task(gate.acquire(SUBMIT)) for _ in range(4)]
    await asyncio.sleep(0)
    serve(gate)
    await asyncio.sleep(0)  # serve() primes the bucket, grants one, waits for a token
    assert gate.granted == 1
    time.sleep(0.08)  # noqa: ASYNC251 -- the stall under test: the bucket refills
    await asyncio.gather(*tasks)

    # Left behind: 3, 2 (bind), then 1 and 0 (do not), the 3rd grant made back to back.
    assert gate.pressure == pytest.approx(_pressure_after(1, 1, 0, 0))


async def test_a_burst_the_rate_drains_at_once_is_no_pressure(
    serve: Callable[[RequestGate], None],
) -> None:
    """200 submits at once at 20,000/s are all sent within 10 ms: the limit does not
    bind, and the polls of those jobs must not be thinned as if it did."""
    gate = _gate(20_000)
    tasks = [asyncio.create_task(gate.acquire(SUBMIT)) for _ in range(200)]
    await asyncio.sleep(0)
    serve(gate)
    await asyncio.gather(*tasks)

    assert gate.granted == 200
    assert gate.pressure == 0


@pytest.mark.parametrize(
    ("waiting", "per_second", "bind_s", "expected"),
    [
        (0, 0.8, 1.0, False),  # nobody waits
        (1, 0.8, 1.0, True),  # Pro: one submit waits 1.25 s
        (1, 1.0, 1.0, True),  # exactly bind_s
        (1, 2.0, 1.0, False),  # 0.5 s
        (199, 20_000, 1.0, False),  # a burst gone in 10 ms
        (300, 80, 0.01, True),  # time-scaled: 3.75 s of backlog against 10 ms
        (1, 1e9, 0.0, True),  # bind_s 0: any submit waiting
        (2, 120 / (60 * 0.003), 0.003, True),  # 2.0000000000000004 after scaling: still 2
    ],
)
def test_binds_when_the_backlog_takes_bind_s_to_drain(
    waiting: int, per_second: float, bind_s: float, expected: bool
) -> None:
    assert binds(waiting, per_second, bind_s) is expected


async def test_grants_are_spaced_at_the_rate_without_a_burst(
    serve: Callable[[RequestGate], None],
) -> None:
    gate = _gate(100)  # one per 10 ms; a waiting crowd gets no burst
    loop = asyncio.get_running_loop()
    waiters = [asyncio.create_task(gate.acquire(POLL)) for _ in range(30)]
    await asyncio.sleep(0)

    start = loop.time()
    serve(gate)
    await asyncio.sleep(0.1)
    elapsed = loop.time() - start
    granted = gate.granted

    # A slow loop can only grant fewer: the first at once, then one per 10 ms at most
    # (a grant served late lets the next come early by as much: still no faster).
    assert 1 <= granted <= 1 + elapsed * 100 + 1, (granted, elapsed)
    await asyncio.gather(*waiters)
    assert gate.granted == 30


async def test_climbing_back_after_a_429_grants_no_faster_than_the_rate(
    serve: Callable[[RequestGate], None],
) -> None:
    """Each success after a 429 raises the rate a step, with a new bucket. That bucket
    must not grant at once: it did, so a client answering at once climbed back in a
    burst far above its rate, drew the next 429, and one 429 became hundreds."""
    gate = _gate(100)
    serve(gate)
    loop = asyncio.get_running_loop()
    await gate.acquire(POLL)
    gate.rate_limited(0.001)  # rate 70/s, climbing back 1/s a success
    await asyncio.sleep(0.01)

    start = loop.time()
    granted = 0
    while loop.time() - start < 0.1:
        await gate.acquire(POLL)
        gate.succeeded()  # the answer came back at once
        granted += 1
    elapsed = loop.time() - start

    # At most one per 10 ms (the rate never exceeds 100/s), plus the bucket's spare.
    assert granted <= elapsed * 100 + 2, (granted, elapsed)


async def test_a_429_pauses_every_priority_and_cuts_the_rate_once_per_pause(
    serve: Callable[[RequestGate], None],
) -> None:
    gate = _gate(1000)
    serve(gate)
    loop = asyncio.get_running_loop()
    await gate.acquire(SUBMIT)

    start = loop.time()  # before the 429s: a stall after them would shorten the wait seen
    assert gate.rate_limited(0.1) == 0.1
    gate.rate_limited(0.05)  # a second 429 of the same burst
    await gate.acquire(FETCH)

    assert loop.time() - start >= 0.1 - 0.005
    assert gate.limited == 2
    assert gate.rate == pytest.approx(700)  # cut by 0.7 once, not twice
    gate.succeeded()
    assert gate.rate == pytest.approx(710)  # and creeps back
    for _ in range(100):
        gate.succeeded()
    assert gate.rate == pytest.approx(1000)  # never past the configured rate


async def test_a_429_without_a_hint_backs_off_and_never_below_the_floor(
    serve: Callable[[RequestGate], None],
) -> None:
    gate = _gate(1000)
    serve(gate)
    await gate.acquire(POLL)
    wait = gate.rate_limited(None)
    assert 1 / gate.rate <= wait <= 0.02  # the backoff's cap

    storm = _gate(1000)
    for _ in range(40):  # a long storm of 429s, each asking for no pause at all
        storm.rate_limited(0.0)
    assert storm.rate == pytest.approx(1000 * storm.config.floor_fraction)


async def test_a_cancelled_waiter_is_skipped(serve: Callable[[RequestGate], None]) -> None:
    gate = _gate(1000)
    gone = asyncio.create_task(gate.acquire(FETCH))
    await asyncio.sleep(0)
    gone.cancel()
    granted: list[Priority] = []
    kept = asyncio.create_task(_acquire(gate, SUBMIT, granted))
    await asyncio.sleep(0)

    serve(gate)
    await kept

    assert granted == [SUBMIT]
    assert gate.granted == 1


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("50/min", 50 / 60), ("2/s", 2.0), ("3000/h", 3000 / 3600), (" 5 / minute ", 5 / 60)],
)
def test_parse_rate(text: str, per_second: float) -> None:
    assert parse_rate(text).per_second == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["50", "50/week", "fast", "-3/min", "0/s"])
def test_parse_rate_refuses_nonsense(text: str) -> None:
    with pytest.raises(UsageError):
        parse_rate(text)


def test_a_scaled_rate_keeps_its_requests_over_a_shorter_period() -> None:
    rate = RateConfig(requests=48, period_s=60).scaled(0.01)
    assert (rate.requests, rate.period_s) == (48, pytest.approx(0.6))
    assert rate.bind_s == pytest.approx(0.01)  # a backlog is judged in model seconds too
    assert rate.per_second == pytest.approx(80)


async def test_with_nobody_waiting_a_token_is_granted_without_the_serve_loop() -> None:
    gate = _gate(1000)
    server = asyncio.create_task(gate.serve())
    await gate.acquire(POLL)  # through serve(): a new bucket spends its spare token
    server.cancel()
    await asyncio.gather(server, return_exceptions=True)
    await asyncio.sleep(0.005)  # tokens are back; serve() is gone

    await asyncio.wait_for(gate.acquire(SUBMIT), timeout=1)

    assert gate.granted == 2
    assert gate.pressure == 0  # nobody was left waiting


@pytest.mark.parametrize("bind_s", [-1.0, float("nan"), float("inf")])
def test_rate_config_refuses_a_bad_bind_s(bind_s: float) -> None:
    with pytest.raises(UsageError, match="bind_s"):
        RateConfig(bind_s=bind_s)
