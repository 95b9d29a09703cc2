"""An output folder belongs to one service: the built-in emulator (--simulate) or one
--base-url's origin. Its request ids mean nothing anywhere else, and its images must not
be mixed with another service's, so a run for another service is refused before anything
is sent or polled. (Before: a folder filled with --simulate was taken by a real run as
finished, 0 requests, exit 0; one half done had emulator request ids polled for real.)
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import in_checkpoint, until, url_manifest

from batcher.checkpoint import Checkpoint
from batcher.client import DEFAULT_BASE_URL
from batcher.errors import UsageError
from batcher.gate import RateConfig
from batcher.options import RunOptions
from batcher.run import EXIT_OK, EXIT_STOPPED, arun
from batcher.sim import SimConfig, SimServer

KEY = "sk-service-0123456789abcdef"
SCALE = 0.002
#: InstantID jobs of 0.8 s at SCALE: surely in flight when a run is stopped.
LONG = {"instantid": 400.0}


def _options(manifest: Path, base_url: str | None = None, **changes: Any) -> RunOptions:
    """Against ``base_url``, or the built-in emulator when there is none."""
    simulate = base_url is None
    latency = changes.pop("latency", {})
    return RunOptions(
        manifest=manifest,
        out=manifest.parent / "out",
        model="instantid",
        base_url=base_url or DEFAULT_BASE_URL,
        simulate=simulate,
        sim=SimConfig(image_size=(16, 16), latency_median_s=latency) if simulate else None,
        rate=RateConfig(requests=100_000, period_s=1.0),
        api_key=KEY,
        progress=False,
        **{"time_scale": SCALE, **changes},
    )


async def _in_flight(options: RunOptions, rows: int) -> None:
    """Run until every row is SUBMITTED, then stop: the folder holds request ids only."""
    interrupted = asyncio.Event()
    task = asyncio.create_task(arun(options, interrupted=interrupted))
    await until(lambda: in_checkpoint(options.out, "SUBMITTED") == rows or task.done())
    interrupted.set()
    assert (await task).exit_code == EXIT_STOPPED


def _requests(server: SimServer) -> int:
    return sum(sum(by.values()) for by in server.stats()["requests"].values())


def _rows(out: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(out / "checkpoint.sqlite")
    try:
        return db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
    finally:
        db.close()


def _service(out: Path) -> str | None:
    return Checkpoint.read_meta(out / "checkpoint.sqlite", "service")


def _origin(server: SimServer) -> str:
    return f"http://127.0.0.1:{server.port}"


async def test_a_half_simulated_folder_is_refused_before_its_request_ids_are_polled(
    tmp_path: Path, sim: Any
) -> None:
    manifest = url_manifest(tmp_path, 6)
    options = _options(manifest, latency=LONG)
    await _in_flight(options, 6)
    rows = _rows(options.out)
    server = await sim(time_scale=SCALE)

    with pytest.raises(UsageError, match=r"jobs sent to the built-in emulator \(--simulate\)"):
        await arun(_options(manifest, server.base_url))

    assert _requests(server) == 0
    assert _rows(options.out) == rows  # nothing reopened, failed or marked
    assert _service(options.out) == "simulate"


@pytest.mark.parametrize("then", ["another base URL", "simulate"])
async def test_a_folder_of_one_base_url_is_refused_by_another_service(
    tmp_path: Path, sim: Any, then: str
) -> None:
    manifest = url_manifest(tmp_path, 6)
    first = await sim(time_scale=SCALE, latency_median_s=LONG)
    options = _options(manifest, first.base_url)
    await _in_flight(options, 6)
    rows, sent = _rows(options.out), _requests(first)
    second = await sim(time_scale=SCALE)

    again = _options(manifest) if then == "simulate" else _options(manifest, second.base_url)

    with pytest.raises(UsageError) as info:
        await arun(again)

    message = str(info.value)
    now = "the built-in emulator (--simulate)" if then == "simulate" else _origin(second)
    assert f"holds jobs sent to {_origin(first)}, not to {now}" in message
    assert f"Use another --out for {now}" in message
    assert f"run again with --base-url {_origin(first)}" in message
    assert ("without --simulate" in message) is (then == "simulate")
    assert _requests(second) == 0
    assert _requests(first) == sent
    assert _rows(options.out) == rows


async def test_the_same_service_resumes_and_is_recorded_by_its_origin_alone(
    tmp_path: Path, sim: Any
) -> None:
    """A base URL written another way (a trailing slash) is the same service; the record
    is its origin, without the path or query of the URL."""
    manifest = url_manifest(tmp_path, 6)
    server = await sim(time_scale=SCALE, latency_median_s=LONG)
    options = _options(manifest, server.base_url)
    await _in_flight(options, 6)
    assert _service(options.out) == _origin(server)

    result = await arun(_options(manifest, server.base_url + "/"))

    assert result.exit_code == EXIT_OK, result.text()
    rows = pq.read_table(options.out / "results.parquet").to_pylist()
    assert {r["status"] for r in rows} == {"COMPLETED"}
    assert server.stats()["paid_twice"] == 0
    assert sum(server.stats()["requests"]["submit"].values()) == 6  # polled, not sent again
    assert _service(options.out) == _origin(server)


async def test_a_simulated_folder_resumes_with_simulate(tmp_path: Path) -> None:
    """Each run's emulator has its own port: the record is "simulate", not its URL."""
    manifest = url_manifest(tmp_path, 6)
    options = _options(manifest, latency=LONG)
    await _in_flight(options, 6)

    result = await arun(_options(manifest))

    assert result.exit_code == EXIT_OK, result.text()
    assert _service(options.out) == "simulate"


