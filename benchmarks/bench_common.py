"""Shared by the benchmark scripts: results files written atomically (bmclip's temp-name + fsync + rename)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a plain checkout works without installing bmclip
    sys.path.insert(0, str(REPO))

from bmclip.eval.report import atomic_write_bytes  # noqa: E402


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader never sees a half-written file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data) -> None:
    """``data`` as indented JSON (one trailing newline), written atomically."""
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


@contextlib.contextmanager
def keep_results_on_sigint(name: str, record: dict):
    """Run the body; a KeyboardInterrupt (the GPU suite's step limit sends SIGINT) ends the body instead of the
    script, and ``record["interrupted"]`` (set False on entry) says whether it came, so the caller still writes the
    rows measured so far."""
    record["interrupted"] = False
    try:
        yield
    except KeyboardInterrupt:
        record["interrupted"] = True
        print(f"{name}: interrupted; writing the rows measured so far", file=sys.stderr, flush=True)


def median_ms(fn, warmup: int, reps: int, cuda: bool) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after ``warmup``: CUDA events (synchronised per
    call) when ``cuda``, else wall time."""
    import statistics
    import time

    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
