"""An emulator of Segmind's v2 API, faithful enough for the official SDK, with fault knobs."""

from batcher.sim.app import Emulator
from batcher.sim.config import SimConfig
from batcher.sim.jobs import FAIL_MARKERS, FAILURES
from batcher.sim.server import SimServer, serve
from batcher.sim.stats import SimStats

__all__ = ["FAILURES", "FAIL_MARKERS", "Emulator", "SimConfig", "SimServer", "SimStats", "serve"]
