"""Stopping and starting again: interrupt, cancel, expired results, out of credits, a bad
key, a changed manifest. The checkpoint carries the run; the emulator's counters prove
that nothing was paid twice and nothing was left behind.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import errno
import json
import logging
import os
import re
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow.parquet as pq
import pytest
from conftest import in_checkpoint, interrupted_run, results_by_id, sim_run_options, until
from PIL import Image

import batcher.finish as finish_module
import batcher.reconcile as reconcile_module
import batcher.run as run_module
import batcher.schemas as schemas_module
from batcher.backoff import RetryConfig
from batcher.checkpoint import RESULTS_FRESH, Checkpoint
from batcher.client import ApiClient, Reply, TransportError
from batcher.errors import AuthError, Interrupted, ManifestError, UsageError
from batcher.gate import Priority, RateConfig, RequestGate
from batcher.image_writer import ImageWriter
from batcher.inputs import ImageInputs
from batcher.intake import BATCH, load
from batcher.options import RunOptions
from batcher.report import build_report, read_results
from batcher.report_text import format_report
from batcher.results import SUMMARY_COLUMNS, summary_table
from batcher.run import EXIT_FAILED_ROWS, EXIT_OK, EXIT_STOPPED, arun
from batcher.schedule import PollConfig
from batcher.sim import SimServer
from batcher.submit import UNKNOWN_OUTCOME

SCALE = 0.002
KEY = "sk-resume-0123456789abcdef"


def _manifest(tmp_path: Path, *, instantid: int, infinite_you: int = 0) -> Path:
    """InfiniteYou rows first, so long jobs are in flight while short ones finish."""
    Image.new("RGB", (64, 64), (200, 150, 120)).save(tmp_path / "face.png")
    path = tmp_path / "jobs.csv"
    iy = ["id_image", "width", "height"] if infinite_you else []
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "model", "prompt", "face_image", *iy])
        for n in range(infinite_you):
            w.writerow([f"y{n}", "infinite-you", f"gentleman {n}", "", "face.png", 256, 256])
        for n in range(instantid):
            w.writerow([f"i{n}", "instantid", f"portrait {n}", "face.png", *([""] * len(iy))])
    return path


def _csv(tmp_path: Path, text: str) -> Path:
    """A manifest of these lines, beside the face.png its rows name."""
    Image.new("RGB", (64, 64)).save(tmp_path / "face.png")
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(text)
    return manifest


def _options(manifest: Path, sim: SimServer, **changes: Any) -> RunOptions:
    return sim_run_options(manifest, sim, KEY, **changes)


_results = results_by_id


def _count(sim: SimServer, endpoint: str, outcome: str) -> int:
    count: int = sim.stats()["requests"].get(endpoint, {}).get(outcome, 0)
    return count


_interrupted_run = interrupted_run


async def _stopped_at(options: RunOptions, state: str, at_least: int) -> Any:
    """The run, interrupted once ``at_least`` of its rows are ``state`` in the checkpoint."""
    return await _interrupted_run(options, lambda: in_checkpoint(options.out, state) >= at_least)


async def _long_jobs(sim: Any, image_size: tuple[int, int] = (64, 64)) -> Any:
    """An emulator whose InfiniteYou jobs take 0.8 s: surely in flight when a run stops."""
    return await sim(
        time_scale=SCALE, latency_median_s={"infinite-you": 400.0}, image_size=image_size
    )


# -- 4. resume ---------------------------------------------------------------------------


async def _stopped_midway(tmp_path: Path, sim: Any) -> tuple[RunOptions, SimServer, Any]:
    """30 rows, stopped once 4 are COMPLETED: some in flight, some not sent yet.
    InfiniteYou jobs take 0.8 s: they are surely in flight when the run is stopped."""
    manifest = _manifest(tmp_path, instantid=24, infinite_you=6)
    server = await _long_jobs(sim)
    options = _options(manifest, server, max_in_flight=10)
    return options, server, await _stopped_at(options, "COMPLETED", 4)


async def test_an_interrupted_run_resumes_without_paying_twice_and_a_third_run_does_nothing(
    tmp_path: Path, sim: Any
) -> None:
    options, server, first = await _stopped_midway(tmp_path, sim)

    assert first.exit_code == EXIT_STOPPED
    assert "run the same command again to resume" in first.text().lower()
    at_stop = _results(options.out)
    states = Counter(r["status"] for r in at_stop.values())
    assert states["COMPLETED"] >= 4
    assert states["SUBMITTED"] >= 1
    assert states["PENDING"] >= 1
    assert set(states) == {"COMPLETED", "SUBMITTED", "PENDING"}
    assert server.stats()["accepted"] == states["COMPLETED"] + states["SUBMITTED"]

    second = await arun(options)

    assert second.exit_code == EXIT_OK, second.text()
    final = _results(options.out)
    assert {r["status"] for r in final.values()} == {"COMPLETED"}
    for row_id, before in at_stop.items():
        after = final[row_id]
        if before["status"] == "COMPLETED":  # not touched again
            assert after == before
        elif before["status"] == "SUBMITTED":  # polled and fetched, not resubmitted
            assert after["request_id"] == before["request_id"]
            assert after["attempts"] == 1
    stats = server.stats()
    assert stats["accepted"] == len(final)
    assert stats["paid_twice"] == 0
    assert second.summary is not None
    assert second.summary.completed_this_run == len(final) - states["COMPLETED"]

    requests_before = server.stats()["requests"]
    third = await arun(options)

    assert third.exit_code == EXIT_OK
    assert server.stats()["requests"] == requests_before  # not one API request
    assert third.summary is not None
    assert third.summary.api_requests == 0
    assert _results(options.out) == final


async def test_a_job_left_in_flight_and_seen_done_after_the_stop_is_marked_as_spanning_it(
    tmp_path: Path, sim: Any
) -> None:
    """Its latency_s counts the time batcher was stopped (hours, after a night): the row
    says so. Rows submitted and seen done by one run (either run) do not, nor a job whose
    completion the first run saw before its images were saved."""
    options, _, first = await _stopped_midway(tmp_path, sim)
    assert first.exit_code == EXIT_STOPPED
    at_stop = _results(options.out)
    left = {i for i, r in at_stop.items() if r["status"] == "SUBMITTED" and r["latency_s"] is None}
    assert left
    assert not any(r["spans_stop"] for r in at_stop.values())
    pause_s = 2.0
    await asyncio.sleep(pause_s)  # a stop between the runs: no job in flight

    second = await arun(options)

    assert second.exit_code == EXIT_OK, second.text()
    final = _results(options.out)
    assert {r["status"] for r in final.values()} == {"COMPLETED"}
    assert {i for i, r in final.items() if r["spans_stop"]} == left
    assert {r["spans_stop"] for r in final.values()} == {True, False}
    assert second.summary is not None
    assert second.summary.spanning == len(left)
    assert "submitted before a stop and seen done after it" in second.summary.text()
    report = build_report(*read_results(options.out))
    assert report.spanning == len(left)
    # Throughput over the time jobs were in flight leaves out the stop (before: only the
    # rate from the first submit, stop included).
    t = report.throughput
    assert t is not None
    assert t.first_submit_s is not None
    # The stop: from the first run's last completion of a job it submitted to the second
    # run's first submit (its start-up, the first run's end, reading its results: all
    # time with no job in flight); other gaps (a loaded machine's) are a small part of
    # the time the runs worked.
    first_run = {i for i, r in at_stop.items() if r["status"] != "PENDING"}
    ended = max(
        final[i]["completed_at"].timestamp() for i in first_run if not final[i]["spans_stop"]
    )
    began = min(r["submitted_at"].timestamp() for i, r in final.items() if i not in first_run)
    assert began - ended >= pause_s
    worked_s = t.last_s - t.first_submit_s - (began - ended)
    assert began - ended <= t.idle_s <= began - ended + 0.5 * worked_s
    assert t.busy_count == len(final) - len(left)
    if t.idle_s >= 0.05 * (t.last_s - t.first_submit_s):
        busy_s = t.last_s - t.first_submit_s - t.idle_s
        assert t.busy_per_minute == pytest.approx(t.busy_count * 60 / busy_s)
        assert "/min over the " in format_report(report)


async def test_rows_taken_out_of_the_manifest_before_they_were_sent_are_not_sent(
    tmp_path: Path, sim: Any
) -> None:
    options, server, first = await _stopped_midway(tmp_path, sim)
    manifest = options.manifest
    assert first.exit_code == EXIT_STOPPED
    at_stop = _results(options.out)
    pending = sorted(i for i, r in at_stop.items() if r["status"] == "PENDING")
    assert len(pending) >= 2
    kept_pending, removed = pending[0], set(pending[1:])
    # The user cuts every row not yet sent but one out of the manifest.
    lines = manifest.read_text().splitlines()
    manifest.write_text(
        "\n".join(line for line in lines if line.split(",")[0] not in removed) + "\n"
    )

    second = await arun(options)

    assert second.exit_code == EXIT_OK, second.text()
    final = _results(options.out)
    assert removed.isdisjoint(final)  # not sent, and not in the table
    assert kept_pending in final
    assert {r["status"] for r in final.values()} == {"COMPLETED"}
    assert server.stats()["accepted"] == len(final)  # nothing removed was paid for


async def test_a_cancelled_run_keeps_a_valid_table_and_resumes_at_most_once(
    tmp_path: Path, sim: Any
) -> None:
    manifest = _manifest(tmp_path, instantid=16, infinite_you=6)
    server = await _long_jobs(sim)
    options = _options(manifest, server, max_in_flight=10)

    task = asyncio.create_task(arun(options))
    await until(lambda: in_checkpoint(options.out, "SUBMITTED") >= 6)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    at_cancel = _results(options.out)  # written on the way out, however the run ended
    assert len(at_cancel) == 22
    states = Counter(r["status"] for r in at_cancel.values())
    assert set(states) <= {"COMPLETED", "SUBMITTED", "SUBMITTING", "PENDING"}
    assert states["SUBMITTED"] >= 1

    second = await arun(options)

    final = _results(options.out)
    for row_id, before in at_cancel.items():
        after = final[row_id]
        if before["status"] == "SUBMITTING":  # the answer was lost with the run: maybe billed
            assert (after["status"], after["error"]) == ("FAILED", UNKNOWN_OUTCOME)
            assert after["unknown_submits"] == 1
        else:
            assert after["status"] == "COMPLETED", (row_id, after["error"])
        if before["status"] in ("SUBMITTED", "COMPLETED"):
            assert after["request_id"] == before["request_id"]
    assert second.exit_code == (EXIT_FAILED_ROWS if states["SUBMITTING"] else EXIT_OK)
    stats = server.stats()
    assert stats["paid_twice"] == 0
    completed = sum(r["status"] == "COMPLETED" for r in final.values())
    assert completed <= stats["accepted"] <= completed + states["SUBMITTING"]


# -- 3. expired results --------------------------------------------------------------------


@pytest.mark.parametrize("client_knows_retention", [False, True], ids=["server-404", "known"])
async def test_a_result_that_expired_while_stopped_is_submitted_again_and_completes(
    tmp_path: Path, sim: Any, client_knows_retention: bool
) -> None:
    manifest = _manifest(tmp_path, instantid=8)
    # Jobs take 300 model seconds and results are kept 900 (0.6 s and 1.8 s of wall time):
    # long enough that jobs SUBMITTED when the stop is asked are still running when the
    # run has stopped (stopping took over 0.2 s on a loaded machine).
    server = await sim(
        time_scale=SCALE,
        latency_median_s={"instantid": 300.0},
        latency_sigma=0.05,
        retention_s=900.0,
        image_size=(64, 64),
    )
    poll = PollConfig(retention_s=900.0) if client_knows_retention else PollConfig()
    options = _options(manifest, server, poll=poll)

    first = await _stopped_at(options, "SUBMITTED", 3)

    assert first.exit_code == EXIT_STOPPED
    at_stop = _results(options.out)
    waiting = {i: r["request_id"] for i, r in at_stop.items() if r["status"] == "SUBMITTED"}
    assert len(waiting) >= 3
    await asyncio.sleep(900.0 * SCALE + 0.1)  # the results of those jobs are gone now

    second = await arun(options)

    assert second.exit_code == EXIT_OK, second.text()
    final = _results(options.out)
    assert {r["status"] for r in final.values()} == {"COMPLETED"}
    for row_id, old_request in waiting.items():
        assert final[row_id]["request_id"] != old_request
        assert final[row_id]["attempts"] == 2
        assert final[row_id]["spans_stop"] is False  # submitted again: a submit of this run
    stats = server.stats()
    assert stats["accepted"] == len(final) + len(waiting)  # each expired job paid again
    assert stats["paid_twice"] == len(waiting)
    gone = _count(server, "status", "404") + _count(server, "result", "404")
    if client_knows_retention:  # requeued on resume without asking the server
        assert gone == 0
    else:  # asked, told 404, requeued
        assert gone >= len(waiting)


# -- 5. out of credits, bad key ----------------------------------------------------------------


async def test_out_of_credits_finishes_the_jobs_in_flight_and_a_top_up_finishes_the_rest(
    tmp_path: Path, sim: Any
) -> None:
    manifest = _manifest(tmp_path, instantid=10, infinite_you=6)
    # Enough for the six InfiniteYou jobs ($0.05) and two InstantID ones ($0.025).
    server = await sim(
        time_scale=SCALE,
        credits_usd=0.35,
        latency_median_s={"infinite-you": 400.0},  # 0.8 s: in flight when the 406 comes
        image_size=(64, 64),
    )
    options = _options(manifest, server)
    done_at_first_406: list[int] = []

    async def watch() -> None:
        await until(lambda: _count(server, "submit", "406") > 0)
        done_at_first_406.append(_count(server, "result", "200"))

    watcher = asyncio.create_task(watch())
    first = await arun(options)
    await watcher

    assert first.exit_code == EXIT_STOPPED
    assert first.stop_reason is not None
    assert "out of credits" in first.stop_reason
    assert "run the same command again to resume" in first.text()
    rows = _results(options.out)
    accepted = server.stats()["accepted"]
    states = Counter(r["status"] for r in rows.values())
    # Jobs were in flight when the 406 came; every one of them was finished and saved.
    assert done_at_first_406[0] < accepted
    assert states == {"COMPLETED": accepted, "PENDING": len(rows) - accepted}
    for row in rows.values():
        if row["status"] == "COMPLETED":
            assert (options.out / row["outputs"][0]).is_file()

    async with (
        aiohttp.ClientSession() as http,
        http.post(server.base_url + "/__sim/credits", json={"add_usd": 5.0}) as resp,
    ):
        assert resp.status == 200
    second = await arun(options)

    assert second.exit_code == EXIT_OK, second.text()
    final = _results(options.out)
    assert {r["status"] for r in final.values()} == {"COMPLETED"}
    for row_id, row in rows.items():
        if row["status"] == "COMPLETED":
            assert final[row_id]["request_id"] == row["request_id"]
    # A submit refused for credits created no job: it is not an attempt.
    assert {r["attempts"] for r in final.values()} == {1}
    stats = server.stats()
    assert stats["accepted"] == len(final)
    assert stats["paid_twice"] == 0


async def test_a_refused_key_stops_the_run_with_the_checkpoint_intact(
    tmp_path: Path, sim: Any
) -> None:
    manifest = _manifest(tmp_path, instantid=10, infinite_you=6)
    server = await sim(time_scale=SCALE, api_keys=frozenset({KEY}), image_size=(64, 64))
    options = _options(manifest, server, max_in_flight=8)
    await _stopped_at(options, "SUBMITTED", 4)
    before = _results(options.out)
    assert any(r["status"] == "SUBMITTED" for r in before.values())
    bad_key = "sk-revoked-key-5551234"
    # A slow rate here: the 401 is answered long before a second request could go out,
    # so no submit is cut off on the wire (which would rightly count as unknown). One an
    # hour is 7.2 s at this time scale; 2/min was 60 ms, a loaded machine's answer time.
    bad = dataclasses.replace(
        options, api_key=bad_key, rate=RateConfig(requests=1, period_s=3600.0)
    )

    with pytest.raises(AuthError) as raised:
        await arun(bad)

    message = str(raised.value)
    assert "refused the key" in message
    assert "SEGMIND_API_KEY" in message
    assert bad_key not in message
    assert KEY not in message
    assert raised.value.status == 401
    # Nothing changed by the refused run, but for the images of jobs seen COMPLETED before
    # the stop (their saved links need no key, and are no API request) and, when the one
    # refused request was a status poll, that poll counted on its row.
    after = _results(options.out)
    refused_polls = _count(server, "status", "401")
    assert _count(server, "submit", "401") + refused_polls == 1
    polled = []
    for row_id, row in before.items():
        if after[row_id] == row:
            continue
        assert row["status"] == "SUBMITTED", row
        if after[row_id] == {**row, "polls": row["polls"] + 1}:
            polled.append(row_id)
            continue
        assert after[row_id]["status"] == "COMPLETED"
        assert after[row_id]["request_id"] == row["request_id"]
    assert len(polled) == refused_polls

    third = await arun(options)

    assert third.exit_code == EXIT_OK, third.text()
    final = _results(options.out)
    assert {r["status"] for r in final.values()} == {"COMPLETED"}
    for row_id, row in before.items():
        if row["request_id"]:
            assert final[row_id]["request_id"] == row["request_id"]
    assert server.stats()["accepted"] == len(final)
    assert server.stats()["paid_twice"] == 0


async def test_a_changed_manifest_stops_the_rerun_before_any_request(
    tmp_path: Path, sim: Any
) -> None:
    manifest = _manifest(tmp_path, instantid=4)
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    options = _options(manifest, server)
    assert (await arun(options)).exit_code == EXIT_OK
    done = _results(options.out)
    requests = server.stats()["requests"]
    manifest.write_text(manifest.read_text().replace("portrait 2", "portrait two"))

    with pytest.raises(ManifestError, match=r"changed since this output folder was used: row 3"):
        await arun(options)

    assert server.stats()["requests"] == requests
    assert _results(options.out) == done


async def test_a_resumed_job_sent_back_for_resubmission_is_submitted_once(
    tmp_path: Path, sim: Any
) -> None:
    """A job an earlier run left in flight, requeued by this run (FAILED, or expired), is
    PENDING in the checkpoint and in the requeue line at once: it must go out once."""
    manifest = _csv(
        tmp_path,
        "id,model,prompt,face_image,id_image\n"
        "fast,instantid,portrait sim:no-face,face.png,\n"
        "slow,infinite-you,gentleman sim:blocked,,face.png\n",
    )
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    out = manifest.parent / "out"
    once = RetryConfig(max_failed_retries=0)
    first = await _interrupted_run(
        _options(manifest, server, retry=once),
        lambda: in_checkpoint(out, "FAILED") == in_checkpoint(out, "SUBMITTED") == 1,
    )
    assert first.exit_code == EXIT_STOPPED
    at_stop = _results(manifest.parent / "out")
    assert (at_stop["fast"]["status"], at_stop["slow"]["status"]) == ("FAILED", "SUBMITTED")

    # "fast" comes back as PENDING ahead of "slow"; one slot makes the feeder page the
    # checkpoint again right after "slow" is requeued by its FAILED answer.
    second = await arun(_options(manifest, server, retry_failed=True, max_in_flight=1))

    assert second.exit_code == EXIT_FAILED_ROWS
    final = _results(manifest.parent / "out")
    assert {r["status"] for r in final.values()} == {"FAILED"}
    assert final["fast"]["attempts"] == final["slow"]["attempts"] == 2
    assert server.stats()["accepted"] == 4  # two per row, none twice in one attempt


async def test_retry_failed_does_not_pay_again_for_a_submit_of_unknown_outcome(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """--retry-failed is for rows that failed for a reason. Before, it also sent the rows
    whose submit outcome was unknown (maybe billed), which only --resubmit-unknown may:
    an audit paid six jobs twice so."""
    manifest = _csv(
        tmp_path,
        "id,model,prompt,face_image\n"
        "ok,instantid,portrait,face.png\n"
        "noface,instantid,portrait sim:no-face,face.png\n"
        "lost1,instantid,lost one,face.png\n"
        "lost2,instantid,lost two,face.png\n",
    )
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    once = RetryConfig(max_failed_retries=0)
    submit = ApiClient.submit

    async def lost(self: ApiClient, model: str, body: bytes) -> Reply:
        if b"lost" in body:
            raise TransportError("connection lost (ServerDisconnectedError)", maybe_sent=True)
        return await submit(self, model, body)

    with monkeypatch.context() as patch:
        patch.setattr(ApiClient, "submit", lost)
        first = await arun(_options(manifest, server, retry=once))
    assert first.exit_code == EXIT_FAILED_ROWS
    rows = _results(manifest.parent / "out")
    assert {i: r["status"] for i, r in rows.items()} == {
        "ok": "COMPLETED",
        "noface": "FAILED",
        "lost1": "FAILED",
        "lost2": "FAILED",
    }
    accepted = server.stats()["accepted"]

    second = await arun(_options(manifest, server, retry=once, retry_failed=True))

    assert server.stats()["accepted"] == accepted + 1  # "noface" only
    rows = _results(manifest.parent / "out")
    assert [rows[i]["error"] for i in ("lost1", "lost2")] == [UNKNOWN_OUTCOME] * 2
    assert second.exit_code == EXIT_FAILED_ROWS
    assert (
        "2 FAILED rows whose submit outcome is unknown (their jobs may exist and be billed) "
        "are not sent again; add --resubmit-unknown to send them too"
    ) in caplog.messages

    third = await arun(_options(manifest, server, retry=once, resubmit_unknown=True))

    assert server.stats()["accepted"] == accepted + 3
    assert {r["status"] for i, r in _results(manifest.parent / "out").items() if i != "noface"} == {
        "COMPLETED"
    }
    assert third.exit_code == EXIT_FAILED_ROWS  # "noface" is FAILED still


async def test_an_unknown_outcome_is_known_as_such_though_the_row_had_a_job_before(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review's case: a row whose job FAILED is sent again (--retry-failed), and that
    submit's outcome is unknown. Before, the row kept the old job's request id, so it
    was taken for a known failure, and the next --retry-failed paid for it again."""
    manifest = _csv(
        tmp_path, "id,model,prompt,face_image\nnoface,instantid,portrait sim:no-face,face.png\n"
    )
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    once = RetryConfig(max_failed_retries=0)
    await arun(_options(manifest, server, retry=once))  # FAILED: the job failed
    submit = ApiClient.submit

    async def accepted_then_lost(self: ApiClient, model: str, body: bytes) -> Reply:
        await submit(self, model, body)  # the server created the job...
        raise TransportError("connection lost (ServerDisconnectedError)", maybe_sent=True)

    with monkeypatch.context() as patch:
        patch.setattr(ApiClient, "submit", accepted_then_lost)
        await arun(_options(manifest, server, retry=once, retry_failed=True))
    row = _results(manifest.parent / "out")["noface"]
    assert (row["error"], row["unknown_submits"], row["request_id"]) == (UNKNOWN_OUTCOME, 1, None)
    assert server.stats()["accepted"] == 2

    await arun(_options(manifest, server, retry=once, retry_failed=True))

    assert server.stats()["accepted"] == 2  # not sent again: only --resubmit-unknown may


