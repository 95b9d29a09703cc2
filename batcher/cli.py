"""The `batcher` command: a thin shell over the Python API.

User mistakes print a ``batcher: ...`` message to stderr (one line, or one line per
problem of a manifest) and exit 2; no traceback reaches the user. `batcher sim` is in
cli_sim.py, the flags' value types in cli_types.py.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batcher.cli_sim import add_sim_parser
from batcher.cli_types import _count
from batcher.errors import BatcherError, OutputUnwritable, UsageError

if TYPE_CHECKING:
    from batcher.gate import RateConfig

EXIT_USAGE = 2
#: Stopped early, resumable (as batcher.run.EXIT_STOPPED).
EXIT_STOPPED = 4


def _rate(text: str) -> RateConfig:
    from batcher.gate import parse_rate

    try:
        return parse_rate(text)
    except BatcherError:
        # One message for every bad value (a zero, a sign, a typo): the form that works.
        raise UsageError(
            f"--rate: {text!r} must be a positive number of requests per s, min or h, like 48/min"
        ) from None


def _out_folder(text: str) -> Path:
    """--out as a Path, read as text first: Path("") is the current folder, and an empty
    --out (an unset "$OUT") must not write there."""
    if not text.strip():
        raise UsageError(f"--out {text!r} names no folder; give one (--out . for this folder)")
    return Path(text)


def _add_run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run (or resume) a manifest: submit, poll, download, write results.parquet",
        description="Validate every row of MANIFEST, submit the jobs under the rate limit, poll "
        "them, download the images into OUT/images/ and write OUT/results.parquet. Running the "
        "same command again resumes from the checkpoint in OUT. The API key is read from "
        "SEGMIND_API_KEY. Exit status: 0 all rows COMPLETED; 3 finished with FAILED or INVALID "
        "rows; 4 stopped early, resumable (Ctrl-C, out of credits, API unreachable); 2 usage, "
        "manifest or key error.",
    )
    from batcher.client import DEFAULT_BASE_URL  # aiohttp: not before main's Ctrl-C guard

    p.add_argument("manifest", type=Path, help="CSV, Parquet or JSONL; one row = one job")
    p.add_argument("--out", required=True, help="output folder (also the checkpoint)")
    p.add_argument(
        "--model", help="model for rows without a model column (instantid, infinite-you)"
    )
    p.add_argument(  # no default here: --simulate refuses a --base-url given, even the default
        "--base-url", help=f"API address (default {DEFAULT_BASE_URL}; not with --simulate)"
    )
    p.add_argument(
        "--rate",
        default="48/min",
        help="API requests allowed, every request counted: N/s, N/min or N/h "
        "(default 48/min, just under the Pro plan's 50/min; Free plan: 5/min)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=200,
        help="jobs submitted and not yet finished, at most (default 200)",
    )
    p.add_argument(
        "--simulate",
        action="store_true",
        help="run against the built-in emulator, time-scaled (nothing is billed)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        help="service durations relative to real time, 0.001 to 1000 (default 1; 0.01 "
        "with --simulate). For a time-scaled `batcher sim`, pass its --time-scale",
    )
    p.add_argument(
        "--resubmit-unknown",
        action="store_true",
        help="at-least-once: send again a submit whose outcome is unknown (the "
        "connection was lost after sending), including such rows from earlier runs. "
        "Default: at-most-once, those rows end FAILED and say so",
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="submit again the rows that ended FAILED in earlier runs, except those whose "
        "submit outcome is unknown (they may be billed already: --resubmit-unknown sends them)",
    )
    p.add_argument(
        "--max-failed-retries",
        type=int,
        default=1,
        help="times a FAILED job is resubmitted before its row is FAILED (default 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and the summary")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from batcher.backoff import RetryConfig
    from batcher.client import DEFAULT_BASE_URL
    from batcher.interrupt import exit_at_once
    from batcher.options import SIMULATE_AND_BASE_URL, RunOptions
    from batcher.run import run

    _setup_logging(args.quiet)
    # Outside the run (reading options, printing the summary) Ctrl-C has nothing to
    # save: exit at once, 130, as during the run's own second Ctrl-C; no traceback.
    signal.signal(signal.SIGINT, exit_at_once)
    if args.simulate and args.base_url is not None:
        raise UsageError(SIMULATE_AND_BASE_URL)
    options = RunOptions(
        manifest=args.manifest,
        out=_out_folder(args.out),
        model=args.model,
        base_url=DEFAULT_BASE_URL if args.base_url is None else args.base_url,
        rate=_rate(args.rate),
        max_in_flight=args.max_in_flight,
        simulate=args.simulate,
        time_scale=args.time_scale,
        resubmit_unknown=args.resubmit_unknown,
        retry_failed=args.retry_failed,
        retry=_retry_config(RetryConfig, args.max_failed_retries),
        progress=False if args.no_progress else None,
    )
    result = run(options)
    print(result.text(), file=sys.stderr)
    return result.exit_code


def _retry_config(cls: Any, max_failed_retries: int) -> Any:
    if max_failed_retries < 0:
        raise UsageError(f"--max-failed-retries must be 0 or more, got {max_failed_retries}")
    return cls(max_failed_retries=max_failed_retries)


def _add_validate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "validate",
        help="check a manifest against the model schemas; sends nothing",
        description="Check MANIFEST as `batcher run` would (columns, ids, every row against its "
        "model's schema, local image files) and print every problem; nothing is sent. Exit "
        "status: 0 every row valid; 3 some rows invalid; 2 the manifest is unusable.",
    )
    p.add_argument("manifest", type=Path, help="CSV, Parquet or JSONL")
    p.add_argument("--model", help="model for rows without a model column")
    p.add_argument(
        "--max-errors", type=_count, default=50, help="rows to list at most (default 50; 0: none)"
    )
    p.set_defaults(func=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    from batcher.validate_cmd import validate_manifest

    _setup_logging(quiet=False)  # a long manifest's "rows so far" lines
    return validate_manifest(args.manifest, args.model, args.max_errors)


def _add_report_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "report",
        help="throughput, latency percentiles and failures of a run, with a PNG chart",
        description="Read DIR/results.parquet and print completed and failed counts (by "
        "reason), throughput over time, latency percentiles (queue, inference_time, end to end), "
        "polls and API requests per job; write DIR/report.png (needs the `report` extra: "
        "pip install 'batcher[report]').",
    )
    p.add_argument("dir", type=Path, help="the --out folder of a `batcher run`")
    p.add_argument("--no-chart", action="store_true", help="text only, no report.png")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from batcher.report import report_main

    return report_main(args.dir, chart=not args.no_chart)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",  # a run of a million rows lasts weeks
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batcher",
        description="Bulk image generation on Segmind's serverless v2 API: validate a manifest, "
        "submit under the rate limit, poll, download, and resume after a crash.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_run_parser,
    _add_validate_parser,
    _add_report_parser,
    add_sim_parser,
]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code: int = args.func(args)
    except BatcherError as exc:
        print(f"batcher: {exc}", file=sys.stderr)
        # What went wrong besides (results.parquet not written either): after the cause.
        for note in getattr(exc, "__notes__", ()):
            print(f"batcher: {note}", file=sys.stderr)
        # A folder that refuses writes (the checkpoint at start-up, say) is resumable.
        return EXIT_STOPPED if isinstance(exc, OutputUnwritable) else EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C while starting, before a command's own handling
        print("batcher: interrupted", file=sys.stderr)
        return 130
    return code
