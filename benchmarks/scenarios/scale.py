"""Scale: many jobs in flight, million-row manifests, and re-running a finished run.

1. In flight: N jobs (100,000; quick 20,000) submitted with no rate limit and
   max_in_flight N to an emulator whose InfiniteYou latency is long enough (time scale
   chosen so the first poll, at the 3rd latency percentile, comes after the last submit)
   that all of them are in flight at once. The batcher process's peak RSS comes from
   ``wait4``; a probe task inside it measures how late the event loop wakes a 10 ms
   sleep (loop lag). Once every job is submitted and held a while, the run is
   interrupted (SIGINT, batcher's own graceful stop), which writes results.parquet.
   A smaller run under tracemalloc says which lines hold the memory.
2. ``batcher validate`` on manifests of growing size, as a subprocess: time and peak RSS.
3. Re-running a finished run (nothing to do), as ``batcher run`` (the CLI) would be run
   again: a finished run made for real, and bigger ones made by ``finished_run`` (intake
   by batcher itself, rows then marked COMPLETED with a real row's result columns, one
   image file per row); the largest one's re-run is profiled with py-spy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PYTHON,
    ROOT,
    SIM_COMMON,
    Context,
    Emulator,
    Outcome,
    Table,
    Target,
    child_env,
    emulator,
    percentile,
    rnd,
    run_client,
    run_measured,
    write_manifest,
)
from benchmarks.profiling import pyspy_record, summarize

RSS_TARGET_MB = 300.0
#: The in-flight run's result retention, model seconds (see _in_flight).
KEPT_S = 1e9
RERUN_TARGET_S = 10.0
#: The emulator for re-runs and for making a real finished run: instant jobs.
INSTANT = (
    "--time-scale",
    "0.001",
    "--latency",
    "instantid=0",
    "--image-size",
    "64x64",
    "--retention",
    "1e9",
    "--seed",
    "0",
)


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "in_flight": 20_000,
            "scale": 0.25,
            "hold_s": 10.0,
            "cap_s": 240.0,
            "trace_n": 5_000,
            "validate": [100_000, 200_000],
            "rerun": [100_000],
        }
    return {
        "in_flight": 100_000,
        "scale": 1.25,
        "hold_s": 30.0,
        "cap_s": 600.0,
        "trace_n": 20_000,
        "validate": [100_000, 1_000_000, 2_000_000],
        "rerun": [100_000, 200_000, 1_000_000],
    }


def _in_flight(
    ctx: Context, n: int, scale: float, hold_s: float, cap_s: float, *, trace: bool = False
) -> dict[str, Any]:
    work = ctx.folder("scale")
    manifest = write_manifest(work / f"in-flight-{n}.csv", n, model="infinite-you")
    # Results kept "forever": batcher holds back submits that could not finish within
    # the retention (a queue, or a service not yet seen to run them all at once), and
    # here every job is to be in flight before the first poll shows any of them running.
    args = ("--time-scale", str(scale), *SIM_COMMON, "--retention", str(KEPT_S))
    with emulator(*args) as emu:
        state: dict[str, Any] = {"all_at": None, "timeline": []}

        def watch(elapsed: float) -> bool:
            stats = emu.stats()
            accepted = stats["accepted"]
            fetched = stats["requests"].get("result", {}).get("200", 0)
            polls = sum(stats["requests"].get("status", {}).values())
            state["timeline"].append((round(elapsed, 1), accepted, fetched, polls))
            if accepted >= n and state["all_at"] is None:
                state["all_at"] = elapsed
            hold = 2.0 if trace else hold_s
            return (state["all_at"] is not None and elapsed - state["all_at"] >= hold) or (
                elapsed > cap_s
            )

        report = run_client(
            "batcher",
            {
                "manifest": str(manifest),
                "out": str(work / f"out-{n}-{trace}"),
                "model": "infinite-you",
                "base_url": emu.base_url,
                "rate": "100000/s",
                "time_scale": scale,
                "max_in_flight": n,
                "retention_s": KEPT_S,
                "loop_probe": not trace,
                "tracemalloc": trace,
                "results_figures": False,
            },
            timeout_s=cap_s + 300,
            watch=watch,
        )
        report["sim_peak_rss_mb"] = emu.peak_rss_mb()
    report["watch"] = state
    return report


def _lag_ms(samples: list[tuple[float, float]], lo: float, hi: float) -> dict[str, Any]:
    lags = [lag for t, lag in samples if lo <= t < hi]
    if not lags:
        return {"n": 0}
    return {
        "n": len(lags),
        "p50": rnd(1e3 * (percentile(lags, 0.5) or 0), 1),
        "p99": rnd(1e3 * (percentile(lags, 0.99) or 0), 1),
        "max": rnd(1e3 * max(lags), 1),
    }


def _validate(ctx: Context, rows: int) -> dict[str, Any]:
    manifest = write_manifest(ctx.folder("scale") / f"validate-{rows}.csv", rows)
    child = run_measured(
        [PYTHON, "-m", "batcher", "validate", str(manifest), "--model", "instantid"],
        timeout_s=60 + rows / 5_000,
    )
    manifest.unlink()
    return {
        "rows": rows,
        "returncode": child.returncode,
        "seconds": child.wall_s,
        "cpu_s": child.user_s + child.sys_s,
        "peak_rss_mb": child.max_rss_mb,
        "stdout": child.stdout.strip()[-300:],
    }


def _sent(emu: Emulator) -> int:
    return sum(sum(v.values()) for v in emu.stats()["requests"].values())


def _make_finished(manifest: Path, out: Path, real_out: Path) -> dict[str, float]:
    """:func:`benchmarks.finished_run.make` in a child process, not in this one: a
    child's peak RSS from ``wait4`` is at least this process's size when it was spawned
    (the child starts on the parent's memory and Linux keeps that high-water mark across
    ``exec``), so the benchmark's own process must stay small while it measures others.
    (Made in this process, a 1,000,000-row run's re-run showed 471 MB; its own peak, by
    ``/usr/bin/time``, is ~190 MB.)"""
    child = subprocess.run(
        [PYTHON, "-m", "benchmarks.finished_run", str(manifest), str(out), "instantid",
         str(real_out)],
        capture_output=True, text=True, check=True, cwd=ROOT, env=child_env(), timeout=3600,
    )  # fmt: skip
    made: dict[str, float] = json.loads(child.stdout.strip().splitlines()[-1])
    return made


def _rerun(
    ctx: Context, manifest: Path, out: Path, emu: Emulator, *, profile: Path | None = None
) -> dict[str, Any]:
    argv = [
        PYTHON,
        "-m",
        "batcher",
        "run",
        str(manifest),
        "--model",
        "instantid",
        "--out",
        str(out),
        "--base-url",
        emu.base_url,
        "--rate",
        "100000/s",
        "--no-progress",
        "-q",
    ]
    before = _sent(emu)
    if profile is not None:
        argv = [*pyspy_record(ctx.pyspy, profile), *argv]
    child = run_measured(argv, timeout_s=900)
    return {
        "requests_sent": _sent(emu) - before,
        "returncode": child.returncode,
        "seconds": child.wall_s,
        "cpu_s": child.user_s + child.sys_s,
        "peak_rss_mb": child.max_rss_mb,
        "summary": child.stderr.strip()[-400:],
    }


def run(ctx: Context) -> Outcome:
    sizes = _sizes(ctx.quick)
    n = sizes["in_flight"]
    outcome = Outcome(
        name="scale",
        title="Scale: jobs in flight, million-row manifests, re-running a finished run",
        settings=sizes,
    )

    # 1. in flight ------------------------------------------------------------------------
    ctx.log(f"scale: {n} jobs in flight (InfiniteYou, time scale {sizes['scale']})")
    big = _in_flight(ctx, n, sizes["scale"], sizes["hold_s"], sizes["cap_s"])
    timeline = big["watch"]["timeline"]
    peak_in_flight = max((a - f for _, a, f, _ in timeline), default=0)
    first_poll_at = next((t for t, _, _, p in timeline if p > 0), None)
    stopped_at = big.get("interrupted_after_s") or big["elapsed_s"]
    submit_end = stopped_at - sizes["hold_s"]
    samples = big.get("loop_lag", [])
    phases = {
        "submitting": _lag_ms(samples, 0.0, submit_end),
        "all in flight (hold)": _lag_ms(samples, submit_end, stopped_at),
        "graceful stop": _lag_ms(samples, stopped_at, 1e9),
        "whole run": _lag_ms(samples, 0.0, 1e9),
    }
    rss = big.get("rss_timeline", [])
    rss_at_start = rss[0][1] if rss else None
    rss_all_in = max((r for t, r in rss if t <= stopped_at), default=None)
    peak = big["process"]["max_rss_mb"]
    table = Table(
        title=f"{n} InfiniteYou jobs submitted at once (max_in_flight {n}, no rate limit)",
        columns=["figure", "value"],
    )
    all_at = big["watch"]["all_at"]
    table.rows += [
        ["jobs accepted by the emulator", timeline[-1][1] if timeline else None],
        ["peak jobs in flight (accepted - results fetched)", peak_in_flight],
        ["seconds to submit them all (child start to last accept)", rnd(all_at, 1)],
        ["submits/s", rnd(n / all_at, 0) if all_at else None],
        ["first status poll seen at (s)", first_poll_at],
        ["peak RSS of the batcher process, MB (wait4)", rnd(peak, 1)],
        [
            "RSS at start of arun / with all in flight, MB",
            f"{rnd(rss_at_start, 1)} / {rnd(rss_all_in, 1)}",
        ],
        [
            "RSS per job in flight, KB",
            rnd(1024 * ((rss_all_in or 0) - (rss_at_start or 0)) / max(peak_in_flight, 1), 2),
        ],
        [
            "graceful stop (SIGINT to exit, results.parquet written), s",
            rnd(big.get("stop_took_s"), 2),
        ],
        ["batcher CPU s / wall s", f"{rnd(big['cpu_s'], 1)} / {rnd(big['elapsed_s'], 1)}"],
        ["emulator peak RSS, MB", rnd(big.get("sim_peak_rss_mb"), 1)],
    ]
    lag_table = Table(
        title="Event-loop lag: how late a 10 ms sleep inside batcher's loop wakes (ms)",
        columns=["phase", "samples", "p50", "p99", "max"],
    )
    for phase, s in phases.items():
        lag_table.rows.append([phase, s.get("n"), s.get("p50"), s.get("p99"), s.get("max")])
    outcome.tables += [table, lag_table]
    outcome.targets.append(
        Target(
            what=f"peak RSS with {n} jobs in flight",
            target=f"<= {RSS_TARGET_MB:g} MB",
            measured=f"{peak:.0f} MB (peak in flight {peak_in_flight})",
            ok=peak <= RSS_TARGET_MB if n >= 100_000 else None,
        )
    )
    outcome.targets.append(
        Target(
            what="event-loop lag p99 with every job in flight",
            target="(information; < 100 ms keeps timers honest)",
            measured=f"{phases['all in flight (hold)'].get('p99')} ms (max "
            f"{phases['all in flight (hold)'].get('max')} ms); whole run p99 "
            f"{phases['whole run'].get('p99')} ms",
            ok=None,
        )
    )
    outcome.details["in_flight"] = {
        k: v for k, v in big.items() if k not in ("loop_lag", "rss_timeline")
    }
    outcome.details["in_flight"]["rss_timeline"] = rss[:: max(1, len(rss) // 60)]

    # memory by line (tracemalloc) --------------------------------------------------------
    trace_n = sizes["trace_n"]
    ctx.log(f"scale: {trace_n} jobs in flight under tracemalloc (which lines hold memory)")
    traced = _in_flight(ctx, trace_n, sizes["scale"], 2.0, sizes["cap_s"], trace=True)
    memory = traced.get("tracemalloc")
    if memory:
        mem_table = Table(
            title=f"Python memory alive with {trace_n} jobs in flight, by allocating line "
            f"(tracemalloc; {memory['traced_mb']:.1f} MB traced in all)",
            columns=["line", "MB", "bytes per job in flight", "objects"],
        )
        for line, size, count in memory["top"]:
            mem_table.rows.append([line, rnd(size / 2**20, 2), rnd(size / trace_n, 0), count])
        outcome.tables.append(mem_table)
        outcome.details["tracemalloc"] = memory

    # 2. validate ---------------------------------------------------------------------------
    val_table = Table(
        title="`batcher validate` (subprocess) on CSV manifests of growing size",
        columns=["rows", "exit", "seconds", "rows/s", "CPU s", "peak RSS MB"],
    )
    outcome.details["validate"] = []
    for rows in sizes["validate"]:
        ctx.log(f"scale: batcher validate, {rows} rows")
        v = _validate(ctx, rows)
        outcome.details["validate"].append(v)
        val_table.rows.append(
            [
                rows,
                v["returncode"],
                rnd(v["seconds"], 1),
                rnd(rows / v["seconds"], 0),
                rnd(v["cpu_s"], 1),
                rnd(v["peak_rss_mb"], 0),
            ]
        )
    outcome.tables.append(val_table)
    vals = outcome.details["validate"]
    # The reader's fixed buffers (pyarrow's 32-block read-ahead of 1 MiB blocks, the id
    # check's 8 MiB SQLite cache) fill over the first ~1M rows of a CSV; memory is
    # constant when it stops growing past them: the last two sizes are compared.
    ref, last = vals[-2], vals[-1]
    growth = last["peak_rss_mb"] - ref["peak_rss_mb"]
    outcome.targets.append(
        Target(
            what="validate memory independent of rows",
            target=f"peak RSS flat (+10% at most) from {ref['rows']} to {last['rows']} rows",
            measured=" -> ".join(f"{v['rows']:,} rows {v['peak_rss_mb']:.0f} MB" for v in vals)
            + f" ({growth:+.0f} MB over the last {last['rows'] - ref['rows']:,} rows)",
            ok=growth <= 0.1 * ref["peak_rss_mb"],
        )
    )

    # 3. re-run of a finished run -----------------------------------------------------------
    scale_dir = ctx.folder("scale")
    real_out = ctx.work / "capacity" / "batcher-0"
    real_manifest = ctx.work / "capacity" / "manifest.csv"
    rerun_table = Table(
        title="Re-running a finished run (`batcher run` CLI, nothing to do): wall time of "
        "the whole command",
        columns=[
            "rows",
            "finished run made",
            "making it took s",
            "re-run s",
            "CPU s",
            "peak RSS MB",
            "exit",
            "API requests sent",
        ],
    )
    outcome.details["rerun"] = []
    with emulator(*INSTANT) as emu:
        if not (real_out / "checkpoint.sqlite").exists():
            ctx.log("scale: a real finished run of 1000 rows (capacity did not run)")
            real_manifest = write_manifest(scale_dir / "real.csv", 1000)
            real_out = scale_dir / "real"
            run_client(
                "batcher",
                {
                    "manifest": str(real_manifest),
                    "out": str(real_out),
                    "model": "instantid",
                    "base_url": emu.base_url,
                    "time_scale": 0.001,
                    "max_in_flight": 1000,
                    "results_figures": False,
                },
                timeout_s=600,
            )
        real_rows = sum(1 for _ in real_manifest.open()) - 1
        ctx.log(f"scale: re-run of a real finished run, {real_rows} rows")
        r = _rerun(ctx, real_manifest, real_out, emu)
        r.update(rows=real_rows, made="for real")
        outcome.details["rerun"].append(r)
        rerun_table.rows.append(
            [
                real_rows,
                "for real (capacity scenario)",
                None,
                rnd(r["seconds"], 2),
                rnd(r["cpu_s"], 2),
                rnd(r["peak_rss_mb"], 0),
                r["returncode"],
                r["requests_sent"],
            ]
        )
        for rows in [real_rows, *sizes["rerun"]]:
            ctx.log(f"scale: making a finished run of {rows} rows (finished_run.py)")
            manifest = write_manifest(scale_dir / f"finished-{rows}.csv", rows)
            out = scale_dir / f"finished-{rows}"
            made = _make_finished(manifest, out, real_out)
            largest = rows == sizes["rerun"][-1]
            ctx.log(f"scale: re-run of the finished {rows}-row run")
            r = _rerun(ctx, manifest, out, emu)
            r.update(rows=rows, made="synthesised", making=made)
            outcome.details["rerun"].append(r)
            rerun_table.rows.append(
                [
                    rows,
                    "synthesised (finished_run.py)",
                    rnd(sum(made.values()), 1),
                    rnd(r["seconds"], 2),
                    rnd(r["cpu_s"], 2),
                    rnd(r["peak_rss_mb"], 0),
                    r["returncode"],
                    r["requests_sent"],
                ]
            )
            if largest and ctx.profile:
                ctx.log(f"scale: re-run of the {rows}-row run under py-spy")
                raw = scale_dir / "py-spy-rerun.txt"
                _rerun(ctx, manifest, out, emu, profile=raw)
                outcome.details["rerun_profile"] = summarize(raw, top=20)
                outcome.details["rerun_profile"]["rows"] = rows
            if rows != real_rows:
                shutil.rmtree(out, ignore_errors=True)
                manifest.unlink(missing_ok=True)
    outcome.tables.append(rerun_table)
    biggest = outcome.details["rerun"][-1]
    outcome.targets.append(
        Target(
            what=f"re-run of a finished {biggest['rows']}-row run",
            target=f"<= {RERUN_TARGET_S:g} s" + (" (at 1,000,000 rows)" if ctx.quick else ""),
            measured=f"{biggest['seconds']:.1f} s, exit {biggest['returncode']}",
            ok=biggest["seconds"] <= RERUN_TARGET_S if biggest["rows"] >= 1_000_000 else None,
        )
    )
    synth = [r for r in outcome.details["rerun"] if r["made"] == "synthesised"]
    if len(synth) >= 2:
        a, b = synth[-2], synth[-1]
        per_row_us = 1e6 * (b["seconds"] - a["seconds"]) / (b["rows"] - a["rows"])
        outcome.notes.append(
            f"Re-run time grows by {per_row_us:.1f} us per row between {a['rows']} and "
            f"{b['rows']} rows: linear in rows, nothing to do or not."
        )
    return outcome
