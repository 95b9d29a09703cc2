"""Malformed manifests, rows and flags, each through the real CLI in a subprocess.

Every case is a row of ``CASES``: the files it writes, the flags it passes, and what the
user must see. Manifest and flag problems exit 2 with one ``batcher: ...`` message and
send nothing (a separate ``batcher sim`` counts every request it gets); bad rows end the
run with exit 3, recorded INVALID in results.parquet with a message naming the column,
the value and the rule, while the other rows complete. No case may print a traceback.

The subprocesses are slow to start (pyarrow, Pillow, aiohttp), so a module fixture runs
every case at once in a few threads and the tests then judge the outcomes one by one.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import select
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batcher.schemas import show

FACE_URL = "https://example.com/face.jpg"
#: The key of the counting emulator; runs that must send nothing are pointed at it.
SIM_KEY = "sk-bad-input-counting-sim"
TIME_SCALE = "0.01"
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # ImageInputs' default max_file_bytes
TEN_MB = 10 * 1024 * 1024
WORKERS = 4
CUT_IN_HALF = "contains an unpaired surrogate (a character cut in half), not valid Unicode"
Row = Mapping[str, object]


# --- building manifests ----------------------------------------------------------------


def write_csv(folder: Path, rows: list[Row], name: str = "m.csv") -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    path = folder / name
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(folder: Path, lines: list[str], name: str = "m.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def face_png(folder: Path, name: str = "face.png") -> str:
    Image.new("RGB", (64, 64), (200, 150, 120)).save(folder / name)
    return name


def good(row_id: str, **cells: object) -> dict[str, object]:
    return {"id": row_id, "prompt": f"portrait {row_id}", "face_image": FACE_URL, **cells}


def two_good_rows(folder: Path) -> Path:
    return write_csv(folder, [good("a"), good("b")])


# --- the cases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Invalid:
    """A row expected INVALID: its 1-based number, its id, and a fragment of its error."""

    row: int
    id: str
    error: str


@dataclass(frozen=True, kw_only=True)
class Case:
    name: str
    #: Writes the case's files into its folder; returns the manifest to pass.
    write: Callable[[Path], Path]
    #: Exit status of `batcher run` (and of `batcher validate` when ``validate``).
    code: int
    #: Fragments of the `batcher: ...` message (exit 2).
    says: tuple[str, ...] = ()
    invalid: tuple[Invalid, ...] = ()
    flags: tuple[str, ...] = ("--model", "instantid")
    #: --out, relative to the case's folder.
    out: str = "out"
    #: Also run `batcher validate` (same exit status; a few cases suffice, each is a process).
    validate: bool = False
    #: A first run completes; then this changes the manifest and the case's run follows.
    then: Callable[[Path], None] | None = None


def _empty(folder: Path) -> Path:
    path = folder / "m.csv"
    path.write_bytes(b"")
    return path


def _header_only(folder: Path) -> Path:
    path = folder / "m.csv"
    path.write_text("id,prompt,face_image\n", encoding="utf-8")
    return path


def _missing_column(folder: Path) -> Path:
    return write_csv(folder, [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}])


def _typo_column(folder: Path) -> Path:
    return write_csv(folder, [good("a", guidance_scal=5), good("b", guidance_scal=6)])


def _duplicate_ids(folder: Path) -> Path:
    return write_csv(folder, [good("a"), good("b"), good("a")])


def _misspelt_model_of_a_mixed_manifest(folder: Path) -> Path:
    # id_image is a column of infinite-you, unknown to instantid, the only model spelt right.
    typo = {"id": "b", "model": "infinite-yuo", "prompt": "p", "id_image": FACE_URL}
    rows = [good("a", model="instantid"), typo]
    return write_jsonl(folder, [json.dumps(row) for row in rows])


def _corrupt_parquet(folder: Path) -> Path:
    path = folder / "m.parquet"
    table = pa.table({k: [v] * 3 for k, v in good("a").items()})
    pq.write_table(table, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the footer (schema, row groups) is gone
    return path


def _not_utf8_parquet(folder: Path) -> Path:
    path = folder / "m.parquet"
    prompts = [b"portrait a", b"caf\xe9 cr\xe8me"]  # latin-1, which pa.array would refuse
    offsets = pa.array([0, len(prompts[0]), len(prompts[0]) + len(prompts[1])], pa.int32())
    data = [None, offsets.buffers()[1], pa.py_buffer(b"".join(prompts))]
    columns = {"id": ["a", "b"], "prompt": pa.Array.from_buffers(pa.string(), 2, data)}
    table = pa.table({**columns, "face_image": [FACE_URL] * 2})
    pq.write_table(table, path)
    return path


def _latin1(folder: Path) -> Path:
    path = folder / "m.csv"
    text = f"id,prompt,face_image\na,plain,{FACE_URL}\nb,café crème,{FACE_URL}\n"
    path.write_bytes(text.encode("latin-1"))
    return path


def _ragged(folder: Path) -> Path:
    path = folder / "m.csv"
    path.write_text(
        f"id,prompt,face_image\na,x,{FACE_URL}\nb,y,{FACE_URL},extra\n", encoding="utf-8"
    )
    return path


def _txt(folder: Path) -> Path:
    path = folder / "m.txt"
    path.write_text(f"id,prompt,face_image\na,x,{FACE_URL}\n", encoding="utf-8")
    return path


def _absent(folder: Path) -> Path:
    return folder / "nowhere.csv"


def _out_is_a_file(folder: Path) -> Path:
    (folder / "taken").write_text("a file where the output folder should go\n")
    return two_good_rows(folder)


def _change_row_b(folder: Path) -> None:
    write_csv(folder, [good("a"), good("b", prompt="portrait b, now in the rain")])


def _break_manifest(folder: Path) -> None:
    write_csv(folder, [good("a"), good("b"), good("a", prompt="a second a")])


def _wrong_type(folder: Path) -> Path:
    return write_csv(folder, [good("a", num_inference_steps="ten"), good("b")])


def _out_of_range(folder: Path) -> Path:
    return write_csv(folder, [good("a"), good("b", guidance_scale=99)])


def _wrong_enum(folder: Path) -> Path:
    rows: list[Row] = [
        {"id": "a", "prompt": "x", "id_image": FACE_URL, "output_format": "gif"},
        {"id": "b", "prompt": "y", "id_image": FACE_URL, "output_format": "png"},
        {"id": "c", "prompt": "z", "id_image": FACE_URL},
    ]
    return write_csv(folder, rows)


def _unknown_model_cell(folder: Path) -> Path:
    return write_csv(folder, [good("a", model="instantid"), good("b", model="instantd")])


def _hostile_ids(folder: Path) -> Path:
    ids = ["a/b", "../../escape", "..", "/etc/passwd", "nul\x00id", "..\\..\\win"]
    return write_jsonl(folder, [json.dumps(good(i)) for i in ids])


def _missing_image(folder: Path) -> Path:
    face = face_png(folder)
    return write_csv(folder, [good("a", face_image="faces/nope.png"), good("b", face_image=face)])


def _escape_in_a_path(folder: Path) -> Path:
    return write_csv(folder, [good("a"), good("b", face_image="face\x1b[2J.png")])


def _not_an_image(folder: Path) -> Path:
    (folder / "notes.png").write_text("these are words, not pixels\n")
    face = face_png(folder)
    return write_csv(folder, [good("a", face_image=face), good("b", face_image="notes.png")])


def _oversized_image(folder: Path) -> Path:
    # A real BMP just over the 20 MiB input cap: 2650 x 2650 x 3 bytes.
    Image.new("RGB", (2650, 2650), (90, 90, 90)).save(folder / "big.bmp")
    assert (folder / "big.bmp").stat().st_size > MAX_IMAGE_BYTES
    return write_csv(folder, [good("a", face_image="big.bmp"), good("b")])


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _png(mode: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


#: The bad-inline-images case's face_image values (the too-big one is built when written).
INLINE_BAD_BASE64 = "data:image/png;base64,!!!notbase64"
INLINE_NOT_BASE64 = "data:,hello"
INLINE_NOT_PIXELS = _data_url(b"these are words, not pixels\n" * 4)
INLINE_64_MP = _data_url(_png("1", (8000, 8000)))  # 64 megapixels in a few kB
#: A PNG signature and zeros, one signature over the input cap (the size is checked first).
INLINE_TOO_BIG_BYTES = 8 + MAX_IMAGE_BYTES
INLINE_OK = _data_url(_png("RGB", (64, 64)))


def _inline_label(value: str | int) -> str:
    """How a problem names a face_image value, or a data URL of that many bytes."""
    chars = len(value) if isinstance(value, str) else len(_data_url(b"")) + -(-value // 3) * 4
    return f"face_image=<inline data, {chars} characters>: "


def _bad_inline_images(folder: Path) -> Path:
    too_big = _data_url(b"\x89PNG\r\n\x1a\n" + bytes(MAX_IMAGE_BYTES))
    assert _inline_label(too_big) == _inline_label(INLINE_TOO_BIG_BYTES)
    rows = [
        good("bad-base64", face_image=INLINE_BAD_BASE64),
        good("not-base64", face_image=INLINE_NOT_BASE64),
        good("text", face_image=INLINE_NOT_PIXELS),
        good("pixels", face_image=INLINE_64_MP),
        good("too-big", face_image=too_big),
        good("ok", face_image=INLINE_OK),
    ]
    return write_jsonl(folder, [json.dumps(row) for row in rows])


def _not_json_line(folder: Path) -> Path:
    lines = [json.dumps(good("a")), '{"id": "b", prompt: "no quotes"}', json.dumps(good("c"))]
    return write_jsonl(folder, lines)


def _nested_too_deeply(folder: Path) -> Path:
    deep = json.dumps(good("b")).replace("}", ', "style": ' + "[" * 1000 + "]" * 1000 + "}")
    return write_jsonl(folder, [json.dumps(good("a")), deep])


def _lone_surrogates(folder: Path) -> Path:
    # json.dumps writes a lone surrogate as the escape "\udce9", as a broken exporter does.
    rows = [
        good("a"),
        good("b", prompt="caf\udce9"),
        good("c\udce9", prompt="portrait c"),
        good("d", model="instantid\udce9"),
        good("e", style=["Watercolor", "caf\udce9"]),
    ]
    return write_jsonl(folder, [json.dumps(row) for row in rows])


def _bom(folder: Path) -> Path:
    path = folder / "m.csv"
    text = f"id,prompt,face_image\na,x,{FACE_URL}\nb,y,{FACE_URL}\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    return path


def _ten_mb_prompt(folder: Path) -> Path:
    return write_csv(folder, [good("big", prompt="a" * TEN_MB), good("small")])


CASES = [
    # The whole manifest or a flag is unusable: exit 2, nothing sent.
    Case(
        name="empty-file", validate=True, write=_empty, code=2, says=("m.csv: the file is empty",)
    ),
    Case(name="header-only", write=_header_only, code=2, says=("has a header but no rows",)),
    Case(
        name="missing-required-column",
        write=_missing_column,
        code=2,
        says=('missing required column "face_image": instantid needs it (used by 2 rows)',),
    ),
    Case(
        name="typo-column-did-you-mean",
        validate=True,
        write=_typo_column,
        code=2,
        says=('unknown column "guidance_scal" (did you mean "guidance_scale"?)',),
    ),
    Case(
        name="misspelt-model-of-a-mixed-manifest",
        validate=True,
        write=_misspelt_model_of_a_mixed_manifest,
        code=2,
        flags=(),
        says=(
            'row 2: model=infinite-yuo is not a known model (did you mean "infinite-you"?)',
            'unknown column "id_image"',
        ),
    ),
    Case(
        name="duplicate-ids",
        write=_duplicate_ids,
        code=2,
        says=("duplicate ids (each row needs its own id)", '"a" on rows 1, 3'),
    ),
    Case(
        name="corrupt-parquet",
        write=_corrupt_parquet,
        code=2,
        says=("m.parquet: cannot be read as Parquet (",),
    ),
    Case(
        name="latin-1-csv",
        validate=True,
        write=_latin1,
        code=2,
        says=("not valid UTF-8 (line 3, byte 0xe9)", "re-save it as UTF-8"),
    ),
    Case(
        name="parquet-string-not-utf-8",
        validate=True,
        write=_not_utf8_parquet,
        code=2,
        says=('not valid UTF-8 (column "prompt", row 2, byte 0xe9)',),
    ),
    Case(
        name="ragged-csv",
        write=_ragged,
        code=2,
        says=("every row needs the header's 3 cells; row 2 has 4",),
    ),
    Case(
        name="unknown-extension",
        write=_txt,
        code=2,
        says=("m.txt: unknown manifest type '.txt'",),
    ),
    Case(name="missing-manifest", write=_absent, code=2, says=("nowhere.csv: cannot open it",)),
    Case(
        name="no-model-anywhere",
        write=two_good_rows,
        code=2,
        flags=(),
        says=('there is no "model" column, so pass --model',),
    ),
    Case(
        name="unknown-model-flag",
        write=two_good_rows,
        code=2,
        flags=("--model", "instantd"),
        says=("unknown model 'instantd' (did you mean \"instantid\"?)",),
    ),
    Case(
        name="out-is-a-file",
        write=_out_is_a_file,
        code=2,
        out="taken",
        says=("--out", "taken: cannot create the folder"),
    ),
    Case(
        name="negative-max-in-flight",
        write=two_good_rows,
        code=2,
        flags=("--model", "instantid", "--max-in-flight", "-3"),
        says=("--max-in-flight must be >= 1, got -3",),
    ),
    Case(
        name="bad-rate",
        write=two_good_rows,
        code=2,
        flags=("--model", "instantid", "--rate", "fast"),
        says=("--rate: 'fast' must be a positive number of requests per s, min or h",),
    ),
    Case(
        name="manifest-changed-before-resume",
        write=two_good_rows,
        then=_change_row_b,
        code=2,
        says=(
            "the manifest changed since this output folder was used: row 2 (id b) now has "
            "different parameters",
            "Nothing was sent and nothing was overwritten",
        ),
    ),
    Case(
        name="broken-manifest-after-a-completed-run",
        validate=True,
        write=two_good_rows,
        then=_break_manifest,
        code=2,
        says=('"a" on rows 1, 3',),
    ),
    # Single rows are bad: exit 3, those rows INVALID with the rule, the others COMPLETED.
    Case(
        name="text-in-an-integer-column",
        validate=True,
        write=_wrong_type,
        code=3,
        invalid=(Invalid(1, "a", "num_inference_steps=ten is not an integer"),),
    ),
    Case(
        name="out-of-range",
        validate=True,
        write=_out_of_range,
        code=3,
        invalid=(Invalid(2, "b", "guidance_scale=99 is above the maximum 25"),),
    ),
    Case(
        name="wrong-enum-value",
        write=_wrong_enum,
        code=3,
        flags=("--model", "infinite-you"),
        invalid=(
            Invalid(1, "a", "output_format=gif is not one of the allowed values (png, jpg, webp)"),
        ),
    ),
    Case(
        name="unknown-model-in-a-cell",
        write=_unknown_model_cell,
        code=3,
        flags=(),
        invalid=(
            Invalid(2, "b", 'model=instantd is not a known model (did you mean "instantid"?)'),
        ),
    ),
    Case(
        name="ids-with-slash-dotdot-nul",
        validate=True,
        write=_hostile_ids,
        code=3,
        invalid=(Invalid(5, "nul\x00id", 'id "nul\\u0000id" contains a control character'),),
    ),
    Case(
        name="missing-local-image",
        write=_missing_image,
        code=3,
        invalid=(Invalid(1, "a", "face_image=faces/nope.png: file not found"),),
    ),
    Case(
        name="terminal-escape-in-a-path",
        write=_escape_in_a_path,
        code=3,
        validate=True,
        invalid=(Invalid(2, "b", "face_image=face\\x1b[2J.png: file not found"),),
    ),
    Case(
        name="non-image-file",
        validate=True,
        write=_not_an_image,
        code=3,
        invalid=(
            Invalid(
                2,
                "b",
                "face_image=notes.png: not an image (avif, bmp, gif, jpeg, png, tiff, webp): "
                "its content matches none of these formats",
            ),
        ),
    ),
    Case(
        name="oversized-image-file",
        write=_oversized_image,
        code=3,
        invalid=(
            # 2650 rows of 7952 bytes (3 x 2650, padded to 4) plus a 54-byte header.
            Invalid(1, "a", "face_image=big.bmp: file is 21072854 bytes, over the 20971520 "),
        ),
    ),
    Case(
        name="bad-inline-images",
        validate=True,
        write=_bad_inline_images,
        code=3,
        invalid=(
            Invalid(
                1,
                "bad-base64",
                _inline_label(INLINE_BAD_BASE64) + "data URL payload is not valid base64",
            ),
            Invalid(
                2,
                "not-base64",
                _inline_label(INLINE_NOT_BASE64) + "data URL is not base64-encoded "
                "(expected data:image/...;base64,...)",
            ),
            Invalid(
                3,
                "text",
                _inline_label(INLINE_NOT_PIXELS) + "not an image (avif, bmp, gif, jpeg, png, "
                "tiff, webp): its content matches none of these formats",
            ),
            Invalid(
                4,
                "pixels",
                _inline_label(INLINE_64_MP) + "image is 8000x8000 (64.0 megapixels), "
                "over the 50 megapixel limit",
            ),
            Invalid(
                5,
                "too-big",
                _inline_label(INLINE_TOO_BIG_BYTES) + "image data is 20971528 bytes, "
                "over the 20971520 byte limit",
            ),
        ),
    ),
    Case(
        name="jsonl-line-not-json",
        write=_not_json_line,
        code=3,
        invalid=(Invalid(2, "2", "line 2 is not valid JSON (Expecting property name"),),
    ),
    Case(
        name="jsonl-nested-too-deeply",
        validate=True,
        write=_nested_too_deeply,
        code=3,
        invalid=(Invalid(2, "2", "line 2 is nested too deeply (more than 100 levels of [ and {)"),),
    ),
    Case(
        name="jsonl-lone-surrogates",
        validate=True,
        write=_lone_surrogates,
        code=3,
        invalid=(
            Invalid(2, "b", f"column prompt: {CUT_IN_HALF}"),
            Invalid(3, "3", f"column id: {CUT_IN_HALF}"),  # an unusable id: the row number
            Invalid(4, "d", f"column model: {CUT_IN_HALF}"),
            Invalid(5, "e", f"column style: {CUT_IN_HALF}"),
        ),
    ),
    # Unusual but fine.
    Case(name="csv-with-bom", validate=True, write=_bom, code=0),
    # Outcome on record: a 10 MiB prompt is read, validated, sent and completes against
    # the emulator (its body cap is 64 MiB). The real API's limit is unknown.
    Case(name="ten-megabyte-prompt", write=_ten_mb_prompt, code=0),
]


# --- running them --------------------------------------------------------------------------


@dataclass
class Outcome:
    folder: Path
    manifest: Path
    out: Path
    run: subprocess.CompletedProcess[str]
    validate: subprocess.CompletedProcess[str] | None
    #: Hashes of every file under out after the first, completed run (``then`` cases).
    before: dict[str, str] = field(default_factory=dict)


def cli(*args: str | Path, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SEGMIND_API_KEY"}
    if key is not None:
        env["SEGMIND_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "batcher", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path; the checkpoint's by its rows
    (a refused manifest leaves them as they were, not the file's note of the manifest
    last read in full: it has none until one is)."""
    hashes = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("checkpoint.sqlite")
    }
    if (root / "checkpoint.sqlite").is_file():
        db = sqlite3.connect(f"{(root / 'checkpoint.sqlite').as_uri()}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        finally:
            db.close()
        hashes["checkpoint.sqlite"] = hashlib.sha256(repr(rows).encode()).hexdigest()
    return hashes


def play(case: Case, folder: Path, sim_url: str) -> Outcome:
    folder.mkdir()
    manifest = case.write(folder)
    out = folder / case.out
    before: dict[str, str] = {}
    if case.then is not None:
        first = cli("run", manifest, "--out", out, *case.flags, "--simulate", "--no-progress")
        assert first.returncode == 0, first.stderr
        before = tree_hashes(out)
        case.then(folder)
    if case.code == 2 and case.then is None:  # must send nothing: aim it at the counting emulator
        where = ("--base-url", sim_url, "--time-scale", TIME_SCALE)
        run = cli("run", manifest, "--out", out, *case.flags, *where, "--no-progress", key=SIM_KEY)
    else:  # a folder the built-in emulator filled is refused to any other service
        run = cli("run", manifest, "--out", out, *case.flags, "--simulate", "--no-progress")
    checked = cli("validate", manifest, *case.flags) if case.validate else None
    return Outcome(folder, manifest, out, run, checked, before)


@pytest.fixture(scope="module")
def counting_sim() -> Iterator[str]:
    """A `batcher sim` in its own process; the base URL it prints (127.0.0.1 by default)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "batcher", "sim", "--port", "0", "--api-key", SIM_KEY],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "batcher sim printed nothing in 30 s"
        line = proc.stdout.readline()
        found = re.fullmatch(r"batcher sim listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert found, line
        yield found[1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def outcomes(counting_sim: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("bad-input")
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {c.name: pool.submit(play, c, root / c.name, counting_sim) for c in CASES}
        return {name: f.result() for name, f in futures.items()}


def sim_stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base_url}/__sim/stats", timeout=10) as resp:
        stats: dict[str, Any] = json.load(resp)
        return stats


def results(out: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}


def assert_no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout


def assert_outputs_inside(out: Path, row: Mapping[str, Any]) -> None:
    images = (out / "images").resolve()
    assert row["outputs"], row
    for rel in row["outputs"]:
        path = (out / rel).resolve()
        assert path.parent == images, (row["id"], rel)
        assert path.is_file()


# --- the table -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, outcomes: dict[str, Outcome], counting_sim: str) -> None:
    o = outcomes[case.name]
    assert o.run.returncode == case.code, o.run.stderr
    assert_no_traceback(o.run)
    if o.validate is not None:
        assert o.validate.returncode == case.code, o.validate.stderr
        assert_no_traceback(o.validate)
    if case.code == 2:
        check_refused(case, o, counting_sim)
    else:
        check_finished(case, o)


def check_refused(case: Case, o: Outcome, counting_sim: str) -> None:
    """One `batcher: ...` message naming the problem; nothing sent, nothing written."""
    for proc in filter(None, (o.run, o.validate)):
        assert proc.stderr.startswith("batcher: "), proc.stderr
        for fragment in case.says:
            assert fragment in proc.stderr, (fragment, proc.stderr)
    stats = sim_stats(counting_sim)
    assert stats["requests"] == {}
    assert stats["accepted"] == 0
    if case.then is not None:
        # Whatever an earlier run finished stays exactly as it was: the checkpoint too,
        # where a row is saved SUBMITTING before its submit is sent.
        assert o.before
        assert any(name.startswith("images/") for name in o.before)
        assert tree_hashes(o.out) == o.before
        assert {r["status"] for r in results(o.out).values()} == {"COMPLETED"}
    elif case.out == "out":  # refused before the first write: no folder, no .lock
        assert not o.out.exists(), sorted(p.name for p in o.out.iterdir())
    else:  # --out named a file: it is left alone
        assert o.out.read_text() == "a file where the output folder should go\n"


def check_finished(case: Case, o: Outcome) -> None:
    """Bad rows INVALID with their reason, the others COMPLETED inside OUT/images."""
    rows = results(o.out)
    bad = {i.id: i for i in case.invalid}
    for row_id, row in rows.items():
        if row_id in bad:
            want = bad[row_id]
            assert (row["status"], row["row"]) == ("INVALID", want.row), row
            assert want.error in row["error"], (want.error, row["error"])
            assert not row["outputs"]
            assert not row["request_id"]
        else:
            assert row["status"] == "COMPLETED", row
            assert_outputs_inside(o.out, row)
    assert set(bad) <= set(rows)
    assert len(rows) > len(bad)
    for want in case.invalid:
        where = f"row {want.row} (id {show(want.id)}): "
        # `run` names each INVALID row on the terminal too, not only in results.parquet.
        assert f"INVALID, not sent: {where}{want.error}" in o.run.stderr, o.run.stderr
        if o.validate is not None:
            line = f"{o.manifest}: {where}{want.error}"
            assert line in o.validate.stderr, (line, o.validate.stderr)
    # A NUL or an ESC from the manifest never reaches the terminal raw.
    printed = o.run.stderr + (o.validate.stderr if o.validate else "")
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", printed), printed


# --- what particular cases mean ------------------------------------------------------------


def test_bom_is_not_part_of_the_first_column(outcomes: dict[str, Outcome]) -> None:
    rows = results(outcomes["csv-with-bom"].out)
    assert sorted(rows) == ["a", "b"]  # the "id" column was found: ids are not row numbers


def test_path_like_ids_stay_inside_images(outcomes: dict[str, Outcome]) -> None:
    o = outcomes["ids-with-slash-dotdot-nul"]
    rows = results(o.out)
    for row_id in ("a/b", "../../escape", "..", "/etc/passwd", "..\\..\\win"):
        assert rows[row_id]["status"] == "COMPLETED"
        assert_outputs_inside(o.out, rows[row_id])
    # Nothing was written beside the manifest, above it, or at an absolute path.
    assert sorted(p.name for p in o.folder.iterdir()) == ["m.jsonl", "out"]
    assert sorted(p.name for p in o.out.iterdir()) == [
        ".lock",
        "checkpoint.sqlite",
        "images",
        "results.parquet",
    ]
    assert not (o.folder.parent / "escape").exists()
    assert len(list((o.out / "images").iterdir())) == 5


def test_ten_megabyte_prompt_is_sent_whole(outcomes: dict[str, Outcome]) -> None:
    rows = results(outcomes["ten-megabyte-prompt"].out)
    assert rows["big"]["status"] == "COMPLETED"
    assert len(json.loads(rows["big"]["params"])["prompt"]) == TEN_MB


def test_bad_inline_images_are_not_tried_nor_printed(outcomes: dict[str, Outcome]) -> None:
    o = outcomes["bad-inline-images"]
    assert o.validate is not None
    rows = results(o.out)
    for row in rows.values():  # the bad ones were not tried at all
        assert row["attempts"] == (1 if row["id"] == "ok" else 0), row["id"]
    sent = json.loads(rows["ok"]["params"])["face_image"]
    assert sent.startswith("base64:")  # results hold a reference, not the image
    for text in (o.run.stderr, o.validate.stderr):
        assert INLINE_NOT_PIXELS[22:34] not in text  # the start of its payload
        assert "AAAAAAAAAAAA" not in text  # the too-big payload
        assert len(text) < 10_000


def test_validate_summarises_and_sends_nothing(outcomes: dict[str, Outcome]) -> None:
    o = outcomes["out-of-range"]
    assert o.validate is not None
    assert o.validate.stdout.strip() == (
        f"{o.manifest}: 2 rows (csv; models: instantid): 1 valid, 1 invalid, 0 warnings"
    )
