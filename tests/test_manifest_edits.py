"""A manifest edited between two runs into the same --out: what is sent again, what is
refused, and that nothing already paid for is paid again."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import in_checkpoint, interrupted_run, results_by_id, sim_run_options
from PIL import Image

from batcher import intake
from batcher.backoff import RetryConfig
from batcher.errors import ManifestError
from batcher.options import RunOptions
from batcher.run import EXIT_FAILED_ROWS, EXIT_OK, EXIT_STOPPED, arun
from batcher.sim import SimServer

SCALE = 0.002
KEY = "sk-edits-0123456789abcdef"


def _manifest(tmp_path: Path, text: str, name: str = "jobs.csv") -> Path:
    """A manifest of these lines, beside the face.png its rows may name."""
    Image.new("RGB", (64, 64), (200, 150, 120)).save(tmp_path / "face.png")
    manifest = tmp_path / name
    manifest.write_text(text)
    return manifest


def _options(manifest: Path, sim: SimServer, **changes: Any) -> RunOptions:
    return sim_run_options(manifest, sim, KEY, **changes)


_results = results_by_id


async def test_rows_whose_id_changed_are_refused_not_paid_for_again(
    tmp_path: Path, sim: Any
) -> None:
    """Before, taking the id column out (or renaming every id) made every row new: all
    of them were sent and paid for a second time, exit 0, and results.parquet held each
    row twice."""
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    manifest = _manifest(
        tmp_path,
        "id,prompt,face_image,seed\na,one,face.png,1\nb,two,face.png,2\nc,three,face.png,3\n",
    )
    options = _options(manifest, server, model="instantid")
    assert (await arun(options)).exit_code == EXIT_OK
    done = _results(options.out)
    requests = server.stats()["requests"]
    manifest.write_text(
        "prompt,face_image,seed\none,face.png,1\ntwo,face.png,2\nthree,face.png,3\n"
    )

    with pytest.raises(ManifestError) as refused:
        await arun(options)

    message = str(refused.value)
    assert "row 1 (id 1) has the parameters of id a (COMPLETED)" in message
    assert "row 3 (id 3) has the parameters of id c (COMPLETED)" in message
    assert "Nothing was sent" in message
    assert server.stats()["requests"] == requests
    assert server.stats()["accepted"] == 3
    assert _results(options.out) == done

    # Refused again, the same way, however often it is run: the rows it read are not kept.
    with pytest.raises(ManifestError, match="has the parameters of id a"):
        await arun(options)
    assert server.stats()["accepted"] == 3

    # A row new in every way is still welcome beside the ids given back.
    manifest.write_text(
        "id,prompt,face_image,seed\na,one,face.png,1\nb,two,face.png,2\nc,three,face.png,3\n"
        "d,four,face.png,4\n"
    )
    assert (await arun(options)).exit_code == EXIT_OK
    assert sorted(_results(options.out)) == ["a", "b", "c", "d"]
    assert server.stats()["accepted"] == 4
    assert server.stats()["paid_twice"] == 0


async def test_rows_taken_out_are_not_sent_again_by_a_retry(tmp_path: Path, sim: Any) -> None:
    """Before, a row taken out of the manifest was sent again by a retry: a FAILED one by
    --retry-failed, one in flight when its job FAILED (or its result expired). Each was
    paid for again, for a row the user no longer wanted."""
    server = await sim(
        time_scale=SCALE, latency_median_s={"infinite-you": 400.0}, image_size=(64, 64)
    )
    rows = {
        "gone_failed": "gone_failed,instantid,portrait sim:no-face,face.png,",
        "kept_failed": "kept_failed,instantid,portrait sim:no-face,face.png,",
        "gone_slow": "gone_slow,infinite-you,gentleman sim:blocked,,face.png",
        "ok": "ok,instantid,portrait,face.png,",
    }
    header = "id,model,prompt,face_image,id_image\n"
    manifest = _manifest(tmp_path, header + "".join(f"{r}\n" for r in rows.values()))
    out = tmp_path / "out"
    first = await interrupted_run(
        _options(manifest, server, retry=RetryConfig(max_failed_retries=0)),
        lambda: in_checkpoint(out, "FAILED") == 2 and in_checkpoint(out, "SUBMITTED") == 1,
    )
    assert first.exit_code == EXIT_STOPPED
    assert _results(out)["gone_slow"]["status"] == "SUBMITTED"
    assert server.stats()["accepted"] == 4
    # InstantID rows only now: the id_image column goes with the InfiniteYou row.
    kept = [rows["kept_failed"], rows["ok"]]
    manifest.write_text(header.replace(",id_image", "") + "".join(f"{r[:-1]}\n" for r in kept))

    second = await arun(_options(manifest, server, retry_failed=True))

    assert second.exit_code == EXIT_FAILED_ROWS, second.text()
    final = _results(out)
    assert final["kept_failed"]["attempts"] == 2  # sent again, as asked
    assert final["gone_failed"]["attempts"] == 1
    assert final["gone_failed"]["error"] == "No face detected in the input image"
    assert final["gone_slow"]["attempts"] == 1
    assert final["gone_slow"]["status"] == "FAILED"
    assert "no longer in the manifest" in final["gone_slow"]["error"]
    assert server.stats()["accepted"] == 5  # kept_failed again, nothing taken out

    # Put back, a row taken out is the manifest's again: --retry-failed may send it.
    manifest.write_text(header + "".join(f"{r}\n" for r in rows.values()))
    third = await arun(_options(manifest, server, retry_failed=True))
    assert third.exit_code == EXIT_FAILED_ROWS, third.text()
    final = _results(out)
    assert final["gone_failed"]["attempts"] == 2
    assert final["gone_slow"]["attempts"] == 2


class _SetOnCall(asyncio.Event):
    """An interrupt that reads as set from its ``n``-th look on: a Ctrl-C in the middle of
    reading the manifest, between two batches of rows."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.looks, self.n = 0, n

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks >= self.n


