"""Errors that bmclip reports to users as a clear message (the CLI prints them without a traceback), and the
one integer check that options are held to."""

from __future__ import annotations

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
