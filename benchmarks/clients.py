"""The clients a scenario measures, each run in its own process by ``common.run_client``::

    python -m benchmarks.clients MODE CONFIG_JSON

``batcher``  batcher's ``arun`` (optionally with a loop-lag probe, RSS samples, tracemalloc)
``bare``     a bare aiohttp loop: submit, status until done, result, image; no bookkeeping
``fixed``    the same loop polling status every ``interval_s`` from submit (a baseline)
``sdk``      the official ``segmind`` SDK's ``run()`` in a thread pool, then the image

Each prints one JSON line with its figures as its last line of stdout. Every loop is
bounded by a count and a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import threading
import time
import tracemalloc
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import KEY, payload


class ThreadCpu:
    """CPU seconds of each thread of this process, by thread name, from ``thread_time``
    read by the thread itself as it ends (exact, however short-lived; no sampling): where
    a client's CPU goes between its event loop and its worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_name: Counter[str] = Counter()
        self._main0 = 0.0
        self._main1: float | None = None
        # Not Thread.run: subclasses (anyio's workers) override it. Every thread runs
        # _bootstrap_inner (CPython's, private but unchanged since 3.0).
        original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

        def bootstrap(thread: threading.Thread) -> None:
            try:
                original(thread)
            finally:
                spent = time.thread_time()
                with self._lock:
                    self.by_name[_thread_kind(thread.name)] += spent

        threading.Thread._bootstrap_inner = bootstrap  # type: ignore[attr-defined]

    def begin(self) -> None:
        """The client's work starts (on the main thread): what ran before is not its."""
        with self._lock:
            self.by_name.clear()
        self._main0 = time.thread_time()
        self._main1 = None

    def end(self) -> None:
        """The client's work is over: the main thread's time stops here."""
        self._main1 = time.thread_time()

    def report(self, wait_s: float = 2.0) -> dict[str, float]:
        """Seconds by kind since :meth:`begin`: the calling (main) thread's, and every other's,
        after waiting up to ``wait_s`` for those told to stop (anyio's idle workers end
        on their own once the loop has gone). Those still running then are left out,
        and counted in ``still_running``."""
        deadline = time.monotonic() + wait_s
        for thread in threading.enumerate():
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        running = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        with self._lock:
            out = {kind: round(s, 3) for kind, s in self.by_name.items()}
        main1 = time.thread_time() if self._main1 is None else self._main1
        out["main"] = round(main1 - self._main0, 3)
        if running:
            out["still_running"] = float(len(running))
        return out


def _thread_kind(name: str) -> str:
    """checkpoint_0 -> checkpoint; AnyIO worker thread -> anyio workers; asyncio_3 -> ..."""
    if name.startswith("AnyIO worker"):
        return "anyio workers"
    return name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else "other"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_now_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {
        "n": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "p50": q(0.5),
        "p95": q(0.95),
        "p99": q(0.99),
        "max": ordered[-1],
    }


# --- batcher ----------------------------------------------------------------------------------


class LoopProbe:
    """How late the event loop wakes a task that asked to sleep ``period`` seconds."""

    def __init__(self, period: float = 0.01, max_samples: int = 200_000) -> None:
        self.period = period
        self.max_samples = max_samples
        self.samples: list[tuple[float, float]] = []  # (monotonic time, lag seconds)
        self.rss: list[tuple[float, float]] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_rss = 0.0
        while len(self.samples) < self.max_samples:
            t0 = loop.time()
            await asyncio.sleep(self.period)
            t1 = loop.time()
            self.samples.append((t1, t1 - t0 - self.period))
            if t1 - last_rss >= 0.5:
                last_rss = t1
                rss = _rss_now_mb()
                if rss is not None:
                    self.rss.append((t1, rss))


def _results_figures(results: Path | None) -> dict[str, Any]:
    """Throughput window and per-row polls from batcher's results.parquet."""
    if results is None or not results.exists():
        return {}
    import pyarrow.parquet as pq

    table = pq.read_table(
        results, columns=["status", "submitted_at", "completed_at", "polls", "notice_lag_s"]
    )
    rows = table.to_pydict()
    done = sorted(
        (s.timestamp(), c.timestamp(), p, lag)
        for st, s, c, p, lag in zip(
            rows["status"],
            rows["submitted_at"],
            rows["completed_at"],
            rows["polls"],
            rows["notice_lag_s"],
            strict=True,
        )
        if st == "COMPLETED" and s is not None and c is not None
    )
    if not done:
        return {"completed_rows": 0}
    first = done[0][0]
    last = max(c for _, c, _, _ in done)
    return {
        "completed_rows": len(done),
        "window_s": last - first,
        "completed_at": sorted(c - first for _, c, _, _ in done),
        "polls": [p for _, _, p, _ in done],  # in submit order
        # (submitted, completed seen, status polls, notice lag), seconds from the first submit
        "rows": [(s - first, c - first, p, lag) for s, c, p, lag in done],
    }


