"""Run every benchmark scenario against the emulator (in its own process) and write
``benchmarks/RESULTS.md`` and ``benchmarks/results.json``::

    .venv/bin/python -m benchmarks.run_all            # full: ~25-40 minutes on 2 CPUs
    .venv/bin/python -m benchmarks.run_all --quick    # smaller sizes: under 3 minutes
    .venv/bin/python -m benchmarks.run_all --only capacity,polling

Scenarios: capacity (jobs/s vs a bare aiohttp loop and the official SDK), rate_limited
(jobs per period vs R/3), polling (polls per job and detection lag vs fixed 1 s / 5 s
pollers), scale (100,000 jobs in flight, million-row validate, re-running a finished
run). Every scenario runs batcher and its baselines in the same invocation and reports
ratios: absolute times drift between machines and runs.

Only 127.0.0.1 is used. Each client runs in its own process with a deadline; the suite
stops by itself. Profiles need py-spy (``.venv/bin/pip install py-spy``); without it
they are skipped and RESULTS.md says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/run_all.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ClientHung, Context, Outcome, machine
from benchmarks.report import render
from benchmarks.scenarios import capacity, polling, rate_limited, scale

SCENARIOS: dict[str, Callable[[Context], Outcome]] = {
    "capacity": capacity.run,
    "rate_limited": rate_limited.run,
    "polling": polling.run,
    "scale": scale.run,
}
HERE = Path(__file__).resolve().parent


def _pyspy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under 3 minutes")
    parser.add_argument(
        "--only", help=f"comma-separated scenarios (default all: {', '.join(SCENARIOS)})"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument(
        "--results", type=Path, default=HERE, help="folder for RESULTS.md and results.json"
    )
    args = parser.parse_args(argv)
    names = list(SCENARIOS) if not args.only else [s.strip() for s in args.only.split(",")]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")

    pyspy = None if args.no_profile else _pyspy()
    work = Path(tempfile.mkdtemp(prefix="batcher-bench-"))
    ctx = Context(quick=args.quick, work=work, pyspy=pyspy)
    command = "python -m benchmarks.run_all" + (" --quick" if args.quick else "")
    if args.only:
        command += f" --only {args.only}"
    started = time.monotonic()
    info = machine()
    ctx.log(
        f"benchmarks ({'quick' if args.quick else 'full'}) in {work}; "
        f"{info['cpu_count']} CPUs, Python {info['python']}, commit {info['commit']}"
    )
    outcomes: list[Outcome] = []
    errors: dict[str, str] = {}
    try:
        for name in names:
            t0 = time.monotonic()
            try:
                outcome = SCENARIOS[name](ctx)
            except ClientHung as exc:
                errors[name] = f"{exc}\n{exc.dump}"
                ctx.log(f"{name}: {exc}")
                continue
            except Exception:  # one broken scenario must not lose the others' figures
                errors[name] = traceback.format_exc()
                ctx.log(f"{name} failed:\n{errors[name]}")
                continue
            outcome.seconds = time.monotonic() - t0
            outcomes.append(outcome)
            ctx.log(f"{name}: done in {outcome.seconds:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - started
    meta: dict[str, Any] = {
        "command": command,
        "mode": "quick" if args.quick else "full",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(total, 1),
        "machine": info,
        "profiler": f"py-spy ({pyspy})" if pyspy else "none (py-spy not installed)",
        "pid": os.getpid(),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": meta,
        "scenarios": [dataclasses.asdict(o) for o in outcomes],
        "errors": errors,
    }
    (args.results / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (args.results / "RESULTS.md").write_text(render(meta, outcomes, errors))
    ctx.log(f"wrote {args.results / 'RESULTS.md'} and results.json in {total:.0f} s")
    print((args.results / "RESULTS.md").read_text())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
