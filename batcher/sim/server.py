"""Run the emulator on a real socket: in-process (async context manager) or as `batcher sim`."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from batcher.sim.app import Emulator
from batcher.sim.config import SimConfig

log = logging.getLogger(__name__)


class SimServer:
    """The emulator listening on ``host:port`` (port 0 picks a free one)::

    async with SimServer(SimConfig(time_scale=0.001)) as sim:
        client = SegmindClient(api_key=key, base_url=sim.base_url + "/v1")
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        middlewares: Sequence[Middleware] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``middlewares`` (aiohttp's) see every request first and may record or change
        the answers: how tests play a hostile or broken API. ``clock`` (seconds) is what
        job timelines are read against: a test may hold it still."""
        self.emulator = Emulator(config, clock=clock)
        self._host = host
        self._port = port
        self._middlewares = tuple(middlewares)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the emulator is not running")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def config(self) -> SimConfig:
        return self.emulator.config

    def stats(self) -> dict[str, Any]:
        return self.emulator.snapshot()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET)
        try:  # bound first: an address that cannot be had leaves nothing to clean up
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
        except BaseException:
            sock.close()
            raise
        # access_log=None: a line per request would cost more than the request itself.
        # shutdown_timeout: a stopped emulator drops what is in flight within a second
        # (aiohttp's default waits up to 60 s; a test double must not hold up teardown).
        app = self.emulator.app()
        app.middlewares.extend(self._middlewares)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.SockSite(self._runner, sock, backlog=1024)
        await site.start()
        self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve(config: SimConfig, host: str, port: int) -> None:
    """Serve until cancelled, printing the base URL first (scripts read that line)."""
    async with SimServer(config, host=host, port=port) as sim:
        print(f"batcher sim listening on {sim.base_url}", flush=True)
        await asyncio.Event().wait()
