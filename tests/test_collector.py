"""The collector's young-generation threshold while batcher works, and after."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

import batcher.validate_cmd as validate_cmd
from batcher.collector import YOUNG_THRESHOLD, fewer_collections


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