def _records_without_files(*, verify: bool) -> Any:
    """A stand-in for ``sink.write_images`` that writes no file: each image's record,
    after Pillow's full decode when ``verify``."""
    import batcher.sink

    def write_images(out: Path, items: Any) -> list[Any]:
        saved = []
        for row_id, index, data in items:
            width, height = batcher.sink._identify(data)[:2] if verify else (64, 64)
            saved.append(
                batcher.sink.SavedImage(
                    path=f"images/{row_id}_{index}.png",
                    width=width,
                    height=height,
                    format="png",
                    bytes=len(data),
                    sha256="",
                )
            )
        return saved

    return write_images


def _apply_ablations(names: list[str]) -> None:
    """What-if experiments: switch one cost of batcher off in this process only, to
    measure what it costs. Never used for a headline figure."""
    import batcher.image_writer
    import batcher.sink
    from batcher.checkpoint import Checkpoint

    for name in names:
        if name == "no_fsync":  # images verified and written in place, never flushed

            def write_all(files: Any) -> list[None]:
                for final, data in files:
                    with open(final, "wb") as handle:
                        handle.write(data)
                return [None] * len(files)

            batcher.sink.write_all = write_all  # type: ignore[attr-defined]
        elif name == "verify_only":  # Pillow's full decode on the worker thread, no file
            batcher.image_writer.write_images = _records_without_files(verify=True)  # type: ignore[attr-defined]
        elif name == "no_image_save":  # no check, no file: the download only
            batcher.image_writer.write_images = _records_without_files(verify=False)  # type: ignore[attr-defined]
        elif name == "no_image_check":  # files written as shipped, the bytes not checked
            batcher.sink._identify = lambda data: (64, 64, "PNG")  # type: ignore[attr-defined]
        elif name == "no_image_files":  # bytes checked as shipped, no file made

            def no_files(files: Any) -> list[None]:
                return [None] * len(files)

            batcher.sink.write_all = no_files  # type: ignore[attr-defined]
            batcher.sink._fsync_dir = lambda folder: None  # type: ignore[attr-defined]
        elif name == "no_checkpoint_updates":  # row transitions are not written

            async def update(self: Checkpoint, job_id: str, **fields: Any) -> None:
                return None

            Checkpoint.update = update  # type: ignore[method-assign]
        elif name == "switch_1ms":  # the GIL handed over every 1 ms instead of 5 ms
            sys.setswitchinterval(0.001)
        else:
            raise ValueError(f"unknown ablation {name!r}")


