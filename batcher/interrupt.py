"""Ctrl-C and SIGTERM: a first stops the run soon with all saved, a second exits at once."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from batcher.pipeline import RunContext

#: After SIGTERM, submits already on the wire get at most this long to be answered (after
#: Ctrl-C, or an error that stops the run: their request timeout). Container managers
#: SIGKILL 10 s after SIGTERM (Docker's default; Kubernetes gives 30 s): this leaves the
#: other half for the checkpoint's last writes and results.parquet.
TERM_WAIT_S = 5.0
#: The signals that stop a run (:meth:`Interrupt.on_signal`).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupt(asyncio.Event):
    """Set by Ctrl-C or SIGTERM (``signal``): what :func:`batcher.run.run` gives
    :func:`batcher.run.arun`, which takes any event. It knows the run it stops
    (``context``), for a second signal to say what it abandons."""

    def __init__(self) -> None:
        super().__init__()
        self.signal: signal.Signals | None = None
        self.context: RunContext | None = None

    def on_signal(self, sig: signal.Signals) -> None:
        """The event loop's handler of STOP_SIGNALS."""
        if self.is_set():
            # The second Ctrl-C: SQLite's WAL keeps the checkpoint valid.
            run = self.context
            if run is not None and run.submitting:
                # Rows between tries or about to be sent too: the next run cannot
                # tell them from the ones at the server.
                note = abandoned_note(len(run.submitting), "on the wire or between tries")
                print(f"batcher: stopped at once: {note}", file=sys.stderr, flush=True)
            os._exit(130)
        self.signal = sig
        self.set()
        if self.context is not None:
            self.context.requeue_signal.set()  # the run sees it now, not in 0.2 s


def wire_wait_s(sig: signal.Signals | None, request_timeout_s: float) -> float:
    """How long a stop by ``sig`` waits for the submits already sent to be answered: up to
    their request timeout, so that none is left "outcome unknown" (maybe billed) by the
    stop; after SIGTERM, at most TERM_WAIT_S, as a SIGKILL may follow soon."""
    if sig == signal.SIGTERM:
        return min(TERM_WAIT_S, request_timeout_s)
    return request_timeout_s


def abandoned_note(abandoned: int, where: str = "on the wire") -> str:
    """What a stop says of the submits it cut off (with their POST at the server)."""
    return (
        f"{abandoned} submits abandoned {where}: outcome unknown (their jobs may exist "
        "and be billed); the next run ends their rows FAILED 'submit outcome unknown' "
        "(--resubmit-unknown sends them again)"
    )


def exit_at_once(signum: int, frame: object) -> None:
    """A signal handler for a moment with nothing to save: exit 130 (the checkpoint,
    SQLite in WAL mode, is valid at any instant)."""
    os._exit(130)
