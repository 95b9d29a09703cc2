"""An INVALID row was never sent: fixing it (or adding its missing image) and running the
same command again completes it, instead of calling the manifest "changed"."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from batcher.options import RunOptions
from batcher.run import arun


def _write(path: Path, rows: list[str]) -> None:
    path.write_text("id,prompt,face_image,guidance_scale\n" + "\n".join(rows) + "\n")


async def _run(manifest: Path, out: Path) -> dict[str, dict[str, object]]:
    result = await arun(
        RunOptions(
            manifest=manifest,
            out=out,
            model="instantid",
            simulate=True,
            progress=False,
            api_key="sk-invalid-fixed-0123",
        )
    )
    table = pq.read_table(out / "results.parquet").to_pylist()
    return {"exit": {"code": result.exit_code}, **{r["id"]: r for r in table}}


async def test_fixed_invalid_rows_complete_on_the_next_run(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    out = tmp_path / "out"
    _write(manifest, ["ok,p,a.png,5", "range,p,a.png,99", "nofile,p,b.png,5"])
    first = await _run(manifest, out)
    assert first["exit"]["code"] == 3
    assert first["range"]["status"] == "INVALID"
    assert "guidance_scale=99 is above the maximum 25" in str(first["range"]["error"])
    assert first["nofile"]["status"] == "INVALID"
    ok_request = first["ok"]["request_id"]

    _write(manifest, ["ok,p,a.png,5", "range,p,a.png,9", "nofile,p,b.png,5"])
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "b.png")
    second = await _run(manifest, out)
    assert second["exit"]["code"] == 0
    assert {second[i]["status"] for i in ("ok", "range", "nofile")} == {"COMPLETED"}
    assert second["ok"]["request_id"] == ok_request  # the done row was not sent again