async def _batcher(cfg: dict[str, Any]) -> dict[str, Any]:
    from batcher.gate import parse_rate
    from batcher.options import RunOptions
    from batcher.run import arun

    _apply_ablations(list(cfg.get("ablations", [])))

    options = RunOptions(
        manifest=Path(cfg["manifest"]),
        out=Path(cfg["out"]),
        model=cfg.get("model"),
        base_url=cfg["base_url"],
        rate=parse_rate(cfg.get("rate", "100000/s")),
        max_in_flight=int(cfg.get("max_in_flight", 1000)),
        time_scale=cfg.get("time_scale"),
        progress=False,
        log_every_s=1e9,
        api_key=KEY,
    )
    if "submit_concurrency" in cfg:
        options = replace(options, submit_concurrency=int(cfg["submit_concurrency"]))
    if "retention_s" in cfg:  # the emulator's, when a scenario changes it
        options = replace(options, poll=replace(options.poll, retention_s=cfg["retention_s"]))
    if cfg.get("tracemalloc"):
        tracemalloc.start()
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    interrupted_at: list[float] = []

    memory: list[Any] = []

    def on_sigint() -> None:
        if not interrupted.is_set():
            interrupted_at.append(loop.time())
            if cfg.get("tracemalloc"):
                memory.append(_memory_by_line())
            interrupted.set()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
    probe = LoopProbe() if cfg.get("loop_probe") else None
    probe_task = asyncio.create_task(probe.run()) if probe else None
    start = loop.time()
    cpu0 = time.process_time()
    THREADS.begin()
    result = await arun(options, interrupted=interrupted)
    elapsed = loop.time() - start
    cpu = time.process_time() - cpu0
    THREADS.end()
    if probe_task is not None:
        probe_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe_task
    summary = result.summary
    report: dict[str, Any] = {
        "mode": "batcher",
        "exit_code": result.exit_code,
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "counts": summary.counts if summary else {},
        "completed_this_run": summary.completed_this_run if summary else 0,
        "api_requests": summary.api_requests if summary else 0,
        "rate_limited": summary.rate_limited if summary else 0,
        "poll_late_s": list(summary.poll_late) if summary and summary.poll_late else None,
        "polls_fell_behind": summary.polls_fell_behind if summary else None,
        "stop_reason": result.stop_reason,
        "peak_rss_mb": _peak_rss_mb(),
    }
    if memory:
        report["tracemalloc"] = memory[0]
    if interrupted_at:
        report["interrupted_after_s"] = interrupted_at[0] - start
        report["stop_took_s"] = loop.time() - interrupted_at[0]
    if cfg.get("results_figures", True):
        report["results"] = _results_figures(result.results)
    if probe is not None:
        report["loop_lag"] = [(t - start, lag) for t, lag in probe.samples]
        report["rss_timeline"] = [(t - start, r) for t, r in probe.rss]
    return report


def _memory_by_line(top: int = 15) -> dict[str, Any]:
    """Python-allocated bytes alive now, by the source line that allocated them."""
    snapshot = tracemalloc.take_snapshot()
    stats = snapshot.statistics("lineno")
    return {
        "traced_mb": sum(s.size for s in stats) / 2**20,
        "top": [
            (f"{_short(s.traceback[0].filename)}:{s.traceback[0].lineno}", s.size, s.count)
            for s in stats[:top]
        ],
    }


def _dump_tasks() -> None:
    """SIGUSR1: where every task waits, and the run's counters (to diagnose a hang)."""
    seen_ctx = False
    for task in asyncio.all_tasks():
        frames = task.get_stack()
        where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames))
        print(f"task {task.get_name()}: {where}", file=sys.stderr)
        for frame in frames:
            ctx = frame.f_locals.get("ctx")
            if ctx is not None and not seen_ctx and hasattr(ctx, "active"):
                seen_ctx = True
                print(
                    f"ctx: active={ctx.active} in_flight={ctx.in_flight} "
                    f"feed_done={ctx.feed_done} flights={len(ctx.flights)} "
                    f"requeued={len(ctx.requeued)} on_wire={ctx.on_wire} "
                    f"counters={ctx.counters}",
                    file=sys.stderr,
                )
    sys.stderr.flush()


def _short(path: str | None) -> str:
    if not path:
        return "?"
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# --- bare aiohttp loop and the fixed-interval poller --------------------------------------------


async def _loop_client(cfg: dict[str, Any], *, interval: float | None) -> dict[str, Any]:
    base = cfg["base_url"]
    model = cfg.get("model", "instantid")
    n = int(cfg["n"])
    concurrency = int(cfg.get("concurrency", 256))
    max_polls = int(cfg.get("max_polls", 100_000))
    deadline_s = float(cfg.get("deadline_s", 600))
    headers = {"x-api-key": KEY, "Accept": "application/json"}
    connector = aiohttp.TCPConnector(limit=int(cfg.get("connector_limit", 256)))
    requests: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    polls: list[int] = []
    status_rtt: list[float] = []
    latencies: list[float] = []  # the server's total_time of each job, wall seconds
    next_row = 0
    done = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    end_by = start + deadline_s

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        nonlocal done
        async with http.post(f"{base}/v2/{model}", json=payload(model, i)) as resp:
            requests["submit"] += 1
            body = await resp.json()
            if resp.status != 200:
                errors[f"submit {resp.status}"] += 1
                return
        count = 0
        while count < max_polls and loop.time() < end_by:
            if interval is not None:
                await asyncio.sleep(interval)
            t0 = loop.time()
            async with http.get(body["status_url"]) as resp:
                state = (await resp.json()).get("status")
            status_rtt.append(loop.time() - t0)
            requests["status"] += 1
            count += 1
            if state in ("COMPLETED", "FAILED"):
                break
        polls.append(count)
        async with http.get(body["response_url"]) as resp:
            result = await resp.json()
            requests["result"] += 1
        total_time = (result.get("metrics") or {}).get("total_time")
        if isinstance(total_time, int | float):
            latencies.append(float(total_time))
        output = result.get("output")
        for url in output if isinstance(output, list) else [output]:
            async with http.get(url) as resp:
                await resp.read()
                requests["image"] += 1
        done += 1

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal next_row
        while next_row < n and loop.time() < end_by:
            i = next_row
            next_row += 1
            try:
                await one(http, i)
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
                errors[type(exc).__name__] += 1

    cpu0 = time.process_time()
    THREADS.begin()
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        await asyncio.gather(*(worker(http) for _ in range(min(concurrency, n))))
    elapsed = loop.time() - start
    THREADS.end()
    return {
        "mode": "fixed" if interval is not None else "bare",
        "completed": done,
        "elapsed_s": elapsed,
        "cpu_s": time.process_time() - cpu0,
        "jobs_per_s": done / elapsed if elapsed > 0 else None,
        "requests": dict(requests),
        "errors": dict(errors),
        "polls": polls,
        "status_rtt_s": _summary(status_rtt),
        "latencies": latencies,
        "peak_rss_mb": _peak_rss_mb(),
    }


