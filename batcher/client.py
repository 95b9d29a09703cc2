"""Segmind's v2 HTTP API over aiohttp, and the pure classification of its answers.

The API key lives only in the headers of each request; it is never stored in a
repr, formatted into a message, or attached to an exception.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import aiohttp

DEFAULT_BASE_URL = "https://api.segmind.com"


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
    ) -> None:
        self._session = session
        self.base_url = base_url.rstrip("/")
        self.__key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    def __repr__(self) -> str:
        return f"ApiClient(base_url={self.base_url!r})"

    async def submit(self, model: str, params: Mapping[str, Any]) -> Reply:
        return await self._request("POST", f"{self.base_url}/v2/{model}", params)

    async def get(self, url: str) -> Reply:
        return await self._request("GET", url, None)

    async def _request(self, method: str, url: str, payload: Mapping[str, Any] | None) -> Reply:
        headers = {"x-api-key": self.__key, "Accept": "application/json"}
        try:
            async with self._session.request(
                method, url, json=payload, headers=headers, timeout=self._timeout
            ) as resp:
                # Should a server ever echo the key, it must not reach a message or a file.
                raw = (await resp.read()).replace(self.__key.encode(), b"***")
                return Reply(resp.status, _json_body(raw), resp.headers)
        except aiohttp.ClientConnectorError as exc:
            # The connection never opened: nothing was sent.
            raise TransportError(f"cannot connect: {exc.os_error}", maybe_sent=False) from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            # Reset, disconnect or timeout after the request went out: it may have arrived.
            name = type(exc).__name__
            raise TransportError(f"connection lost ({name})", maybe_sent=True) from None


def _json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        return {"error": raw[:200].decode("utf-8", "replace").strip()}
    return body if isinstance(body, dict) else {"value": body}
