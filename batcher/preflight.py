"""What is settled before a run sends anything: the API key is usable, the output folder
is this run's alone (a lock), and its jobs belong to the service this run talks to."""

from __future__ import annotations

import contextlib
import fcntl
import os
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from batcher.checkpoint import Checkpoint
from batcher.client import MIN_KEY_CHARS, origin
from batcher.errors import UsageError
from batcher.jobs import SUBMITTED, SUBMITTING
from batcher.manifest import fingerprint
from batcher.options import RunOptions

#: The key sent to the in-process emulator when none is set: it accepts any.
SIMULATE_KEY = "simulate-key"

#: Meta key: the service the folder's jobs are sent to, SIMULATED or --base-url's origin.
SERVICE_META, SIMULATED = "service", "simulate"
#: Meta key: the --time-scale of the folder's jobs in flight (see _check_time_scale).
TIME_SCALE_META = "time_scale"


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
    """One run per output folder at a time. The lock file is neither truncated nor opened
    through a symlink: a link planted at ``.lock`` must not make the run clobber its target."""
    path = out / ".lock"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as exc:
        if os.path.islink(path):
            raise UsageError(f"{path}: the lock file is a symbolic link: remove it") from None
        raise UsageError(
            f"{path}: cannot open the lock file ({exc.strerror or exc}): batcher needs a "
            "folder it can write to for --out"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(f"another batcher run is using {out}") from None
        yield
    finally:
        os.close(fd)


def api_key(options: RunOptions) -> str:
    key = (options.api_key or os.environ.get("SEGMIND_API_KEY", "")).strip()
    if key:
        _check_key(key)
        return key
    if options.simulate:
        return SIMULATE_KEY
    raise UsageError(
        "SEGMIND_API_KEY is not set: export your Segmind API key (or use "
        "--simulate to run against the built-in emulator)"
    )


def _check_key(key: str) -> None:
    """A key goes into an HTTP header: a line break or a control character there makes
    every request fail (aiohttp refuses it) after the row was marked as being sent. And
    every echo of it in an answer is masked (client._Redactor): a key of a few characters
    would mask them in the images' base64 too, and fail paid jobs."""
    for char in key:
        control = unicodedata.category(char) == "Cc"
        if control or char.isspace():
            # The character's code only: the message must not show any of the key.
            kind = "a control character" if control else "whitespace"
            raise UsageError(
                f"SEGMIND_API_KEY contains {kind} (U+{ord(char):04X}) within the key: set "
                "it to the key alone"
            )
    if len(key) < MIN_KEY_CHARS:
        # Its length only: the message must not show any of the key.
        chars = "character" if len(key) == 1 else "characters"
        raise UsageError(
            f"SEGMIND_API_KEY is {len(key)} {chars} long: Segmind keys are longer (batcher "
            f"needs {MIN_KEY_CHARS} at least); set it to your whole key"
        )


def manifest_identity(manifest: Path, model: str | None) -> str:
    """What the checkpoint remembers of the manifest it was loaded from. Blocking."""
    # The same file read with another --model is another job.
    return f"{fingerprint(manifest)} model={model}"


def service_identity(options: RunOptions) -> str:
    """What the checkpoint remembers of the service its jobs are sent to: the in-process
    emulator, or --base-url's origin (scheme://host:port: nothing that could hold a
    credential, no user info, no query)."""
    if options.simulate:
        return SIMULATED
    identity = origin(options.base_url)
    assert identity is not None, "RunOptions checks --base-url"
    return identity


async def _check_time_scale(cp: Checkpoint, options: RunOptions) -> None:
    """Refuse to resume jobs in flight at another --time-scale than they were sent at: a
    result is kept an hour of the service's time, counted at the run's scale, so a
    smaller one takes live jobs for expired (and pays for them again), a larger one
    polls them at the wrong pace. With nothing in flight, the new scale is recorded."""
    if options.simulate:  # the emulator's jobs end with the run that made them: nothing paid
        return
    current = f"{options.scale:g}"
    recorded = await cp.get_meta(TIME_SCALE_META)
    if recorded == current:
        return
    counts = await cp.counts()
    in_flight = counts.get(SUBMITTED, 0) + counts.get(SUBMITTING, 0)
    if recorded is not None and in_flight:
        raise UsageError(
            f"{options.out} has {in_flight} jobs in flight sent with --time-scale {recorded}, "
            f"and this run's is {current}: their results' retention would be counted at the "
            f"wrong pace (a smaller scale takes live jobs for expired and pays for them "
            f"again). Run again with --time-scale {recorded} to finish them"
        )
    await cp.set_meta(TIME_SCALE_META, current)


async def check_service(cp: Checkpoint, options: RunOptions) -> None:
    """Refuse, before anything is sent or polled, a folder whose jobs belong to another
    service: its request ids mean nothing there, and its images would be mixed with that
    service's in one results.parquet."""
    await _check_time_scale(cp, options)
    current = service_identity(options)
    recorded = await cp.get_meta(SERVICE_META)
    if recorded == current:
        return
    if recorded is None or not await cp.any_sent():
        # A new folder, one from before the service was recorded, or one whose rows were
        # never sent (a mistyped --base-url, a run stopped during intake): it belongs to
        # this run's service from now on.
        await cp.set_meta(SERVICE_META, current)
        return

    def name(service: str) -> str:
        return "the built-in emulator (--simulate)" if service == SIMULATED else service

    again = "--simulate (and no --base-url)" if recorded == SIMULATED else f"--base-url {recorded}"
    if options.simulate:
        again += " and without --simulate"
    raise UsageError(
        f"{options.out} holds jobs sent to {name(recorded)}, not to {name(current)}: their "
        f"request ids and images belong to that service. Use another --out for "
        f"{name(current)}, or run again with {again} to go on with this folder"
    )
