"""A job row's states, error texts and records (NewRow in, Job out): what the stages share."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Row states:
#
#     PENDING -> SUBMITTING -> SUBMITTED -> COMPLETED
#                   |              |     \-> FAILED
#                   |              \-> PENDING   (result expired before it was fetched)
#                   \-> FAILED      (outcome unknown, at-most-once policy)
#     INVALID                        (never sent)
#
# A SUBMITTED row with ``output_urls`` is a job seen COMPLETED (billed) whose images are
# not all saved yet: they are downloaded from those URLs, never submitted again.
PENDING, SUBMITTING, SUBMITTED = "PENDING", "SUBMITTING", "SUBMITTED"
COMPLETED, FAILED, INVALID = "COMPLETED", "FAILED", "INVALID"
TERMINAL = (COMPLETED, FAILED, INVALID)
#: The error of a row taken out of the manifest after it had been submitted.
REMOVED = "no longer in the manifest: not sent again (it was submitted before, and may be billed)"

#: A FAILED row's error when its submit's outcome is unknown: the job may exist and be
#: billed. Rows are told by its first words, the same since the first version.
UNKNOWN_OUTCOME = (
    "submit outcome unknown: the connection was lost after the request was sent, so the job "
    "may exist and be billed; not sent again (at-most-once). Run again with "
    "--resubmit-unknown to submit it again"
)

#: The columns that name a row's job at the API, cleared when the row is sent again: an
#: unknown or requeued submit must not show (or be taken for) a job it may not have.
NO_JOB: dict[str, Any] = {
    "request_id": None, "status_url": None, "response_url": None, "output_urls": None,
}  # fmt: skip
#: The columns an attempt's answer fills (its result read, its images saved), cleared
#: with NO_JOB when a row goes back to be sent again (requeued, reopened, edited): an
#: attempt that then fails must not show the figures and images of the one before it.
NO_OUTCOME: dict[str, Any] = {
    "completed_at": None, "latency_s": None, "notice_lag_s": None, "inference_time": None,
    "metrics": None, "spans_stop": 0, "outputs": None, "width": None, "height": None,
    "bytes": None, "sha256": None,
}  # fmt: skip
#: A new attempt's start, as SQL assignments for a statement over many rows.
NEW_ATTEMPT_SQL = ", ".join(
    f"{name}={'NULL' if value is None else value}" for name, value in (NO_JOB | NO_OUTCOME).items()
)


@dataclass(frozen=True, kw_only=True)
class NewRow:
    """A manifest row as it enters the checkpoint."""

    id: str
    number: int
    model: str
    digest: str
    params: Mapping[str, Any]
    state: str = PENDING
    error: str | None = None
    warnings: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    """A row read back from the checkpoint, with what the pipeline needs to act on it."""

    id: str
    number: int
    model: str
    #: The parameters as stored (JSON): decoded only when the job is sent, since a
    #: hundred thousand jobs in flight would otherwise each hold a parsed dict.
    params_json: str
    state: str
    request_id: str | None
    status_url: str | None
    response_url: str | None
    attempts: int
    unknown_submits: int
    submitted_at: float | None
    #: JSON list of the output URLs of a job seen COMPLETED whose images are not all
    #: saved yet (None otherwise): its images are downloaded from them, not the result.
    output_urls: str | None = None
    #: No longer in the manifest: a retry (a FAILED job, an expired result) fails it.
    removed: bool = False

    @property
    def params(self) -> dict[str, Any]:
        """The parameters to send, decoded from the checkpoint's JSON."""
        params: dict[str, Any] = json.loads(self.params_json)
        return params


#: Columns a caller may set through :meth:`Checkpoint.update`.
COLUMNS = frozenset({
    "state", "error", "request_id", "status_url", "response_url", "attempts", "retries",
    "unknown_submits", "polls", "submitted_at", "started_at", "completed_at", "latency_s",
    "notice_lag_s", "inference_time", "metrics", "outputs", "width", "height", "bytes",
    "sha256", "warnings", "rate_limited", "output_urls", "download_retries", "result_reads",
    "spans_stop",
})  # fmt: skip


#: The columns a :class:`Job` is read from, in the order :func:`job_from_row` takes them.
JOB_COLUMNS = (
    "id, number, model, params, state, request_id, status_url, response_url, attempts, "
    "unknown_submits, submitted_at, output_urls, removed"
)


def job_from_row(row: Sequence[Any]) -> Job:
    """The :class:`Job` of a row selected as :data:`JOB_COLUMNS`."""
    return Job(
        id=row[0],
        number=row[1],
        model=row[2],
        params_json=row[3],
        state=row[4],
        request_id=row[5],
        status_url=row[6],
        response_url=row[7],
        attempts=row[8],
        unknown_submits=row[9],
        submitted_at=row[10],
        output_urls=row[11],
        removed=bool(row[12]),
    )
