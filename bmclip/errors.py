"""Errors that bmclip reports to users as a clear message (the CLI prints them without a traceback), and the
integer and real-number checks that options are held to."""

from __future__ import annotations

import math
import numbers
from typing import Any


class BmclipError(Exception):
    """Base class of user-facing errors (bad config, bad input, bad checkpoint)."""


class ConfigError(BmclipError, ValueError):
    """A configuration key or value is wrong; the message names the key."""


class CheckpointError(BmclipError):
    """A checkpoint cannot be loaded: unknown/missing keys, unsafe pickle, corrupt file."""


class DataError(BmclipError):
    """Input data cannot be read (corrupt shard, malformed XML, unknown dataset spec)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised in the main thread by the ``bmclip`` command's handler, so that ``with`` blocks
    and ``finally`` clauses unwind as for Ctrl-C (a subclass of KeyboardInterrupt, which ``except
    Exception`` clauses do not swallow)."""


def is_int(v: Any) -> bool:
    """True for an integer (Python or numpy) that is not a bool: ``True`` is not a batch size."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_int(v: Any, what: str, low: int | None = None, high: int | None = None) -> int:
    """``v`` as an ``int`` if it is an integer (see :func:`is_int`) within [low, high], else ConfigError
    "``what`` must be an integer >= low (from low to high), got v"."""
    if not is_int(v) or (low is not None and v < low) or (high is not None and v > high):
        if low is not None and high is not None:
            rng = f" from {low} to {high}"
        elif low is not None:
            rng = f" >= {low}"
        else:
            rng = f" <= {high}" if high is not None else ""
        raise ConfigError(f"{what} must be an integer{rng}, got {v!r}")
    return int(v)


def check_real(v: Any, what: str, low: float | None = None, *, above: bool = False) -> float:
    """``v`` as a ``float`` if it is a finite real number (an integer or a float, not a bool or a string) that is
    >= ``low`` (> ``low`` with ``above``), else ConfigError "``what`` must be a finite number >= low, got v"."""
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (low is not None and (v <= low if above else v < low)):
        rng = "" if low is None else f" {'>' if above else '>='} {low:g}"
        raise ConfigError(f"{what} must be a finite number{rng}, got {v!r}")
    return float(v)
