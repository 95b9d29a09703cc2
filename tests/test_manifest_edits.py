"""A manifest edited between two runs into the same --out: what is sent again, what is
refused, and that nothing already paid for is paid again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from batcher.errors import ManifestError
from batcher.options import RunOptions
from batcher.run import EXIT_OK, arun
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
    return RunOptions(
        manifest=manifest,
        out=manifest.parent / "out",
        model="instantid",
        base_url=sim.base_url,
        time_scale=sim.config.time_scale,
        api_key=KEY,
        progress=False,
        **changes,
    )


def _results(out: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}


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
    options = _options(manifest, server)
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