# --- the official SDK in a thread pool ----------------------------------------------------------


def _sdk(cfg: dict[str, Any]) -> dict[str, Any]:
    import httpx
    import segmind

    base = cfg["base_url"]
    model = cfg.get("model", "instantid")
    n = int(cfg["n"])
    threads = int(cfg.get("threads", 64))
    deadline = time.monotonic() + float(cfg.get("deadline_s", 600))
    local = threading.local()
    lock = threading.Lock()
    outcomes: Counter[str] = Counter()
    next_row = iter(range(n))
    first_error: list[str] = []

    def clients() -> tuple[Any, httpx.Client]:
        if not hasattr(local, "sdk"):
            local.sdk = segmind.SegmindClient(api_key=KEY, base_url=base + "/v1")
            local.http = httpx.Client(timeout=30)
        return local.sdk, local.http

    def worker() -> None:
        sdk, http = clients()
        while time.monotonic() < deadline:
            with lock:
                i = next(next_row, None)
            if i is None:
                return
            try:
                body = sdk.run(model, **payload(model, i))
                output = body.get("output")
                for url in output if isinstance(output, list) else [output]:
                    http.get(url).raise_for_status()
                key = "ok"
            except Exception as exc:  # the SDK raises on 429, 5xx, timeouts: count them all
                status = getattr(exc, "status", None)
                key = f"{type(exc).__name__}" + (f" {status}" if status else "")
                if not first_error:
                    first_error.append(f"{key}: {getattr(exc, 'detail', exc)}"[:200])
            with lock:
                outcomes[key] += 1

    start = time.monotonic()
    cpu0 = time.process_time()
    THREADS.begin()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(worker) for _ in range(threads)]:
            future.result()
    elapsed = time.monotonic() - start
    THREADS.end()
    ok = outcomes.get("ok", 0)
    return {
        "mode": "sdk",
        "completed": ok,
        "elapsed_s": elapsed,
        "cpu_s": time.process_time() - cpu0,
        "jobs_per_s": ok / elapsed if elapsed > 0 else None,
        "outcomes": dict(outcomes),
        "first_error": first_error[0] if first_error else None,
        "peak_rss_mb": _peak_rss_mb(),
    }


#: Installed before any client starts a thread.
THREADS = ThreadCpu()


def main(argv: list[str]) -> int:
    mode, cfg = argv[0], json.loads(argv[1])
    if cfg.get("switch_interval"):  # an experiment knob: the GIL hand-off interval
        sys.setswitchinterval(float(cfg["switch_interval"]))
    if mode == "batcher":
        report = asyncio.run(_batcher(cfg))
    elif mode == "bare":
        report = asyncio.run(_loop_client(cfg, interval=None))
    elif mode == "fixed":
        report = asyncio.run(_loop_client(cfg, interval=float(cfg["interval_s"])))
    elif mode == "sdk":
        report = _sdk(cfg)
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    report["pid"] = os.getpid()
    # After asyncio.run: its default executor's threads (DNS lookups) have been joined.
    # The SDK's pool threads ended with its ``with`` block.
    report["thread_cpu_s"] = THREADS.report()
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
