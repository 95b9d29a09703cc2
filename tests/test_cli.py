"""The `batcher` command: help for every subcommand, one-line errors with exit 2, the demo
on the built-in emulator, and an API key that is written nowhere."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import os
import signal
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

import batcher.finish as finish_module
import batcher.preflight as preflight
from batcher.checkpoint import Checkpoint
from batcher.cli import build_parser, main
from batcher.client import DEFAULT_BASE_URL
from batcher.errors import UsageError
from batcher.image_writer import ImageWriter
from batcher.options import RunOptions

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "manifests" / "demo_instantid.csv"
KEY = "sk-cli-Zq8x3Kp1-distinctive"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    choices: dict[str, argparse.ArgumentParser] = action.choices
    return choices


async def _batcher(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, bytes, bytes]:
    """``python -m batcher ARGS`` in a child process; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batcher",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, stdout, stderr


def _env(key: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SEGMIND_API_KEY"}
    if key is not None:
        env["SEGMIND_API_KEY"] = key
    return env


def _files_holding(folder: Path, secret: bytes) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and secret in p.read_bytes()]


# -- help -------------------------------------------------------------------------------------


def test_there_are_subcommands() -> None:
    assert set(_subcommands()) >= {"run", "validate", "sim"}


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_subcommand_and_option_has_help(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = _subcommands()[name]
    assert parser.description, f"`batcher {name}` has no description"
    for action in parser._actions:
        assert action.help, (name, action.dest)
        assert action.help != argparse.SUPPRESS, (name, action.dest)

    with pytest.raises(SystemExit) as exited:
        main([name, "--help"])

    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"usage: batcher {name}")
    assert parser.description.split()[0] in shown


def test_the_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for name in _subcommands():
        assert name in shown


# -- errors are one line, exit 2 ------------------------------------------------------------------


@pytest.fixture
def _sigint() -> Iterator[None]:
    """`batcher run` installs its own Ctrl-C handler; pytest gets its own back after."""
    saved = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, saved)


async def test_run_without_a_key_exits_2_with_one_line(tmp_path: Path) -> None:
    code, stdout, stderr = await _batcher(
        "run", str(DEMO), "--model", "instantid", "--out", str(tmp_path / "out"),
        env=_env(None), cwd=tmp_path,
    )  # fmt: skip

    assert code == 2
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("batcher: SEGMIND_API_KEY is not set")
    assert "--simulate" in lines[0]
    assert stdout == b""
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("_sigint")
@pytest.mark.usefixtures("_sigint")
def test_a_checkpoint_refused_at_start_up_exits_4_resumable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk already full when the run starts: the folder's problem, resumable (exit 4,
    as when it fills later), not a usage error (exit 2, before)."""

    def full(self: Checkpoint, statements: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Checkpoint, "_apply", full)
    out = tmp_path / "out"
    code = main(["run", str(DEMO), "--model", "instantid", "--out", str(out), "--simulate"])

    assert code == 4
    err = capsys.readouterr().err
    checkpoint = out / "checkpoint.sqlite"
    assert err.startswith(
        f"batcher: cannot write the checkpoint {checkpoint} (database or disk is full)"
    ), err


def test_a_negative_max_failed_retries_names_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(Before: "RetryConfig.max_failed_retries must be >= 0", the code's name for it.)"""
    argv = ["run", str(DEMO), "--out", str(tmp_path / "o"), "--max-failed-retries", "-1"]
    assert main([*argv, "--simulate"]) == 2
    assert capsys.readouterr().err == "batcher: --max-failed-retries must be 0 or more, got -1\n"


