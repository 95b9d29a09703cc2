"""The collector's young-generation threshold while batcher works, and after."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import sim_run_options, url_manifest

import batcher.run as run_module
import batcher.validate_cmd as validate_cmd
from batcher.collector import YOUNG_THRESHOLD, fewer_collections
from batcher.run import EXIT_OK, arun


@pytest.fixture
def threshold() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*before)


@pytest.mark.usefixtures("threshold")
def test_raised_inside_and_set_back_after_even_on_an_error() -> None:
    gc.set_threshold(700, 11, 12)
    inside: list[tuple[int, ...]] = []

    def stopping_run() -> None:
        with fewer_collections():
            inside.append(gc.get_threshold())
            raise RuntimeError("a run that stops")

    with pytest.raises(RuntimeError):
        stopping_run()
    assert inside == [(YOUNG_THRESHOLD, 11, 12)]
    assert gc.get_threshold() == (700, 11, 12)


@pytest.mark.usefixtures("threshold")
@pytest.mark.parametrize("young", [YOUNG_THRESHOLD * 5, 0], ids=["higher", "collection-off"])
def test_a_higher_threshold_or_collection_off_set_by_the_program_is_kept(young: int) -> None:
    gc.set_threshold(young, 10, 10)
    with fewer_collections():
        assert gc.get_threshold() == (young, 10, 10)
    assert gc.get_threshold() == (young, 10, 10)


@pytest.mark.usefixtures("threshold")
def test_validate_reads_the_manifest_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, ...]] = []

    async def check(manifest: Path, model: str | None, max_errors: int) -> int:
        seen.append(gc.get_threshold())
        return 0

    monkeypatch.setattr(validate_cmd, "_check", check)
    gc.set_threshold(700, 10, 10)
    assert validate_cmd.validate_manifest(tmp_path / "m.csv", None, 5) == 0
    assert seen == [(YOUNG_THRESHOLD, 10, 10)]
    assert gc.get_threshold() == (700, 10, 10)


@pytest.mark.usefixtures("threshold")
async def test_a_run_works_under_it_and_sets_the_collector_back_after(
    tmp_path: Path, sim: Any, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raised while the pipeline works (the collector was a seventh of the event loop's
    CPU at full speed), restored after, for a program that runs batcher among other work."""
    server = await sim(time_scale=0.002, image_size=(64, 64))
    seen: list[tuple[int, ...]] = []
    real_work = run_module._work

    async def work(*args: Any) -> Any:
        seen.append(gc.get_threshold())
        return await real_work(*args)

    monkeypatch.setattr(run_module, "_work", work)
    gc.set_threshold(900, 11, 12)
    options = sim_run_options(url_manifest(tmp_path, 3), server, api_key, model="instantid")

    result = await arun(options)

    assert result.exit_code == EXIT_OK, result.text()
    assert seen == [(YOUNG_THRESHOLD, 11, 12)]
    assert gc.get_threshold() == (900, 11, 12)
