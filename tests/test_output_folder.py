"""What a finished run does with an output folder someone changed since: results.parquet
replaced, emptied, or turned into a link."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import url_manifest

from batcher.checkpoint import Checkpoint
from batcher.cli import main
from batcher.errors import CheckpointUnwritable
from batcher.options import RunOptions
from batcher.run import EXIT_OK, arun
from batcher.sim import SimServer

KEY = "sk-folder-0123456789abcdef"
SCALE = 0.002


def _options(tmp_path: Path, server: SimServer, rows: int) -> RunOptions:
    return RunOptions(
        manifest=url_manifest(tmp_path, rows),
        out=tmp_path / "out",
        model="instantid",
        base_url=server.base_url,
        time_scale=SCALE,
        api_key=KEY,
        progress=False,
    )


def _other_parquet(path: Path) -> None:
    pq.write_table(pa.table({"a": [1]}), path)


def _same_columns_other_rows(path: Path) -> None:
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 1), path)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda p: p.write_text("id,status\n"),  # saved over by a spreadsheet
        lambda p: p.write_bytes(b""),
        _other_parquet,
        _same_columns_other_rows,
    ],
    ids=["csv", "empty", "other-parquet", "other-rows"],
)
async def test_a_finished_run_rewrites_a_results_table_that_is_not_its_own(
    tmp_path: Path, sim: Any, spoil: Any
) -> None:
    """Before, the run that finds every row final read the table as it was to print the
    summary: a traceback (exit 1) when it was not a results.parquet any more, and a
    summary of the wrong rows when it held others."""
    server = await sim(time_scale=SCALE, image_size=(16, 16))
    options = _options(tmp_path, server, 3)
    assert (await arun(options)).exit_code == EXIT_OK
    table = options.out / "results.parquet"
    done = pq.read_table(table)
    requests = server.stats()["requests"]
    spoil(table)

    result = await arun(options)

    assert result.exit_code == EXIT_OK, result.text()
    assert result.summary is not None
    assert result.summary.counts == {"COMPLETED": 3}
    assert pq.read_table(table).equals(done)
    assert server.stats()["requests"] == requests


async def test_a_link_at_results_parquet_is_replaced_not_read(tmp_path: Path, sim: Any) -> None:
    server = await sim(time_scale=SCALE, image_size=(16, 16))
    options = _options(tmp_path, server, 2)
    assert (await arun(options)).exit_code == EXIT_OK
    table = options.out / "results.parquet"
    elsewhere = tmp_path / "elsewhere.parquet"
    table.rename(elsewhere)
    _other_parquet(elsewhere)
    before = elsewhere.read_bytes()
    table.symlink_to(elsewhere)

    result = await arun(options)

    assert result.exit_code == EXIT_OK, result.text()
    assert not table.is_symlink()
    assert pq.read_table(table).num_rows == 2
    assert elsewhere.read_bytes() == before


def test_a_full_disk_while_the_manifest_is_read_stops_resumably_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, the checkpoint refused by the disk while the manifest's rows were recorded
    (before any submit) raised sqlite3's own error: a traceback, exit 1."""
    manifest = tmp_path / "m.csv"
    prompt = "a long prompt " * 40
    manifest.write_text(
        "id,prompt,face_image\n"
        + "".join(f"r{n},{prompt},https://example.com/f.jpg\n" for n in range(2000))
    )
    opened = Checkpoint._open

    def small_disk(self: Checkpoint) -> None:
        opened(self)
        assert self._db is not None
        self._db.execute("PRAGMA max_page_count = 64")  # 256 KiB: full before 2000 rows

    monkeypatch.setattr(Checkpoint, "_open", small_disk)
    out = tmp_path / "out"

    code = main(["run", str(manifest), "--out", str(out), "--model", "instantid", "--simulate"])

    err = capsys.readouterr().err
    assert code == 4, err
    assert "Traceback" not in err
    assert err.startswith(f"batcher: cannot write the checkpoint {out / 'checkpoint.sqlite'}")
    assert "database or disk is full" in err


@pytest.mark.parametrize(
    ("code", "words"), [(13, "database or disk is full"), (4874, "disk I/O error")]
)
async def test_a_checkpoint_a_full_disk_cannot_open_is_not_to_be_moved_away(
    tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    """Before, a finished folder on a full disk (SQLite could not make its WAL files) was
    refused as "cannot open it as batcher's checkpoint ...; move it away (or use another
    --out) to start afresh", exit 2: done so, every row was sent and paid for again."""
    server = await sim(time_scale=SCALE, image_size=(16, 16))
    options = _options(tmp_path, server, 2)
    assert (await arun(options)).exit_code == EXIT_OK

    def full(*args: Any, **kwargs: Any) -> Any:
        error = sqlite3.OperationalError(words)
        error.sqlite_errorcode = code
        raise error

    with monkeypatch.context() as patch:
        patch.setattr(sqlite3, "connect", full)
        with pytest.raises(CheckpointUnwritable) as info:
            await arun(options)

    message = str(info.value)
    assert f"cannot open the checkpoint {options.out / 'checkpoint.sqlite'} ({words})" in message
    assert "move it away" not in message
    assert "run the same command again" in message
    assert (await arun(options)).exit_code == EXIT_OK
    assert server.stats()["accepted"] == 2
