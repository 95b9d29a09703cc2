"""HTTP units with aioresponses: the answer table (classify), the API client, and one call
through the gate with its retry policy (retry.call). Nothing leaves the process except
the one test that needs a refused connection, which dials a closed port on 127.0.0.1, and
the one that reads a large body off the wire, from an in-process server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any
from unittest.mock import Mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aioresponses import aioresponses
from yarl import URL

import batcher.client as client_module
from batcher.backoff import RetryConfig
from batcher.client import (
    ApiClient,
    Outcome,
    Reply,
    TransportError,
    classify,
    encode_params,
    json_body,
)
from batcher.gate import Priority, RateConfig, RequestGate
from batcher.retry import CallStats, call

BASE = "http://127.0.0.1:8399"
SUBMIT = f"{BASE}/v2/instantid"
STATUS = f"{BASE}/v2/requests/r-1/status"
KEY = "sk-units-SECRET-4242"
FAST = RetryConfig(base_s=0.001, cap_s=0.002, max_attempts=4)


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds responses without the ``stream_writer`` that aiohttp 3.14's
    ClientResponse requires; this fills it in."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", Mock(output_size=0))
        super().__init__(method, url, **kwargs)


def _answer(
    m: aioresponses,
    method: str,
    url: str,
    status: int = 200,
    body: dict[str, Any] | None = None,
    **kwargs: Any,
) -> None:
    m.add(url, method, status=status, payload=body or {}, response_class=_Response, **kwargs)


@pytest.fixture
def mocked() -> Iterator[aioresponses]:
    with aioresponses() as m:
        yield m


@pytest.fixture
async def client() -> AsyncIterator[ApiClient]:
    async with aiohttp.ClientSession() as session:
        yield ApiClient(session, BASE + "/", KEY)


@pytest.fixture
async def gate() -> AsyncIterator[RequestGate]:
    """A fast gate, served for the test's length."""
    gate = RequestGate(RateConfig(requests=1000, period_s=1.0), retry=FAST)
    task = asyncio.create_task(gate.serve())
    yield gate
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _sent(m: aioresponses, method: str, url: str) -> list[Any]:
    calls: list[Any] = m.requests.get((method, URL(url)), [])
    return calls


# -- classify ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, {"status": "QUEUED"}, Outcome.OK),
        (200, {"status": "COMPLETED", "output": "https://x/y.png"}, Outcome.OK),
        (400, {"error": "Invalid parameters"}, Outcome.REJECTED),
        (401, {"error": "Unauthorized"}, Outcome.AUTH),
        (403, {"error": "Forbidden"}, Outcome.AUTH),
        (404, {"error": "Request r-1 not found"}, Outcome.NOT_FOUND),
        (406, {"error": "Insufficient credits"}, Outcome.NO_CREDITS),
        (422, {"status": "FAILED", "error": "No face detected"}, Outcome.FAILED),
        (422, {"error": "validation error"}, Outcome.REJECTED),
        (429, {"error": "Too many requests"}, Outcome.RATE_LIMITED),
        (500, {"error": "Internal server error"}, Outcome.RETRY),
        (502, {}, Outcome.RETRY),
        (504, {"error": "Gateway timeout"}, Outcome.RETRY),
        (408, {}, Outcome.RETRY),
        (200, {"status": "FAILED", "error": "blocked"}, Outcome.FAILED),  # the body decides
    ],
)
def test_classify_maps_every_answer_of_the_contract(
    status: int, body: dict[str, Any], outcome: Outcome
) -> None:
    assert classify(status, body) is outcome
    assert Reply(status, body).outcome is outcome


def test_error_text_carries_the_status_and_the_servers_words() -> None:
    assert Reply(422, {"error": "No face detected"}).error_text() == "HTTP 422: No face detected"
    assert Reply(502, {}).error_text() == "HTTP 502"


# -- ApiClient ----------------------------------------------------------------------------------


async def test_submit_posts_the_params_with_the_key_header(
    mocked: aioresponses, client: ApiClient
) -> None:
    _answer(mocked, "POST", SUBMIT, body={"request_id": "r-1", "status": "QUEUED"})

    reply = await client.submit(
        "instantid", json_body({"prompt": "a", "face_image": "https://x/f.jpg"})
    )

    assert (reply.status, reply.body["request_id"], reply.outcome) == (200, "r-1", Outcome.OK)
    (sent,) = _sent(mocked, "POST", SUBMIT)
    assert sent.kwargs["headers"]["x-api-key"] == KEY
    assert sent.kwargs["headers"]["Content-Type"] == "application/json"
    assert json.loads(sent.kwargs["data"]) == {"prompt": "a", "face_image": "https://x/f.jpg"}


