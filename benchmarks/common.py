"""What every scenario shares: the emulator in its own process, measured child processes,
manifests, and the machine's description.

Only 127.0.0.1 is used. Every child process runs under a deadline and is killed past it;
every wait loop is bounded in time.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
KEY = "sk-bench-0123456789"
HOST = "127.0.0.1"
#: A face image URL: passed through by batcher and the baselines, never fetched.
FACE_URL = "https://example.com/face.jpg"
_LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


def child_env(root: Path = ROOT) -> dict[str, str]:
    """The environment of every child: this one, with the benchmark key and no real key,
    importing batcher from ``root`` (this tree, or another one an A/B compares)."""
    env = {k: v for k, v in os.environ.items() if k != "SEGMIND_API_KEY"}
    env["SEGMIND_API_KEY"] = KEY
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --- the machine ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU, memory, Python and the git commit, for the results header."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem_gb = round(kb / 1024 / 1024, 1)
    commit = "unknown"
    dirty = False
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "batcher"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        dirty = bool(status.strip())
    versions = {}
    for name in ("aiohttp", "anyio", "aiolimiter", "pyarrow", "segmind", "httpx", "pyinstrument"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[name] = version(name)
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": mem_gb,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "commit": commit,
        "batcher_tree_dirty": dirty,
        "versions": versions,
    }


# --- measured child processes -----------------------------------------------------------------


@dataclass
class ChildResult:
    """How a child process ended, what it printed, and what it cost (from ``wait4``)."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    user_s: float
    sys_s: float
    max_rss_mb: float
    timed_out: bool = False

    def last_json(self) -> dict[str, Any]:
        """The last line of stdout that is a JSON object (a client's report)."""
        for line in reversed(self.stdout.strip().splitlines()):
            if line.startswith("{"):
                data: dict[str, Any] = json.loads(line)
                return data
        raise RuntimeError(
            f"child printed no JSON report (exit {self.returncode}, timed out "
            f"{self.timed_out}); stderr tail:\n{self.stderr[-2000:]}"
        )


def run_measured(
    argv: Sequence[str],
    *,
    timeout_s: float,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    interrupt_after_s: float | None = None,
    watch: Callable[[float], bool] | None = None,
    watch_every_s: float = 0.25,
    dump_signal: int | None = None,
) -> ChildResult:
    """Run a child to its end (SIGINT after ``interrupt_after_s`` or once ``watch(elapsed)``
    says so, SIGKILL past ``timeout_s``); its peak RSS and CPU come from ``wait4``, so they
    are its own. ``watch`` is called every ``watch_every_s`` while the child runs."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), stdout=out, stderr=err, env=env or child_env(), cwd=cwd, text=True
        )
        timed_out = interrupted = False
        status = 0
        rusage = None
        last_watch = 0.0
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            elapsed = time.perf_counter() - start
            wants_stop = interrupt_after_s is not None and elapsed > interrupt_after_s
            if watch is not None and elapsed - last_watch >= watch_every_s:
                last_watch = elapsed
                wants_stop = watch(elapsed) or wants_stop
            if wants_stop and not interrupted:
                proc.send_signal(signal.SIGINT)
                interrupted = True
            if elapsed > timeout_s and not timed_out:
                if dump_signal is not None:  # ask a hung client where it waits, then kill it
                    proc.send_signal(dump_signal)
                    time.sleep(2.0)
                proc.kill()
                timed_out = True
            time.sleep(0.02)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return ChildResult(
            returncode=proc.returncode,
            stdout=out.read(),
            stderr=err.read(),
            wall_s=wall,
            user_s=rusage.ru_utime,
            sys_s=rusage.ru_stime,
            max_rss_mb=rusage.ru_maxrss / 1024,
            timed_out=timed_out,
        )


class ClientHung(RuntimeError):
    """A client did not finish within its deadline; ``dump`` is where its tasks waited."""

    def __init__(self, mode: str, timeout_s: float, dump: str) -> None:
        super().__init__(f"{mode} client did not finish within {timeout_s:.0f} s")
        self.mode = mode
        self.dump = dump


def run_client(
    mode: str,
    config: dict[str, Any],
    *,
    timeout_s: float,
    watch: Callable[[float], bool] | None = None,
    prefix: Sequence[str] = (),
    python: Sequence[str] = (PYTHON,),
    root: Path = ROOT,
) -> dict[str, Any]:
    """Run ``python -m benchmarks.clients MODE CONFIG`` (after ``prefix``, e.g. a profiler;
    ``python`` may carry options, e.g. ``-m cProfile``) from the tree at ``root``, and
    return its report, with the child's own peak RSS and CPU added."""
    child = run_measured(
        [*prefix, *python, "-m", "benchmarks.clients", mode, json.dumps(config)],
        timeout_s=timeout_s,
        env=child_env(root),
        cwd=root,
        watch=watch,
        dump_signal=signal.SIGUSR1 if mode == "batcher" and not prefix else None,
    )
    if child.timed_out:
        raise ClientHung(mode, timeout_s, child.stderr[-8000:])
    report = child.last_json()
    report["process"] = {
        "wall_s": round(child.wall_s, 3),
        "cpu_s": round(child.user_s + child.sys_s, 3),
        "max_rss_mb": round(child.max_rss_mb, 1),
        "returncode": child.returncode,
    }
    return report


