"""What a run is asked to do: one frozen, keyword-only object shared by the CLI and the API."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from batcher.backoff import RetryConfig
from batcher.client import DEFAULT_BASE_URL
from batcher.errors import UsageError
from batcher.gate import RateConfig
from batcher.redownload import DownloadRetry
from batcher.schedule import PollConfig
from batcher.sink import DownloadLimits

if TYPE_CHECKING:  # the emulator (aiohttp.web, its image maker) loads only with --simulate
    from batcher.sim.config import SimConfig

#: With --simulate, durations run this much faster, so demos finish in seconds.
SIMULATE_TIME_SCALE = 0.01
#: --time-scale's range (of run and of `batcher sim`). Below 0.001 the hour a result is
#: kept is under 3.6 s and durations shrink under the client's own delays: results
#: expire before they are fetched, and rows go round for ever. Above 1000 a 7.7 s job
#: takes two hours.
TIME_SCALE_RANGE = (0.001, 1000.0)
#: --simulate sends nothing to --base-url: asking for both is a mistake, not a choice.
SIMULATE_AND_BASE_URL = (
    "--simulate runs the built-in emulator in-process and sends nothing to --base-url: give "
    "one of them (--base-url alone for the API or a `batcher sim`, --simulate alone for "
    "the built-in emulator)"
)


def check_time_scale(value: float) -> None:
    """Raise :class:`UsageError` unless value is within TIME_SCALE_RANGE (so finite)."""
    low, high = TIME_SCALE_RANGE
    if not low <= value <= high:  # NaN fails every comparison
        raise UsageError(f"--time-scale must be between {low:g} and {high:g}, got {value:g}")


def check_base_url(url: str) -> None:
    """Raise :class:`UsageError` unless ``url`` is an address to send the API's requests
    to: http(s), a host, a port that can be connected to, no user, password or query (a
    credential there would be sent, and shown in messages)."""
    shown = repr(url)
    try:
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None or parts.query:
            shown = "the URL given (not shown: it may hold a secret)"
            raise ValueError("it holds a user, password or query; the key goes in SEGMIND_API_KEY")
        port = parts.port  # raises for a port that is not a number in 0-65535
        if parts.scheme.lower() not in ("http", "https"):
            raise ValueError("it must start with http:// or https://")
        if not parts.hostname:
            raise ValueError("it has no host")
        if any(c.isspace() for c in url):
            raise ValueError("it contains a space")
        if port == 0:
            raise ValueError("port 0 cannot be connected to")
        if parts.fragment:
            raise ValueError("it has a #fragment")
    except ValueError as exc:
        raise UsageError(f"--base-url must be the API's http(s) address; {shown}: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Every option of ``batcher run``; defaults are right for Segmind's Pro plan."""

    manifest: Path
    out: Path
    model: str | None = None
    base_url: str = DEFAULT_BASE_URL
    rate: RateConfig = field(default_factory=RateConfig)
    #: Jobs submitted and not yet finished, at most.
    max_in_flight: int = 200
    #: Run against the in-process emulator (time-scaled) instead of the real API.
    simulate: bool = False
    #: The emulator's knobs with --simulate (its time_scale is the run's).
    sim: SimConfig | None = None
    #: Durations of the service relative to real time: 1.0 for the real API.
    time_scale: float | None = None
    #: Send again a submit whose outcome is unknown (at-least-once). Default: at-most-once.
    resubmit_unknown: bool = False
    #: Submit again rows that ended FAILED in an earlier run.
    retry_failed: bool = False
    retry: RetryConfig = field(default_factory=RetryConfig)
    poll: PollConfig = field(default_factory=PollConfig)
    downloads: DownloadLimits = field(default_factory=DownloadLimits)
    #: Downloads of a COMPLETED job's images tried again, and for how long at most.
    download_retry: DownloadRetry = field(default_factory=DownloadRetry)
    #: A tqdm bar (None: when stderr is a terminal).
    progress: bool | None = None
    #: Seconds between plain progress lines when there is no bar.
    log_every_s: float = 30.0
    #: How many submits may be on the wire at once. Each waits for two checkpoint
    #: commits besides its POST, so a few dozen keep a fast API busy; under a rate
    #: limit the extra workers only wait at the gate (a row is SUBMITTING only once granted).
    submit_concurrency: int = 32
    #: The key; None reads SEGMIND_API_KEY. Never printed.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise UsageError(f"--max-in-flight must be >= 1, got {self.max_in_flight}")
        if self.time_scale is not None:
            check_time_scale(self.time_scale)
        if self.submit_concurrency < 1:
            raise UsageError("submit_concurrency must be >= 1")
        check_base_url(self.base_url)  # a host too: the checkpoint records the origin
        if self.simulate and self.base_url != DEFAULT_BASE_URL:
            raise UsageError(SIMULATE_AND_BASE_URL)

    @property
    def scale(self) -> float:
        """The effective time scale."""
        if self.time_scale is not None:
            return self.time_scale
        return SIMULATE_TIME_SCALE if self.simulate else 1.0

    def scaled_retry(self) -> RetryConfig:
        s = self.scale
        return replace(self.retry, base_s=self.retry.base_s * s, cap_s=self.retry.cap_s * s)

    def scaled_poll(self) -> PollConfig:
        return replace(self.poll, time_scale=self.scale)

    def sim_config(self) -> SimConfig:
        """The emulator's config for --simulate: the user's knobs, at the run's time scale."""
        from batcher.sim.config import SimConfig

        base = self.sim or SimConfig(rate_limit=50, rate_period_s=60.0)
        return replace(base, time_scale=self.scale)