def test_json_body_is_json_dumps_with_long_plain_strings_spliced_in() -> None:
    image = base64.b64encode(random.randbytes(100_000)).decode()
    small = {"prompt": 'a "quoted" \u00e9 prompt', "seed": 7, "base64": False}
    assert json_body(small) == json.dumps(small).encode()  # byte for byte
    for params in (
        {**small, "face_image": image},
        {"face_image": image},  # every value spliced
        {"face_image": image, "pose_image": "data:image/png;base64," + image, **small},
    ):
        body = json_body(params)
        assert json.loads(body) == params
        assert b'"' + image.encode() + b'"' in body  # as it is, not re-encoded
    for needs_escaping in (image[:-10] + "\n" + image[-10:], image + '"', image + "\u00e9"):
        params = {"prompt": "p", "face_image": needs_escaping}
        assert json_body(params) == json.dumps(params).encode()


@pytest.mark.parametrize("size", [1000, 3 * 1024 * 1024], ids=["small", "megabytes"])
async def test_a_body_of_megabytes_is_encoded_off_the_loop_and_sent_whole(
    size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local face photo goes as base64 in the JSON body. A big one is encoded in a worker
    thread and streamed (aiohttp warns, an error under this suite, that a big bytes body
    "might lock the event loop"), and still arrives with its Content-Length, not chunked."""
    params = {"prompt": "a", "face_image": base64.b64encode(random.randbytes(size)).decode()}
    seen: dict[str, Any] = {}

    async def handle(request: web.Request) -> web.Response:
        seen["headers"] = dict(request.headers)
        seen["body"] = await request.read()
        return web.json_response({"request_id": "r-1", "status": "QUEUED"})

    encoded_in: list[str] = []
    encode = client_module.json_body

    def spy(payload: Any) -> bytes:
        encoded_in.append(threading.current_thread().name)
        return encode(payload)

    monkeypatch.setattr(client_module, "json_body", spy)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v2/instantid", handle)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        body = await encode_params(params)
        reply = await ApiClient(session, str(server.make_url("/")), KEY).submit("instantid", body)

    assert reply.status == 200
    assert json.loads(seen["body"]) == params
    assert int(seen["headers"]["Content-Length"]) == len(seen["body"])
    assert "Transfer-Encoding" not in seen["headers"]
    assert seen["headers"]["Content-Type"] == "application/json"
    on_loop = encoded_in == [threading.main_thread().name]
    assert on_loop is (size < 1024 * 1024), encoded_in


async def test_the_key_is_in_no_repr(client: ApiClient) -> None:
    assert KEY not in repr(client)
    assert KEY not in str(client)
    assert client.base_url == BASE  # the trailing slash is dropped


async def test_a_non_json_body_becomes_the_error_text(
    mocked: aioresponses, client: ApiClient
) -> None:
    mocked.get(STATUS, status=502, body="<html>Bad gateway</html>", response_class=_Response)

    reply = await client.get(STATUS)

    assert reply.outcome is Outcome.RETRY
    assert reply.body == {"error": "<html>Bad gateway</html>"}


@pytest.mark.parametrize(
    "exc", [aiohttp.ServerDisconnectedError(), aiohttp.ClientOSError(104, "reset"), TimeoutError()]
)
async def test_a_lost_connection_may_have_been_sent(
    mocked: aioresponses, client: ApiClient, exc: Exception
) -> None:
    mocked.post(SUBMIT, exception=exc)

    with pytest.raises(TransportError) as raised:
        await client.submit("instantid", json_body({"prompt": "a"}))

    assert raised.value.maybe_sent is True
    assert KEY not in str(raised.value)


async def test_a_refused_connection_was_not_sent() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with aiohttp.ClientSession() as session:
        api = ApiClient(session, f"http://127.0.0.1:{port}", KEY)
        with pytest.raises(TransportError) as raised:
            await api.submit("instantid", json_body({"prompt": "a"}))
    assert raised.value.maybe_sent is False
    assert KEY not in str(raised.value)


async def test_a_connection_that_never_opens_was_not_sent(blackhole: int) -> None:
    """Before, only the total timeout applied, and its bare TimeoutError read as "maybe
    sent": every row of a run behind a dead firewall ended FAILED "maybe billed"."""
    async with aiohttp.ClientSession() as session:
        api = ApiClient(session, f"http://127.0.0.1:{blackhole}", KEY)
        api_fast = ApiClient(
            session, f"http://127.0.0.1:{blackhole}", KEY, timeout_s=5.0, connect_timeout_s=0.3
        )
        assert api._timeout.sock_connect == client_module.CONNECT_TIMEOUT_S
        with pytest.raises(TransportError) as raised:
            await api_fast.submit("instantid", json_body({"prompt": "a"}))
    assert raised.value.maybe_sent is False
    assert str(raised.value) == "cannot connect: no connection within 0.3 s"


async def test_an_invalid_url_was_not_sent(mocked: aioresponses, client: ApiClient) -> None:
    mocked.post(SUBMIT, exception=aiohttp.InvalidURL(SUBMIT))
    with pytest.raises(TransportError) as raised:
        await client.submit("instantid", json_body({"prompt": "a"}))
    assert raised.value.maybe_sent is False


#: A key with what JSON escapes in it: "/" (as \/ by some servers), '"' and non-ASCII.
ODD_KEY = 'sk-Odd/Key"S\u00e9cret-0042'
ODD_B64 = base64.b64encode(ODD_KEY.encode()).decode()


def _echo(text: str, *, escape_slash: bool = False, ascii_only: bool = True) -> str:
    body = json.dumps({"error": f"bad key {text}"}, ensure_ascii=ascii_only)
    return body.replace("/", "\\/") if escape_slash else body


def _strings(value: object) -> list[str]:
    """Every string in a decoded JSON value, names included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


@pytest.mark.parametrize(
    "body",
    [
        _echo(ODD_KEY, ascii_only=False),
        _echo(ODD_KEY),  # \" and \u00e9
        _echo(ODD_KEY, escape_slash=True),  # and \/
        _echo(ODD_KEY.upper(), ascii_only=False),
        _echo(ODD_KEY.swapcase(), escape_slash=True),
        _echo(ODD_B64),
        _echo(ODD_B64, escape_slash=True),
        _echo(base64.urlsafe_b64encode(ODD_KEY.encode()).decode().rstrip("=")),
        _echo(base64.b64encode(ODD_KEY.encode() + b"\n").decode()),  # encoded with more
        json.dumps({"detail": [{"loc": ["header", ODD_KEY], "input": {ODD_KEY.lower(): 1}}]}),
        f"<html>bad key {ODD_KEY}</html>",
        f"<html>bad key {ODD_KEY.upper()}</html>",
        f"bad key {ODD_B64}",
    ],
    ids=[
        "utf-8-json", "json-escaped", "slash-escaped", "upper-case", "swapped-case", "base64",
        "base64-slash-escaped", "urlsafe-base64", "base64-of-more", "nested-name-and-value",
        "text", "text-upper-case", "text-base64",
    ],
)  # fmt: skip
async def test_an_echo_of_the_key_in_any_form_is_redacted(mocked: aioresponses, body: str) -> None:
    """Before: only a byte-for-byte echo was replaced, before decoding; an escaped,
    re-cased or base64 echo reached stderr, results.parquet and the checkpoint."""
    mocked.get(STATUS, status=401, body=body, response_class=_Response)
    async with aiohttp.ClientSession() as session:
        reply = await ApiClient(session, BASE, ODD_KEY).get(STATUS)

    shown = "\n".join([*_strings(reply.body), reply.error_text()]).casefold()
    assert "***" in shown
    for part in (*ODD_KEY.split("/"), *ODD_B64.split("/")):
        assert part.rstrip("=").casefold()[:8] not in shown, part


@pytest.mark.parametrize(
    "echo",
    [
        KEY[: len(KEY) // 2 + 1] + "...",  # "masked", the rest of it guessable
        "..." + KEY[-(len(KEY) // 2 + 1) :],
        KEY[2:-2].upper(),
    ],
)
async def test_half_the_key_or_more_echoed_is_redacted(mocked: aioresponses, echo: str) -> None:
    """An audit's server echoed the key's first 14 characters of 21: that reached the
    log, the checkpoint and results.parquet."""
    _answer(mocked, "GET", STATUS, status=400, body={"error": f"bad request for key {echo}"})
    async with aiohttp.ClientSession() as session:
        reply = await ApiClient(session, BASE, KEY).get(STATUS)
    assert reply.body == {"error": f"bad request for key {echo.replace(echo.strip('.'), '***')}"}


@pytest.mark.parametrize("length", range(1, 90))
def test_every_run_of_the_key_long_enough_to_redact_holds_one_of_its_clues(length: int) -> None:
    """The cheap test (a few substring searches) must see every run that the slow path
    would redact, or a partial echo would pass unseen."""
    key = "".join(chr(0x41 + (n * 7) % 26) + str(n % 10) for n in range(length))[:length]
    shortest = max(client_module._MIN_FORM, (length + 1) // 2)
    anchors = client_module._anchors(key, shortest)
    for run in client_module._runs(key, shortest):
        assert any(anchor in run for anchor in anchors), run


async def test_a_masked_echo_of_less_than_half_the_key_is_left_as_it_is(
    mocked: aioresponses,
) -> None:
    body = {"error": f"bad key {KEY[:4]}...{KEY[-4:]}"}
    _answer(mocked, "GET", STATUS, status=401, body=body)
    async with aiohttp.ClientSession() as session:
        reply = await ApiClient(session, BASE, KEY).get(STATUS)
    assert reply.body == body


async def test_an_answer_without_the_key_is_left_as_it_is(mocked: aioresponses) -> None:
    body = {
        "status": "COMPLETED",
        "output": ["https://cdn.example.com/sk-Odd/out.png", "\u00e9"],
        "metrics": {"inference_time": 7.5, "note": None},
    }
    _answer(mocked, "GET", STATUS, body=body)
    async with aiohttp.ClientSession() as session:
        reply = await ApiClient(session, BASE, ODD_KEY).get(STATUS)
    assert reply.body == body


# -- retry.call ---------------------------------------------------------------------------------


async def _call(
    gate: RequestGate,
    send: Any,
    *,
    safe: bool,
    priority: Priority = Priority.POLL,
    stats: CallStats | None = None,
    **kwargs: Any,
) -> Reply | TransportError:
    return await call(
        gate,
        priority,
        send,
        retry=FAST,
        rng=random.Random(0),
        safe_to_resend=safe,
        stats=stats,
        **kwargs,
    )


async def test_5xx_is_retried_then_succeeds(
    mocked: aioresponses, client: ApiClient, gate: RequestGate
) -> None:
    _answer(mocked, "POST", SUBMIT, 500, {"error": "Internal server error"})
    _answer(mocked, "POST", SUBMIT, 502)
    _answer(mocked, "POST", SUBMIT, 200, {"request_id": "r-1"})
    stats = CallStats()
    granted: list[int] = []

    async def before_send() -> None:
        granted.append(gate.granted)

    reply = await _call(
        gate,
        lambda: client.submit("instantid", json_body({"prompt": "a"})),
        safe=False,
        priority=Priority.SUBMIT,
        stats=stats,
        before_send=before_send,
    )

    assert isinstance(reply, Reply)
    assert (reply.status, reply.body) == (200, {"request_id": "r-1"})
    assert stats.retries == 2
    assert len(_sent(mocked, "POST", SUBMIT)) == 3
    assert granted == [1, 2, 3]  # each attempt went through the gate, after its grant


async def test_5xx_past_max_attempts_returns_the_last_answer(
    mocked: aioresponses, client: ApiClient, gate: RequestGate
) -> None:
    for _ in range(FAST.max_attempts):
        _answer(mocked, "GET", STATUS, 504, {"error": "Gateway timeout"})

    reply = await _call(gate, lambda: client.get(STATUS), safe=True)

    assert isinstance(reply, Reply)
    assert reply.status == 504
    assert len(_sent(mocked, "GET", STATUS)) == FAST.max_attempts


@pytest.mark.parametrize(
    ("status", "body"),
    [(422, {"status": "FAILED", "error": "No face detected"}), (400, {"error": "bad"})],
)
async def test_a_definite_answer_is_not_retried(
    mocked: aioresponses, client: ApiClient, gate: RequestGate, status: int, body: dict[str, Any]
) -> None:
    _answer(mocked, "GET", STATUS, status, body)

    reply = await _call(gate, lambda: client.get(STATUS), safe=True)

    assert isinstance(reply, Reply)
    assert reply.status == status
    assert len(_sent(mocked, "GET", STATUS)) == 1


async def test_429_waits_for_retry_after_through_the_gate_for_every_request(
    mocked: aioresponses, client: ApiClient, gate: RequestGate
) -> None:
    loop = asyncio.get_running_loop()
    sent_at: list[float] = []

    def record(url: URL, **kwargs: Any) -> None:
        sent_at.append(loop.time())

    mocked.add(
        STATUS,
        "GET",
        status=429,
        payload={"error": "Too many requests"},
        headers={"Retry-After": "0.6"},
        callback=record,
        response_class=_Response,
    )
    _answer(mocked, "GET", STATUS, 200, {"status": "PROCESSING"}, callback=record)
    stats = CallStats()

    task = asyncio.create_task(_call(gate, lambda: client.get(STATUS), safe=True, stats=stats))
    while not gate.limited:  # noqa: ASYNC110 -- the gate has no event for its 429s
        await asyncio.sleep(0.001)
    # Another request, even a result fetch, waits out the same pause: it is granted no
    # sooner than the pause allows after the 429'd request went out. (Timed from that
    # request, not from when this test got to ask: on a loaded machine that came late.)
    asked = loop.time()
    await gate.acquire(Priority.FETCH)
    other_granted = loop.time()
    reply = await task

    # Asked inside the pause (0.6 s leaves a loaded machine time): else the grant's time
    # below would hold whether the gate paused or not.
    assert asked - sent_at[0] < 0.6 - 0.05
    assert isinstance(reply, Reply)
    assert reply.status == 200
    assert stats.rate_limited == 1
    assert stats.retries == 0
    assert sent_at[1] - sent_at[0] >= 0.6 - 0.005
    assert other_granted - sent_at[0] >= 0.6 - 0.005
    assert gate.limited == 1
    assert gate.rate == pytest.approx(1000 * 0.7, rel=0.05)  # cut, creeping back on success


async def test_a_post_whose_connection_dropped_is_not_resent(
    mocked: aioresponses, client: ApiClient, gate: RequestGate
) -> None:
    mocked.post(SUBMIT, exception=aiohttp.ServerDisconnectedError())
    _answer(mocked, "POST", SUBMIT, 200, {"request_id": "r-2"})  # must stay unused
    stats = CallStats()

    result = await _call(
        gate,
        lambda: client.submit("instantid", json_body({"prompt": "a"})),
        safe=False,
        priority=Priority.SUBMIT,
        stats=stats,
    )

    assert isinstance(result, TransportError)
    assert result.maybe_sent is True
    assert len(_sent(mocked, "POST", SUBMIT)) == 1
    assert stats.retries == 0


async def test_a_get_whose_connection_dropped_is_retried(
    mocked: aioresponses, client: ApiClient, gate: RequestGate
) -> None:
    mocked.get(STATUS, exception=aiohttp.ServerDisconnectedError())
    mocked.get(STATUS, exception=aiohttp.ClientOSError(104, "Connection reset by peer"))
    _answer(mocked, "GET", STATUS, 200, {"status": "COMPLETED"})
    stats = CallStats()

    reply = await _call(gate, lambda: client.get(STATUS), safe=True, stats=stats)

    assert isinstance(reply, Reply)
    assert reply.body == {"status": "COMPLETED"}
    assert stats.retries == 2
    assert len(_sent(mocked, "GET", STATUS)) == 3


async def test_a_post_that_never_connected_is_retried(
    gate: RequestGate,
) -> None:
    """Nothing was sent, so sending again cannot create a second job."""
    attempts: list[int] = []

    async def send() -> Reply:
        attempts.append(1)
        if len(attempts) < 3:
            raise TransportError("cannot connect", maybe_sent=False)
        return Reply(200, {"request_id": "r-3"})

    reply = await _call(gate, send, safe=False, priority=Priority.SUBMIT)

    assert isinstance(reply, Reply)
    assert reply.body == {"request_id": "r-3"}
    assert len(attempts) == 3
