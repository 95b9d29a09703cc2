"""How many status requests per second the emulator serves on this machine.

Two set-ups, the same load: the emulator in its own process (``python -m batcher sim``,
as a test suite or a manual run would use it), then in this process beside the load
generator, for comparison. The load is ``--connections`` keep-alive connections polling
``GET /v2/requests/{id}/status`` of ``--jobs`` submitted jobs for ``--seconds``.
Only 127.0.0.1 is used; every loop is bounded; nothing is written but the figures::

    .venv/bin/python benchmarks/bench_sim.py [--seconds 5] [--connections 64] [--jobs 300]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import signal
import statistics
import sys
import time
from pathlib import Path

import aiohttp

from batcher.sim import SimConfig, SimServer

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-bench-0123456789"
HOST = "127.0.0.1"
PAYLOAD = {"prompt": "photo of a man", "face_image": "https://example.com/face.jpg"}
#: Emulator knobs for both set-ups: fast jobs, tiny images, no faults, no rate limit, and a
#: retention that outlives the run (time_scale shrinks it too: 3600 s would be 3.6 s).
SIM_ARGS = ["--time-scale", "0.001", "--image-size", "64x64", "--seed", "0", "--retention", "1e7"]
SIM_CONFIG = SimConfig(
    time_scale=0.001,
    image_size=(64, 64),
    seed=0,
    retention_s=1e7,
    api_keys=frozenset({KEY}),
)
#: A hard cap on requests per run, so the loop ends even if the clock misbehaves.
MAX_REQUESTS = 5_000_000
WARMUP_S = 0.5


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, where /proc tells (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Figures:
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    #: CPU seconds this process and the emulator's spent, when measurable.
    own_cpu: float
    sim_cpu: float | None = None

    def line(self, label: str, connections: int) -> str:
        ordered = sorted(self.latencies)
        p50 = ordered[len(ordered) // 2] * 1e3
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3
        mean = statistics.fmean(ordered) * 1e3
        cpu = f"load generator {self.own_cpu / self.seconds:.0%}"
        if self.sim_cpu is not None:
            cpu += f", emulator process {self.sim_cpu / self.seconds:.0%}"
        return (
            f"{label:<28} {self.requests / self.seconds:6.0f} status req/s   "
            f"p50 {p50:6.2f} ms   p99 {p99:6.2f} ms   mean {mean:6.2f} ms\n"
            f"{'':<28} {self.requests} requests, {self.errors} non-200, "
            f"{connections} connections, {self.seconds:.1f} s; CPU busy: {cpu}"
        )


async def _submit_all(http: aiohttp.ClientSession, base_url: str, jobs: int) -> list[str]:
    async def one() -> str:
        async with http.post(f"{base_url}/v2/instantid", json=PAYLOAD) as resp:
            resp.raise_for_status()
            body = await resp.json()
            return str(body["status_url"])

    return list(await asyncio.gather(*(one() for _ in range(jobs))))


async def _hammer(
    http: aiohttp.ClientSession, urls: list[str], connections: int, seconds: float
) -> Figures:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(first: int) -> None:
        nonlocal errors
        index = first
        while time.perf_counter() < deadline and len(latencies) < MAX_REQUESTS:
            t0 = time.perf_counter()
            async with http.get(urls[index % len(urls)]) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - t0)
            index += connections

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(i) for i in range(connections)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return Figures(len(latencies), errors, elapsed, latencies, cpu)


async def measure(
    base_url: str, *, jobs: int, connections: int, seconds: float, sim_pid: int | None = None
) -> Figures:
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, headers={"x-api-key": KEY}) as http:
        urls = await _submit_all(http, base_url, jobs)
        await _hammer(http, urls, connections, WARMUP_S)  # open the connections, warm caches
        before = None if sim_pid is None else _cpu_seconds(sim_pid)
        figures = await _hammer(http, urls, connections, seconds)
        after = None if sim_pid is None else _cpu_seconds(sim_pid)
    if before is None or after is None:
        return figures
    return dataclasses.replace(figures, sim_cpu=after - before)


async def in_own_process(*, jobs: int, connections: int, seconds: float) -> Figures:
    env = {k: v for k, v in os.environ.items() if k != "SEGMIND_API_KEY"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batcher",
        "sim",
        "--host",
        HOST,
        "--port",
        "0",
        "--api-key",
        KEY,
        *SIM_ARGS,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if found is None:
            raise RuntimeError(f"unexpected first line from `batcher sim`: {line!r}")
        return await measure(
            found[1], jobs=jobs, connections=connections, seconds=seconds, sim_pid=proc.pid
        )
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def in_this_process(*, jobs: int, connections: int, seconds: float) -> Figures:
    async with SimServer(SIM_CONFIG, host=HOST, port=0) as sim:
        return await measure(sim.base_url, jobs=jobs, connections=connections, seconds=seconds)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per set-up")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections")
    parser.add_argument("--jobs", type=int, default=300, help="jobs whose status is polled")
    args = parser.parse_args(argv)
    knobs = {"jobs": args.jobs, "connections": args.connections, "seconds": args.seconds}
    print(f"python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, {os.cpu_count()} CPUs")
    own = await in_own_process(**knobs)
    print(own.line("emulator in its own process", args.connections), flush=True)
    shared = await in_this_process(**knobs)
    print(shared.line("emulator in-process", args.connections), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
