"""The `batcher` flags' value types, shared by cli.py and cli_sim.py.

The names keep their underscore: argparse names a type by its __name__ when it refuses
a value ("invalid _count value: 'x'").
"""

from __future__ import annotations

import argparse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _count(text: str) -> int:
    """A whole number >= 0 (argparse turns the ValueError of int('x') into its message)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is below 0")
    return value


def _model_seconds(text: str) -> tuple[str, float]:
    slug, sep, seconds = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not MODEL=SECONDS")
    return slug, float(seconds)


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT")
    return int(w), int(h)