# --- the emulator -----------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: Clock ticks of every CPU so far: (busy, stolen, total); see :func:`machine_ticks`.
Ticks = tuple[int, int, int]


def machine_ticks() -> Ticks | None:
    """Clock ticks of every CPU so far, (busy, stolen, total), from /proc/stat: idle and
    iowait are not busy; steal is (the CPU was not ours to use), and is counted apart:
    on a shared virtual machine the host takes a varying share, which slows a round."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    total = sum(fields[:8])  # guest time is counted in user already
    return total - fields[3] - fields[4], fields[7], total


def busy_share(before: Ticks | None, after: Ticks | None) -> float | None:
    """The share of all CPUs' time that was busy between two :func:`machine_ticks`."""
    return _tick_share(before, after, 0)


def stolen_share(before: Ticks | None, after: Ticks | None) -> float | None:
    """The share of all CPUs' time the host took between two :func:`machine_ticks`."""
    return _tick_share(before, after, 1)


def _tick_share(before: Ticks | None, after: Ticks | None, field: int) -> float | None:
    if before is None or after is None or after[2] <= before[2]:
        return None
    return (after[field] - before[field]) / (after[2] - before[2])


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Emulator:
    """A running ``python -m batcher sim`` child."""

    base_url: str
    proc: subprocess.Popen[bytes]
    args: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.base_url + "/__sim/stats", timeout=30) as resp:
            data: dict[str, Any] = json.load(resp)
        return data

    def cpu_s(self) -> float | None:
        return _cpu_seconds(self.proc.pid)

    def peak_rss_mb(self) -> float | None:
        return _rss_mb(self.proc.pid)


