"""Intake: what a run says on the terminal about the rows it records before sending."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import sim_run_options

from batcher.checkpoint import Checkpoint
from batcher.inputs import ImageInputs
from batcher.intake import BATCH, SHOWN_INVALID, load
from batcher.manifest import ticker
from batcher.manifest.ticker import RowTicker
from batcher.run import arun
from batcher.schemas import model_from_json, registry
from batcher.validate_cmd import validate_manifest

FACE = "https://example.com/f.jpg"


async def test_a_run_names_the_rows_sent_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unlisted InstantID style is sent (API_CONTRACT: "an unlisted style should warn,
    not block"). Before, `batcher run` said nothing: the warning was only in a column of
    results.parquet, read after every row had been paid for."""
    manifest = tmp_path / "m.csv"
    rows = [f"w{n},p,{FACE},Watercolour\n" for n in range(SHOWN_INVALID + 2)]
    manifest.write_text("id,prompt,face_image,style\nok,p,https://x/f.jpg,Neon\n" + "".join(rows))
    caplog.set_level(logging.WARNING, logger="batcher.intake")
    async with Checkpoint(tmp_path / "c.sqlite") as cp:
        await load(cp, str(manifest), "instantid", ImageInputs(tmp_path))
        assert await cp.counts() == {"PENDING": SHOWN_INVALID + 3}
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        "sent with a warning: row 2 (id w0): style=Watercolour is not one of the allowed "
        "values ((No style), Watercolor, Film Noir, Neon, Jungle, Mars, ...) (did you mean "
        '"Watercolor"?); sent anyway, the server decides'
    )
    assert len(lines) == SHOWN_INVALID + 1
    assert lines[-1] == "2 more rows sent with a warning; every warning is in results.parquet"


async def test_rows_alike_with_a_fixed_seed_are_named_as_one_image_billed_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """InfiniteYou's default seed is 6255, not random ("null for randomness", which a
    manifest cannot give): rows alike in every parameter are each billed for the same
    image. So are InstantID rows alike with the same seed >= 0; InstantID rows with no
    seed or -1 (random) are not. Said before anything is sent; all are sent."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,model,prompt,id_image,face_image,seed\n"
        f"a,infinite-you,p,{FACE},,\n"  # row 1
        f"b,infinite-you,p,{FACE},,\n"  # row 2 = row 1: both seed 6255
        f"c,infinite-you,p,{FACE},,7\n"  # its own seed
        f"d,instantid,p,,{FACE},\n"  # random seed
        f"e,instantid,p,,{FACE},\n"
        f"f,instantid,p,,{FACE},-1\n"
        f"g,instantid,p,,{FACE},5\n"  # row 7
        f"h,instantid,p,,{FACE},5\n"  # row 8 = row 7
        f"i,infinite-you,p,{FACE},,\n"  # row 9 = row 1
        f"j,infinite-you,q,{FACE},,\n"  # another prompt
    )
    caplog.set_level(logging.WARNING, logger="batcher.intake")
    async with Checkpoint(tmp_path / "c.sqlite") as cp:
        await load(cp, str(manifest), None, ImageInputs(tmp_path))
        assert await cp.counts() == {"PENDING": 10}  # warned, not held back
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        "3 rows repeat an earlier row in every parameter, the seed included (the row's own, "
        "or the model's default when it gives none; a model's default seed is not random: "
        "infinite-you's is 6255): each is billed and gives the same image as the earlier "
        "row: row 2 (id b) = row 1 (id a); row 8 (id h) = row 7 (id g); row 9 (id i) = "
        "row 1 (id a). Sent all the same; give each row its own seed to get different images"
    )


def test_the_seed_a_model_uses_when_a_row_gives_none() -> None:
    models = registry()
    assert models["infinite-you"].seed_when_absent == 6255  # its page's default
    assert models["instantid"].seed_when_absent == -1  # random
    no_seed = model_from_json({"slug": "seedless", "params": {"prompt": {"type": "string"}}})
    assert no_seed.seed_when_absent is None


def test_a_row_ticker_says_the_rows_so_far_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    tick = RowTicker("reading m.csv", total=5000, every_s=10.0, clock=lambda: now[0])
    bare = RowTicker("reading m.jsonl", every_s=10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="batcher.manifest.ticker")
    tick(2000)
    now[0] = 109.9
    tick(3000)  # not 10 s yet since the start
    now[0] = 110.0
    tick(4000)
    bare(4000)
    now[0] = 119.0
    tick(4500)  # 9 s since its last line
    now[0] = 120.0
    tick(5000)
    assert [r.getMessage() for r in caplog.records] == [
        "reading m.csv: 4,000 of 5,000 rows so far",
        "reading m.jsonl: 4,000 rows so far",  # no total known
        "reading m.csv: 5,000 of 5,000 rows so far",
    ]


def _long_manifest(path: Path, rows: int) -> Path:
    """One row to send, then rows without a prompt: INVALID, recorded but never sent."""
    with path.open("w") as f:
        f.write(f"id,prompt,face_image\nok,p,{FACE}\n")
        f.writelines(f"r{n},,{FACE}\n" for n in range(rows - 1))
    return path


async def test_a_run_says_how_far_it_has_read_a_long_manifest(
    tmp_path: Path,
    sim: Any,
    api_key: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 1,000,000-row manifest takes a minute or two to scan and check before the first
    submit, and the terminal said nothing meanwhile: a run that looked hung. Now a line
    every EVERY_S (here every look: the scan's every 4,096 rows, the check's every batch)."""
    monkeypatch.setattr(ticker, "EVERY_S", 0.0)
    manifest = _long_manifest(tmp_path / "m.csv", 9000)
    server = await sim(time_scale=0.001, image_size=(64, 64))
    caplog.set_level(logging.INFO, logger="batcher.manifest.ticker")
    result = await arun(sim_run_options(manifest, server, api_key, model="instantid"))
    assert result.summary is not None
    assert result.summary.counts == {"COMPLETED": 1, "INVALID": 8999}
    assert [r.getMessage() for r in caplog.records if r.name == ticker.__name__] == [
        "reading m.csv: 4,096 rows so far",
        "reading m.csv: 8,192 rows so far",
        *(f"checking the rows of m.csv: {n:,} of 9,000 rows so far" for n in _batch_ends(9000)),
    ]


def _batch_ends(rows: int) -> list[int]:
    return [*range(BATCH, rows, BATCH), rows]


def test_validate_says_how_far_it_has_read_a_long_manifest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ticker, "EVERY_S", 0.0)
    manifest = _long_manifest(tmp_path / "m.csv", 9000)
    caplog.set_level(logging.INFO, logger="batcher.manifest.ticker")
    assert validate_manifest(manifest, "instantid", max_errors=0) == 3  # rows INVALID
    assert [r.getMessage() for r in caplog.records if r.name == ticker.__name__] == [
        "reading m.csv: 4,096 rows so far",
        "reading m.csv: 8,192 rows so far",
        *(f"checking the rows of m.csv: {n:,} of 9,000 rows so far" for n in _batch_ends(9000)),
    ]