def test_bad_flags_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    for argv in (
        ["run", str(DEMO), "--out", out, "--rate", "fast", "--simulate"],
        ["run", str(DEMO), "--out", out, "--max-in-flight", "0", "--simulate"],
        ["run", str(DEMO), "--out", out, "--model", "nope", "--simulate"],
        ["run", str(tmp_path / "missing.csv"), "--out", out, "--simulate"],
        ["run", str(DEMO), "--out", out, "--max-failed-retries", "-1", "--simulate"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("batcher: "), (argv, err)
        assert "Traceback" not in err


@pytest.mark.usefixtures("_sigint")
@pytest.mark.parametrize("rate", ["0/min", "0.0/h", "abc", "-5/s", "5/fortnight", "1e3/min", ""])
def test_a_bad_rate_names_the_option_and_the_accepted_form(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rate: str
) -> None:
    out = tmp_path / "out"

    code = main(["run", str(DEMO), "--model", "instantid", "--out", str(out), f"--rate={rate}"])

    assert code == 2
    assert capsys.readouterr().err == (
        f"batcher: --rate: {rate!r} must be a positive number of requests per s, min or h, "
        "like 48/min\n"
    )
    assert not out.exists()


@pytest.mark.usefixtures("_sigint")
@pytest.mark.parametrize("rate", ["48/min", "2/s", "10/hour", " 0.5 / S "])
def test_a_refused_run_leaves_no_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rate: str
) -> None:
    """A missing manifest is refused before OUT (or its parent) is made; every rate here is
    accepted, so the manifest is what the message is about."""
    out = tmp_path / "new" / "out"
    missing = tmp_path / "missing.csv"

    code = main(["run", str(missing), "--out", str(out), "--simulate", f"--rate={rate}"])

    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"batcher: {missing}: cannot open it"), err
    assert not (tmp_path / "new").exists()


@pytest.mark.usefixtures("_sigint")
@pytest.mark.parametrize("scale", ["inf", "nan", "1e-9", "0.0009", "0", "-1", "1001"])
def test_a_time_scale_out_of_range_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, scale: str
) -> None:
    """No --simulate: were the scale let through, the missing key would be the message."""
    monkeypatch.delenv("SEGMIND_API_KEY", raising=False)
    out = tmp_path / "out"

    code = main(
        ["run", str(DEMO), "--model", "instantid", "--out", str(out), f"--time-scale={scale}"]
    )

    assert code == 2
    assert capsys.readouterr().err == (
        f"batcher: --time-scale must be between 0.001 and 1000, got {float(scale):g}\n"
    )
    assert not out.exists()


@pytest.mark.usefixtures("_sigint")
@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:18O03", "Port could not be cast to integer value as '18O03'"),
        ("http://127.0.0.1:99999", "Port out of range 0-65535"),
        ("http://127.0.0.1:0", "port 0 cannot be connected to"),
        ("http:///v2", "it has no host"),
        ("http://[::1", "Invalid IPv6 URL"),
        ("http://api.segmind .com", "it contains a space"),
        ("api.example.com", "it must start with http:// or https://"),
        ("https://api.example.com/#x", "it has a #fragment"),
    ],
)
def test_a_base_url_that_cannot_be_dialled_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, why: str
) -> None:
    """Before, a port typo was let through: every submit failed "outcome unknown, may
    be billed", and those rows were never sent again, the URL once fixed."""
    out = tmp_path / "out"

    code = main(["run", str(DEMO), "--model", "instantid", "--out", str(out), "--base-url", url])

    assert code == 2
    assert capsys.readouterr().err == (
        f"batcher: --base-url must be the API's http(s) address; {url!r}: {why}\n"
    )
    assert not out.exists()


@pytest.mark.usefixtures("_sigint")
@pytest.mark.parametrize("url", ["https://user:hunter2@api.example.com", "https://h/?key=hunter2"])
def test_a_base_url_with_a_credential_is_refused_and_not_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    code = main(
        ["run", str(DEMO), "--model", "instantid", "--out", str(tmp_path / "o"), "--base-url", url]
    )

    assert code == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err
    assert "the key goes in SEGMIND_API_KEY" in err


@pytest.mark.parametrize(
    "url", [DEFAULT_BASE_URL, "http://[::1]:80/", "https://p.example/segmind/"]
)
def test_a_base_url_with_a_path_or_an_ipv6_host_is_accepted(url: str) -> None:
    assert RunOptions(manifest=DEMO, out=Path("out"), base_url=url).base_url == url


@pytest.mark.parametrize("scale", [0.001, 1000.0])
def test_the_ends_of_the_time_scale_range_are_accepted(scale: float) -> None:
    assert RunOptions(manifest=DEMO, out=Path("out"), time_scale=scale).scale == scale


