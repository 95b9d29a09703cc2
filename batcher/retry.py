"""One API call through the gate, retried by policy until it has a definite answer.

429s pause the whole gate and are retried; 5xx and lost connections back off and
retry. A POST whose connection was lost after sending is *not* retried here: its
job may already exist (and be billed), so the caller decides (see submit.py).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from batcher.backoff import RetryConfig, backoff_delay, parse_retry_after
from batcher.client import Outcome, Reply, TransportError
from batcher.gate import Priority, RequestGate

#: 429s tolerated for one call before it counts as a failure: high, since they are not its fault.
MAX_RATE_LIMITED = 200


@dataclass
class CallStats:
    """What retrying one call cost."""

    retries: int = 0
    rate_limited: int = 0


async def call(
    gate: RequestGate,
    priority: Priority,
    send: Callable[[], Awaitable[Reply]],
    *,
    retry: RetryConfig,
    rng: random.Random,
    safe_to_resend: bool,
    stats: CallStats | None = None,
    before_send: Callable[[], Awaitable[None]] | None = None,
    between_tries: Callable[[], Awaitable[None]] | None = None,
) -> Reply | TransportError:
    """The final reply, or the :class:`TransportError` that ended the attempts.

    A lost connection is retried only when ``safe_to_resend`` (a GET, or a POST that
    was never sent); otherwise it is returned at once for the caller's policy.
    ``before_send`` runs after the gate grants each attempt, just before it is sent;
    ``between_tries`` when a try failed with nothing at the server (a 5xx, a connection
    never opened) and another follows, before its backoff.
    """
    stats = stats if stats is not None else CallStats()
    attempt = 0
    while True:
        await gate.acquire(priority)
        if before_send is not None:
            await before_send()
        try:
            reply = await send()
        except TransportError as exc:
            if exc.maybe_sent and not safe_to_resend:
                return exc
            attempt += 1
            if attempt >= retry.max_attempts:
                return exc
            stats.retries += 1
            await _back_off(attempt, retry, rng, between_tries)
            continue
        outcome = reply.outcome
        if outcome is Outcome.RATE_LIMITED:
            stats.rate_limited += 1
            if stats.rate_limited >= MAX_RATE_LIMITED:
                return reply
            gate.rate_limited(parse_retry_after(reply.headers, datetime.now(UTC)))
            continue
        if outcome is Outcome.RETRY:
            attempt += 1
            if attempt >= retry.max_attempts:
                return reply
            stats.retries += 1
            await _back_off(attempt, retry, rng, between_tries)
            continue
        gate.succeeded()
        return reply


async def _back_off(
    attempt: int,
    retry: RetryConfig,
    rng: random.Random,
    between_tries: Callable[[], Awaitable[None]] | None,
) -> None:
    if between_tries is not None:
        await between_tries()
    await asyncio.sleep(backoff_delay(attempt, retry, rng))
