"""Paired A/B of batcher's client capacity between two source trees (a change against its
parent), and a deterministic measure of the same: Python function calls per job::

    .venv/bin/python -m benchmarks.ab --base /tmp/base --new . --rounds 7 --jobs 5000
    .venv/bin/python -m benchmarks.ab --calls --new . --jobs 3000

A round runs both trees once each, back to back and in alternating order, each on a
fresh zero-latency emulator (the capacity scenario's), and the change is judged on the
median of the rounds' ratios: a single pair swings by 0.2 with the machine's state.
``--bare`` adds the bare aiohttp loop to every round, which gives each tree's x-bare
figure as the capacity scenario reports it.

``--calls`` runs one tree under cProfile (in-process: the emulator in its own process as
usual) and prints the calls a job and the functions with the most own time. Calls a job
do not drift with the machine, so a small cut shows there when jobs/s cannot see it.

Each tree runs its own ``benchmarks.clients``; both must have it.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import PYTHON, wait_for_quiet_disk, write_manifest
from benchmarks.scenarios.capacity import client_config, jobs_per_s, measure, measure_batcher


def _one(
    tree: Path,
    mode: str,
    manifest: Path,
    n: int,
    work: Path,
    python: tuple[str, ...] = (PYTHON,),
    extra: dict[str, Any] | None = None,
) -> tuple[float, float]:
    """jobs/s of one client run on its own fresh emulator, and the CPU a job of client and
    emulator together (ms); both go to stderr too."""
    out = Path(tempfile.mkdtemp(dir=work))
    cfg = {**client_config(manifest, n), "out": str(out), "results_figures": False}
    cfg = {**cfg, **(extra or {})}
    if mode == "batcher":
        report = measure_batcher(work, cfg, python=python, root=tree)
        disk = f", a new file {report['new_file_us']:.0f} us before"
    else:
        report, disk = measure(mode, cfg, python=python, root=tree), ""
    jps = jobs_per_s(report) or 0.0
    client_ms = 1e3 * report["process"]["cpu_s"] / n
    emulator_ms = 1e3 * (report["emulator_cpu_s"] or 0.0) / n
    print(
        f"  {mode:7s} {tree}: {jps:6.1f} jobs/s, client {client_ms:.2f}"
        f" + emulator {emulator_ms:.2f} ms CPU a job{disk}",
        file=sys.stderr,
        flush=True,
    )
    return jps, client_ms + emulator_ms


def ab(
    base: Path,
    new: Path,
    rounds: int,
    n: int,
    bare: bool,
    work: Path,
    extra: dict[str, Any],
) -> None:
    manifest = write_manifest(work / "manifest.csv", n)
    # A previous A/B's cleanup (tens of thousands of image files) makes every new file
    # many times dearer for minutes (ext4's recently_deleted): batcher pays that per image,
    # a what-if without image files not at all. Its rounds would measure the cleanup.
    waited = wait_for_quiet_disk(work, lambda line: print(line, file=sys.stderr, flush=True))
    print(f"disk probes before the rounds: {[round(p) for p in waited]} us", file=sys.stderr)
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    x_bare: dict[str, list[float]] = {"base": [], "new": []}
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        order = [("base", base), ("new", new)] if r % 2 == 0 else [("new", new), ("base", base)]
        got: dict[str, tuple[float, float]] = {}
        for name, tree in order:
            config = extra if name == "new" else None
            got[name] = _one(tree, "batcher", manifest, n, work, extra=config)
        ratios.append(got["new"][0] / got["base"][0])
        cpu_ratios.append(got["new"][1] / got["base"][1])
        if bare:
            ceiling, _ = _one(new, "bare", manifest, n, work)
            for name, (jps, _cpu) in got.items():
                x_bare[name].append(jps / ceiling)
        print(
            f"  new / base {ratios[-1]:.3f} jobs/s, {cpu_ratios[-1]:.3f} CPU a job",
            file=sys.stderr,
            flush=True,
        )
    summary = {
        "rounds": rounds,
        "jobs": n,
        "new_over_base_median": statistics.median(ratios),
        "new_over_base": [round(x, 3) for x in ratios],
        # client + emulator CPU a job: steadier than jobs/s, as the machine's state moves
        "cpu_new_over_base_median": statistics.median(cpu_ratios),
        "cpu_new_over_base": [round(x, 3) for x in cpu_ratios],
    }
    for name, values in x_bare.items():
        if values:
            summary[f"{name}_x_bare_median"] = statistics.median(values)
            summary[f"{name}_x_bare"] = [round(x, 3) for x in values]
    print(json.dumps(summary))


def calls(tree: Path, mode: str, n: int, top: int, work: Path) -> None:
    manifest = write_manifest(work / "manifest.csv", n)
    stats_file = work / "profile.pstats"
    _one(tree, mode, manifest, n, work, (PYTHON, "-m", "cProfile", "-o", str(stats_file)))
    stats = pstats.Stats(str(stats_file))
    total = sum(cc for (cc, _nc, _tt, _ct, _callers) in stats.stats.values())  # type: ignore[attr-defined]
    print(json.dumps({"mode": mode, "jobs": n, "calls_per_job": round(total / n, 1)}))
    if top:
        stats.sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=Path, default=Path.cwd(), help="tree with the change")
    parser.add_argument("--base", type=Path, help="tree to compare against")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--bare", action="store_true", help="the bare loop in every round too")
    parser.add_argument(
        "--new-config",
        type=json.loads,
        default={},
        help="JSON: client settings for --new only (e.g. a worker count; --base may be --new)",
    )
    parser.add_argument("--calls", action="store_true", help="cProfile calls a job of --new")
    parser.add_argument("--top", type=int, default=0, help="with --calls: functions to list")
    parser.add_argument(
        "--mode", choices=("batcher", "bare"), default="batcher", help="with --calls: the client"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BATCHER_AB_TMP")) as tmp:
        work = Path(tmp)
        if args.calls:
            calls(args.new.resolve(), args.mode, args.jobs, args.top, work)
        elif args.base is None:
            parser.error("--base is required for an A/B (or --calls)")
        else:
            ab(
                args.base.resolve(),
                args.new.resolve(),
                args.rounds,
                args.jobs,
                args.bare,
                work,
                args.new_config,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
