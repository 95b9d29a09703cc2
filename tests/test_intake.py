"""Intake: what a run says on the terminal about the rows it records before sending."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from batcher.checkpoint import Checkpoint
from batcher.inputs import ImageInputs
from batcher.intake import SHOWN_INVALID, load
from batcher.schemas import model_from_json, registry

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