@pytest.mark.usefixtures("_sigint")
@pytest.mark.parametrize("out", ["", "  "])
def test_an_empty_out_is_refused_not_taken_as_the_current_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, out: str
) -> None:
    monkeypatch.chdir(tmp_path)

    code = main(["run", str(DEMO), "--model", "instantid", "--out", out, "--simulate"])

    assert code == 2
    assert capsys.readouterr().err == (
        f"batcher: --out {out!r} names no folder; give one (--out . for this folder)\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("rows", "code"),
    [
        (["a,p,face.png"], 0),
        (["a,p,face.png", "b,p,missing.png"], 3),
        (["a,p,face.png", "a,p,face.png"], 2),
    ],
    ids=["valid", "invalid-row", "duplicate-id"],
)
def test_validate_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: list[str], code: int
) -> None:
    Image.new("RGB", (32, 32)).save(tmp_path / "face.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(["id,prompt,face_image", *rows]) + "\n")

    assert main(["validate", str(manifest), "--model", "instantid"]) == code
    err = capsys.readouterr().err
    if code == 3:
        assert "face_image=missing.png" in err


# -- the demo, and the key -------------------------------------------------------------------------


async def test_simulate_runs_the_demo_and_the_key_is_written_nowhere(tmp_path: Path) -> None:
    out = tmp_path / "out"

    code, stdout, stderr = await _batcher(
        "run", str(DEMO), "--model", "instantid", "--out", str(out), "--simulate",
        "--no-progress", env=_env(KEY), cwd=tmp_path,
    )  # fmt: skip

    assert code == 0, stderr.decode()[-2000:]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert len(rows) == 12
    assert {r["status"] for r in rows} == {"COMPLETED"}
    assert b"rows: 12  completed: 12" in stderr
    assert KEY.encode() not in stdout + stderr
    assert _files_holding(out, KEY.encode()) == []


async def test_a_refused_key_exits_2_with_one_clear_line_and_a_resumable_folder(
    tmp_path: Path, sim: Any
) -> None:
    server = await sim(time_scale=0.002, api_keys=frozenset({"sk-the-right-key"}))
    # --rate 2/min: the 401 is back long before a second submit could be cut off on the wire.
    out = tmp_path / "out"

    code, stdout, stderr = await _batcher(
        "run", str(DEMO), "--model", "instantid", "--out", str(out), "--no-progress",
        "--base-url", server.base_url, "--time-scale", "0.002", "--rate", "2/min",
        env=_env(KEY), cwd=tmp_path,
    )  # fmt: skip

    assert code == 2
    text = stderr.decode()
    assert "Traceback" not in text
    (line,) = [x for x in text.splitlines() if x.startswith("batcher: ")]
    assert "refused the key" in line
    assert "run again to resume" in line
    assert KEY.encode() not in stdout + stderr
    assert _files_holding(out, KEY.encode()) == []
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert {r["status"] for r in rows} == {"PENDING"}  # the checkpoint holds every row
    assert server.stats()["accepted"] == 0


def _no_space(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.usefixtures("_sigint")
def test_a_full_disk_exits_4_with_its_reason_first_when_results_parquet_fails_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images and results.parquet both refused (ENOSPC): the stop (exit 4, resumable) is
    what the user sees, with the summary, then one line about results.parquet. Before:
    exit 2 and only "batcher: cannot write .../results.parquet"."""

    async def write(self: ImageWriter, row_id: str, index: int, data: bytes) -> Any:
        return _no_space()

    monkeypatch.setattr(ImageWriter, "write", write)
    monkeypatch.setattr(finish_module, "write_results", _no_space)
    out = tmp_path / "out"

    code = main(
        ["run", str(DEMO), "--model", "instantid", "--out", str(out), "--simulate",
         "--no-progress", "-q"]
    )  # fmt: skip

    err = capsys.readouterr().err
    assert code == 4, err
    assert "Traceback" not in err
    assert not [line for line in err.splitlines() if line.startswith("batcher: ")], err
    lines = err.splitlines()
    (rows,) = [n for n, line in enumerate(lines) if line.startswith("rows: 12 ")]
    (stop,) = [n for n, line in enumerate(lines) if line.startswith("stopped: cannot write images")]
    (note,) = [n for n, line in enumerate(lines) if "could not be written either" in line]
    assert rows < stop < note, err
    assert "No space left on device" in lines[stop]
    assert lines[note] == (
        f"{out / 'results.parquet'} could not be written either (No space left on "
        f"device): every row is saved in {out / 'checkpoint.sqlite'}, and the next run "
        "writes it"
    )


@pytest.mark.usefixtures("_sigint")
def test_a_refused_key_is_the_first_line_when_results_parquet_fails_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sim_config = RunOptions.sim_config

    def refusing(self: RunOptions) -> Any:
        return dataclasses.replace(sim_config(self), api_keys=frozenset({"sk-not-this-one"}))

    monkeypatch.setattr(RunOptions, "sim_config", refusing)
    monkeypatch.setattr(finish_module, "write_results", _no_space)
    out = tmp_path / "out"

    code = main(
        ["run", str(DEMO), "--model", "instantid", "--out", str(out), "--simulate",
         "--no-progress", "-q", "--rate", "1/h"]
    )  # fmt: skip

    err = capsys.readouterr().err
    assert code == 2, err
    first, second = [line for line in err.splitlines() if line.startswith("batcher: ")]
    assert "refused the key" in first
    assert second.startswith(f"batcher: {out / 'results.parquet'} could not be written either")


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("SG_line1\nX-Injected: yes", "a control character (U+000A)"),
        ("SG_line1\r\nX-Injected: yes", "a control character (U+000D)"),
        ("SG_tab\tinside", "a control character (U+0009)"),
        ("SG_space inside", "whitespace (U+0020)"),
        ("SG_nbsp\u00a0inside", "whitespace (U+00A0)"),
    ],
    ids=["LF", "CRLF", "tab", "space", "nbsp"],
)
async def test_a_key_with_a_line_break_or_space_within_exits_2_before_anything_is_written(
    tmp_path: Path, sim: Any, key: str, says: str
) -> None:
    """Before: aiohttp refused the header at the first submit (ValueError, a traceback,
    exit 1) and the row was left SUBMITTING, so the next run failed it as "submit outcome
    unknown, may be billed" though nothing had been sent."""
    server = await sim(time_scale=0.002)
    out = tmp_path / "out"

    code, stdout, stderr = await _batcher(
        "run", str(DEMO), "--model", "instantid", "--out", str(out), "--no-progress",
        "--base-url", server.base_url, "--time-scale", "0.002",
        env=_env(f"  {key}\n"), cwd=tmp_path,
    )  # fmt: skip

    assert code == 2
    assert stderr.decode().splitlines() == [
        f"batcher: SEGMIND_API_KEY contains {says} within the key: set it to the key alone"
    ]
    assert b"SG_" not in stdout + stderr  # no part of the key is shown
    assert key[-6:].encode() not in stdout + stderr
    assert not out.exists()
    assert server.stats()["requests"] == {}


@pytest.mark.parametrize(
    ("key", "says"), [("k", "1 character"), ("Sk-Q7zp", "7 characters")], ids=["1", "7"]
)
async def test_a_short_key_exits_2_before_anything_is_written_or_sent(
    tmp_path: Path, sim: Any, key: str, says: str
) -> None:
    """Before: the run went on, and every echo of the key in an answer was masked, its
    letters in an image's base64 too: a paid job ended FAILED "output could not be saved"
    (SEGMIND_API_KEY=k, `base64: true`)."""
    server = await sim(time_scale=0.002)
    out = tmp_path / "out"

    code, stdout, stderr = await _batcher(
        "run", str(DEMO), "--model", "instantid", "--out", str(out), "--no-progress",
        "--base-url", server.base_url, "--time-scale", "0.002",
        env=_env(key), cwd=tmp_path,
    )  # fmt: skip

    assert code == 2
    assert stderr.decode().splitlines() == [
        f"batcher: SEGMIND_API_KEY is {says} long: Segmind keys are longer (batcher needs 8 "
        "at least); set it to your whole key"
    ]
    assert stdout == b""  # and the one line above shows only the key's length
    assert not out.exists()
    assert server.stats()["requests"] == {}


def test_simulate_without_a_key_sends_one_a_run_accepts(tmp_path: Path) -> None:
    """The placeholder key of --simulate passes the checks a real key must pass (it was
    "sim-key", 7 characters, short enough to be masked in base64 images)."""
    options = RunOptions(manifest=DEMO, out=tmp_path / "out", simulate=True, api_key=None)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("SEGMIND_API_KEY", raising=False)
        key = preflight.api_key(options)
    preflight.api_key(dataclasses.replace(options, simulate=False, api_key=key))


@pytest.mark.parametrize("after_s", [0.25, 0.5, 0.8])
async def test_ctrl_c_while_starting_exits_without_a_traceback(
    tmp_path: Path, after_s: float
) -> None:
    """Ctrl-C in the first second (imports, reading options, scanning the manifest) used
    to print a KeyboardInterrupt traceback."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt,face_image\na,x,https://example.com/f.jpg\n")
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "batcher", "run", str(manifest), "--model", "instantid"),
        *("--out", str(tmp_path / "out"), "--simulate", "--time-scale", "1", "-q"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(None),
    )
    await asyncio.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert b"Traceback" not in stderr, stderr.decode()
    # 130, or death by SIGINT as Python reports an interrupt at shutdown (a shell shows
    # both as 130); 4 once the run's own handling has started.
    assert proc.returncode in (130, -signal.SIGINT, 4), (proc.returncode, stderr.decode())


@pytest.mark.parametrize("value", ["-1", "x"])
def test_validate_refuses_a_max_errors_that_is_no_count(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-errors -1 used to hide every problem and still exit 3 without a word."""
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(DEMO), "--max-errors", value])
    assert exit_info.value.code == 2  # with -1, before: no SystemExit, no output
    err = capsys.readouterr().err
    assert "argument --max-errors" in err
    assert "Traceback" not in err


