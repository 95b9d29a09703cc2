"""Segmind's v2 HTTP API over aiohttp, and the pure classification of its answers.

The API key lives only in the headers of each request; it is never stored in a
repr, formatted into a message, or attached to an exception.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from batcher.offload import run_sized

DEFAULT_BASE_URL = "https://api.segmind.com"
#: Largest API answer read. Status answers are tiny; a result with inline (base64)
#: images of several large samples is tens of MB. A hostile or broken server's endless
#: or decompression-bomb body stops here instead of filling the memory.
MAX_BODY_BYTES = 128 * 1024 * 1024
_CHUNK = 256 * 1024
#: Request bodies larger than this are encoded off the event loop and streamed (aiohttp
#: warns that a larger bytes body "might lock the event loop"); answers larger than this
#: are parsed off it.
LARGE_BODY_BYTES = 1024 * 1024
#: Seconds for a TCP connection to open. Past it nothing was sent: the request is tried
#: again, and a run whose every connection times out so stops as an outage.
CONNECT_TIMEOUT_S = 20.0


class Outcome(Enum):
    """What an API answer means for the job and the run."""

    OK = "ok"  # 2xx
    FAILED = "failed"  # the job ran and failed (422 with status FAILED)
    REJECTED = "rejected"  # 400 and other 4xx: permanent for this row
    NOT_FOUND = "not_found"  # 404: unknown model on submit; unknown/expired request id on GET
    AUTH = "auth"  # 401 / 403: stop the run
    NO_CREDITS = "no_credits"  # 406: stop submitting
    RATE_LIMITED = "rate_limited"  # 429: slow everyone down, try again
    RETRY = "retry"  # 5xx and 408: transient, try again after a backoff


def classify(status: int, body: Mapping[str, Any]) -> Outcome:
    """Map an HTTP status (and body) to an :class:`Outcome`; read the body whatever the code."""
    if body.get("status") == "FAILED":
        return Outcome.FAILED
    if 200 <= status < 300:
        return Outcome.OK
    if status == 429:
        return Outcome.RATE_LIMITED
    if status in (401, 403):
        return Outcome.AUTH
    if status == 406:
        return Outcome.NO_CREDITS
    if status == 404:
        return Outcome.NOT_FOUND
    if status == 408 or status >= 500:
        return Outcome.RETRY
    return Outcome.REJECTED


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: status, JSON body (or ``{"error": text}``), and headers."""

    status: int
    body: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def outcome(self) -> Outcome:
        return classify(self.status, self.body)

    def error_text(self) -> str:
        """The server's explanation, prefixed with the HTTP status."""
        detail = self.body.get("error") or self.body.get("detail") or self.body.get("message")
        if 300 <= self.status < 400 and not detail:
            detail = "a redirect, not followed: the API key is only ever sent to --base-url"
        return f"HTTP {self.status}: {detail}" if detail else f"HTTP {self.status}"


class TransportError(Exception):
    """No HTTP answer. ``maybe_sent``: the request may have reached the server."""

    def __init__(self, message: str, *, maybe_sent: bool) -> None:
        super().__init__(message)
        self.maybe_sent = maybe_sent