async def test_rows_of_a_manifest_read_in_part_are_not_sent_once_the_old_one_is_back(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, a Ctrl-C while an edited manifest was read kept the rows read so far and
    the folder's record of the manifest before: the old file put back as it was (`mv
    jobs.csv.bak jobs.csv` keeps its time) was not read again, and the edit's rows, in no
    manifest now, were sent."""
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    manifest = _manifest(tmp_path, "id,prompt,face_image\na,one,face.png\nb,two,face.png\n")
    options = _options(manifest, server, model="instantid")
    assert (await arun(options)).exit_code == EXIT_OK
    old, old_stat = manifest.read_bytes(), manifest.stat()
    manifest.write_text(
        "id,prompt,face_image\na,one,face.png\nb,two,face.png\n"
        + "".join(f"n{i},new {i},face.png\n" for i in range(4))
    )
    monkeypatch.setattr(intake, "check_rows", functools.partial(intake.check_rows, batch=2))

    stopped = await arun(options, interrupted=_SetOnCall(3))  # after 2 batches of 2 rows

    assert stopped.exit_code == EXIT_STOPPED
    manifest.write_bytes(old)
    os.utime(manifest, ns=(old_stat.st_atime_ns, old_stat.st_mtime_ns))

    assert (await arun(options)).exit_code == EXIT_OK
    assert sorted(_results(options.out)) == ["a", "b"]
    assert server.stats()["accepted"] == 2


async def test_the_same_rows_in_another_format_are_the_same_jobs(tmp_path: Path, sim: Any) -> None:
    """CSV cells are text, JSON Lines and Parquet cells typed: before, the same rows
    written as JSON Lines or Parquet were refused as "changed" (their cells, not what is
    sent, were compared), and the folder could not be resumed with them."""
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    csv_manifest = _manifest(
        tmp_path,
        "id,prompt,face_image,seed,identity_strength,enhance_face_region\n"
        "a,one,face.png,1,0.8,true\nb,two,face.png,2,0.80,false\n",
    )
    options = _options(csv_manifest, server, model="instantid")
    assert (await arun(options)).exit_code == EXIT_OK
    done = _results(options.out)
    table = pacsv.read_csv(csv_manifest, convert_options=pacsv.ConvertOptions())
    as_parquet = tmp_path / "jobs.parquet"
    pq.write_table(table, as_parquet)
    as_jsonl = tmp_path / "jobs.jsonl"
    as_jsonl.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))

    for manifest in (as_jsonl, as_parquet, csv_manifest):
        result = await arun(dataclasses.replace(options, manifest=manifest))
        assert result.exit_code == EXIT_OK, result.text()

    assert server.stats()["accepted"] == 2
    assert _results(options.out) == done


async def test_a_row_not_sent_yet_takes_its_edit(tmp_path: Path, sim: Any) -> None:
    """Before, a row still PENDING (never sent) that was edited between two runs was
    refused as "changed" like a row paid for, and the run could not go on."""
    server = await sim(time_scale=SCALE, latency_median_s={"instantid": 400.0})
    manifest = _manifest(
        tmp_path, "id,prompt,face_image\n" + "".join(f"r{i},p {i},face.png\n" for i in range(4))
    )
    options = _options(manifest, server, model="instantid", max_in_flight=1)
    out = options.out
    first = await interrupted_run(options, lambda: in_checkpoint(out, "SUBMITTED") == 1)
    assert first.exit_code == EXIT_STOPPED
    assert _results(out)["r3"]["status"] == "PENDING"
    manifest.write_text(manifest.read_text().replace("p 3", "p three"))

    second = await arun(options)

    assert second.exit_code == EXIT_OK, second.text()
    assert json.loads(_results(out)["r3"]["params"])["prompt"] == "p three"
    assert server.stats()["accepted"] == 4


async def test_a_failed_row_edited_is_sent_with_its_edit_by_retry_failed(
    tmp_path: Path, sim: Any
) -> None:
    """Before, a FAILED row fixed in the manifest ("No face detected": another face) was
    refused as "changed", with or without --retry-failed."""
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    manifest = _manifest(
        tmp_path, "id,prompt,face_image\nbad,p sim:no-face,face.png\ngood,p,face.png\n"
    )
    options = _options(manifest, server, model="instantid", retry=RetryConfig(max_failed_retries=0))
    assert (await arun(options)).exit_code == EXIT_FAILED_ROWS
    manifest.write_text(manifest.read_text().replace("p sim:no-face", "p fixed"))

    with pytest.raises(ManifestError, match=r"row 1 \(id bad\).*FAILED row.*--retry-failed"):
        await arun(options)
    result = await arun(dataclasses.replace(options, retry_failed=True))

    assert result.exit_code == EXIT_OK, result.text()
    bad = _results(options.out)["bad"]
    assert (bad["status"], bad["attempts"]) == ("COMPLETED", 2)
    assert json.loads(bad["params"])["prompt"] == "p fixed"
    assert server.stats()["accepted"] == 3


async def test_rows_without_ids_shifted_by_an_insert_are_told_why(tmp_path: Path, sim: Any) -> None:
    """Rows with no id are known by their row number: before, a row added at the top
    refused every row below as "changed", with nothing to say that the ids had moved."""
    server = await sim(time_scale=SCALE, image_size=(64, 64))
    manifest = _manifest(tmp_path, "prompt,face_image\none,face.png\ntwo,face.png\n")
    options = _options(manifest, server, model="instantid")
    assert (await arun(options)).exit_code == EXIT_OK
    manifest.write_text("prompt,face_image\nzero,face.png\none,face.png\ntwo,face.png\n")

    with pytest.raises(ManifestError, match="known by their row number: a row added") as refused:
        await arun(options)

    assert "row 1 (id 1), row 2 (id 2) now have different parameters" in str(refused.value)
    assert server.stats()["accepted"] == 2
