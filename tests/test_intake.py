"""Intake: what a run says on the terminal about the rows it records before sending."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from batcher.checkpoint import Checkpoint
from batcher.inputs import ImageInputs
from batcher.intake import SHOWN_INVALID, load

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
