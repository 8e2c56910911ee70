"""Shared by the benchmark scripts: results files written atomically (bmclip's temp-name + fsync + rename), the
machine description, interleaved timing, tar shards, image fidelity (PSNR against Pillow), and a loopback object
store (moto's S3 server) behind an optional bandwidth-limited TCP proxy."""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import math
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a plain checkout works without installing bmclip
    sys.path.insert(0, str(REPO))

from bmclip.io import atomic_write_text, atomic_writer  # noqa: E402


def write_json_atomic(path: Path, data) -> None:
    """``data`` as indented JSON (one trailing newline), written atomically."""
    atomic_write_text(json.dumps(data, indent=1) + "\n", path)


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


def interleaved_runs(methods: dict[str, Callable[[], int | tuple[int, float]]], repeats: int) -> dict[str, dict]:
    """Run every method ``repeats`` times, round-robin (A B C A B C ...), so that each sees the same background
    load. A method returns how many items it processed, timed here as a whole; or ``(items, seconds)`` when it
    times itself (to leave out a teardown that is not part of the work measured). Per method: the items of each
    run, its seconds, the items/s of each run and their median, min and max."""
    runs: dict[str, list[tuple[int, float]]] = {k: [] for k in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            r = fn()
            wall = time.perf_counter() - t0
            n, t = r if isinstance(r, tuple) else (r, wall)
            if not 0 < t <= wall:
                raise ValueError(f"{name} reported {t} s for a call that took {wall:.3f} s")
            runs[name].append((n, t))
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


# --- a loopback object store and a throttled link --------------------------------------------------------------


@contextlib.contextmanager
def loopback_s3(start_timeout_s: float = 60.0, server: dict | None = None) -> Iterator[dict]:
    """moto's S3 API server on a free loopback port, in its own process (so that serving objects does not take this
    process's GIL from the loader being timed; needs ``moto[server]`` and s3fs, the dev extra). Yields the fsspec
    storage options that reach it (endpoint and fake credentials, so no user credential is ever sent). ``server``:
    a dict that gets the server's ``pid`` (to read its CPU time with :func:`process_cpu_s`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile()  # its request log (a pipe could fill up and stall the server)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    if server is not None:
        server["pid"] = proc.pid
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"moto's server exited ({proc.returncode}): {log.read()[-800:].decode()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto's server did not listen on port {port} within {start_timeout_s:g} s")
            time.sleep(0.1)
        yield {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench",
               "client_kwargs": {"region_name": "eu-west-1"}}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def process_cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) used so far by process ``pid`` (None: this process), from
    ``/proc/PID/stat``; NaN where that cannot be read (not Linux, or the process is gone)."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
    except (OSError, IndexError, ValueError):
        return math.nan


def upload_s3(storage_options: dict, bucket: str, paths: Sequence[str | Path]) -> list[str]:
    """Put local files into ``s3://bucket/<name>`` (bucket created); their URLs in order."""
    import s3fs  # optional: only the remote rows need it

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **storage_options)
    fs.mkdir(bucket)
    for p in paths:
        fs.put_file(str(p), f"{bucket}/{Path(p).name}")
    return [f"s3://{bucket}/{Path(p).name}" for p in paths]


class ThrottledProxy:
    """A TCP proxy on loopback to ``target`` (host, port) whose downstream bytes (target -> client) share one link
    of ``rate`` bytes/s: every connection's chunks are paced on one clock, as on a real link of that bandwidth
    (``rate`` None: not throttled). The clock is a token bucket holding ``burst_s`` seconds of the link: a sleep
    that overshoots does not lower the average rate. Upstream bytes (requests) pass unthrottled. ``endpoint``: the
    proxy's URL; ``bytes_down``: bytes delivered to clients so far."""

    def __init__(self, target: tuple[str, int], rate: float | None, chunk: int = 64 << 10, burst_s: float = 0.02):
        self.target, self.rate, self.chunk, self.burst_s = target, rate, chunk, burst_s
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._free_at = 0.0  # when the link is free for the next chunk
        self._closed = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept, name="ThrottledProxy", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(self.target, timeout=30)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            open_pumps = [2]  # both sockets are closed when both directions have ended
            for src, dst, paced in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, paced, open_pumps), daemon=True).start()

    def _pace(self, n: int) -> None:
        """Wait for this chunk's slot on the link."""
        with self._lock:
            start = max(time.monotonic() - self.burst_s, self._free_at)
            self._free_at = start + n / self.rate
            end = self._free_at
        delay = end - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _pump(self, src: socket.socket, dst: socket.socket, paced: bool, open_pumps: list[int]) -> None:
        try:
            while True:
                data = src.recv(self.chunk)
                if not data:
                    break
                if paced and self.rate:
                    self._pace(len(data))
                dst.sendall(data)
                if paced:
                    with self._lock:
                        self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                src.shutdown(socket.SHUT_RD)
            with self._lock:
                open_pumps[0] -= 1
                last = open_pumps[0] == 0
            if last:
                src.close()
                dst.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> ThrottledProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def throttled_link(target: tuple[str, int], rate: float | None, start_timeout_s: float = 30.0,
                   server: dict | None = None) -> Iterator[str]:
    """A :class:`ThrottledProxy` to ``target`` in its own process (its pumping threads then take no GIL or core
    time from the process being timed beyond what the OS shares); yields its endpoint URL. ``server``: a dict that
    gets the proxy's ``pid``."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--throttled-proxy", target[0],
                             str(target[1]), repr(rate)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if server is not None:
        server["pid"] = proc.pid
    try:
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(start_timeout_s)
        if not ready or not ready[0].startswith("http://"):
            raise RuntimeError(f"the throttled proxy did not start (exit status {proc.poll()})")
        yield ready[0].strip()
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the proxy exits when its standard input closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _serve_throttled_proxy(host: str, port: str, rate: str) -> int:
    with ThrottledProxy((host, int(port)), None if rate == "None" else float(rate)) as px:
        print(px.endpoint, flush=True)
        sys.stdin.read()  # until the parent closes it (or dies)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--throttled-proxy":
        sys.exit(_serve_throttled_proxy(*sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} --throttled-proxy HOST PORT RATE")