async def test_an_unreachable_api_stops_resumably_with_no_row_taken_for_sent(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest(tmp_path, instantid=12)
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    options = _options(manifest, server)

    async def refused(self: ApiClient, model: str, params: Any) -> Reply:
        # A refused connection, at once: no submit can then be caught half-way through
        # connecting when the run stops (that one would rightly count as maybe sent).
        raise TransportError("cannot connect: [Errno 111] Connection refused", maybe_sent=False)

    with monkeypatch.context() as patch:
        patch.setattr(ApiClient, "submit", refused)
        first = await arun(options)

    assert first.exit_code == EXIT_STOPPED
    assert first.stop_reason is not None
    assert "cannot reach the API" in first.stop_reason
    # Every submit was refused a connection: none is a maybe-billed "unknown outcome",
    # including those still retrying (in a backoff, at the gate) when the first gave up.
    rows = _results(options.out)
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("PENDING", 0)}

    second = await arun(options)

    assert second.exit_code == EXIT_OK, second.text()
    final = _results(options.out)
    assert {(r["status"], r["unknown_submits"]) for r in final.values()} == {("COMPLETED", 0)}
    assert server.stats()["accepted"] == len(final)


async def test_progress_lines_count_the_jobs_in_flight_not_the_idle_workers(
    tmp_path: Path, sim: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """(Before: in_flight=32 for a 4-row manifest, the submit workers' slots.)"""
    caplog.set_level(logging.INFO, logger="batcher.progress")
    manifest = _manifest(tmp_path, instantid=1, infinite_you=3)  # InstantID's done at once
    server = await _long_jobs(sim)
    result = await arun(_options(manifest, server, log_every_s=0.01))
    assert result.exit_code == EXIT_OK, result.text()
    lines = [m for m in caplog.messages if m.startswith("progress:")]
    assert lines, caplog.messages
    shown = [int(re.search(r"in_flight=(\d+)", line)[1]) for line in lines]  # type: ignore[index]
    assert max(shown) <= 4, lines


async def test_a_stop_keeps_the_retry_counts_of_every_row_it_hands_back(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connection refused: the first row out of tries stops the run while the
    others are in a backoff or at the gate. Each row goes back to PENDING (not
    SUBMITTING, which a resume would take for maybe billed) with its retries in the
    same write: before, a row cancelled in its backoff lost them, and the first row's
    were a separate write that the stop could cancel."""
    manifest = _manifest(tmp_path, instantid=6)
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    options = _options(manifest, server, retry=RetryConfig(base_s=2.0, max_attempts=4))
    posts: Counter[bytes] = Counter()

    async def refused(self: ApiClient, model: str, body: bytes) -> Reply:
        posts[body] += 1
        raise TransportError("cannot connect: [Errno 111] Connection refused", maybe_sent=False)

    with monkeypatch.context() as patch:
        patch.setattr(ApiClient, "submit", refused)
        first = await arun(options)

    assert first.exit_code == EXIT_STOPPED
    assert "cannot reach the API" in first.text()
    rows = _results(options.out)
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("PENDING", 0)}
    # The race was run: some row was stopped with tries left.
    assert any(n < 4 for n in posts.values()), posts
    # A refused POST is a retry but the last of a row's four; a row stopped in its
    # backoff (or at the gate) after n POSTs was retrying its n-th.
    assert sorted(min(n, 3) for n in posts.values()) == sorted(
        r["retries"] for r in rows.values() if r["retries"]
    )
    assert first.summary is not None
    assert first.summary.api_requests == sum(posts.values())


async def test_a_stop_keeps_the_429_counts_of_rows_waiting_at_the_gate(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row's first POST is answered 429 with an hour's Retry-After; Ctrl-C while
    they wait at the gate. Each row is PENDING again with its 429 in the same write
    (before, a row cancelled at the gate lost it, and the report undercounted 429s)."""
    manifest = _manifest(tmp_path, instantid=4)
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    options = _options(manifest, server)
    posts: list[bytes] = []

    async def too_many(self: ApiClient, model: str, body: bytes) -> Reply:
        posts.append(body)
        return Reply(429, {"error": "Too Many Requests"}, {"Retry-After": "3600"})

    with monkeypatch.context() as patch:
        patch.setattr(ApiClient, "submit", too_many)
        first = await _interrupted_run(options, lambda: len(posts) >= 1)

    assert first.exit_code == EXIT_STOPPED
    rows = _results(options.out)
    assert len(posts) >= 1
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("PENDING", 0)}
    assert sorted(Counter(posts).values()) == sorted(
        r["rate_limited"] for r in rows.values() if r["rate_limited"]
    )


async def test_a_finished_run_run_again_reads_and_rewrites_nothing(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest(tmp_path, instantid=8)
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    options = _options(manifest, server)
    assert (await arun(options)).exit_code == EXIT_OK
    table = options.out / "results.parquet"
    written = table.stat().st_mtime_ns, table.stat().st_ino
    requests = server.stats()["requests"]

    def no_scan(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the unchanged manifest was scanned again")

    with monkeypatch.context() as patch:
        patch.setattr(reconcile_module, "scan", no_scan)
        again = await arun(options)

    assert again.exit_code == EXIT_OK
    assert again.summary is not None
    assert again.summary.counts == {"COMPLETED": 8}
    assert (table.stat().st_mtime_ns, table.stat().st_ino) == written  # not rewritten
    assert server.stats()["requests"] == requests


async def test_a_table_left_stale_by_a_killed_run_is_rewritten_though_nothing_is_left(
    tmp_path: Path, sim: Any
) -> None:
    manifest = _manifest(tmp_path, instantid=6)
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    options = _options(manifest, server)
    assert (await arun(options)).exit_code == EXIT_OK
    # A later run changed a row and was killed before it rewrote the table: the checkpoint
    # has the change, results.parquet does not, and the run had marked it stale.
    db = sqlite3.connect(options.out / "checkpoint.sqlite")
    with db:
        db.execute("UPDATE jobs SET state='FAILED', error='changed' WHERE id='i0'")
        db.execute("UPDATE meta SET value='stale' WHERE key='results'")
    db.close()

    again = await arun(options)

    assert again.exit_code == EXIT_FAILED_ROWS
    assert (_results(options.out)["i0"]["status"], _results(options.out)["i0"]["error"]) == (
        "FAILED",
        "changed",
    )


async def test_the_same_manifest_with_another_model_is_read_again(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest(tmp_path, instantid=4)
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    options = _options(manifest, server)
    assert (await arun(options)).exit_code == EXIT_OK
    scans: list[Any] = []
    real_scan = reconcile_module.scan

    def counting_scan(*args: Any, **kwargs: Any) -> Any:
        scans.append(kwargs.get("default_model"))
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(reconcile_module, "scan", counting_scan)
    await arun(dataclasses.replace(options, model="infinite-you"))

    assert scans == ["infinite-you"]  # not taken for the run it was made from


async def test_a_jobs_clock_starts_when_its_submit_is_sent_not_while_it_waits_for_the_gate(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rate-bound, submits wait longest at the gate. That wait is not the job's latency:
    counted in, it skewed latency_s, submitted_at and the poll schedule (polls came
    early, ~2.4 a job instead of ~1 under a binding limit)."""
    manifest = _manifest(tmp_path, instantid=4)
    server = await sim(time_scale=SCALE, image_size=(64, 64))  # jobs take ~15 ms
    wait_s = 0.5
    real_acquire = RequestGate.acquire

    async def slow_for_submits(self: RequestGate, priority: Priority) -> None:
        if priority == Priority.SUBMIT:
            await asyncio.sleep(wait_s)  # a submit's turn comes late
        await real_acquire(self, priority)

    monkeypatch.setattr(RequestGate, "acquire", slow_for_submits)
    result = await arun(_options(manifest, server))

    assert result.exit_code == EXIT_OK, result.text()
    rows = _results(manifest.parent / "out").values()
    assert all(r["latency_s"] < wait_s / 2 for r in rows), [r["latency_s"] for r in rows]


async def test_an_unwritable_images_folder_stops_resumably_and_nothing_is_paid_twice(
    tmp_path: Path, sim: Any
) -> None:
    """A folder problem (here ``images`` is a file; disk full or permissions alike) is
    not any row's fault: the run stops with exit 4 instead of failing every row, the
    paid jobs stay in the checkpoint, and the next run fetches them without resubmitting."""
    manifest = _manifest(tmp_path, instantid=6)
    server = await sim(time_scale=SCALE, image_size=(32, 32))
    out = manifest.parent / "out"
    out.mkdir()
    (out / "images").write_text("not a folder")

    first = await arun(_options(manifest, server))

    assert first.exit_code == EXIT_STOPPED, first.text()
    assert first.stop_reason is not None
    assert "cannot write images" in first.stop_reason
    assert "run the same command again" in first.stop_reason
    rows = _results(out)
    assert len(rows) == 6
    assert not any(r["status"] == "FAILED" for r in rows.values())  # no row blamed
    submitted = server.stats()["requests"]["submit"]

    (out / "images").unlink()
    second = await arun(_options(manifest, server))

    assert second.exit_code == EXIT_OK, second.text()
    assert all(r["status"] == "COMPLETED" for r in _results(out).values())
    stats = server.stats()
    assert stats["paid_twice"] == 0
    # jobs submitted before the stop were fetched, not sent again
    assert sum(stats["requests"]["submit"].values()) == 6
    assert sum(submitted.values()) >= 1


# -- a full disk: results.parquet failing too never hides why the run stopped ------------


def _no_space(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _disk_full(monkeypatch: pytest.MonkeyPatch, *, images: bool, results: bool = True) -> None:
    """What a full disk does to a run, without filling one: with ``images`` no image
    can be written, with ``results`` no results.parquet."""

    async def write(self: ImageWriter, row_id: str, index: int, data: bytes) -> Any:
        return _no_space()

    if images:
        monkeypatch.setattr(ImageWriter, "write", write)
    if results:
        monkeypatch.setattr(finish_module, "write_results", _no_space)


async def _stopped_on_images(manifest: Path, server: SimServer) -> Any:
    """The run, stopped by images the disk refuses: exit 4, saying why."""
    result = await arun(_options(manifest, server))
    assert result.exit_code == EXIT_STOPPED, result.text()
    assert result.stop_reason is not None
    assert "cannot write images" in result.stop_reason
    return result


def _says_results_unwritten_after(text: str, first: str, out: Path) -> None:
    """``text`` names the run's own reason (the line holding ``first``) before a line
    that says results.parquet could not be written too, the next run writes it and the
    checkpoint holds every row."""
    lines = text.splitlines()
    (reason,) = [n for n, line in enumerate(lines) if first in line]
    (note,) = [n for n, line in enumerate(lines) if "could not be written either" in line]
    assert reason < note, text
    assert str(out / "results.parquet") in lines[note]
    assert "No space left on device" in lines[note]
    assert f"every row is saved in {out / 'checkpoint.sqlite'}" in lines[note]
    assert "the next run writes it" in lines[note]


async def test_a_full_disk_stops_with_exit_4_though_results_parquet_fails_too(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the results.parquet error, raised in a ``finally``, took the place of the
    stop: exit 2, "cannot write results.parquet", no summary, and a wrapper retrying on 4
    gave up."""
    manifest = _manifest(tmp_path, instantid=6)
    server = await sim(time_scale=SCALE, image_size=(32, 32))
    out = manifest.parent / "out"
    _disk_full(monkeypatch, images=True)

    first = await _stopped_on_images(manifest, server)

    assert "No space left on device" in first.stop_reason
    assert first.results is None
    assert first.summary is not None  # read from the checkpoint instead
    assert sum(first.summary.counts.values()) == 6
    assert "COMPLETED" not in first.summary.counts
    _says_results_unwritten_after(first.text(), "stopped: cannot write images", out)
    assert not (out / "results.parquet").exists()

    monkeypatch.undo()  # space freed
    second = await arun(_options(manifest, server))

    assert second.exit_code == EXIT_OK, second.text()
    assert {r["status"] for r in _results(out).values()} == {"COMPLETED"}
    assert server.stats()["paid_twice"] == 0
    # The summary's columns read from the checkpoint are the file's.
    async with Checkpoint(out / "checkpoint.sqlite") as cp:
        from_checkpoint = await asyncio.to_thread(summary_table, cp)
    written = pq.read_table(out / "results.parquet", columns=list(SUMMARY_COLUMNS))
    assert from_checkpoint.equals(written)


async def test_a_checkpoint_the_disk_refuses_stops_the_run_resumably(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills under the checkpoint (its log grows first on a small one): the
    run stops, exit 4, saying so. Before: an ExceptionGroup traceback, exit 1."""
    manifest = _manifest(tmp_path, instantid=4, infinite_you=4)
    server = await _long_jobs(sim, image_size=(32, 32))
    out = manifest.parent / "out"
    apply = Checkpoint._apply

    def fills_up(self: Checkpoint, statements: Any) -> None:
        statements = list(statements)
        if any(sql.startswith("UPDATE jobs SET state=?") for sql, _ in statements) and (
            in_checkpoint(out, "SUBMITTED") >= 2
        ):
            raise sqlite3.OperationalError("database or disk is full")
        apply(self, statements)

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoint, "_apply", fills_up)
        first = await arun(_options(manifest, server))

    assert first.exit_code == EXIT_STOPPED, first.text()
    assert first.stop_reason is not None
    assert first.stop_reason.startswith(
        f"cannot write the checkpoint {out / 'checkpoint.sqlite'} (database or disk is full)"
    )
    assert "run the same command again to resume" in first.stop_reason

    second = await arun(_options(manifest, server))  # space freed

    final = _results(out)
    assert {r["status"] for r in final.values()} <= {"COMPLETED", "FAILED"}
    assert all(r["error"] == UNKNOWN_OUTCOME for r in final.values() if r["status"] == "FAILED")
    assert second.exit_code in (EXIT_OK, EXIT_FAILED_ROWS), second.text()
    assert server.stats()["paid_twice"] == 0


async def test_a_checkpoint_refused_while_the_run_stops_is_said_after_the_stop(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review's case: Ctrl-C, then the disk refuses a commit of the stopping run. The
    stop's reason stands (exit 4), and the refusal follows it. Before, it was not said:
    "jobs in flight are saved", though a paid job's request id was not."""
    manifest = _manifest(tmp_path, instantid=2, infinite_you=4)
    server = await _long_jobs(sim, image_size=(32, 32))
    out = manifest.parent / "out"
    interrupted = asyncio.Event()
    apply = Checkpoint._apply
    failed: list[Any] = []

    def once(self: Checkpoint, statements: Any) -> None:
        statements = list(statements)
        if (
            interrupted.is_set()
            and not failed
            and any(sql.startswith("UPDATE jobs SET state=?") for sql, _ in statements)
        ):
            failed.append(statements)
            raise sqlite3.OperationalError("disk I/O error")
        apply(self, statements)

    monkeypatch.setattr(Checkpoint, "_apply", once)
    task = asyncio.create_task(arun(_options(manifest, server), interrupted=interrupted))
    await until(lambda: in_checkpoint(out, "SUBMITTED") >= 2 or task.done())
    interrupted.set()
    result = await task

    assert failed
    assert result.exit_code == EXIT_STOPPED, result.text()
    assert result.stop_reason is not None
    assert result.stop_reason.startswith("interrupted")
    lines = result.text().splitlines()
    stopped = next(n for n, line in enumerate(lines) if line.startswith("stopped: interrupted"))
    assert any(
        line.startswith(f"cannot write the checkpoint {out / 'checkpoint.sqlite'} (disk I/O error)")
        for line in lines[stopped + 1 :]
    ), lines


async def test_an_interrupted_run_stays_exit_4_though_results_parquet_cannot_be_written(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest(tmp_path, instantid=4, infinite_you=4)
    server = await _long_jobs(sim, image_size=(32, 32))
    options = _options(manifest, server, max_in_flight=4)
    _disk_full(monkeypatch, images=False)

    first = await _stopped_at(options, "SUBMITTED", 2)

    assert first.exit_code == EXIT_STOPPED, first.text()
    assert first.stop_reason is not None
    assert first.stop_reason.startswith("interrupted")
    assert first.summary is not None
    assert sum(first.summary.counts.values()) == 8
    _says_results_unwritten_after(first.text(), "stopped: interrupted", options.out)


async def test_a_refused_key_stays_the_error_though_results_parquet_cannot_be_written(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error raised at the end of the run (exit 2 here) is still the one raised, with
    a note that results.parquet could not be written: before, the results.parquet
    error replaced it, and the refused key was never mentioned."""
    manifest = _manifest(tmp_path, instantid=3)
    server = await sim(time_scale=SCALE, api_keys=frozenset({"sk-another-key-0000"}))
    options = _options(manifest, server, rate=RateConfig(requests=1, period_s=3600.0))
    _disk_full(monkeypatch, images=False)

    with pytest.raises(AuthError) as raised:
        await arun(options)

    assert "refused the key" in str(raised.value)
    (note,) = raised.value.__notes__
    _says_results_unwritten_after(f"{raised.value}\n{note}", "refused the key", options.out)


async def test_an_unexpected_error_is_not_replaced_by_results_parquet_failing(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug's traceback must survive: before, the results.parquet UsageError (raised
    ``from None``) took its place and hid it altogether."""
    manifest = _manifest(tmp_path, instantid=2)
    server = await sim(time_scale=SCALE, image_size=(32, 32))
    options = _options(manifest, server)
    _disk_full(monkeypatch, images=False)

    async def broken(*args: Any) -> None:
        raise RuntimeError("a bug in the pipeline")

    monkeypatch.setattr(run_module, "_pipeline", broken)

    with pytest.raises(RuntimeError, match="a bug in the pipeline") as raised:
        await arun(options)

    (note,) = raised.value.__notes__
    _says_results_unwritten_after(f"{raised.value}\n{note}", "a bug", options.out)


async def test_a_checkpoint_that_cannot_save_its_last_changes_does_not_hide_the_stop(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint's last commit at the end of a stopped run fails too (its disk is
    full): the stop and exit 4 stay, and a line says so. Before: sqlite3's error took
    their place, a traceback."""
    manifest = _manifest(tmp_path, instantid=4)
    server = await sim(time_scale=SCALE, image_size=(32, 32))
    out = manifest.parent / "out"
    _disk_full(monkeypatch, images=True, results=False)

    async def full(self: Checkpoint) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Checkpoint, "flush", full)

    first = await _stopped_on_images(manifest, server)

    assert first.results == out / "results.parquet"
    lines = first.text().splitlines()
    (stop,) = [n for n, line in enumerate(lines) if line.startswith("stopped: cannot write")]
    (note,) = [n for n, line in enumerate(lines) if "could not save its last changes" in line]
    assert stop < note
    assert lines[note].startswith(f"{out / 'checkpoint.sqlite'} could not save")
    assert "(database or disk is full)" in lines[note]
    assert "as after a crash" in lines[note]


async def test_results_parquet_not_marked_up_to_date_is_a_warning_not_the_runs_end(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """results.parquet is written, but the checkpoint cannot record that (its disk is
    full): nothing is lost, the next run writes the file again. Before: sqlite3's error
    replaced the stop (a traceback)."""
    manifest = _manifest(tmp_path, instantid=4)
    server = await sim(time_scale=SCALE, image_size=(32, 32))
    out = manifest.parent / "out"
    _disk_full(monkeypatch, images=True, results=False)
    set_meta = Checkpoint.set_meta

    async def full_at_the_end(self: Checkpoint, key: str, value: str) -> None:
        if value == RESULTS_FRESH:
            raise sqlite3.OperationalError("database or disk is full")
        await set_meta(self, key, value)

    monkeypatch.setattr(Checkpoint, "set_meta", full_at_the_end)

    first = await _stopped_on_images(manifest, server)

    assert first.results == out / "results.parquet"
    assert len(_results(out)) == 4
    assert any(
        "could not be marked up to date (database or disk is full)" in r.getMessage()
        for r in caplog.records
    )


async def test_a_resume_after_the_wall_clock_stepped_back_polls_on(
    tmp_path: Path, sim: Any
) -> None:
    """Jobs recorded as submitted in the future (the clock was stepped back since, e.g.
    by NTP) are polled as just submitted, not a crash on a negative age."""
    manifest = _manifest(tmp_path, instantid=1, infinite_you=4)
    server = await _long_jobs(sim, image_size=(32, 32))
    options = _options(manifest, server, max_in_flight=4)
    first = await _stopped_at(options, "SUBMITTED", 4)
    assert first.exit_code == EXIT_STOPPED
    db = sqlite3.connect(options.out / "checkpoint.sqlite")
    try:
        moved = db.execute(
            "UPDATE jobs SET submitted_at = submitted_at + 600 WHERE state='SUBMITTED'"
        ).rowcount
        db.commit()
    finally:
        db.close()
    assert moved >= 1

    second = await arun(options)

    assert second.exit_code == EXIT_OK, second.text()
    assert {r["status"] for r in _results(options.out).values()} == {"COMPLETED"}
    assert server.stats()["paid_twice"] == 0


# -- the output folder: links planted in it, files that are not what they should be --------


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with a file's bytes (None for a folder)."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


async def test_an_out_folder_that_cannot_be_written_says_so(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Before: "cannot open the lock file (Read-only file system): remove it", advice
    that cannot help.) A read-only mount, faked: as root a mode bit would not stop us."""
    manifest = _manifest(tmp_path, instantid=1)
    server = await sim(time_scale=SCALE, image_size=(32, 32))
    options = _options(manifest, server)
    options.out.mkdir()
    real_open = os.open

    def read_only(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".lock"):
            raise OSError(30, "Read-only file system")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(UsageError) as raised:
        await arun(options)
    assert str(raised.value) == (
        f"{options.out / '.lock'}: cannot open the lock file (Read-only file system): "
        "batcher needs a folder it can write to for --out"
    )
    assert server.stats()["accepted"] == 0


@pytest.mark.parametrize(
    ("name", "says"),
    [
        (".lock", "the lock file is a symbolic link: remove it"),
        ("checkpoint.sqlite", "checkpoint.sqlite is a symbolic link"),
        ("checkpoint.sqlite-wal", "checkpoint.sqlite-wal is a symbolic link"),
        ("checkpoint.sqlite-shm", "checkpoint.sqlite-shm is a symbolic link"),
        ("images", "images is a symbolic link, not a folder"),
    ],
)
async def test_a_symlink_planted_in_out_is_refused_and_nothing_outside_is_touched(
    tmp_path: Path, sim: Any, name: str, says: str
) -> None:
    """Another local user who can write in --out plants links at the names batcher uses:
    the run refuses, naming the link, before anything is sent. (Before: the lock's target
    was truncated, the checkpoint created outside, images written and an unrelated
    ``.part`` file swept outside; a link at -wal/-shm was a traceback.)"""
    manifest = _manifest(tmp_path, instantid=2)
    server = await sim(time_scale=SCALE, image_size=(32, 32))
    out, outside = manifest.parent / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (outside / "precious.txt").write_text("precious")
    (outside / "folder").mkdir()
    (outside / "folder" / "theirs.part").write_text("another program's partial file")
    # The checkpoint's link dangles, as a fresh attack's would: SQLite would create it.
    target = {"images": "folder", "checkpoint.sqlite": "made.sqlite"}.get(name, "precious.txt")
    (out / name).symlink_to(outside / target)
    before = _tree(outside)

    with pytest.raises(UsageError) as info:
        await arun(_options(manifest, server))

    assert says in str(info.value)
    assert str(out / name) in str(info.value)
    assert _tree(outside) == before
    assert _count(server, "submit", "200") == 0


@pytest.mark.parametrize("what", ["text", "folder"])
async def test_a_checkpoint_that_is_not_one_is_refused_and_left_as_it_is(
    tmp_path: Path, sim: Any, what: str
) -> None:
    """Before: a traceback (sqlite3.DatabaseError / OperationalError), exit 1."""
    manifest = _manifest(tmp_path, instantid=2)
    server = await sim(time_scale=SCALE, image_size=(32, 32))
    out = manifest.parent / "out"
    out.mkdir()
    path = out / "checkpoint.sqlite"
    if what == "folder":
        path.mkdir()
    else:
        path.write_text("notes, not a database " * 20)
    before = _tree(out)

    with pytest.raises(UsageError, match="cannot open it as batcher's checkpoint") as info:
        await arun(_options(manifest, server))

    assert str(info.value).startswith(f"{path}: ")
    assert "move it away" in str(info.value)
    assert {k: v for k, v in _tree(out).items() if k != ".lock"} == before
    assert _count(server, "submit", "200") == 0


async def test_a_folder_at_results_parquet_keeps_the_work_and_says_what_to_fix(
    tmp_path: Path, sim: Any
) -> None:
    """Before: a traceback (IsADirectoryError) at the end of the run."""
    manifest = _manifest(tmp_path, instantid=3)
    server = await sim(time_scale=SCALE, image_size=(32, 32))
    out = manifest.parent / "out"
    (out / "results.parquet").mkdir(parents=True)

    with pytest.raises(UsageError) as info:
        await arun(_options(manifest, server))

    message = str(info.value)
    assert message.startswith(f"cannot write {out / 'results.parquet'} (")
    assert f"every row is saved in {out / 'checkpoint.sqlite'}" in message
    assert "move away what is at its name" in message
    assert "run the same command again" in message
    assert in_checkpoint(out, "COMPLETED") == 3
    assert not list(out.glob("*.part"))

    (out / "results.parquet").rmdir()
    second = await arun(_options(manifest, server))

    assert second.exit_code == EXIT_OK, second.text()
    assert {r["status"] for r in _results(out).values()} == {"COMPLETED"}
    assert _count(server, "submit", "200") == 3  # nothing was sent again


async def test_results_go_through_a_new_temporary_file_never_a_planted_link(
    tmp_path: Path, sim: Any
) -> None:
    """Before: results were written through ``results.parquet.part``, a fixed name, so a
    link there had its target overwritten and results.parquet became a link to it."""
    manifest = _manifest(tmp_path, instantid=2)
    server = await sim(time_scale=SCALE, image_size=(32, 32))
    out = manifest.parent / "out"
    out.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("precious")
    (out / "results.parquet.part").symlink_to(victim)
    (out / "results.parquet.0badc0de.part").write_bytes(b"left by a killed run")

    result = await arun(_options(manifest, server))

    assert result.exit_code == EXIT_OK, result.text()
    assert victim.read_text() == "precious"
    assert not (out / "results.parquet").is_symlink()
    assert len(_results(out)) == 2
    assert not (out / "results.parquet.0badc0de.part").exists()


async def test_a_run_sweeps_only_the_temporary_files_its_own_writers_name(
    tmp_path: Path, sim: Any
) -> None:
    """Before: every ``results.parquet.*.part`` and every ``images/*.part`` was deleted,
    a user's file with a similar name and a link at a temporary name included."""
    manifest = _manifest(tmp_path, instantid=2)
    server = await sim(time_scale=SCALE, image_size=(32, 32))
    out = manifest.parent / "out"
    (out / "images").mkdir(parents=True)
    victim = tmp_path / "precious.part"
    victim.write_text("precious")
    left = [out / "results.parquet.0badc0de.part", out / "images" / "g0_0.png.0badc0de.part"]
    theirs = [out / "results.parquet.backup.part", out / "images" / "notes.part"]
    for path in left + theirs:
        path.write_bytes(b"half a file")
    (out / "results.parquet.1badc0de.part").symlink_to(victim)

    result = await arun(_options(manifest, server))

    assert result.exit_code == EXIT_OK, result.text()
    assert not [p for p in left if p.exists()]
    assert all(p.read_bytes() == b"half a file" for p in theirs)
    assert (out / "results.parquet.1badc0de.part").is_symlink()
    assert victim.read_text() == "precious"


async def test_ctrl_c_while_the_manifest_is_read_stops_at_once_with_nothing_sent(
    tmp_path: Path,
) -> None:
    """A stop signal during the scan of a large manifest ended only when the scan did
    (~40 s for 300,000 rows); the scan now looks every 4,096 rows."""
    manifest = tmp_path / "big.csv"
    with manifest.open("w") as f:
        f.write("id,prompt,face_image\n")
        f.writelines(f"r{n},p {n},https://example.com/f.jpg\n" for n in range(50_000))
    interrupted = asyncio.Event()
    interrupted.set()  # Ctrl-C already came
    options = RunOptions(
        manifest=manifest, out=tmp_path / "out", model="instantid", simulate=True, progress=False
    )
    result = await arun(options, interrupted=interrupted)
    assert result.exit_code == EXIT_STOPPED
    assert result.stop_reason is not None
    assert "(row 4096): nothing was sent" in result.stop_reason
    assert not (tmp_path / "out").exists()  # stopped before anything was written


async def test_a_load_stopped_between_batches_keeps_what_it_recorded(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,prompt,face_image\n"
        + "".join(f"r{n},p {n},https://example.com/f.jpg\n" for n in range(3 * BATCH))
    )
    asked = 0

    def stop() -> bool:
        nonlocal asked
        asked += 1
        return asked > 1  # after the first batch

    async with Checkpoint(tmp_path / "c.sqlite") as cp:
        with pytest.raises(Interrupted, match=f"row {BATCH}"):
            await load(cp, str(manifest), "instantid", ImageInputs(tmp_path), stop)
        assert await cp.counts() == {"PENDING": BATCH}


async def test_a_stopped_run_keeps_the_polls_of_the_jobs_it_leaves_in_flight(
    tmp_path: Path, sim: Any
) -> None:
    """`batcher report` counts a folder's API requests from its rows. A job's polls were
    saved only when it ended, so a run stopped (or killed) with jobs in flight lost all
    of theirs: 1,500 InfiniteYou rows killed 3 times lost 522 of the server's 6,048."""
    manifest = _manifest(tmp_path, instantid=1, infinite_you=4)
    server = await sim(
        time_scale=SCALE, latency_median_s={"infinite-you": 1500.0}, image_size=(64, 64)
    )
    options = _options(manifest, server)
    first = await _interrupted_run(options, lambda: _count(server, "status", "200") >= 12)

    assert first.exit_code == EXIT_STOPPED
    rows = _results(options.out)
    assert {r["status"] for i, r in rows.items() if i.startswith("y")} == {"SUBMITTED"}
    seen = _count(server, "status", "200")
    saved = sum(r["polls"] for r in rows.values())
    # Missing at most the polls the stop cut off on the wire: one a job in flight.
    assert seen - 4 <= saved <= seen, (saved, seen)


async def test_unfinished_rows_of_a_model_no_longer_known_stop_the_run_with_what_to_do(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model from a file in BATCHER_MODEL_DIRS: a run stopped with its jobs in flight and
    rows not yet sent, resumed without that folder. Before: a KeyError traceback (the poll
    schedule and the feeder look the model up). Now the run stops before sending anything,
    says which model and how many rows, and resumes once the folder is back."""
    spec = json.loads((Path(schemas_module.__file__).parent / "instantid.json").read_text())
    spec["slug"] = "toy-id"
    spec["latency"]["median_s"] = 400.0
    models = tmp_path / "models"
    models.mkdir()
    (models / "toy-id.json").write_text(json.dumps(spec))
    monkeypatch.setenv("BATCHER_MODEL_DIRS", str(models))
    manifest = _csv(
        tmp_path,
        "id,model,prompt,face_image\n"
        + "".join(f"t{n},toy-id,portrait {n},face.png\n" for n in range(40)),
    )
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    options = _options(manifest, server, max_in_flight=4)
    first = await _stopped_at(options, "SUBMITTED", 2)
    assert first.exit_code == EXIT_STOPPED
    before = {r["id"]: r["status"] for r in _results(options.out).values()}
    submitted = sum(state == "SUBMITTED" for state in before.values())
    assert submitted >= 2
    assert "PENDING" in before.values()
    posts = _count(server, "submit", "200")

    monkeypatch.delenv("BATCHER_MODEL_DIRS")
    # Rows left SUBMITTING (a submit cut off on the wire) end FAILED without their model.
    work = sum(state in ("PENDING", "SUBMITTED") for state in before.values())
    told = f"{work} rows of model 'toy-id' still to send or fetch ({submitted} of them in flight"
    with pytest.raises(UsageError) as refused:
        await arun(options)
    assert told in str(refused.value)
    assert "BATCHER_MODEL_DIRS: set it as it was when those rows were taken" in str(refused.value)
    # A manifest read again (touched, or edited) would fail its scan on the unknown model:
    # the same message, not "model=toy-id is not a known model" alone.
    stat = manifest.stat()
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(UsageError) as refused_again:
        await arun(options)
    assert told in str(refused_again.value)
    # A FAILED row --retry-failed would reopen counts, and stays FAILED: the run that
    # refuses changes nothing (reopened, the next run without the flag would send it).
    pending = next(i for i, state in before.items() if state == "PENDING")
    db = sqlite3.connect(options.out / "checkpoint.sqlite")
    with db:
        db.execute("UPDATE jobs SET state='FAILED', error='HTTP 400: bad' WHERE id=?", (pending,))
    with pytest.raises(UsageError, match=f"{work} rows of model 'toy-id'"):
        await arun(dataclasses.replace(options, retry_failed=True))
    assert db.execute("SELECT state FROM jobs WHERE id=?", (pending,)).fetchone() == ("FAILED",)
    with db:
        db.execute("UPDATE jobs SET state='PENDING', error=NULL WHERE id=?", (pending,))
    db.close()
    assert _count(server, "submit", "200") == posts
    async with Checkpoint(options.out / "checkpoint.sqlite") as cp:
        counts = await cp.counts()
    assert counts.get("PENDING", 0) + counts.get("SUBMITTED", 0) == work  # as it was

    monkeypatch.setenv("BATCHER_MODEL_DIRS", str(models))
    done = await arun(options)
    assert done.exit_code == EXIT_OK
    assert {r["status"] for r in _results(options.out).values()} == {"COMPLETED"}
    assert _count(server, "submit", "200") == 40  # none sent twice
