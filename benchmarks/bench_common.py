"""Shared by the benchmark scripts: results files written atomically (bmclip's temp-name + fsync + rename)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a plain checkout works without installing bmclip
    sys.path.insert(0, str(REPO))

from bmclip.io import atomic_write_text as _atomic_write_text  # noqa: E402


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader never sees a half-written file."""
    _atomic_write_text(text, path)


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


def measure_matmul_tflops(device, n: int = 8192, warmup: int = 5, iters: int = 20, dtype=None) -> float:
    """This card's dense matmul rate (TFLOP/s): the mean of ``iters`` ``torch.matmul`` of two n×n random
    matrices (bf16 by default) after ``warmup``, timed with CUDA events (wall time on CPU). Random data, never
    zeros (which run faster than real data). The suite's MFU and roofline floors use this, not a datasheet."""
    import torch

    dtype = dtype or torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)  # drawn where they are used: no 2 x 256 MB host copy
    a = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    ms = _mean_ms(lambda: torch.matmul(a, b), warmup, iters, device)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12


def measure_copy_gbps(device, nbytes: int = 2 << 30, warmup: int = 3, iters: int = 10) -> float:
    """Device-memory bandwidth (GB/s, 10⁹ bytes/s): a ``nbytes`` device-to-device copy, counting the bytes read
    plus the bytes written, mean over ``iters`` after ``warmup``."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _mean_ms(lambda: dst.copy_(src), warmup, iters, device)
    return 2.0 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _mean_ms(fn, warmup: int, iters: int, device) -> float:
    import time

    import torch

    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def read_peak_json(path) -> dict:
    """The figures ``roofline.py --measure`` wrote (device, matmul_bf16_tflops, copy_gbps), or {} when the file is
    missing or unreadable (callers then measure for themselves)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, TypeError):
        return {}
    return data if isinstance(data, dict) else {}
