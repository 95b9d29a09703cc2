"""The emulated Segmind HTTP API: v2 submit/status/result, v1 sync, output images.

Every API request passes the same gate, in the real service's likely order:
auth (401), rate limit (429), then the injected faults (slow, dropped, 5xx).
Debug routes live under ``/__sim/``, clearly outside the real API.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import heapq
import json
import math
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from batcher.schemas import ModelSpec, registry, validate
from batcher.sim.config import SimConfig
from batcher.sim.images import ImageCache, image_request
from batcher.sim.jobs import Job, JobTable
from batcher.sim.limits import Credits, SlidingWindow
from batcher.sim.outputs import Outputs
from batcher.sim.stats import SimStats

_GATEWAY_ERRORS = ((500, "Internal server error"), (502, "Bad gateway"), (504, "Gateway timeout"))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _key_id(key: str) -> str:
    """A stable, non-secret name for an API key (the key itself is never stored)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _is_image_value(value: str) -> bool:
    if value.startswith(("http://", "https://")):
        return True
    if value.startswith("data:image/") and ";base64," in value:
        value = value.split(",", 1)[1]
    try:
        return len(base64.b64decode(value, validate=True)) > 8
    except (binascii.Error, ValueError):
        return False


class Emulator:
    """The whole emulated service: state, knobs and the aiohttp application."""

    def __init__(
        self, config: SimConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or SimConfig()
        self.models: dict[str, ModelSpec] = registry()
        self.stats = SimStats()
        self.jobs = JobTable(self.config, clock)
        self.credits = Credits(self.config.credits_usd)
        self._clock = clock
        self._window = SlidingWindow(
            self.config.rate_limit, self.config.scaled(self.config.rate_period_s), clock
        )
        self._rng = random.Random(self.config.seed + 1)
        self._images = ImageCache()
        self.outputs = Outputs(
            lambda: self.config, images=self._images, stats=self.stats, clock=clock, rng=self._rng
        )
        #: Heap of (done_at, request_id, cost): jobs that will end FAILED, charged until then.
        self._refunds: list[tuple[float, str, float]] = []
        self._keys = (
            None if self.config.api_keys is None else {_key_id(k) for k in self.config.api_keys}
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v2/{model}", self._submit)
        app.router.add_get("/v2/requests/{rid}/status", self._status)
        app.router.add_get("/v2/requests/{rid}", self._result)
        app.router.add_post("/v1/{model}", self._sync)
        app.router.add_get("/outputs/{rid}/{name}", self.outputs.serve)
        app.router.add_get("/__sim/stats", self._stats)
        app.router.add_post("/__sim/credits", self._add_credits)
        return app

    # -- the gate ---------------------------------------------------------------------------

    async def _gate(self, request: web.Request, endpoint: str) -> web.Response | str:
        """Auth, rate limit and faults: a response that ends the request, or the key id."""
        key = request.headers.get("x-api-key", "")
        key_id = _key_id(key) if key else ""
        if not key or (self._keys is not None and key_id not in self._keys):
            self.stats.count(endpoint, 401)
            return _error(401, "Unauthorized: missing or invalid API key")
        verdict = self._window.hit(key_id)
        if not verdict.allowed:
            self.stats.count(endpoint, 429)
            return _error(
                429,
                "Too many requests: rate limit exceeded",
                self._rate_headers(verdict.retry_after),
            )
        cfg = self.config
        if cfg.slow_rate and self._rng.random() < cfg.slow_rate:
            await asyncio.sleep(cfg.scaled(cfg.slow_s))
        roll = self._rng.random()
        if roll < cfg.drop_rate:
            return "drop:" + key_id
        if roll < cfg.drop_rate + cfg.error_rate:
            status, message = self._rng.choice(_GATEWAY_ERRORS)
            self.stats.count(endpoint, status)
            return _error(status, message)
        return key_id

    def _rate_headers(self, wait: float) -> dict[str, str]:
        mode = self.config.rate_limit_headers
        headers: dict[str, str] = {}
        if mode in ("retry-after", "both"):
            # Whole seconds as HTTP says, unless time-scaled, where that would be far too coarse.
            # Always rounded up: a client that waits exactly this long must then pass.
            up = math.ceil(wait) if self.config.time_scale >= 1 else math.ceil(wait * 1e3) / 1e3
            headers["Retry-After"] = str(up) if self.config.time_scale >= 1 else f"{up:.3f}"
        if mode in ("reset-at", "both"):
            at = datetime.now(UTC) + timedelta(seconds=wait + 0.001)  # ms precision: round up
            headers["x-rate-limit-reset-at-utc"] = at.isoformat(timespec="milliseconds")
        return headers

    def _dropped(self, request: web.Request, endpoint: str) -> web.Response:
        self.stats.count(endpoint, "dropped")
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)  # never reaches the client

    # -- v2 ---------------------------------------------------------------------------------

    async def _submit(self, request: web.Request) -> web.Response:
        gate = await self._gate(request, "submit")
        if isinstance(gate, web.Response):
            return gate
        drop = gate.startswith("drop:")
        key_id = gate.removeprefix("drop:")
        if drop and self._rng.random() >= self.config.drop_after_accept:
            return self._dropped(request, "submit")
        outcome = await self._accept(request, key_id)
        if isinstance(outcome, web.Response):
            if drop:
                return self._dropped(request, "submit")
            self.stats.count("submit", outcome.status)
            return outcome
        if drop:
            self.stats.accepted_then_dropped += 1
            return self._dropped(request, "submit")
        self.stats.count("submit", 200)
        base = f"{request.scheme}://{request.host}/v2/requests/{outcome.request_id}"
        return web.json_response(
            {
                "request_id": outcome.request_id,
                "status": "QUEUED",
                "status_url": base + "/status",
                "response_url": base,
                "poll_url": base + "/status",
            }
        )

    async def _accept(self, request: web.Request, key_id: str) -> Job | web.Response:
        """Check model, body, parameters and credits; create the job, charged until it fails."""
        slug = request.match_info["model"]
        model = self.models.get(slug)
        if model is None:
            return _error(404, f"Model {slug} not found")
        params = await self._params(request, model)
        if isinstance(params, web.Response):
            return params
        # Charged at submit, whatever the job's fate (the service cannot know it yet).
        self._settle()
        if not self.credits.charge(model.cost_usd):
            return _error(406, "Insufficient credits: not enough credits to process request")
        canon = json.dumps([slug, params], sort_keys=True, default=str)
        digest = hashlib.sha256(canon.encode()).hexdigest()
        job = self.jobs.submit(
            model=model, params=model.with_defaults(params), key_id=key_id, digest=digest
        )
        self.stats.accept(key_id, digest, billed=job.error is None)
        if job.error is not None:
            heapq.heappush(self._refunds, (job.done_at, job.request_id, job.cost))
        self.outputs.add(job)
        return job

    def _settle(self) -> None:
        """Return the charge of every job that has ended FAILED: a FAILED job is not billed."""
        now = self._clock()
        while self._refunds and self._refunds[0][0] <= now:
            self.credits.add(heapq.heappop(self._refunds)[2])

    async def _params(
        self, request: web.Request, model: ModelSpec
    ) -> dict[str, Any] | web.Response:
        if request.content_type != "application/json":
            return _error(
                406, f"Unsupported Content-Type {request.content_type!r}: send application/json"
            )
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "Invalid request body: not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "Invalid request body: expected a JSON object")
        checked = validate(model, body)
        problems = [str(p) for p in checked.errors]
        for name in model.image_params:
            value = checked.params.get(name)
            if isinstance(value, str) and not _is_image_value(value):
                problems.append(f"{name} must be an image URL or base64 image data")
        if problems:
            return _error(400, "Invalid parameters: " + "; ".join(problems))
        return checked.params

    def _job(self, request: web.Request, endpoint: str) -> Job | web.Response:
        job = self.jobs.get(request.match_info["rid"])
        if job is None:
            self.stats.count(endpoint, 404)
            return _error(404, f"Request {request.match_info['rid']} not found")
        return job

    def _see(self, job: Job, state: str, now: float) -> None:
        if state in ("COMPLETED", "FAILED") and job.first_seen_done is None:
            job.first_seen_done = now
            self.stats.detection_lag.append(now - job.done_at)
            self.stats.polls_per_job.append(job.polls)

    async def _status(self, request: web.Request) -> web.Response:
        gate = await self._gate(request, "status")
        if isinstance(gate, web.Response):
            return gate
        if gate.startswith("drop:"):
            return self._dropped(request, "status")
        job = self._job(request, "status")
        if isinstance(job, web.Response):
            return job
        job.polls += 1
        now = self._clock()
        state = job.state(now)
        self._see(job, state, now)
        body: dict[str, Any] = {"request_id": job.request_id, "status": state, "metrics": {}}
        if state in ("COMPLETED", "FAILED"):
            body["metrics"] = job.metrics()
        return self._terminal_aware(body, job, "status")

    def _terminal_aware(self, body: dict[str, Any], job: Job, endpoint: str) -> web.Response:
        if body["status"] == "FAILED":
            body["error"] = job.error
            self.stats.count(endpoint, 422)
            return web.json_response(body, status=422)
        self.stats.count(endpoint, 200)
        return web.json_response(body)

    async def _result(self, request: web.Request) -> web.Response:
        gate = await self._gate(request, "result")
        if isinstance(gate, web.Response):
            return gate
        if gate.startswith("drop:"):
            return self._dropped(request, "result")
        job = self._job(request, "result")
        if isinstance(job, web.Response):
            return job
        now = self._clock()
        state = job.state(now)
        self._see(job, state, now)
        body: dict[str, Any] = {"request_id": job.request_id, "status": state, "metrics": {}}
        if state == "COMPLETED":
            body["output"] = await self.outputs.value(request, job)
            body["metrics"] = job.metrics()
        elif state == "FAILED":
            body["metrics"] = job.metrics()
        return self._terminal_aware(body, job, "result")

    # -- v1 sync, debug ------------------------------------------------------------

    async def _sync(self, request: web.Request) -> web.Response:
        gate = await self._gate(request, "sync")
        if isinstance(gate, web.Response):
            return gate
        if gate.startswith("drop:"):
            return self._dropped(request, "sync")
        job = await self._accept(request, gate)
        if isinstance(job, web.Response):
            self.stats.count("sync", job.status)
            return job
        await asyncio.sleep(max(0.0, job.done_at - self._clock()))
        if job.error:
            self.stats.count("sync", 422)
            return _error(422, job.error)
        req = image_request(job.model, job.params, job.seed, 0, self.config.image_size)
        data = await asyncio.to_thread(self._images.get_or_render, req)
        self.stats.count("sync", 200)
        return web.Response(body=data, content_type=req.mime)

    def snapshot(self) -> dict[str, Any]:
        """Stats plus live state, as ``GET /__sim/stats`` serves them."""
        self.jobs.expire()
        self._settle()
        snap = self.stats.snapshot(self.config.time_scale)
        snap.update(
            live_jobs=len(self.jobs),
            credits_remaining_usd=self.credits.remaining,
            time_scale=self.config.time_scale,
        )
        return snap

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def _add_credits(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._settle()
        self.credits.add(float(body.get("add_usd", 0)))
        return web.json_response({"credits_remaining_usd": self.credits.remaining})
