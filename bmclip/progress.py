"""Progress of a long command (build-dataset, eval): a tqdm bar on a terminal, plain timestamped lines in a log.

A tqdm bar written to a file (Slurm's output, ``2> build.log``, a container's log) is a stream of carriage
returns ten times a second: hours of build make megabytes of one unreadable line, and ``tail`` shows the
last redraw only. Off a terminal the commands therefore print one plain line every ``every_s`` seconds and one
at the end (what ``bmclip train`` does too): the count, the rate, the postfix counters and the ETA.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

# Seconds between two lines off a terminal: often enough for an operator to see a build move, rare enough that
# a day-long build logs under 3,000 lines.
PLAIN_EVERY_S = 30.0


def is_terminal(stream: Any) -> bool:
    """``stream.isatty()``, False for a stream without one or a closed one (also used by bmclip train's console)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_duration(seconds: float) -> str:
    """``H:MM:SS``; "?" for a negative, infinite or NaN duration (an ETA not known yet)."""
    if not (seconds >= 0) or seconds == float("inf"):
        return "?"
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """``update(n)``, ``set_postfix(**counters)`` and ``close()``, as tqdm's, drawn as fits ``stream``.

    ``enabled=False`` (``--no-progress``) prints nothing. ``total`` may be None (no percentage or ETA).
    """

    def __init__(self, desc: str, unit: str, total: int | None = None, *, enabled: bool = True,
                 stream: TextIO | None = None, every_s: float = PLAIN_EVERY_S, silent_if_empty: bool = True):
        self.desc, self.unit, self.total = desc, unit, total
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.t0 = self.last = time.monotonic()
        self.enabled = enabled
        self.silent_if_empty = silent_if_empty  # stopped before the first item: no last line (the error says why)
        self.bar = None
        self.closed = False
        if enabled and is_terminal(self.stream):
            from tqdm import tqdm  # only for a terminal: `bmclip --help` imports this module

            self.bar = tqdm(total=total, unit=unit, desc=desc, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.every_s:
            self._line()

    def set_postfix(self, **counters: Any) -> None:
        self.postfix.update(counters)
        if self.bar is not None:
            self.bar.set_postfix(refresh=False, **self.postfix)

    def close(self, done: bool | None = None) -> None:
        """Close; the last plain line ends in "done" or "stopped" (``done=None``: done when the total is reached
        or there is none). A progress stopped before its first item prints no line (the error says why) unless
        it was made with ``silent_if_empty=False``."""
        if self.closed:
            return
        self.closed = True
        if done is None:
            done = not self.total or self.n >= self.total
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and (done or self.n or not self.silent_if_empty):
            self._line(final="done" if done else "stopped")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(done=exc_type is None)  # left by an exception (an error, a signal): "stopped"

    def wrap(self, batches: Iterable[Any], size: Callable[[Any], int] = len) -> Iterator[Any]:
        """Yield ``batches`` unchanged, counting ``size(batch)`` items of each (at most up to the total: a consumer
        that stops at a maximum cuts the last batch short)."""
        for b in batches:
            k = size(b)
            self.update(k if not self.total else min(k, max(0, self.total - self.n)))
            yield b

    def line(self, final: str | None = None) -> str:
        """The plain line for the current state (``final``: the word it ends with instead of an ETA)."""
        elapsed = time.monotonic() - self.t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        if self.total:
            count += f" ({100.0 * self.n / self.total:.0f}%)"
        parts = [count, *(f"{k} {v}" for k, v in self.postfix.items()), f"{rate:.1f} {self.unit}/s",
                 f"elapsed {format_duration(elapsed)}"]
        if final:
            parts.append(final)
        elif self.total and rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        return f"{time.strftime('%H:%M:%S')} {self.desc}: " + ", ".join(parts)

    def _line(self, final: str | None = None) -> None:
        self.last = time.monotonic()
        try:
            print(self.line(final), file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed or broken log stream must not stop the build
            pass
