"""`batcher sim`: its flags, and the emulator served with them until Ctrl-C.

Not in batcher/sim/: importing that package loads aiohttp (~0.4 s), which `batcher`'s
start (its help, main()'s Ctrl-C guard) must not wait for; the emulator is imported
only when the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from batcher.cli_types import _fraction, _model_seconds, _size
from batcher.errors import BatcherError, UsageError


def add_sim_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sim",
        help="serve the Segmind v2 API emulator until stopped",
        description="Serve an emulator of Segmind's v2 API (and v1 sync) on HOST:PORT, print its "
        "base URL, and run until Ctrl-C. Point the official SDK at BASE_URL/v1, or batcher at "
        "BASE_URL. Debug counters: GET BASE_URL/__sim/stats. Durations are model seconds, "
        "multiplied by --time-scale.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    p.add_argument(
        "--api-key",
        help="the one key accepted (default: the key in SEGMIND_API_KEY; with neither, any "
        "non-empty key)",
    )
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply every duration (0.001 to 1000)"
    )
    p.add_argument(
        "--latency",
        type=_model_seconds,
        action="append",
        default=[],
        metavar="MODEL=SECONDS",
        help="median latency of a model (default: its page's, InstantID 7.7, InfiniteYou 163)",
    )
    p.add_argument("--sigma", type=float, help="log-normal spread of latency (default per model)")
    p.add_argument("--capacity", type=int, help="jobs running at once per model (default: no cap)")
    p.add_argument(
        "--cold-start", type=float, default=0.0, help="extra seconds when a model is cold"
    )
    p.add_argument("--rate-limit", type=int, help="requests per period per key (default: none)")
    p.add_argument("--rate-period", type=float, default=60.0, help="rate-limit period (default 60)")
    p.add_argument(
        "--rate-limit-headers",
        choices=["retry-after", "reset-at", "both", "none"],
        default="retry-after",
        help="what a 429 carries (the real header is unknown)",
    )
    p.add_argument("--error-rate", type=_fraction, default=0.0, help="fraction of 500/502/504")
    p.add_argument(
        "--drop-rate", type=_fraction, default=0.0, help="fraction of dropped connections"
    )
    p.add_argument(
        "--drop-after-accept",
        type=_fraction,
        default=0.5,
        help="fraction of dropped submits that were accepted and billed first (default 0.5)",
    )
    p.add_argument("--slow-rate", type=_fraction, default=0.0, help="fraction of slow answers")
    p.add_argument("--slow", type=float, default=5.0, help="seconds a slow answer waits")
    p.add_argument("--truncate-rate", type=_fraction, default=0.0, help="fraction of cut downloads")
    p.add_argument(
        "--output-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="output links answer 404 this long after their job completed (a slow CDN)",
    )
    p.add_argument(
        "--output-link-ttl",
        type=float,
        metavar="SECONDS",
        help="signed output links, 403 this long after the result read that named them "
        "(default: plain links)",
    )
    p.add_argument(
        "--fail-rate",
        type=_fraction,
        default=0.0,
        help="fraction of FAILED jobs (not billed: the charge is returned when one fails)",
    )
    p.add_argument("--credits", type=float, help="account balance in USD (default: unlimited)")
    p.add_argument("--retention", type=float, default=3600.0, help="seconds results are kept")
    p.add_argument(
        "--single-output-as-list",
        action="store_true",
        help="serve a one-sample output as a one-element list",
    )
    p.add_argument(
        "--base64-style",
        choices=["raw", "data-url"],
        default="raw",
        help="shape of output with base64: true",
    )
    p.add_argument("--image-size", type=_size, metavar="WxH", help="force every image's size")
    p.add_argument("--seed", type=int, default=0, help="seed of latency draws and faults")
    p.set_defaults(func=_cmd_sim)


def _cmd_sim(args: argparse.Namespace) -> int:
    from batcher.client import MIN_KEY_CHARS
    from batcher.options import check_time_scale
    from batcher.schemas import get_model
    from batcher.sim import SimConfig, serve

    check_time_scale(args.time_scale)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    for slug, _ in args.latency:
        try:
            get_model(slug)  # else the knob would be ignored without a word
        except UsageError as exc:
            raise UsageError(f"--latency: {exc}") from None
    key = args.api_key or os.environ.get("SEGMIND_API_KEY")
    try:
        config = SimConfig(
            time_scale=args.time_scale,
            latency_median_s=dict(args.latency),
            latency_sigma=args.sigma,
            capacity=args.capacity,
            cold_start_s=args.cold_start,
            rate_limit=args.rate_limit,
            rate_period_s=args.rate_period,
            rate_limit_headers=args.rate_limit_headers,
            error_rate=args.error_rate,
            drop_rate=args.drop_rate,
            drop_after_accept=args.drop_after_accept,
            slow_rate=args.slow_rate,
            slow_s=args.slow,
            truncate_rate=args.truncate_rate,
            output_delay_s=args.output_delay,
            output_link_ttl_s=args.output_link_ttl,
            fail_rate=args.fail_rate,
            credits_usd=args.credits,
            retention_s=args.retention,
            single_output_as_list=args.single_output_as_list,
            base64_style=args.base64_style,
            image_size=args.image_size,
            api_keys=frozenset({key}) if key else None,
            seed=args.seed,
        )
    except ValueError as exc:
        raise BatcherError(f"sim: {exc}") from None
    if not key:
        print(
            "batcher sim: no --api-key or SEGMIND_API_KEY: any non-empty key is accepted",
            file=sys.stderr,
        )
    elif len(key) < MIN_KEY_CHARS:
        # Served anyway: the emulator masks nothing, and the SDK takes any key. Its length
        # only, never the key.
        print(
            f"batcher sim: warning: the key is {len(key)} characters long: `batcher run` "
            f"refuses keys shorter than {MIN_KEY_CHARS}, so it cannot use this emulator",
            file=sys.stderr,
        )
    import asyncio  # here, not at the top: it is 57 ms of the CLI's 68 ms of imports, a
    # window in which Ctrl-C would print a traceback before main() can catch it

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(config, args.host, args.port))
    except OSError as exc:  # from bind: the port is taken, the host is not this machine's...
        where = f"{args.host}:{args.port}"
        raise UsageError(
            f"sim: cannot listen on {where} ({exc.strerror or exc}); check --host and --port"
        ) from None
    return 0
