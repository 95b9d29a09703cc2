"""The emulated service's output images: the ``output`` field of a result, and the links
it names (public, no key, as Segmind's are).

Knobs (see :class:`batcher.sim.config.SimConfig`): links kept ``output_retention_s``
after submit, answering 404 for ``output_delay_s`` after the job completed, signed and
expiring ``output_link_ttl_s`` after the result read that named them (403 after), and a
fraction of downloads cut short (``truncate_rate``).
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import hmac
import random
import secrets
from collections.abc import Callable

from aiohttp import web

from batcher.sim.config import SimConfig
from batcher.sim.images import ImageCache, image_request
from batcher.sim.jobs import Job
from batcher.sim.stats import SimStats


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Outputs:
    """Jobs whose outputs may be asked for, until their links expire."""

    def __init__(
        self,
        config: Callable[[], SimConfig],
        *,
        images: ImageCache,
        stats: SimStats,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self._config = config  # read at each request: tests change the emulator's config
        self._images = images
        self._stats = stats
        self._clock = clock
        self._rng = rng
        self._jobs: dict[str, Job] = {}
        self._expiry: list[tuple[float, str]] = []
        #: Signs output links when they expire (``output_link_ttl_s``).
        self._key = secrets.token_bytes(16)

    def add(self, job: Job) -> None:
        """A job accepted: its outputs are served (once it completes) until they expire."""
        self._jobs[job.request_id] = job
        expires = job.submitted_at + self._config().scaled(self._config().output_retention_s)
        heapq.heappush(self._expiry, (expires, job.request_id))

    async def value(self, request: web.Request, job: Job) -> str | list[str]:
        """The ``output`` of a COMPLETED job's result: a link per sample, or base64."""
        config = self._config()
        out = job.model.output
        samples = int(job.params.get(out.samples_param or "", 1))
        inline = bool(job.params.get(out.base64_param or "", False))
        items: list[str] = []
        for index in range(samples):
            req = image_request(job.model, job.params, job.seed, index, config.image_size)
            if inline:
                data = await asyncio.to_thread(self._images.get_or_render, req)
                b64 = base64.b64encode(data).decode()
                items.append(
                    f"data:{req.mime};base64,{b64}" if config.base64_style == "data-url" else b64
                )
            else:
                path = f"/outputs/{job.request_id}/{index}.{req.fmt}"
                items.append(f"{request.scheme}://{request.host}{path}{self._signed(path)}")
        if len(items) == 1 and not config.single_output_as_list:
            return items[0]
        return items

    def _signature(self, path: str, expires: str) -> str:
        return hmac.new(self._key, f"{path}:{expires}".encode(), "sha256").hexdigest()[:32]

    def _signed(self, path: str) -> str:
        """The query that signs an output link until ``output_link_ttl_s`` from now ("" when
        links are plain), as a storage bucket's signed URLs do."""
        config = self._config()
        if config.output_link_ttl_s is None:
            return ""
        expires = f"{self._clock() + config.scaled(config.output_link_ttl_s):.6f}"
        return f"?Expires={expires}&Signature={self._signature(path, expires)}"

    def _refused(self, request: web.Request, now: float) -> web.Response | None:
        """403 for a signed link that is expired or forged, as a bucket answers."""
        if self._config().output_link_ttl_s is None:
            return None
        expires = request.query.get("Expires", "")
        given = request.query.get("Signature", "")
        if not hmac.compare_digest(given, self._signature(request.path, expires)):
            return _error(403, "Access denied: the signature does not match")
        if float(expires) < now:  # signed by us, so a number
            return _error(403, "Access denied: the request has expired")
        return None

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """``GET /outputs/{rid}/{name}``: the image bytes, or why not."""
        config = self._config()
        now = self._clock()
        refused = self._refused(request, now)
        if refused is not None:
            self._stats.count("output", 403)
            return refused
        while self._expiry and self._expiry[0][0] <= now:
            self._jobs.pop(heapq.heappop(self._expiry)[1], None)
        job = self._jobs.get(request.match_info["rid"])
        stem = request.match_info["name"].split(".", 1)[0]
        out = job.model.output if job else None
        samples = int(job.params.get(out.samples_param or "", 1)) if job and out else 0
        if (
            job is None
            or job.state(now) != "COMPLETED"
            or not stem.isdigit()
            or int(stem) >= samples
            or now < job.done_at + config.scaled(config.output_delay_s)  # not on the CDN yet
        ):
            self._stats.count("output", 404)
            return _error(404, "Not found")
        req = image_request(job.model, job.params, job.seed, int(stem), config.image_size)
        data = await asyncio.to_thread(self._images.get_or_render, req)
        if config.truncate_rate and self._rng.random() < config.truncate_rate:
            self._stats.count("output", "truncated")
            resp = web.StreamResponse(headers={"Content-Type": req.mime})
            resp.content_length = len(data)
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            if request.transport is not None:
                request.transport.abort()
            return resp
        self._stats.count("output", 200)
        return web.Response(body=data, content_type=req.mime)