class ApiClient:
    """Submit, status and result calls. One attempt each: retrying is the caller's policy."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 60.0,
        connect_timeout_s: float | None = None,
    ) -> None:
        self._session = session
        # Every request goes through the rate gate and is counted. aiohttp otherwise sends
        # a GET again, unseen, when the server closed the reused connection under it: a
        # request the gate never granted and no count shows (3.10+; its own test client
        # turns it off the same way, there being no public switch).
        if "_retry_connection" in aiohttp.ClientSession.ATTRS:
            session._retry_connection = False
        self.base_url = base_url.rstrip("/")
        #: Seconds a request may take in all (a stopping run waits that long for a submit).
        self.timeout_s = timeout_s
        self.__key = api_key
        self._redact = _Redactor(api_key)
        # A TCP connect timeout of its own: past it aiohttp raises ConnectionTimeoutError,
        # which says nothing was sent. Under the total alone a connection that never opens
        # (a firewall dropping packets) ends in a bare TimeoutError, read as "maybe sent".
        # Not `connect`, which counts the wait for a free pooled connection too: a slow
        # API would then look unreachable.
        self._connect_s = min(connect_timeout_s or CONNECT_TIMEOUT_S, timeout_s)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self._connect_s)

    def __repr__(self) -> str:
        return f"ApiClient(base_url={self.base_url!r})"

    async def submit(self, model: str, body: bytes) -> Reply:
        """POST a job; ``body`` is its params as :func:`encode_params` makes them (once
        per row, not once per attempt)."""
        return await self._request("POST", f"{self.base_url}/v2/{model}", body)

    async def get(self, url: str) -> Reply:
        """GET a status or result URL, which must be on the base URL's host (see
        :func:`api_urls`): the key goes nowhere else."""
        if not same_origin(url, self.base_url):
            raise ValueError("refusing to send the API key to a URL off --base-url's host")
        return await self._request("GET", url, None)

    async def _request(self, method: str, url: str, body: bytes | None) -> Reply:
        headers = {"x-api-key": self.__key, "Accept": "application/json"}
        data: bytes | io.BytesIO | None = body
        if body is not None:
            headers["Content-Type"] = "application/json"
            if len(body) > LARGE_BODY_BYTES:  # aiohttp sends a stream in chunks
                data = io.BytesIO(body)
        try:
            # Redirects are not followed: aiohttp drops only Authorization on a redirect
            # to another host, and x-api-key would go with it.
            async with self._session.request(
                method,
                url,
                data=data,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                raw = await _read_capped(resp)
                if raw is None:
                    return Reply(
                        resp.status,
                        {"error": f"answer body over {MAX_BODY_BYTES / 2**20:g} MB, not read"},
                        resp.headers,
                    )
                # Should a server ever echo the key, it must not reach a message or a file.
                # A result with inline images is megabytes of JSON: parsed off the loop.
                answer = await run_sized(len(raw) > LARGE_BODY_BYTES, self._redact, raw)
                return Reply(resp.status, answer, resp.headers)
        except aiohttp.ClientConnectorError as exc:
            # The connection never opened: nothing was sent.
            raise TransportError(f"cannot connect: {exc.os_error}", maybe_sent=False) from None
        except aiohttp.ConnectionTimeoutError:
            raise TransportError(
                f"cannot connect: no connection within {self._connect_s:g} s", maybe_sent=False
            ) from None
        except aiohttp.InvalidURL:
            raise TransportError("cannot connect: not a valid URL", maybe_sent=False) from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            # Reset, disconnect or timeout after the request went out: it may have arrived.
            name = type(exc).__name__
            raise TransportError(f"connection lost ({name})", maybe_sent=True) from None


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes | None:
    """The (decompressed) body, or None past MAX_BODY_BYTES."""
    declared = resp.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        return None
    if declared is not None and "Content-Encoding" not in resp.headers:
        return await resp.read()  # exactly the declared length: the common, cheap case
    body = bytearray()  # chunked, or compressed: count what decompression yields
    async for chunk in resp.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return None
    return bytes(body)


class _Redactor:
    """An answer's body, decoded, with every echo of the key replaced by ``***``: as sent
    or in another letter case, JSON-escaped (``\\/``, ``\\"``, ``\\u00e9``), or base64;
    and every run of half the key or more (a server "masking" it as ``sk-AUDITSEC...``).

    The decoded strings (keys and values, at any depth) are rewritten only when the raw
    body holds a clue: the longest run of each form that JSON leaves unescaped, in any
    ASCII case. Ordinary answers pay one ``bytes.lower`` and a few substring searches.
    (A server escaping every plain letter as ``\\u0041`` would pass unseen: not an echo
    by mistake.)
    """

    def __init__(self, key: str) -> None:
        shortest = max(_MIN_FORM, (len(key) + 1) // 2)
        whole = {key, *_base64_forms(key.encode())}
        forms = whole | _runs(key, shortest)
        pattern = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
        self._text = re.compile(pattern, re.IGNORECASE)
        # Not right after a backslash: "***" there would break a JSON escape (a run of
        # the key from its '"' on, say), and the decoded walk finds such echoes anyway.
        self._raw = re.compile(rb"(?<!\\)(?:" + pattern.encode() + rb")", re.IGNORECASE)
        # Each run of the key that long holds one of its anchors: they are its clues.
        clued = whole | _anchors(key, shortest)
        runs = {max(_UNESCAPED.findall(form), key=len, default="").lower() for form in clued}
        self._always = "" in runs  # a form with no plain run: no cheap test, always walk
        # A run that holds another is found only where that one is: one search does both.
        self._clues = tuple(
            r.encode() for r in runs if r and not any(o != r and o in r for o in runs)
        )

    def __repr__(self) -> str:
        return "_Redactor()"  # its patterns spell out the key

    def __call__(self, raw: bytes) -> dict[str, Any]:
        if not self._always:
            lowered = raw.lower()
            for clue in self._clues:
                if clue in lowered:
                    break
            else:  # no clue: no form of the key can be in there
                return _parse_answer(raw)
        # Before decoding too, so a non-JSON body cut to 200 characters keeps no half key.
        body = _parse_answer(self._raw.sub(b"***", raw))
        todo: list[dict[Any, Any] | list[Any]] = [body]
        while todo:  # no recursion: a deeply nested answer cannot overflow the stack
            node = todo.pop()
            if isinstance(node, dict):
                items = list(node.items())
                node.clear()
                for name, value in items:  # JSON names are strings
                    scrubbed = self._text.sub("***", value) if isinstance(value, str) else value
                    node[self._text.sub("***", name)] = scrubbed
                    if isinstance(value, dict | list):
                        todo.append(value)
            else:
                for index, value in enumerate(node):
                    if isinstance(value, str):
                        node[index] = self._text.sub("***", value)
                    elif isinstance(value, dict | list):
                        todo.append(value)
        return body


#: Runs of characters JSON never escapes (all but ", \, /, control and non-ASCII).
_UNESCAPED = re.compile(r'[^"\\/\x00-\x1f\x7f-\U0010ffff]+')
#: Base64 forms shorter than this are not looked for: they would match ordinary text.
_MIN_FORM = 8

#: The shortest key a run accepts (preflight.api_key): a shorter one would be masked
#: wherever its letters meet in an answer, in the images' base64 too.
MIN_KEY_CHARS = _MIN_FORM


def _runs(key: str, shortest: int) -> set[str]:
    """Every run of the key's characters ``shortest`` long or more. Half the key (and
    _MIN_FORM at least) is enough: what is left of a key echoed in part is too little
    to keep it secret. A masked echo that keeps fewer (``sk-...cdef``) is left alone."""
    return {
        key[start:end]
        for start in range(len(key) - shortest + 1)
        for end in range(start + shortest, len(key) + 1)
    }


def _anchors(key: str, shortest: int) -> set[str]:
    """Runs of the key, about half ``shortest`` long, placed so that every run of
    ``shortest`` holds one: a few substring searches find all of them."""
    size = (shortest + 1) // 2
    step = shortest - size + 1
    return {key[start : start + size] for start in range(0, len(key) - size + 1, step)}


def _base64_forms(raw: bytes) -> set[str]:
    """The key's base64 text, standard and URL-safe, whole and without the characters
    that mix its last bits with whatever follows it in longer encoded data."""
    forms = set()
    for text in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()):
        forms |= {text, text[: len(raw) * 4 // 3]}
    return {f for f in forms if len(f) >= _MIN_FORM}


async def encode_params(params: Mapping[str, Any]) -> bytes:
    """A submit's JSON body: in a worker thread when its strings are megabytes (a local
    face photo goes as base64), else on the event loop."""
    heavy = sum(len(v) for v in params.values() if isinstance(v, str)) > LARGE_BODY_BYTES
    return await run_sized(heavy, json_body, params)


def json_body(params: Mapping[str, Any]) -> bytes:
    """``json.dumps(params)``, with long strings that need no escaping (base64 images)
    spliced in as they are: json.dumps scans and copies them holding the GIL (63 ms for
    11 MB), to escape nothing. Those keys come last; JSON objects have no order."""
    plain: dict[str, bytes] = {}
    for name, value in params.items():
        if isinstance(value, str) and len(value) > _SPLICE_CHARS and value.isascii():
            raw = value.encode("ascii")
            if not raw.translate(None, _JSON_PLAIN):  # nothing left: nothing to escape
                plain[name] = raw
    head = json.dumps({k: v for k, v in params.items() if k not in plain}).encode()
    if not plain:
        return head
    parts = [head[:-1]]  # without its closing brace
    sep = b", " if len(head) > 2 else b""  # head is "{}" when every value is spliced
    for name, raw in plain.items():
        parts += [sep, json.dumps(name).encode(), b': "', raw, b'"']
        sep = b", "
    parts.append(b"}")
    return b"".join(parts)


#: Strings longer than this are spliced into a body when they need no JSON escaping.
_SPLICE_CHARS = 64 * 1024
#: Bytes JSON writes as they are: printable ASCII but the quote and the backslash.
_JSON_PLAIN = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


def _parse_answer(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):  # RecursionError: nested absurdly deep
        return {"error": raw[:200].decode("utf-8", "replace").strip()}
    return body if isinstance(body, dict) else {"value": body}


def same_origin(url: str, base_url: str) -> bool:
    """Whether ``url`` is an absolute URL on the scheme, host and port of ``base_url``."""
    if url.startswith(base_url.rstrip("/") + "/"):  # under the base URL itself: every poll
        return True
    a, b = _origin(url), _origin(base_url)
    return a is not None and a == b


def _origin(url: str) -> tuple[str, str, int | None] | None:
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:  # a port that is not a number
        return None
    if not parts.hostname or scheme not in ("http", "https"):
        return None
    return scheme, parts.hostname, port


def origin(url: str) -> str | None:
    """``scheme://host:port`` of an absolute http(s) URL, lowercased and with the port
    always given; never its user info, path or query. None when it has no such origin."""
    parts = _origin(url)
    if parts is None:
        return None
    scheme, host, port = parts
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def api_urls(
    base_url: str, request_id: str, status_url: str | None, response_url: str | None
) -> tuple[str, str, bool]:
    """(status URL, result URL, replaced) for a request: the server's own URLs when they
    are on ``base_url``'s host, else the documented ``/v2/requests/{id}[/status]`` on
    ``base_url`` (``replaced`` True). The key is sent with every poll, so it must never
    follow a URL an answer names on another host, nor one a checkpoint kept from an
    earlier run against another base URL (or an emulator that is gone)."""
    base = f"{base_url.rstrip('/')}/v2/requests/{request_id}"
    if (
        status_url
        and response_url
        and same_origin(status_url, base_url)
        and same_origin(response_url, base_url)
    ):
        return status_url, response_url, False
    return f"{base}/status", base, True