@contextlib.contextmanager
def emulator(*args: str, start_timeout_s: float = 30.0) -> Iterator[Emulator]:
    """``python -m batcher sim --port 0 ARGS`` in its own process, stopped on exit."""
    argv = [PYTHON, "-m", "batcher", "sim", "--host", HOST, "--port", "0", "--api-key", KEY]
    proc = subprocess.Popen(
        [*argv, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=child_env(),
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + start_timeout_s
        url = None
        while url is None and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                line = proc.stdout.readline().decode()
                found = _LISTENING.search(line)
                if found:
                    url = found[1]
                elif not line and proc.poll() is not None:
                    break
        if url is None:
            raise RuntimeError(f"batcher sim did not start (exit code {proc.poll()})")
        yield Emulator(url, proc, list(args))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if proc.stdout is not None:
            proc.stdout.close()


# --- the disk ------------------------------------------------------------------------------------


def new_file_us(parent: Path, files: int = 200) -> float:
    """CPU microseconds one new empty file costs in a new folder under ``parent`` (its
    mean over ``files``). batcher creates a file per image; the bare loop none. On ext4 a
    create skips every inode freed in the last minute or so (``recently_deleted``), so
    right after a mass delete (a test run's temporary folders, a previous benchmark's
    scratch) each create scans past them: 10-15 us on this machine when quiet, 150-400
    us after one. The folder is left for the scratch folder's removal: removing it
    here would be such a delete."""
    folder = Path(tempfile.mkdtemp(prefix="disk-probe-", dir=parent))
    start = time.thread_time()
    for i in range(files):
        os.close(os.open(folder / f"p{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return 1e6 * (time.thread_time() - start) / files


#: A new file costing more than this (us of CPU) means ext4 is scanning recently freed
#: inodes: 8-26 us was measured on this machine when quiet, 87-400 after mass deletes.
QUIET_NEW_FILE_US = 50.0
#: ext4 passes over an inode freed less than 60 s ago, or 360 s while its inode table
#: block is not yet written back (fs/ext4/ialloc.c, recently_deleted): no wait is longer.
EXT4_RECENT_S = 360.0


def wait_for_quiet_disk(
    parent: Path, log: Callable[[str], None], *, limit_s: float = EXT4_RECENT_S
) -> list[float]:
    """Probe (:func:`new_file_us`) every 30 s until a new file costs at most
    QUIET_NEW_FILE_US, for ``limit_s`` at most; every probe's figure. A previous
    benchmark run's cleanup (a million-row checkpoint, 100,000 images) makes the next
    minutes' creates several times dearer, which batcher pays per image and the bare
    loop not at all: without this wait the first rounds measure that cleanup.

    Each probe follows a ``sync``: ext4 passes over a freed inode for as long as its
    inode table block is not written back, and here that lasted past 360 s of probes
    (369 us) until a sync (39 us at the next probe)."""

    def probe() -> float:
        os.sync()
        return new_file_us(parent)

    probes = [probe()]
    deadline = time.monotonic() + limit_s
    while probes[-1] > QUIET_NEW_FILE_US and time.monotonic() < deadline:
        log(
            f"disk: a new file costs {probes[-1]:.0f} us of CPU (ext4 after a mass delete; "
            f"{QUIET_NEW_FILE_US:.0f} us or less when quiet): waiting 30 s"
        )
        time.sleep(30.0)
        probes.append(probe())
    return probes


# --- manifests --------------------------------------------------------------------------------


#: Emulator arguments every scenario shares: small images (the client's work per job,
#: not Pillow's), results kept an hour, a fixed seed.
SIM_COMMON = ("--image-size", "64x64", "--retention", "3600", "--seed", "0")


def write_manifest(path: Path, rows: int, *, model: str = "instantid") -> Path:
    """A CSV manifest of ``rows`` valid jobs (image given as a URL), streamed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = "face_image" if model == "instantid" else "id_image"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", image])
        for i in range(rows):
            w.writerow([f"row-{i:07d}", f"photo of a person, portrait {i}", FACE_URL])
    return path


def payload(model: str, i: int) -> dict[str, Any]:
    """What the baselines send for row ``i``: the manifest's row, as batcher sends it."""
    image = "face_image" if model == "instantid" else "id_image"
    return {"prompt": f"photo of a person, portrait {i}", image: FACE_URL}


# --- small statistics -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def rnd(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


# --- what a scenario gets and gives -----------------------------------------------------------


@dataclass
class Context:
    """One suite run: its mode, its scratch folder, and where progress lines go."""

    quick: bool
    work: Path
    #: py-spy's executable; None: no profiles.
    pyspy: str | None = None

    @property
    def profile(self) -> bool:
        return self.pyspy is not None

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def folder(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)


@dataclass
class Target:
    what: str
    target: str
    measured: str
    ok: bool | None  # None: informational, no pass/fail


@dataclass
class Outcome:
    """A scenario's result: tables and targets for RESULTS.md, details for results.json."""

    name: str
    title: str
    settings: dict[str, Any]
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