async def test_a_folder_from_before_the_record_resumes_and_gets_it(
    tmp_path: Path, sim: Any
) -> None:
    manifest = url_manifest(tmp_path, 6)
    server = await sim(time_scale=SCALE, latency_median_s=LONG)
    options = _options(manifest, server.base_url)
    await _in_flight(options, 6)
    db = sqlite3.connect(options.out / "checkpoint.sqlite")
    try:
        db.execute("DELETE FROM meta WHERE key='service'")  # as a folder of an older batcher
        db.commit()
    finally:
        db.close()

    result = await arun(options)

    assert result.exit_code == EXIT_OK, result.text()
    assert _service(options.out) == _origin(server)
    with pytest.raises(UsageError, match="another --out"):  # recorded from now on
        await arun(_options(manifest))


async def test_a_folder_whose_rows_were_never_sent_goes_to_the_next_service(
    tmp_path: Path, sim: Any
) -> None:
    """A review's case: a first run against a mistyped --base-url (connection refused)
    sends nothing and stops. Before, the folder stayed bound to that URL: the right one
    was refused, "holds jobs sent to" a service that never had any."""
    manifest = url_manifest(tmp_path, rows=2)
    server = await sim(time_scale=SCALE, image_size=(16, 16))
    typo = f"http://127.0.0.1:{_closed_port()}"
    first = await arun(_options(manifest, typo))
    assert first.exit_code == EXIT_STOPPED, first.text()
    assert _service(manifest.parent / "out") == f"{typo}"

    second = await arun(_options(manifest, server.base_url))

    assert second.exit_code == EXIT_OK, second.text()
    assert _service(manifest.parent / "out") == _origin(server)
    assert server.stats()["accepted"] == 2


def _closed_port() -> int:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_jobs_in_flight_are_not_resumed_at_another_time_scale(
    tmp_path: Path, sim: Any
) -> None:
    """A result is kept an hour of the service's time: --time-scale is what a resumed run
    counts it in. Before, a resume with a smaller --time-scale (0.001 against jobs sent at
    1, say) took every job in flight older than 3.6 s for expired and paid for it again;
    a larger one polled them at the wrong pace."""
    manifest = url_manifest(tmp_path, 6)
    server = await sim(time_scale=SCALE, latency_median_s=LONG)
    options = _options(manifest, server.base_url)
    await _in_flight(options, 6)
    rows, sent = _rows(options.out), _requests(server)

    with pytest.raises(UsageError) as info:
        await arun(_options(manifest, server.base_url, time_scale=SCALE / 2))

    message = str(info.value)
    assert f"6 jobs in flight sent with --time-scale {SCALE:g}" in message
    assert f"Run again with --time-scale {SCALE:g}" in message
    assert _requests(server) == sent
    assert _rows(options.out) == rows

    # With the folder's scale, they finish; with nothing in flight, any scale will do.
    assert (await arun(options)).exit_code == EXIT_OK
    assert (await arun(_options(manifest, server.base_url, time_scale=SCALE / 2))).exit_code == 0
    assert sum(server.stats()["requests"]["submit"].values()) == 6
