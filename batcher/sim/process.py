"""The emulator in a child process, for tests and benchmarks that must outlive a client."""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_PREFIX = "batcher sim listening on "


@dataclass(frozen=True)
class SimProcess:
    """A running ``batcher sim`` child: its base URL and its live counters."""

    base_url: str
    process: subprocess.Popen[str]

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.base_url + "/__sim/stats", timeout=10) as resp:
            data: dict[str, Any] = json.load(resp)
            return data


@contextlib.contextmanager
def sim_process(*args: str, start_timeout_s: float = 20.0) -> Iterator[SimProcess]:
    """Start ``python -m batcher sim --port 0 ARGS...`` and stop it on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "batcher", "sim", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = _read_url(proc, start_timeout_s)
        yield SimProcess(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _read_url(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(_PREFIX):
                return line[len(_PREFIX) :].strip()
            if not line and proc.poll() is not None:
                break
    raise RuntimeError(f"batcher sim did not start (exit code {proc.poll()})")
