"""Shared by the benchmark scripts: results files written atomically (bmclip's temp-name + fsync + rename), the
machine description, interleaved timing, tar shards, and image fidelity (PSNR against Pillow)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a plain checkout works without installing bmclip
    sys.path.insert(0, str(REPO))

from bmclip.io import atomic_write_text as _atomic_write_text  # noqa: E402
from bmclip.io import atomic_writer  # noqa: E402


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


# --- the machine -----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (``platform.processor()`` where there is no /proc)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where that is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_info(**versions: str) -> dict:
    """What a results table names: CPU model, usable / online cores, load average, date, Python and torch versions
    (plus ``versions``, e.g. torchvision=...)."""
    import torch

    return {
        "machine": cpu_model(),
        "cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **versions,
    }


# --- timing ----------------------------------------------------------------------------------------------------


def interleaved_runs(methods: dict[str, Callable[[], int]], repeats: int) -> dict[str, dict]:
    """Run every method ``repeats`` times, round-robin (A B C A B C ...), so that each sees the same background
    load. A method returns how many items it processed. Per method: the items of each run, its wall seconds, the
    items/s of each run and their median, min and max."""
    runs: dict[str, list[tuple[int, float]]] = {k: [] for k in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            n = fn()
            runs[name].append((n, time.perf_counter() - t0))
    out = {}
    for name, rs in runs.items():
        rates = [n / t for n, t in rs]
        out[name] = {"items": [n for n, _ in rs], "wall_s": [t for _, t in rs], "per_s": rates,
                     "per_s_median": statistics.median(rates), "per_s_min": min(rates), "per_s_max": max(rates)}
    return out


# --- shards ----------------------------------------------------------------------------------------------------


def write_tar_shard(samples: Sequence[tuple[str, dict[str, bytes]]], path: Path) -> Path:
    """A webdataset tar shard (USTAR, members ``KEY.EXT`` in the given order) of ``(key, {ext: bytes})``."""
    with atomic_writer(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for ext, payload in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    return Path(path)


# --- fidelity --------------------------------------------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 arrays of one shape (inf when equal)."""
    if a.shape != b.shape:
        raise ValueError(f"PSNR of arrays of different shapes {a.shape} and {b.shape}")
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def pillow_crop_resize(im: Image.Image, window: tuple[int, int, int, int], size: tuple[int, int],
                       resample=Image.BICUBIC) -> np.ndarray:
    """The fidelity reference: Pillow crops ``window`` (left, top, right, bottom) out of the fully decoded image and
    resizes it to ``size`` (w, h) with its antialiasing filter (bicubic by default, = torchvision on PIL images);
    HWC uint8."""
    return np.asarray(im.crop(window).resize(size, resample))
