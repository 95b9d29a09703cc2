"""Submits lost after sending, one after another: when they stop being single rows' bad
luck and become the API's (or a proxy's) fault.

A submit whose connection is lost after the request went out may have created a billed
job: its row's outcome is unknown. A few in a run are bad luck. Many in a row, with no
request of the run answered 2xx since the first of them, is a connection-reset storm
(a broken proxy or load balancer): going on would burn every row of the manifest as
"outcome unknown", so the run stops, resumable, with the rest untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Submits lost after sending, in a row, that stop the run. "In a row" spans the submit
#: workers: losses with no 2xx answer to any request (submit, poll, result) since the
#: first of them. Each may be billed, so few; a healthy API answers something 2xx
#: between two random drops, so a stop needs the API to answer nothing at all.
LOST_IN_A_ROW = 5


@dataclass(frozen=True)
class LostStreak:
    """Submits lost after sending since ``since`` (loop time of the first of them), with
    no 2xx answer from the API after it."""

    since: float = float("-inf")
    count: int = 0

    def after_loss(self, now: float, last_ok: float) -> LostStreak:
        """The streak once another submit is lost at ``now``; ``last_ok`` is the loop
        time of the run's last 2xx answer. A 2xx since the streak began starts a new one."""
        if self.count == 0 or last_ok >= self.since:
            return LostStreak(now, 1)
        return LostStreak(self.since, self.count + 1)

    @property
    def is_storm(self) -> bool:
        """Enough losses in a row to stop the run."""
        return self.count >= LOST_IN_A_ROW


def storm_reason(in_a_row: int, unknown: int, *, resubmit_unknown: bool) -> str:
    """Why the run stopped on a storm of lost connections: ``in_a_row`` submits lost with
    nothing answered 2xx since, ``unknown`` submits of the run whose outcome is unknown."""
    head = (
        f"connections to the API are being lost after the request is sent: {in_a_row} "
        "submits in a row, and no request has succeeded since the first of them. "
    )
    if resubmit_unknown:
        lost = (
            f"{unknown} submits of this run have an unknown outcome (their jobs may exist "
            "and be billed); their rows are sent again by the next run (--resubmit-unknown). "
        )
    else:
        lost = (
            f"{unknown} rows have an unknown outcome (their jobs may exist and be billed): "
            "FAILED 'submit outcome unknown', not sent again (--resubmit-unknown sends them). "
        )
    return head + lost + "The other rows are untouched: run the same command again to resume"


__all__ = ["LOST_IN_A_ROW", "LostStreak", "storm_reason"]