# -- --simulate and --base-url -----------------------------------------------------------------


@pytest.mark.usefixtures("_sigint")
@pytest.mark.parametrize("base_url", ["http://127.0.0.1:8400", DEFAULT_BASE_URL])
def test_simulate_with_a_base_url_exits_2_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], base_url: str
) -> None:
    """Before: --base-url was ignored without a word (the default given too), and the run
    went to the built-in emulator."""
    out = tmp_path / "out"

    code = main([
        "run", str(DEMO), "--model", "instantid", "--out", str(out), "--simulate",
        "--base-url", base_url, "--no-progress",
    ])  # fmt: skip

    assert code == 2
    assert capsys.readouterr().err == (
        "batcher: --simulate runs the built-in emulator in-process and sends nothing to "
        "--base-url: give one of them (--base-url alone for the API or a `batcher sim`, "
        "--simulate alone for the built-in emulator)\n"
    )
    assert not out.exists()


def test_run_options_refuse_simulate_with_another_base_url(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--simulate runs the built-in emulator in-process"):
        RunOptions(
            manifest=tmp_path / "m.csv",
            out=tmp_path / "out",
            simulate=True,
            base_url="http://127.0.0.1:8400",
        )


# -- one service per output folder ------------------------------------------------------------


async def test_a_simulated_folder_is_refused_by_a_real_run_with_exit_2_and_nothing_sent(
    tmp_path: Path, sim: Any
) -> None:
    """The audit's case: before, the second run said 12 of 12 completed, 0 API requests,
    exit 0 (and a folder half done had the emulator's request ids polled for real)."""
    out = tmp_path / "out"
    server = await sim(time_scale=0.01)
    run = ("run", str(DEMO), "--model", "instantid", "--out", str(out), "--no-progress")
    code, _, stderr = await _batcher(*run, "--simulate", env=_env(KEY), cwd=tmp_path)
    assert code == 0, stderr.decode()[-2000:]
    table = (out / "results.parquet").read_bytes()

    code, stdout, stderr = await _batcher(
        *run, "--base-url", server.base_url, env=_env(KEY), cwd=tmp_path
    )

    assert code == 2, stderr.decode()[-2000:]
    assert stdout == b""
    origin = f"http://127.0.0.1:{server.port}"
    assert stderr.decode().splitlines() == [
        f"batcher: {out} holds jobs sent to the built-in emulator (--simulate), not to "
        f"{origin}: their request ids and images belong to that service. Use another --out "
        f"for {origin}, or run again with --simulate (and no --base-url) to go on with this "
        "folder"
    ]
    assert server.stats()["requests"] == {}
    assert (out / "results.parquet").read_bytes() == table
