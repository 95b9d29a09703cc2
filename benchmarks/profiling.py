"""Where a client's time goes: py-spy's raw (collapsed-stack) samples, summarised.

py-spy samples every thread of the child from outside (no instrumentation, so no
distortion of asyncio's many small calls, unlike a tracing profiler) and counts a
thread only while it is not idle. A sample of the main thread is time the event
loop was busy; worker-thread samples are file, image and SQLite work.

Samples are attributed to a *stage*: the outermost frame of batcher's own code
(``fetch.fetch_one``, ``poll.Poller.poll``...), refined for the request path
(``client._request`` is "HTTP request (aiohttp)"). Samples with no batcher frame
are the event loop itself: socket reads, aiohttp's response parsing callbacks,
``select``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

#: (substring of a frame, stage name), checked innermost-first: the first match wins.
_INNER_STAGES = (
    ("(batcher/client.py", "HTTP request via aiohttp (ApiClient._request)"),
    ("download (batcher/sink.py", "image download via aiohttp (sink.download)"),
    ("(batcher/gate.py", "rate gate (gate.py)"),
    ("(batcher/checkpoint.py", "checkpoint (checkpoint.py)"),
    ("(batcher/group_commit.py", "checkpoint (checkpoint.py)"),
    ("(batcher/jobs.py", "checkpoint (checkpoint.py)"),
    ("(batcher/listing.py", "manifest intake (intake.py)"),
    ("(batcher/schedule.py", "poll schedule maths (schedule.py)"),
    ("run_sync (anyio/to_thread.py", "hand-off to worker thread (anyio.to_thread)"),
    ("(batcher/results.py", "results.parquet writing (results.py)"),
    ("(batcher/intake.py", "manifest intake (intake.py)"),
    ("(batcher/manifest/", "manifest reading (manifest/)"),
    ("(batcher/progress.py", "summary (progress.py)"),
)
_OUTER_STAGES = (
    ("(batcher/fetch.py", "fetch stage other"),
    ("(batcher/poll.py", "poll stage other"),
    ("(batcher/feed.py", "submit stage other"),
    ("(batcher/submit.py", "submit stage other"),
    ("(batcher/pipeline.py", "pipeline bookkeeping"),
    ("(batcher/flight.py", "pipeline bookkeeping"),
    ("(batcher/run.py", "run setup/teardown"),
    ("(batcher/interrupt.py", "run setup/teardown"),
    ("(batcher/resume.py", "run setup/teardown"),
    ("(batcher/reconcile.py", "run setup/teardown"),
    ("(benchmarks/clients.py", "benchmark client code"),
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


def _thread_name(head: str) -> str:
    name = head.split(": ", 1)[1] if ": " in head else head
    if name.startswith("thread ("):
        return "other thread"
    if name.startswith("AnyIO worker"):
        return "AnyIO worker threads (image verify + write)"
    if name.startswith("checkpoint"):
        return "checkpoint thread (SQLite)"
    return name


def _library(frame: str) -> str:
    found = _FRAME.match(frame)
    path = found["file"] if found else frame
    top = path.split("/", 1)[0]
    if top.endswith(".py"):
        top = top[:-3]
    if top.startswith("<frozen"):
        return "import machinery"
    return top


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for needle, stage in _INNER_STAGES:
            if needle in frame:
                return stage
    for needle, stage in _OUTER_STAGES:  # the list's order decides, not the stack's
        if any(needle in frame for frame in frames):
            return stage
    if any(("(batcher/" in f) for f in frames):
        return "batcher other"
    return "event loop + aiohttp callbacks (no batcher frame)"


def summarize(raw: Path, *, top: int = 15) -> dict[str, Any]:
    """Shares of samples by thread, by stage (main thread), by library and by function
    (innermost frame) for a py-spy ``--format raw --threads`` file."""
    threads: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    worker_functions: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        head, *frames = stack.split(";")
        thread = _thread_name(head)
        threads[thread] += n
        if not frames:
            continue
        # py-spy --full-filenames is off: batcher's own files show as "batcher/x.py" only
        # when run from the repository; normalise both spellings.
        frames = [_normalise(f) for f in frames]
        if thread == "MainThread":
            stages[stage_of(frames)] += n
            libraries[_library(frames[-1])] += n
            functions[frames[-1]] += n
        elif "idle" not in thread:
            worker_functions[frames[-1]] += n
    main = threads.get("MainThread", 0)

    def share(counter: Counter[str], total: int) -> list[tuple[str, int, float]]:
        return [(k, v, round(v / total, 4) if total else 0.0) for k, v in counter.most_common(top)]

    return {
        "samples": sum(threads.values()),
        "threads": share(threads, sum(threads.values())),
        "main_thread_stages": share(stages, main),
        "main_thread_libraries": share(libraries, main),
        "main_thread_functions": share(functions, main),
        "worker_thread_functions": share(worker_functions, sum(worker_functions.values())),
    }


_BATCHER_FILES = (
    "client.py",
    "sink.py",
    "gate.py",
    "checkpoint.py",
    "group_commit.py",
    "jobs.py",
    "schedule.py",
    "results.py",
    "intake.py",
    "manifest/records.py",
    "manifest/rows.py",
    "manifest/preflight.py",
    "progress.py",
    "fetch.py",
    "poll.py",
    "feed.py",
    "submit.py",
    "pipeline.py",
    "flight.py",
    "run.py",
    "interrupt.py",
    "resume.py",
    "reconcile.py",
    "retry.py",
    "backoff.py",
    "inputs.py",
    "options.py",
)


def _normalise(frame: str) -> str:
    """py-spy shortens a path to its package part; batcher's files may show bare."""
    found = _FRAME.match(frame)
    if not found:
        return frame
    path = found["file"]
    if path in _BATCHER_FILES:
        return frame.replace(f"({path}", f"(batcher/{path}")
    return frame


def pyspy_record(pyspy: str | Path, raw: Path) -> tuple[str, ...]:
    """The py-spy command that samples a child (and its native threads) into ``raw``."""
    return (str(pyspy), "record", "-r", "100", "--nonblocking", "-f", "raw", "-t", "-F",
            "-o", str(raw), "--")  # fmt: skip
