"""Reading and preflight-checking job manifests (CSV, Parquet, JSONL), all built in tmp_path."""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import threading
import tracemalloc
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher import manifest
from batcher.errors import ManifestError, UsageError
from batcher.manifest import (
    ManifestInfo,
    ManifestRow,
    fingerprint,
    preflight,
    read_rows,
    records,
    scan,
)
from batcher.validate_cmd import validate_manifest

FACE = "https://example.com/face.png"


def write(tmp_path: Path, name: str, rows: list[dict[str, object]]) -> Path:
    """A manifest of these rows in the format the name's extension says."""
    path = tmp_path / name
    suffix = path.suffix.lower()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if suffix == ".csv":
        lines = [",".join(columns)]
        lines += [",".join(str(row.get(c, "")) for c in columns) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif suffix == ".parquet":
        pq.write_table(pa.table({c: [row.get(c) for row in rows] for c in columns}), path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def rows_of(path: Path, default_model: str | None = "instantid", **kw: int) -> list[ManifestRow]:
    return list(read_rows(path, default_model=default_model, **kw))


def scan_error(path: Path, default_model: str | None = "instantid") -> str:
    with pytest.raises(ManifestError) as info:
        scan(path, default_model=default_model)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message


GOOD = [
    {"id": "a", "prompt": "a cat", "face_image": FACE, "seed": 7},
    {"id": "b", "prompt": "a dog", "face_image": FACE, "seed": 8},
]


# --- reading each format ---------------------------------------------------------------


def test_csv_cells_are_text_and_empty_cells_are_omitted(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text(
        f"id,prompt,face_image,seed,guidance_scale\na,a cat,{FACE},7,\nb,,{FACE},,5.5\n"
    )
    rows = rows_of(path)
    assert [r.id for r in rows] == ["a", "b"]
    assert rows[0].params == {"prompt": "a cat", "face_image": FACE, "seed": "7"}
    assert rows[1].params == {"face_image": FACE, "guidance_scale": "5.5"}
    assert all(r.model == "instantid" and r.problems == () for r in rows)


def test_csv_quoted_cells_keep_commas_and_newlines(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text(f'prompt,face_image\n"a cat, sitting\non a mat",{FACE}\nplain,{FACE}\n')
    rows = rows_of(path)
    assert [r.params["prompt"] for r in rows] == ["a cat, sitting\non a mat", "plain"]
    assert [r.number for r in rows] == [1, 2]


def test_csv_utf8_bom_is_stripped_from_the_first_column(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(f"\ufeffid,prompt,face_image\nx1,café,{FACE}\n".encode())
    assert rows_of(path)[0].id == "x1"
    assert rows_of(path)[0].params["prompt"] == "café"
    assert scan(path, default_model="instantid").columns == ("id", "prompt", "face_image")


def test_parquet_cells_keep_their_types_and_nulls_are_omitted(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": pa.array([7, None, 9], pa.int64()),
            "prompt": ["a", "", None],
            "face_image": [FACE] * 3,
            "seed": pa.array([1, 2, None], pa.int64()),
            "guidance_scale": [5.5, float("nan"), None],
            "base64": [True, False, None],
            "style": [["x", "y"], None, []],
        }
    )
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    one, two, three = rows_of(path)
    assert (one.id, two.id, three.id) == ("7", "2", "9")
    assert one.params == {
        "prompt": "a",
        "face_image": FACE,
        "seed": 1,
        "guidance_scale": 5.5,
        "base64": True,
        "style": ["x", "y"],
    }
    assert type(one.params["seed"]) is int
    assert two.params == {"face_image": FACE, "seed": 2, "base64": False}
    assert three.params == {"face_image": FACE, "style": []}


@pytest.mark.parametrize("name", ["m.csv", "m.parquet", "m.jsonl"])
def test_numbering_and_order_hold_across_small_batches(tmp_path: Path, name: str) -> None:
    rows = [{"id": f"r{i}", "prompt": "p", "face_image": FACE} for i in range(10)]
    got = rows_of(write(tmp_path, name, rows), batch_rows=3)
    assert [r.id for r in got] == [f"r{i}" for i in range(10)]
    assert [r.number for r in got] == list(range(1, 11))


def test_batch_rows_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="batch_rows"):
        read_rows(write(tmp_path, "m.csv", GOOD), default_model="instantid", batch_rows=0)


@pytest.mark.parametrize("name", ["m.jsonl", "m.ndjson", "M.JSONL"])
def test_jsonl_keeps_types_and_skips_blank_lines(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(
        '{"id": "a", "prompt": "x", "seed": 3, "guidance_scale": 2.5, "base64": true}\n'
        "\n   \n"
        '{"prompt": "y", "seed": null, "style": {"k": 1}}\n'
    )
    first, second = rows_of(path)
    assert first.params == {"prompt": "x", "seed": 3, "guidance_scale": 2.5, "base64": True}
    assert (second.number, second.id) == (2, "2")
    assert second.params == {"prompt": "y", "style": {"k": 1}}


def test_jsonl_bad_lines_are_row_problems_not_crashes(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps({"id": "ok", "prompt": "p", "face_image": FACE}).encode()
        + b'\n\n{not json\n[1, 2]\n"text"\n'
        + b'{"prompt": "caf\xe9"}\n'
        + json.dumps({"id": "ok2", "prompt": "p", "face_image": FACE}).encode()
        + b"\n"
    )
    rows = rows_of(path)
    assert [r.number for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0].id == "ok"
    assert rows[0].problems == ()
    assert rows[1].problems[0].startswith("line 3 is not valid JSON (")
    assert rows[2].problems == ("line 4 is not a JSON object (it is list)",)
    assert rows[3].problems == ("line 5 is not a JSON object (it is str)",)
    assert rows[4].problems == ("line 6 is not valid UTF-8",)
    assert (rows[1].id, rows[1].model, rows[1].params) == ("2", "instantid", {})
    assert rows[5].id == "ok2"
    info = scan(path, default_model="instantid")  # row-level: the preflight passes
    assert info.rows == 6


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_jsonl_nan_and_infinity_are_row_problems_not_values(tmp_path: Path, constant: str) -> None:
    """Python's json reads them; JSON has no such numbers. NaN was dropped as 'not given'
    (the server's default used, silently) and Infinity sent as the text 'inf'."""
    path = tmp_path / "m.jsonl"
    path.write_text(
        f'{{"id": "a", "prompt": "p", "face_image": "{FACE}", "adapter_strength": {constant}}}\n'
    )
    (row,) = rows_of(path)
    assert row.problems == (
        f"line 1 is not valid JSON ({constant} is not a JSON number; write null for a value "
        "not given)",
    )


def test_jsonl_nested_too_deeply_is_a_row_problem_not_a_crash(tmp_path: Path) -> None:
    def nested(levels: int) -> str:
        return "[" * levels + "]" * levels

    limit = manifest.MAX_JSON_DEPTH  # the line's object is the first level
    path = tmp_path / "m.jsonl"
    path.write_text(
        f'{{"id": "a", "style": {nested(limit - 1)}}}\n'
        f'{{"id": "b", "style": {nested(limit)}}}\n'
        f'{{"id": "c", "style": {nested(1000)}}}\n'  # past the JSON parser's recursion limit
        f"{nested(1000)}\n"
    )
    rows = rows_of(path)
    assert (rows[0].id, rows[0].problems) == ("a", ())
    too_deep = f"is nested too deeply (more than {limit} levels of [ and {{)"
    assert [r.problems for r in rows[1:]] == [(f"line {n} {too_deep}",) for n in (2, 3, 4)]


def test_a_jsonl_key_given_twice_is_a_row_problem_naming_it(tmp_path: Path) -> None:
    """Before: json kept the last value and the row was sent with it, silently."""
    path = tmp_path / "m.jsonl"
    path.write_text(
        f'{{"id": "a", "prompt": "p", "prompt": "q", "face_image": "{FACE}", "seed": 1, '
        '"seed": 2, "style": {"x": 1, "x": 2}}\n'
        f'{{"id": "b", "prompt": "p", "face_image": "{FACE}", "style": {{"x": 1}}}}\n'
    )
    first, second = rows_of(path)
    assert first.id == "a"
    assert first.problems == tuple(
        f'the key "{key}" is given more than once in the line (only the last would be read): '
        "give it once"
        for key in ("prompt", "seed")
    )
    assert second.problems == ()


def test_validate_says_what_a_cell_is_naming_its_row_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The messages of `batcher validate` as they come from each format: a null cell is
    null (before: prompt='' is required), binary data is named as such, not previewed."""
    jsonl = write(tmp_path, "m.jsonl", [
        {"id": "a", "prompt": None, "face_image": FACE},
        {"id": "b", "prompt": {"x": 1}, "face_image": FACE},
        {"id": "c", "prompt": "p", "face_image": FACE, "style": 3},
    ])  # fmt: skip
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.table({
        "id": ["a", "b"], "prompt": ["p", None], "face_image": [b"\x89PNG\r\n\x1a\n", None],
    }), parquet)  # fmt: skip
    csv = tmp_path / "m.csv"
    csv.write_text(f"id,prompt,face_image\na,,{FACE}\n")

    assert validate_manifest(jsonl, "instantid", 10) == 3
    assert validate_manifest(parquet, "instantid", 10) == 3
    assert validate_manifest(csv, "instantid", 10) == 3
    assert capsys.readouterr().err.splitlines() == [
        f"{jsonl}: row 1 (id a): prompt is null: a value is required",
        f"{jsonl}: row 2 (id b): prompt={{'x': 1}} is an object, not a string",
        f"{jsonl}: row 3 (id c): warning: style=3 is a number where a name is expected (one of "
        '(No style), Watercolor, Film Noir, Neon, Jungle, Mars, ...); sent anyway as "3", '
        "the server decides",
        f"{parquet}: row 1 (id a): face_image is binary data (8 bytes): give base64 text, a "
        "URL or a file path",
        f"{parquet}: row 2 (id b): face_image is null: a value is required; prompt is null: "
        "a value is required",
        f"{csv}: row 1 (id a): prompt is empty: a value is required",
    ]


# --- ids, numbering and models ---------------------------------------------------------


@pytest.mark.parametrize("name", ["m.csv", "m.parquet", "m.jsonl"])
def test_rows_are_numbered_from_one_and_default_id_is_the_number(tmp_path: Path, name: str) -> None:
    rows = [
        {"id": "first", "prompt": "p"},
        {"id": "", "prompt": "q"},
        {"id": "  third  ", "prompt": "r"},
    ]
    got = rows_of(write(tmp_path, name, rows))
    assert [(r.number, r.id) for r in got] == [(1, "first"), (2, "2"), (3, "third")]


def test_without_an_id_column_ids_are_row_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "m.csv", [{"prompt": "p"}] * 3)
    assert [r.id for r in rows_of(path)] == ["1", "2", "3"]


def test_whole_number_float_ids_read_as_integers(tmp_path: Path) -> None:
    path = write(tmp_path, "m.jsonl", [{"id": 5.0}, {"id": 2.5}, {"id": True}])
    one, two, three = rows_of(path)
    assert (one.id, one.problems) == ("5", ())
    assert (two.id, two.problems) == ("2", ("id=2.5 is not text or a whole number",))
    assert three.problems == ("id=True is not text or a whole number",)


@pytest.mark.parametrize("name", ["m.csv", "m.parquet", "m.jsonl"])
def test_model_cell_overrides_the_default_and_an_empty_cell_uses_it(
    tmp_path: Path, name: str
) -> None:
    rows = [{"model": "infinite-you", "prompt": "p"}, {"model": "", "prompt": "q"}]
    got = rows_of(write(tmp_path, name, rows), default_model="instantid")
    assert [r.model for r in got] == ["infinite-you", "instantid"]
    assert all("model" not in r.params for r in got)


def test_unknown_model_in_a_cell_is_a_row_problem_and_not_a_used_model(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "model": "instantidd", "prompt": "p", "face_image": FACE},
        {"id": "b", "model": "instantid", "prompt": "p", "face_image": FACE},
    ]
    path = write(tmp_path, "m.csv", rows)
    bad, good = rows_of(path, default_model=None)
    assert bad.problems == ('model=instantidd is not a known model (did you mean "instantid"?)',)
    assert bad.model == "instantidd"
    assert good.problems == ()
    assert scan(path, default_model=None).models == ("instantid",)


def test_unknown_default_model_is_a_usage_error(tmp_path: Path) -> None:
    path = write(tmp_path, "m.csv", GOOD)
    with pytest.raises(UsageError, match="instantidx"):
        scan(path, default_model="instantidx")
    with pytest.raises(UsageError, match="instantidx"):
        read_rows(path, default_model="instantidx")


def test_bad_ids_are_row_problems_and_path_like_ids_are_fine(tmp_path: Path) -> None:
    rows = [{"id": "a\x00b"}, {"id": "x" * 513}, {"id": "x" * 512}, {"id": "../etc/passwd"}]
    got = rows_of(write(tmp_path, "m.jsonl", rows))
    assert got[0].problems == ('id "a\\u0000b" contains a control character',)
    assert got[1].problems == ("id is 513 characters long; the limit is 512",)
    assert got[2].problems == ()
    assert got[3].problems == ()
    assert got[3].id == "../etc/passwd"


def test_a_lone_surrogate_is_a_row_problem_naming_its_column(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "prompt": "caf\udce9"},
        {"id": "b\udce9", "prompt": "p"},
        {"id": "c", "model": "instantid\udce9", "prompt": "p"},
        {"id": "d", "prompt": "p", "style": ["x", {"k\udce9": 1}]},
        {"id": "e", "prompt": "caf\u00e9 \U0001f600"},  # a surrogate pair is one character
    ]
    got = rows_of(write(tmp_path, "m.jsonl", rows))  # json.dumps writes "\udce9" escapes
    cut = "contains an unpaired surrogate (a character cut in half), not valid Unicode"
    assert [r.problems for r in got] == [
        (f"column prompt: {cut}",),
        (f"column id: {cut}",),
        (f"column model: {cut}",),
        (f"column style: {cut}",),
        (),
    ]
    assert (got[1].id, got[2].model) == ("2", "")  # nothing unencodable is kept as a key
    assert got[4].params["prompt"] == "caf\u00e9 \U0001f600"


def test_digest_follows_model_and_params_only(tmp_path: Path) -> None:
    def row(**kw: object) -> ManifestRow:
        base: dict[str, object] = {"number": 1, "id": "a", "model": "instantid", "params": {}}
        return ManifestRow(**(base | kw))  # type: ignore[arg-type]

    same = row(params={"prompt": "p", "seed": 1})
    assert same.digest == row(params={"seed": 1, "prompt": "p"}, id="z", number=9).digest
    assert same.digest != row(params={"prompt": "p", "seed": 2}).digest
    assert same.digest != row(params={"prompt": "p", "seed": "1"}).digest
    assert same.digest != row(params={"prompt": "p", "seed": 1}, model="infinite-you").digest
    assert len(same.digest) == 64
    assert int(same.digest, 16) >= 0


# --- the preflight scan ----------------------------------------------------------------


def test_scan_reports_format_columns_rows_and_sorted_models(tmp_path: Path) -> None:
    rows = [
        {"id": "1", "model": "instantid", "prompt": "p", "face_image": FACE},
        {"id": "2", "model": "infinite-you", "prompt": "p", "id_image": FACE},
        {"id": "3", "prompt": "p", "face_image": FACE},
    ]
    path = write(tmp_path, "m.parquet", rows)
    info = scan(str(path), default_model="instantid")
    assert info == ManifestInfo(
        path=path,
        format="parquet",
        columns=("id", "model", "prompt", "face_image", "id_image"),
        rows=3,
        models=("infinite-you", "instantid"),
    )


def test_missing_file(tmp_path: Path) -> None:
    message = scan_error(tmp_path / "nope.csv")
    assert "cannot open it" in message
    assert "No such file" in message
    with pytest.raises(ManifestError, match=r"nope\.csv"):
        read_rows(tmp_path / "nope.csv", default_model="instantid")


def test_a_directory_is_not_a_manifest(tmp_path: Path) -> None:
    (tmp_path / "dir.csv").mkdir()
    assert scan_error(tmp_path / "dir.csv").endswith("is a folder, not a manifest file")


def test_a_named_pipe_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    """Opening a FIFO with no writer blocks forever, and a run reads its manifest more
    than once: every entry point refuses it before opening it."""
    fifo = tmp_path / "m.csv"
    os.mkfifo(fifo)
    outcomes: dict[str, str] = {}

    def attempt(name: str, call: Callable[[], object]) -> None:
        try:
            call()
            outcomes[name] = "no error"
        except ManifestError as exc:
            outcomes[name] = str(exc)

    calls: dict[str, Callable[[], object]] = {
        "scan": lambda: scan(fifo, default_model="instantid"),
        "read_rows": lambda: read_rows(fifo, default_model="instantid"),
        "fingerprint": lambda: fingerprint(fifo),
    }
    for name, call in calls.items():
        worker = threading.Thread(target=attempt, args=(name, call), daemon=True)
        worker.start()
        worker.join(timeout=10)
    assert set(outcomes) == set(calls), f"blocked on the pipe: {set(calls) - set(outcomes)}"
    for message in outcomes.values():
        assert message.startswith(f"{fifo}: is not a regular file"), message


def test_parquet_decimals_read_as_numbers_whole_ones_exactly(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    table = pa.table(
        {
            "prompt": ["a", "b"],
            "face_image": [FACE, FACE],
            "seed": pa.array([Decimal("7"), Decimal("123456789012345678")], pa.decimal128(20, 0)),
            "guidance_scale": pa.array([Decimal("5.50"), None], pa.decimal128(4, 2)),
        }
    )
    pq.write_table(table, path)
    rows = list(read_rows(path, default_model="instantid"))
    assert [r.params.get("seed") for r in rows] == [7, 123456789012345678]
    assert type(rows[0].params["seed"]) is int
    assert rows[0].params["guidance_scale"] == 5.5
    assert "guidance_scale" not in rows[1].params  # null: not given
    assert scan(path, default_model="instantid").rows == 2


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "m.xlsx"
    path.write_text("id\n1\n")
    message = scan_error(path)
    assert "unknown manifest type '.xlsx'" in message
    assert ".csv" in message


@pytest.mark.parametrize("name", ["m.csv", "m.parquet", "m.jsonl"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"")
    assert scan_error(path) == f"{path}: the file is empty"


def test_csv_with_only_blank_lines_has_no_header(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("\n\n")
    assert scan_error(path) == f"{path}: the file is empty (no header row)"
    with pytest.raises(ManifestError, match="no header row"):
        rows_of(path)


def test_header_only_csv(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("id,prompt,face_image\n")
    assert scan_error(path) == f"{path}: has a header but no rows"


def test_parquet_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    assert scan_error(path) == f"{path}: has no rows"


def test_jsonl_of_blank_lines_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("\n  \n")
    assert scan_error(path) == f"{path}: has no rows"


def test_corrupt_parquet_is_a_manifest_error(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    path.write_bytes(os.urandom(4096))
    assert "cannot be read as Parquet (" in scan_error(path)
    with pytest.raises(ManifestError, match="cannot be read as Parquet"):
        rows_of(path)


def test_parquet_corrupt_inside_is_a_manifest_error_while_streaming(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(50_000)]}), path)
    data = path.read_bytes()
    path.write_bytes(data[:4] + b"\0" * (len(data) - 2000) + data[-1996:])
    rows = read_rows(path, default_model="instantid")  # the footer is intact: it opens
    with pytest.raises(ManifestError, match="cannot be read as Parquet"):
        list(rows)


def test_ragged_csv_names_the_rows(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text(f'prompt,face_image\na,{FACE}\nb,{FACE},extra\n"c\nd",{FACE}\ne\n')
    message = scan_error(path)
    assert message == (f"{path}: every row needs the header's 2 cells; row 2 has 3, row 4 has 1")


def test_an_unclosed_quote_is_named_as_the_cause(tmp_path: Path) -> None:
    """(Before: "row 2 has 1", and nothing about the quote.)"""
    path = tmp_path / "m.csv"
    path.write_text(f'prompt,face_image\na,{FACE}\n"b,{FACE}\nc,{FACE}\n')
    assert scan_error(path) == (
        f"{path}: every row needs the header's 2 cells; row 2 has 1 (a quote opened in it "
        "is never closed: the rest of the file is one cell)"
    )


def test_duplicate_header_column(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("prompt,seed,prompt\na,1,b\n")
    assert scan_error(path) == f'{path}: column "prompt" appears more than once'


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ("prompt,face_image,", "column 3 of the header has no name (a trailing comma, as "
         "spreadsheets write?): name it, or remove it from every line"),
        ("prompt,face_image,, ", "columns 3, 4 of the header have no name (a trailing comma, "
         "as spreadsheets write?): name them, or remove them from every line"),
        ("prompt;face_image", 'the header is one column, "prompt;face_image": batcher reads '
         "comma-separated CSV, and this file looks separated by ';'"),
        ("prompt\tface_image", 'the header is one column, "prompt\\tface_image": batcher '
         "reads comma-separated CSV, and this file looks separated by '\\t'"),
    ],
)  # fmt: skip
def test_a_header_a_spreadsheet_wrote_says_what_to_change(
    tmp_path: Path, header: str, says: str
) -> None:
    """(Before: 'unknown column ""', 'column "" appears more than once', or no model
    column, the whole header being one.)"""
    path = tmp_path / "m.csv"
    path.write_text(f"{header}\na,{FACE}\n")
    assert scan_error(path) == f"{path}: {says}"


def test_csv_row_larger_than_a_block_is_a_manifest_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(records, "CSV_BLOCK_BYTES", 2**19)
    monkeypatch.setattr(records, "CSV_LARGE_BLOCK_BYTES", 2**20)
    path = tmp_path / "m.csv"
    path.write_text(f"prompt,face_image\nsmall,{FACE}\n{'x' * 2**21},{FACE}\n")
    assert scan_error(path) == f"{path}: a CSV row is larger than 1 MiB, the most batcher reads"


def test_a_row_longer_than_a_block_is_read_again_with_large_blocks_each_row_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small blocks bound the reader's memory; a long row makes it start again with
    large ones, and the rows it had given already are not given twice."""
    monkeypatch.setattr(records, "CSV_BLOCK_BYTES", 2**16)
    long_prompt = "y" * 2**18  # four small blocks
    lines = [f"r{i},short {i},{FACE}" for i in range(5000)]  # many blocks before it
    lines += [f"long,{long_prompt},{FACE}", f"after,last,{FACE}"]
    path = tmp_path / "m.csv"
    path.write_text("id,prompt,face_image\n" + "\n".join(lines) + "\n")

    rows = rows_of(path)

    assert [r.id for r in rows] == [f"r{i}" for i in range(5000)] + ["long", "after"]
    assert rows[5000].params["prompt"] == long_prompt
    assert [r.number for r in rows] == list(range(1, 5003))


def test_ten_megabyte_prompt_cell_is_read(tmp_path: Path) -> None:
    prompt = "a very long prompt " * (10 * 2**20 // 19 + 1)
    path = tmp_path / "m.csv"
    path.write_text(f"id,prompt,face_image\nbig,{prompt},{FACE}\nsmall,p,{FACE}\n")
    big, small = rows_of(path)
    assert big.params["prompt"] == prompt
    assert len(prompt) > 10 * 2**20
    assert (small.id, small.params["prompt"]) == ("small", "p")
    assert scan(path, default_model="instantid").rows == 2


def test_non_utf8_csv_names_the_line_and_asks_for_utf8(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(f"prompt,face_image\nok,{FACE}\ncaf\xe9,{FACE}\n".encode("latin-1"))
    message = scan_error(path)
    assert message.startswith(f"{path}: not valid UTF-8 (line 3, byte 0xe9); ")
    assert "re-save it as UTF-8" in message
    with pytest.raises(ManifestError, match="not valid UTF-8"):
        rows_of(path)


def not_utf8_strings(values: list[bytes]) -> pa.Array:
    """A Parquet-bound string column holding these bytes unchecked (pa.array would refuse)."""
    offsets = pa.array([sum(map(len, values[:i])) for i in range(len(values) + 1)], pa.int32())
    data = pa.py_buffer(b"".join(values))
    return pa.Array.from_buffers(pa.string(), len(values), [None, offsets.buffers()[1], data])


def test_non_utf8_parquet_string_names_the_column_and_row(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    prompts = not_utf8_strings([b"a", b"b", b"c", b"caf\xe9", b"e"])
    pq.write_table(pa.table({"prompt": prompts, "face_image": [FACE] * 5}), path)
    expected = (
        f'{path}: not valid UTF-8 (column "prompt", row 4, byte 0xe9); batcher reads '
        "Parquet strings as UTF-8 only, so write them as UTF-8"
    )
    assert scan_error(path) == expected
    with pytest.raises(ManifestError) as info:
        rows_of(path, batch_rows=2)  # row 4 is the second of the second batch
    assert str(info.value) == expected


def test_non_utf8_csv_header(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b"pr\xf6mpt\nx\n")
    assert "not valid UTF-8 (line 1, byte 0xf6)" in scan_error(path)


def test_no_model_column_and_no_default_says_pass_model(tmp_path: Path) -> None:
    path = write(tmp_path, "m.csv", GOOD)
    message = scan_error(path, default_model=None)
    assert 'no model given: there is no "model" column, so pass --model' in message
    assert "instantid" in message
    assert rows_of(path, default_model=None)[0].model == ""


def test_rows_without_a_model_cell_and_no_default_are_named(tmp_path: Path) -> None:
    rows = [
        {"model": "instantid" if i % 3 else "", "prompt": "p", "face_image": FACE}
        for i in range(20)
    ]
    path = write(tmp_path, "m.csv", rows)
    message = scan_error(path, default_model=None)
    expected = "rows 1, 4, 7, 10, 13 and 2 more have no model; fill the model cell or pass --model"
    assert message == f"{path}: {expected}"


def test_unknown_column_suggests_the_closest_parameter(tmp_path: Path) -> None:
    path = write(
        tmp_path, "manifest.csv", [{"prompt": "p", "face_image": FACE, "guidance_scal": 5}]
    )
    assert scan_error(path) == (
        f'{path}: unknown column "guidance_scal" (did you mean "guidance_scale"?); '
        "columns must be parameter names of instantid, or id, model"
    )


def test_a_jsonl_key_no_model_takes_is_named_with_the_row_that_first_gives_it(
    tmp_path: Path,
) -> None:
    """A JSON Lines key is a column of the lines that give it: before, a typo on one line
    of a million was named without saying which line ('unknown column "seeed"')."""
    rows: list[dict[str, object]] = [{"prompt": "p", "face_image": FACE} for _ in range(60)]
    rows[56]["seeed"] = 3
    rows[58]["seeed"] = 4
    rows[59]["colour"] = "red"
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n\n" for r in rows), encoding="utf-8")
    assert scan_error(path) == (
        f'{path}: unknown columns "seeed" first on row 57 (did you mean "seed"?), "colour" '
        "first on row 60; columns must be parameter names of instantid, or id, model"
    )


def test_an_id_column_spelt_in_capitals_is_named(tmp_path: Path) -> None:
    """Before, "ID" (or "Prompt") was an unknown column with no suggestion: the id column
    was never among them, and "ID" is not close to "id" letter for letter."""
    path = write(tmp_path, "manifest.csv", [{"ID": "a", "Prompt": "p", "face_image": FACE}])
    assert (
        'unknown columns "ID" (did you mean "id"?), "Prompt" (did you mean "prompt"?); '
        "columns must be parameter names of instantid, or id, model"
    ) in scan_error(path)


def test_unknown_columns_are_judged_against_every_used_model(tmp_path: Path) -> None:
    rows = [
        {"model": "instantid", "prompt": "p", "face_image": FACE, "num_steps": 5},
        {"model": "infinite-you", "id_image": FACE, "colour": "red"},
    ]
    message = scan_error(write(tmp_path, "m.jsonl", rows))
    assert 'unknown column "colour" first on row 2;' in message
    assert "num_steps" not in message  # a parameter of infinite-you, which a row uses
    assert "parameter names of infinite-you, instantid" in message


def test_a_misspelt_model_is_named_before_the_columns_it_makes_unknown(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "model": "instantid", "prompt": "p", "face_image": FACE},
        {"id": "b", "model": "infinite-yuo", "prompt": "p", "id_image": FACE},
    ]
    message = scan_error(write(tmp_path, "m.jsonl", rows), default_model=None)
    assert message.splitlines()[1:3] == [
        "  - unknown model (columns are checked against the known models only):",
        '      row 2: model=infinite-yuo is not a known model (did you mean "infinite-you"?)',
    ]
    assert 'unknown column "id_image"' in message.splitlines()[3]


def test_missing_required_column(tmp_path: Path) -> None:
    path = write(tmp_path, "m.csv", [{"prompt": "p"}, {"prompt": "q"}])
    assert scan_error(path) == (
        f'{path}: missing required column "face_image": instantid needs it (used by 2 rows)'
    )


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, "m.csv", [{"id": "a", "promt": "p"}, {"id": "a", "promt": "q"}])
    message = scan_error(path)
    lines = message.splitlines()
    assert lines[0] == f"{path}: 3 problems"
    assert any('unknown column "promt" (did you mean "prompt"?)' in ln for ln in lines)
    assert any('missing required columns "face_image", "prompt"' in ln for ln in lines)
    assert '"a" on rows 1, 2' in message


# --- duplicate ids ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["m.csv", "m.parquet", "m.jsonl"])
def test_duplicate_ids_name_each_id_and_its_rows(tmp_path: Path, name: str) -> None:
    ids = ["a", "b", "a", "c", "b", "a", "d"]
    rows = [{"id": i, "prompt": "p", "face_image": FACE} for i in ids]
    message = scan_error(write(tmp_path, name, rows))
    assert message.splitlines()[1:] == ['  "a" on rows 1, 3, 6', '  "b" on rows 2, 5']
    assert "duplicate ids" in message.splitlines()[0]


def test_a_default_id_can_clash_with_an_explicit_one(tmp_path: Path) -> None:
    rows = [
        {"id": "2", "prompt": "p", "face_image": FACE},
        {"id": "", "prompt": "q", "face_image": FACE},
    ]
    assert '"2" on rows 1, 2' in scan_error(write(tmp_path, "m.csv", rows))


def test_many_duplicate_ids_are_capped(tmp_path: Path) -> None:
    ids = [f"id{i % 8}" for i in range(100)]
    rows = [{"id": i, "prompt": "p", "face_image": FACE} for i in ids]
    lines = scan_error(write(tmp_path, "m.csv", rows)).splitlines()
    assert lines[1] == '  "id0" on rows 1, 9, 17, 25, 33 and 8 more'
    assert lines[-1] == "  and 3 more duplicated ids"
    assert len(lines) == 7


def test_hash_collisions_without_equal_ids_are_not_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preflight, "_id_hash", lambda _id: 42)
    rows = [{"id": f"r{i}", "prompt": "p", "face_image": FACE} for i in range(50)]
    assert scan(write(tmp_path, "m.csv", rows), default_model="instantid").rows == 50


def test_real_duplicates_are_found_among_hash_collisions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preflight, "_id_hash", lambda row_id: len(row_id))
    ids = ["aa", "bb", "ccc", "dd", "bb", "eee"]
    rows = [{"id": i, "prompt": "p", "face_image": FACE} for i in ids]
    lines = scan_error(write(tmp_path, "m.csv", rows)).splitlines()
    assert lines[1:] == ['  "bb" on rows 2, 5']


def test_id_hash_is_a_signed_64_bit_integer() -> None:
    values = {preflight._id_hash(f"row-{i}") for i in range(1000)}
    assert len(values) == 1000
    assert all(-(2**63) <= v < 2**63 for v in values)
    assert preflight._id_hash("x") == preflight._id_hash("x")


# --- streaming and fingerprint ---------------------------------------------------------


def test_read_rows_streams_a_large_csv_in_little_memory(tmp_path: Path) -> None:
    count = 200_000
    path = tmp_path / "big.csv"
    with path.open("w") as f:
        f.write("id,prompt,face_image,seed,guidance_scale\n")
        for i in range(count):
            f.write(f"row-{i:07d},a portrait of person {i} in soft light,{FACE},{i},5.5\n")

    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        held = list(itertools.islice(read_rows(path, default_model="instantid"), 2000))
        per_row = (tracemalloc.get_traced_memory()[0] - before) / len(held)
        del held
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        seen, last = 0, None
        for row in read_rows(path, default_model="instantid"):
            seen, last = seen + 1, row
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert seen == count
    assert last is not None
    assert (last.number, last.id) == (count, f"row-{count - 1:07d}")
    assert peak < per_row * count / 4  # holding every row would take per_row * count
    assert peak < path.stat().st_size / 4


def test_fingerprint_changes_with_content_and_covers_both_ends(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    body = bytearray(b"x" * (300 * 1024))
    path.write_bytes(body)
    first = fingerprint(path)
    assert first.startswith(f"size={len(body)} mtime_ns=")
    assert fingerprint(path) == first
    stat = path.stat()
    body[-1:] = b"y"
    path.write_bytes(body)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint(path) != first  # same size and mtime: the last 64 KiB tell
    with pytest.raises(ManifestError, match=r"gone\.csv"):
        fingerprint(tmp_path / "gone.csv")


def test_a_manifest_where_no_row_can_be_sent_fails_the_scan(tmp_path: Path) -> None:
    rows = [{"model": "sdxl", "prompt": "p"}, {"model": "flux", "prompt": "q"}]
    message = scan_error(write(tmp_path, "m.csv", rows), default_model=None)
    assert message.endswith("no row can be sent; the first, row 1: model=sdxl is not a known model")


def test_jsonl_where_no_line_is_an_object_fails_the_scan(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("id,prompt\n1,a cat\n")
    message = scan_error(path)
    assert "no row can be sent; the first, row 1: line 1 is not valid JSON (" in message


def test_the_id_hashes_spill_to_a_scratch_file_that_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    path = tmp_path / "m.csv"
    rows = [f"r{i},p,{FACE}" for i in range(20_000)] + [f"r7,p,{FACE}"]
    path.write_text("id,prompt,face_image\n" + "\n".join(rows) + "\n")

    assert '"r7" on rows 8, 20001' in scan_error(path)
    assert list(scratch.iterdir()) == []  # the scratch database is gone
