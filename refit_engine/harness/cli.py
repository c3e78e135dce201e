"""argparse value types shared by the main job, the sweep and the dry run: counts, layouts and
model overrides, each refused with a one-line reason."""

from __future__ import annotations

import argparse
import os

from refit_engine.harness.grid import parse_layout_spec, parse_overrides


def _number(text: str, convert, ok, requirement: str):
    """An argparse value: `convert(text)`, refused with a reason unless `ok(value)`."""
    try:
        value = convert(text)
    except ValueError:
        kind = "an integer" if convert is int else "a number"
        raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {requirement}, not {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "at least 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "at least 0")


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    return _number(text, float, lambda v: v > 0, "positive")


def layout_arg(text: str) -> str:
    """argparse type: a layout such as tp=2,ep=4 (checked here, kept as text)."""
    try:
        parse_layout_spec(text)
    except (SystemExit, ValueError) as exc:  # unknown key / not an integer
        raise argparse.ArgumentTypeError(f"bad layout {text!r}: {exc} (e.g. tp=2,pp=1,ep=4,etp=1)"
                                         ) from None
    return text


def overrides_arg(text: str) -> dict:
    """argparse type: model size overrides such as hidden=512,num_layers=6."""
    try:
        return parse_overrides(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad overrides {text!r}: NAME=INTEGER[,NAME=INTEGER...]"
                                         ) from None


def env_flag(name: str):
    """True / False where the environment sets `name` to 1 / 0, None where it does not."""
    value = os.environ.get(name)
    return None if value in (None, "") else value == "1"
