"""The loader against what users run instead: ShardLoader vs webdataset + torchvision.io + v2 + DataLoader workers.

Same shards, same output (224 px random resized crops, uint8), same batch size, same crop distribution
(scale (0.9, 1), ratio (3/4, 4/3), bicubic with antialiasing: open_clip's training crop and bmclip's), two shard
sets built from the real PMC figure JPEGs (``--data``, default ../shared/data/pmc_samples, else the repo's
fixtures), cycled to ``--n`` samples and split into equal shards (a multiple of every worker count, so that
webdataset's split by worker gives each worker the same work):

- ``builder``: the figures as ``bmclip build-dataset`` stores them (``bmclip.data.pmc.media.process_image``,
  longest side 512 px, JPEG q90);
- ``full``: the figure files as published (full size).

Rows, each at 1 worker/thread and at all usable cores (``--workers``):

- ``anchor``: ``webdataset.WebDataset`` (tar streaming, shuffle buffer 64) -> ``torchvision.io.decode_jpeg`` (CPU)
  -> ``v2.RandomResizedCrop(224, antialias=True)`` -> batched in the worker -> ``torch.utils.data.DataLoader``
  with N worker processes (persistent): the pipeline a performance-minded open_clip user writes today.
  bmclip does not flip (the ShardLoader has no flip), so neither does the anchor.
- ``ffcv_style``: the same frame, decoding with libjpeg-turbo's DCT scaling (Pillow ``draft``: the largest of
  1/2, 1/4, 1/8 that keeps the crop >= the output) and an area (box) resize of the scaled window: FFCV's method.
- ``bmclip``: ``ShardLoader`` with N decoder threads, defaults (DCT scaling only while >= 2x the output).
- ``bmclip_exact``: the same with ``decode_options={"dct_scaling": False}`` (full-size decode: the pixels closest
  to Pillow's, for the comparison at equal fidelity).
- ``bmclip_dct1``: the same with ``decode_options={"dct_min_ratio": 1.0}`` (scaled while >= the output).
- ``decode_1core``: ``bmclip._C.Decoder(1).decode_batch`` over the same images, no loader: one core's decode rate.

Remote rows (``--remote``, on the builder set; needs the dev extra's ``moto[server]`` and s3fs): the same shards
uploaded to moto's S3 server on loopback and read by ``ShardLoader(s3://..., cache_dir=...)`` (its download cache
with prefetch, default look-ahead; the cache evicts after use, so each epoch downloads its shards again, except
those the look-ahead into the next epoch kept):

- ``remote_s3``: straight to the server (the link is not the bottleneck);
- ``remote_s3_throttled``: through ``bench_common.ThrottledProxy``, a TCP proxy whose downstream bytes share one
  link of ``--remote-mbps`` MB/s (default 100; moto itself cannot throttle);
- ``local_cold``: their reference, the same shards from local disk timed the same way.

A remote (or ``local_cold``) run is a new ``ShardLoader`` reading ``REMOTE_EPOCHS`` epochs from a cold cache, timed
from making the loader to its last batch (not its teardown). The server and the proxy run in their own processes
(they share the machine's cores with the loader, as a local object store would); each run records the bytes the
loader fetched and the CPU time of the loader's process and of the serving processes (in the targets' notes).

Speed: images/s wall clock per epoch, every loader warmed up by one epoch first (worker start-up, page cache),
then ``--repeats`` epochs per row interleaved round-robin (A B C A B C ...): median and range.
Fidelity: on fixed crop windows (``bmclip._C.crop_box``: the windows bmclip's ``decode_batch`` draws), every
decoder's output against Pillow's (full decode, crop, bicubic resize with antialiasing): min / median PSNR (dB).
Targets: bmclip on all cores >= 1.5x the anchor on all cores at equal fidelity (worst-window PSNR at most 1 dB
below the anchor's), and >= 0.9 x cores x one core's decode rate. Remote: ``remote_s3`` within 10 % of
``local_cold`` on all cores; ``remote_s3_throttled`` within 10 % of the expected rate, min(local rate, link
bandwidth / bytes per sample) (bytes per sample: the bytes each run fetched / its samples; the note says which bound
applies).

    python benchmarks/loader_peers.py --out peers.json --md peers.md     # the real numbers (idle machine)
    python benchmarks/loader_peers.py --quick                             # a check that it runs (~1 min)
    python benchmarks/loader_peers.py --sets builder --remote --only local_cold,remote --out remote.json --md remote.md
    python benchmarks/bench_loader.py --peers [ARGS...]                   # the same, from bench_loader
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
import webdataset as wds
from PIL import Image, features
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    REPO,
    interleaved_runs,
    loopback_s3,
    machine_info,
    pillow_crop_resize,
    process_cpu_s,
    psnr,
    throttled_link,
    upload_s3,
    usable_cores,
    write_json_atomic,
    write_tar_shard,
)

from bmclip._ext import load_ext  # noqa: E402
from bmclip.data.loader import ShardLoader  # noqa: E402
from bmclip.data.pmc.media import ImageSkip, process_image  # noqa: E402
from bmclip.io import atomic_write_text  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("BMCLIP_SHARED", REPO.parent / "shared")) / "data" / "pmc_samples"
FIXTURE_DATA = REPO / "tests" / "fixtures"
SCALE = (0.9, 1.0)  # bmclip's ShardLoader and open_clip's training crop
RATIO = (3 / 4, 4 / 3)
SHUFFLE_BUFFER = 64
BUILDER_MAX_SIDE = 512  # bmclip build-dataset's default max_side
# ShardLoader decode_options per bmclip row (the same options in the fidelity pass)
BMCLIP_MODES = {"bmclip": {}, "bmclip_exact": {"dct_scaling": False}, "bmclip_dct1": {"dct_min_ratio": 1.0}}
TARGET_VS_ANCHOR = 1.5
TARGET_VS_CORES = 0.9
# "equal fidelity": the row's worst-window PSNR vs Pillow is at most this far below the anchor's
EQUAL_FIDELITY_DB = 1.0
REMOTE_ROWS = ("remote_s3", "remote_s3_throttled")
LOCAL_COLD = "local_cold"  # the remote rows' local reference: the same local shards, timed as the remote rows are
REMOTE_EPOCHS = 3  # consecutive epochs per timed remote (and local_cold) run (see _cold_method)
TARGET_REMOTE_VS_LOCAL = 0.9  # remote within 10 % of local when the link is not the bottleneck
TARGET_THROTTLED_TOLERANCE = 0.1  # throttled: samples/s = expected rate within 10 %


# --- inputs ----------------------------------------------------------------------------------------------------


@dataclass
class ShardSet:
    """One set of shards every row reads. ``urls`` go to ``ShardLoader`` and ``webdataset.WebDataset`` as they are;
    ``loader_kwargs`` are extra ``ShardLoader`` arguments. A remote set (the same shards served over S3/HTTP, read
    through ``ShardLoader(urls, cache_dir=...)`` and webdataset's ``pipe:``/``https://`` streaming) is another
    ShardSet with remote ``urls`` and its cache arguments in ``loader_kwargs``, timed by the same rows."""

    name: str
    urls: list[str]
    blobs: list[bytes]  # the distinct encoded images, in the order the shards cycle through them
    n: int
    loader_kwargs: dict = field(default_factory=dict)
    description: str = ""
    server_pids: tuple[int, ...] = ()  # the processes serving remote ``urls`` (their CPU time is read per run)


def find_jpegs(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*.jpg") if p.is_file())


def builder_jpeg(data: bytes) -> bytes:
    """The JPEG ``bmclip build-dataset`` stores for a figure (longest side <= 512 px, q90; small ones as they are).
    Raises ``ImageSkip`` for a figure the builder refuses (too small, extreme aspect, undecodable)."""
    return process_image(data, max_side=BUILDER_MAX_SIDE).jpeg


def shard_count(workers: Sequence[int]) -> int:
    """Twice the least common multiple of the worker counts: every worker of every configuration gets the same
    number of shards (webdataset splits whole shards between workers), at least two."""
    return 2 * math.lcm(*workers)


def write_shard_set(name: str, blobs: list[bytes], n: int, n_shards: int, out_dir: Path,
                    description: str = "") -> ShardSet:
    """``n`` samples (rounded up to a multiple of ``n_shards``) cycling over ``blobs``, in ``n_shards`` equal
    shards ``{name}-NNNNNN.tar`` of KEY.jpg + KEY.txt."""
    per = max(1, -(-n // n_shards))
    urls = []
    for s in range(n_shards):
        samples = []
        for j in range(per):
            i = s * per + j
            samples.append((f"s{i:07d}", {"jpg": blobs[i % len(blobs)], "txt": f"figure {i} of set {name}".encode()}))
        urls.append(str(write_tar_shard(samples, out_dir / f"{name}-{s:06d}.tar")))
    return ShardSet(name, urls, blobs, per * n_shards, description=description)


# --- the anchor: webdataset + torchvision.io + v2 + DataLoader workers -----------------------------------------


def _interp(name: str) -> InterpolationMode:
    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[name]


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _tv_sample(sample, rrc) -> tuple[torch.Tensor, str]:
    jpg, txt = sample
    return rrc(decode_jpeg(_as_tensor(jpg), mode=ImageReadMode.RGB)), txt.decode("utf-8")


def _ffcv_sample(sample, size: int) -> tuple[torch.Tensor, str]:
    jpg, txt = sample
    im = Image.open(io.BytesIO(jpg))
    top, left, ch, cw = _rrc_params(im.height, im.width)
    return _ffcv_window(im, (left, top, left + cw, top + ch), size), txt.decode("utf-8")


def _rrc_params(h: int, w: int) -> tuple[int, int, int, int]:
    """torchvision's random resized crop window (top, left, height, width) for an h x w image (global torch RNG)."""
    return RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(1, h, w), list(SCALE), list(RATIO))


def _ffcv_window(im: Image.Image, window: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """DCT-scaled decode (the largest power-of-two reduction that keeps the window >= size) + area resize of the
    scaled window: CHW uint8."""
    w, h = im.size
    left, top, right, bottom = window
    cw, ch = right - left, bottom - top
    drafted = im.draft("RGB", (math.ceil(w * size / cw), math.ceil(h * size / ch)))
    s = w / drafted[1][2] if drafted else 1.0  # the reduction draft picked (1, 2, 4 or 8; 1 for non-JPEG)
    if im.mode != "RGB":  # greyscale / CMYK figures (convert copies even an RGB image)
        im = im.convert("RGB")
    out = im.resize((size, size), Image.BOX, box=(left / s, top / s, right / s, bottom / s))
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


def make_anchor(urls: list[str], size: int, batch: int, workers: int, decoder: str = "torchvision",
                interpolation: str = "bicubic") -> DataLoader:
    """The webdataset + DataLoader pipeline; ``decoder`` "torchvision" (decode_jpeg + v2.RandomResizedCrop) or
    "ffcv_style" (Pillow draft + area resize). Batches of (uint8 [B, 3, size, size], list of captions)."""
    if decoder == "torchvision":
        rrc = v2.RandomResizedCrop(size, scale=SCALE, ratio=RATIO, interpolation=_interp(interpolation),
                                   antialias=True)
        fn = partial(_tv_sample, rrc=rrc)
    elif decoder == "ffcv_style":
        fn = partial(_ffcv_sample, size=size)
    else:
        raise ValueError(f"decoder must be 'torchvision' or 'ffcv_style', got {decoder!r}")
    ds = (wds.WebDataset(urls, shardshuffle=False).shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER)
          .to_tuple("jpg", "txt").map(fn).batched(batch, partial=True))
    return DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                      prefetch_factor=2 if workers > 0 else None)


def run_epoch(loader) -> int:
    """Images in one pass over ``loader`` (torch batches (images, captions) or ShardLoader dicts)."""
    n = 0
    for b in loader:
        n += (b["image"] if isinstance(b, dict) else b[0]).shape[0]
    return n


# --- bmclip ----------------------------------------------------------------------------------------------------


def make_bmclip(shards: ShardSet, size: int, batch: int, threads: int, **decode_options) -> ShardLoader:
    return ShardLoader(shards.urls, batch_size=batch, image_size=size, num_threads=threads, seed=0,
                       shuffle_buffer=SHUFFLE_BUFFER, decode_options=decode_options, **shards.loader_kwargs)


def bmclip_epoch(ld) -> int:
    n = run_epoch(ld)
    if ld.stats["skipped_total"]:
        raise RuntimeError(f"bmclip skipped samples: {ld.skipped}")
    return n


def decode_1core(C, blobs: list[bytes], n: int, size: int, batch: int) -> Callable[[], int]:
    """One core's decode + random resized crop rate: ``Decoder(1).decode_batch`` over ``n`` samples cycling
    ``blobs``, no loader."""
    dec = C.Decoder(1)
    arrs = [np.frombuffer(blobs[i % len(blobs)], dtype=np.uint8) for i in range(n)]
    out = np.empty((batch, size, size, 3), np.uint8)

    def run() -> int:
        for i in range(0, n, batch):
            chunk = arrs[i : i + batch]
            reasons = dec.decode_batch(chunk, out[: len(chunk)], seed=i, scale=SCALE, ratio=RATIO)
            if any(r is not None for r in reasons):
                raise RuntimeError(f"decode failures: {reasons}")
        return n

    return run


# --- fidelity --------------------------------------------------------------------------------------------------


def crop_windows(blobs: list[bytes], size: int, per_image: int, seed: int, C=None) -> list[tuple[int, tuple]]:
    """(image index, (left, top, right, bottom)) for ``per_image`` windows of each image: the windows
    ``bmclip._C.Decoder.decode_batch(seed=seed)`` crops from the list ``[blob for blob in blobs for _ in
    range(per_image)]`` (``crop_box``); without bmclip._C, torchvision's RandomResizedCrop draws (seeded)."""
    out = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for i, b in enumerate(blobs):
            w, h = Image.open(io.BytesIO(b)).size
            for k in range(per_image):
                if C is not None:
                    window = tuple(C.crop_box(w, h, size, seed, i * per_image + k, "random_resized_crop", SCALE,
                                              RATIO)[0])
                else:
                    top, left, ch, cw = _rrc_params(h, w)
                    window = (left, top, left + cw, top + ch)
                out.append((i, window))
    return out


def _tv_window(data: bytes, window, size: int, interpolation: str) -> np.ndarray:
    left, top, right, bottom = window
    img = decode_jpeg(_as_tensor(data), mode=ImageReadMode.RGB)
    out = TF.resized_crop(img, top, left, bottom - top, right - left, [size, size],
                          interpolation=_interp(interpolation), antialias=True)
    return out.permute(1, 2, 0).numpy()


def fidelity(blobs: list[bytes], size: int, per_image: int = 4, seed: int = 3, interpolation: str = "bicubic",
             C=None) -> dict[str, dict]:
    """Min / median PSNR (dB) of each decoder against Pillow on the same windows (``crop_windows``), plus the
    per-window values. Decoders: torchvision.io + resized_crop, the FFCV-style decode, and with ``C``
    (bmclip._C) ``decode_batch`` with each of ``BMCLIP_MODES``' options."""
    windows = crop_windows(blobs, size, per_image, seed, C)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    ref = [pillow_crop_resize(pil[i], win, (size, size)) for i, win in windows]
    outs: dict[str, list[np.ndarray]] = {
        "anchor": [_tv_window(blobs[i], win, size, interpolation) for i, win in windows],
        "ffcv_style": [_ffcv_window(Image.open(io.BytesIO(blobs[i])), win, size).permute(1, 2, 0).numpy()
                       for i, win in windows],
    }
    if C is not None:
        dec = C.Decoder(1)
        rep = [b for b in blobs for _ in range(per_image)]
        for name, kw in BMCLIP_MODES.items():
            arr = np.zeros((len(rep), size, size, 3), np.uint8)
            reasons = dec.decode_batch(rep, arr, seed=seed, scale=SCALE, ratio=RATIO, **kw)
            if any(r is not None for r in reasons):
                raise RuntimeError(f"decode failures: {reasons}")
            outs[name] = list(arr)
    res = {}
    for name, imgs in outs.items():
        vals = [psnr(o, r) for o, r in zip(imgs, ref)]
        res[name] = {"min_db": min(vals), "median_db": float(np.median(vals)), "per_window_db": vals}
    return res


# --- the run ---------------------------------------------------------------------------------------------------


def _load_c():
    """bmclip._C, or None where it is not built."""
    try:
        C = load_ext()
    except ImportError:
        return None
    return C if hasattr(C, "Decoder") else None


def _expected(row: str, shards: ShardSet) -> int:
    """Images one timed run of ``row`` yields: one epoch, or ``REMOTE_EPOCHS`` for the remote rows."""
    return shards.n * (REMOTE_EPOCHS if row.startswith((*REMOTE_ROWS, LOCAL_COLD)) else 1)


def speed_rows(shards: ShardSet, size: int, batch: int, workers: Sequence[int], repeats: int, C,
               interpolation: str, only: set[str], remote: dict[str, ShardSet] | None = None) -> dict[str, dict]:
    """Warm up and time every row on one shard set (interleaved). DataLoader rows are built and warmed (their worker
    processes forked) before any bmclip decoder thread exists in this process. ``remote``: row name -> the same
    shards at remote URLs, each timed as ``ShardLoader`` (bmclip's defaults) at every worker count."""
    makers: dict[str, Callable[[], Callable[[], int]]] = {}
    for w in workers:
        makers[f"anchor_{w}w"] = partial(_loader_method, make_anchor, shards.urls, size, batch, w, "torchvision",
                                         interpolation)
        makers[f"ffcv_style_{w}w"] = partial(_loader_method, make_anchor, shards.urls, size, batch, w, "ffcv_style",
                                             interpolation)
    if C is not None:
        for w in workers:
            for mode, kw in BMCLIP_MODES.items():
                makers[f"{mode}_{w}t"] = partial(_bmclip_method, shards, size, batch, w, **kw)
        makers["decode_1core"] = partial(decode_1core, C, shards.blobs, shards.n, size, batch)
        for row, rs in ({LOCAL_COLD: shards, **remote} if remote else {}).items():
            for w in workers:
                makers[f"{row}_{w}t"] = partial(_cold_method, rs, size, batch, w)
    makers = {k: v for k, v in makers.items() if not only or any(k.startswith(o) for o in only)}
    methods: dict[str, Callable[[], int | tuple[int, float]]] = {}
    for name, make in makers.items():
        fn = make()
        n = fn()  # warm-up epoch
        n = n[0] if isinstance(n, tuple) else n
        if n != _expected(name, shards):
            raise RuntimeError(f"{name} yielded {n} images from {shards.name}, expected {_expected(name, shards)}")
        methods[name] = fn
        print(f"  {shards.name}: warmed up {name}", flush=True)
    res = interleaved_runs(methods, repeats)
    for name, r in res.items():
        if any(n != _expected(name, shards) for n in r["items"]):
            raise RuntimeError(f"{name} yielded {r['items']} images, expected {_expected(name, shards)} each run")
        extra = getattr(methods[name], "runs", None)
        if extra is not None:  # a remote row: what each timed run fetched and the CPU it took (warm-up left out)
            timed = extra[-repeats:]
            for key in ("bytes_fetched", "cpu_s", "server_cpu_s"):
                r[key] = [x[key] for x in timed]
    methods.clear()  # DataLoader workers and decoder pools end here
    return res


def _loader_method(make, *args) -> Callable[[], int]:
    loader = make(*args)
    return lambda: run_epoch(loader)


def _bmclip_method(shards: ShardSet, size: int, batch: int, threads: int, **decode_options) -> Callable[[], int]:
    ld = make_bmclip(shards, size, batch, threads, **decode_options)
    return lambda: bmclip_epoch(ld)


def _cold_method(shards: ShardSet, size: int, batch: int, threads: int) -> Callable[[], tuple[int, float]]:
    """``REMOTE_EPOCHS`` consecutive epochs from a cold start: a new ``ShardLoader`` each call (over remote shards:
    with an empty cache folder; over local ones, ``local_cold``: the remote rows' reference, paying the same
    start). Cold, so that no shard was fetched ahead while the interleaved rows ran (a kept loader
    prefetches the next epoch's first shards in the background); several epochs, so that the end of the data (the
    shuffle buffer draining with nothing left to fetch, which a loader reading on into the next epoch overlaps
    with that epoch's downloads) weighs as in a run of many shards, not as in one pass over a handful.

    Each call appends to ``.runs`` what the link-bound rate and the CPU accounting need: ``bytes_fetched`` (the
    loader's count: a shard still cached from the end of one epoch that the next epoch opens first is not fetched
    again), ``cpu_s`` (this process: loader, decoder and download threads) and ``server_cpu_s`` (the processes
    serving the shards: the S3 server, and the throttling proxy for the throttled row; None when unknown)."""
    runs = itertools.count()
    log: list[dict] = []

    def epochs() -> tuple[int, float]:
        run = next(runs)
        cache = Path(shards.loader_kwargs["cache_dir"]) / f"run-{run}" if "cache_dir" in shards.loader_kwargs else None
        kwargs = {**shards.loader_kwargs, **({"cache_dir": str(cache)} if cache else {})}
        c0 = process_cpu_s()
        s0 = _servers_cpu_s(shards.server_pids)
        t0 = time.perf_counter()
        ld = make_bmclip(replace(shards, loader_kwargs=kwargs), size, batch, threads)
        try:
            n = sum(bmclip_epoch(ld) for _ in range(REMOTE_EPOCHS))
            seconds = time.perf_counter() - t0
            log.append({"bytes_fetched": int(ld.stats["bytes_fetched"]), "cpu_s": process_cpu_s() - c0,
                        "server_cpu_s": None if s0 is None else _finite(_servers_cpu_s(shards.server_pids) - s0)})
            # timed: making the loader (cold cache), then the epochs; not the teardown below (a full garbage
            # collection, ~0.14 s here, which a training run pays once at its end, and the local rows never)
            return n, seconds
        finally:
            del ld
            gc.collect()  # the loader's cache thread stops and removes its folder when the loader goes
            if cache is not None:
                shutil.rmtree(cache, ignore_errors=True)

    epochs.runs = log  # type: ignore[attr-defined]
    return epochs


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _servers_cpu_s(pids: Sequence[int]) -> float | None:
    return sum(process_cpu_s(p) for p in pids) if pids else None


def targets_for(speed: dict[str, dict], fid: dict[str, dict], cores: int) -> list[dict]:
    """The issue's two local targets from one shard set's rows (ratios of medians, and the range of the per-run
    ratios of the interleaved runs)."""
    out = []

    def ratio(a: str, b: str, k: float = 1.0) -> tuple[float, float, float]:
        ra, rb = speed[a]["per_s"], speed[b]["per_s"]
        per_run = [x / (k * y) for x, y in zip(ra, rb)]
        return speed[a]["per_s_median"] / (k * speed[b]["per_s_median"]), min(per_run), max(per_run)

    for ours in BMCLIP_MODES:
        a, b = f"{ours}_{cores}t", f"anchor_{cores}w"
        if a in speed and b in speed:
            m, lo, hi = ratio(a, b)
            note, equal = "", None
            if ours in fid and "anchor" in fid:
                f, fa = fid[ours], fid["anchor"]
                note = f"{f['min_db']:.1f} / {f['median_db']:.1f} vs {fa['min_db']:.1f} / {fa['median_db']:.1f}"
                equal = f["min_db"] >= fa["min_db"] - EQUAL_FIDELITY_DB
            met = m >= TARGET_VS_ANCHOR and equal is not False
            t = {"target": f"{a} / {b} (all cores)", "value": m, "range": [lo, hi],
                 "goal": f">= {TARGET_VS_ANCHOR}, equal fidelity", "at_least": TARGET_VS_ANCHOR, "met": met,
                 "equal_fidelity": equal, "note": note}
            if ours == "bmclip" and "decode_1core" in speed:
                # decode_1core decodes with bmclip's defaults and nothing else: cores x its rate is about the most
                # a loader decoding the same pixels the same way delivers here (an estimate: one core's rate
                # varies from run to run, and a run of the loader can beat it), beside the anchor's rate
                t["ceiling"] = cores * speed["decode_1core"]["per_s_median"] / speed[b]["per_s_median"]
                t["note"] += ("; " if t["note"] else "") + (
                    f"decode ceiling ~{t['ceiling']:.2f}x ({cores} cores x decode_1core / {b})")
            out.append(t)
    a = f"bmclip_{cores}t"
    if a in speed and "decode_1core" in speed:
        m, lo, hi = ratio(a, "decode_1core", cores)
        out.append({"target": f"{a} / ({cores} cores x decode_1core)", "value": m, "range": [lo, hi],
                    "goal": f">= {TARGET_VS_CORES}", "at_least": TARGET_VS_CORES, "met": m >= TARGET_VS_CORES,
                    "note": ""})
    return out


def remote_targets(speed: dict[str, dict], cores: int, bytes_per_sample: float, link_bytes_per_s: float
                   ) -> list[dict]:
    """The issue's remote targets: ``remote_s3`` / local on all cores >= 0.9, and ``remote_s3_throttled`` /
    min(local rate, link-bound rate) within 1 +- 0.1. Local is ``local_cold`` (the same shards from local disk,
    timed as the remote rows are: a new loader per run, ``REMOTE_EPOCHS`` epochs), or ``bmclip`` where that row
    was not run.

    The link-bound rate of a run is its samples x link bandwidth / the bytes that run fetched (the loader's
    ``bytes_fetched``, recorded per run by :func:`_cold_method`; ``bytes_per_sample`` x samples, the shards'
    size, where a row has no such record): a shard the cache still holds from the end of one epoch, which the next
    epoch opens first, is not fetched again, so fewer bytes than the shards' total cross the link."""
    out = []
    local = f"{LOCAL_COLD}_{cores}t" if f"{LOCAL_COLD}_{cores}t" in speed else f"bmclip_{cores}t"
    if local not in speed:
        return out
    lr = speed[local]
    a = f"remote_s3_{cores}t"
    if a in speed:
        r = speed[a]
        per_run = [x / y for x, y in zip(r["per_s"], lr["per_s"])]
        m = r["per_s_median"] / lr["per_s_median"]
        out.append({"target": f"{a} / {local} (link not the bottleneck)", "value": m,
                    "range": [min(per_run), max(per_run)], "goal": f">= {TARGET_REMOTE_VS_LOCAL}",
                    "at_least": TARGET_REMOTE_VS_LOCAL, "met": m >= TARGET_REMOTE_VS_LOCAL,
                    "note": _cpu_note(r, m, cores, "the S3 server's process")})
    a = f"remote_s3_throttled_{cores}t"
    if a in speed:
        r = speed[a]
        fetched = r.get("bytes_fetched")
        if fetched and all(fetched):
            per_sample = [f / n for f, n in zip(fetched, r["items"])]
        else:  # no per-run counts (a hand-made row): the shards' size per sample
            per_sample = [bytes_per_sample] * len(r["per_s"])
        link_rates = [link_bytes_per_s / b for b in per_sample]
        link_rate = statistics.median(link_rates)
        bound = "link-bound" if link_rate < lr["per_s_median"] else "decode-bound"
        expect = min(link_rate, lr["per_s_median"])
        per_run = [x / min(k, y) for x, k, y in zip(r["per_s"], link_rates, lr["per_s"])]
        m = r["per_s_median"] / expect
        lo, hi = 1 - TARGET_THROTTLED_TOLERANCE, 1 + TARGET_THROTTLED_TOLERANCE
        fetched_ps = statistics.median(per_sample)
        kept = 1 - fetched_ps / bytes_per_sample
        out.append({"target": f"{a} / expected rate", "value": m, "range": [min(per_run), max(per_run)],
                    "goal": f"{lo:g}-{hi:g}", "at_least": lo, "at_most": hi, "met": lo <= m <= hi,
                    "note": f"expected {expect:.0f} img/s, {bound}: link {link_bytes_per_s / 1e6:g} MB/s / "
                            f"{fetched_ps / 1e3:.1f} kB fetched per sample = {link_rate:.0f} img/s (shards "
                            f"{bytes_per_sample / 1e3:.1f} kB per sample; {kept:.0%} not fetched again: kept in "
                            f"the cache across epoch boundaries), local {lr['per_s_median']:.0f} img/s"
                            + ("; " + _cpu_note(r, m, cores, "the S3 server and the proxy") if bound ==
                               "decode-bound" and r.get("server_cpu_s") else "")})
    return out


def _cpu_note(r: dict, m: float, cores: int, who: str) -> str:
    """Where a remote row's CPU went (per second of its runs): ``who`` (the serving processes, which share this
    machine's cores with the loader only because the store is on loopback) and the loader's own process; and the
    ratio ``m`` with the serving processes' CPU time given back to the local rate it is compared with."""
    parts = []
    server = [c / w for c, w in zip(r.get("server_cpu_s") or [], r.get("wall_s") or []) if c is not None]
    if server:
        sc = statistics.median(server)
        parts.append(f"{who} used {sc:.2f} of the {cores} cores; with that CPU time given back "
                     f"(local x {cores - sc:.2f}/{cores}): {m * cores / (cores - sc):.2f}x")
    client = [c / w for c, w in zip(r.get("cpu_s") or [], r.get("wall_s") or [])]
    if client:
        parts.append(f"the loader's process used {statistics.median(client):.2f} cores")
    return "; ".join(parts)


def markdown(info: dict, sets: dict[str, dict]) -> str:
    """The results as markdown, ready for benchmarks/RESULTS.md."""
    lines = [
        f"Machine: {info['machine']}, {info['cores']} usable cores ({info['cpu_count']} online); "
        f"load average {info['loadavg_at_start']} at start, {info['loadavg_at_end']} at end; {info['date_utc']} UTC.",
        f"torch {info['torch']}, torchvision {info['torchvision']}, webdataset {info['webdataset']}, Pillow "
        f"{info['pillow']} (libjpeg-turbo {info['libjpeg_turbo']}), Python {info['python']}.",
        f"Output {info['size']}x{info['size']} uint8, batch {info['batch']}, crop scale {list(SCALE)} ratio "
        f"[3/4, 4/3], {info['interpolation']} + antialias; {info['repeats']} interleaved epochs per row after one "
        f"warm-up epoch; img/s = median (min–max). PSNR vs Pillow (full decode + crop + bicubic) on "
        f"{info['fidelity_windows']} fixed windows per image.",
        "",
    ]
    for name, s in sets.items():
        sp, fid = s["speed"], s["fidelity"]
        lines += [f"**{name}** — {s['description']}", "",
                  "| row | workers / threads | img/s median (range) | × anchor, same count | PSNR min / median dB |",
                  "|---|---:|---:|---:|---:|"]
        for row, r in sp.items():
            kind, _, count = row.rpartition("_")
            if row == "decode_1core":
                kind, count = "decode_1core", "1t"
            anchor = sp.get(f"anchor_{count[:-1]}w")
            rel = f"{r['per_s_median'] / anchor['per_s_median']:.2f}×" if anchor else "–"
            f = fid.get("bmclip" if kind == "decode_1core" else kind)  # decode_batch's defaults = bmclip's
            fs = f"{f['min_db']:.1f} / {f['median_db']:.1f}" if f else "–"
            lines.append(f"| {kind} | {count} | {r['per_s_median']:.1f} ({r['per_s_min']:.1f}–{r['per_s_max']:.1f})"
                         f" | {rel} | {fs} |")
        if s["targets"]:
            lines += ["", "| target | measured (per-run range) | goal | status | PSNR min / median dB, row vs anchor |",
                      "|---|---:|---:|---|---|"]
            for t in s["targets"]:
                lines.append(f"| {t['target']} | {t['value']:.2f}× ({t['range'][0]:.2f}–{t['range'][1]:.2f}) | "
                             f"{t['goal']} | {_status(t)} | {t['note']} |")
        lines.append("")
    return "\n".join(lines)


def _status(t: dict) -> str:
    if t["met"]:
        return "met"
    slow = t["value"] < t["at_least"] or t["value"] > t.get("at_most", math.inf)
    why = [w for w, bad in (("speed", slow), ("fidelity", t.get("equal_fidelity") is False)) if bad]
    return f"missed ({', '.join(why)})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder searched for *.jpg (real figures)")
    ap.add_argument("--n", type=int, default=1280, help="samples per shard set (the JPEGs cycled)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="timed epochs per row (interleaved)")
    ap.add_argument("--workers", default="",
                    help="comma list of worker/thread counts, 'all' = usable cores (default: 1,all)")
    ap.add_argument("--sets", default="builder,full", help="shard sets: builder (512 px), full (full size)")
    ap.add_argument("--only", default="", help="comma list of row-name prefixes, e.g. 'anchor,bmclip_' (default all)")
    ap.add_argument("--interpolation", choices=("bicubic", "bilinear"), default="bicubic",
                    help="the anchor's resampling (v2's default is bilinear; bmclip and open_clip use bicubic)")
    ap.add_argument("--fidelity-images", type=int, default=0, help="distinct images in the PSNR pass (0: all)")
    ap.add_argument("--fidelity-windows", type=int, default=4, help="crop windows per image in the PSNR pass")
    ap.add_argument("--quick", action="store_true",
                    help="a check that it runs: defaults --n 200 --repeats 2, 8 images x 2 windows for fidelity")
    ap.add_argument("--remote", action="store_true",
                    help="add the remote rows on the builder set: the same shards from a loopback S3 server (moto), "
                         "unthrottled and through a throttled link (needs moto[server] and s3fs)")
    ap.add_argument("--remote-mbps", type=float, default=100.0, help="the throttled link's bandwidth, MB/s [100]")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--md", type=Path, default=None, help="write the markdown table here")
    args = ap.parse_args(argv)
    if args.quick:  # new defaults; flags given explicitly still win
        ap.set_defaults(n=200, repeats=2, fidelity_images=8, fidelity_windows=2)
        args = ap.parse_args(argv)
    cores = usable_cores()
    workers = sorted({cores if w == "all" else int(w) for w in args.workers.split(",") if w} or {1, cores})
    if workers[0] < 1:
        ap.error("--workers must be >= 1")
    only = {s for s in args.only.split(",") if s}
    set_names = [s for s in args.sets.split(",") if s]
    if bad := set(set_names) - {"builder", "full"}:
        ap.error(f"unknown --sets {sorted(bad)}")
    if args.remote and "builder" not in set_names:
        ap.error("--remote times the builder set: include it in --sets")
    if args.remote_mbps <= 0:
        ap.error("--remote-mbps must be > 0")

    data = args.data
    jpegs = find_jpegs(data)
    if not jpegs and data == DEFAULT_DATA:
        print(f"no JPEGs under {data}: using the repo's fixtures {FIXTURE_DATA}", file=sys.stderr)
        data, jpegs = FIXTURE_DATA, find_jpegs(FIXTURE_DATA)
    if not jpegs:
        print(f"no *.jpg under {data}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the main process only collects batches; workers are single-threaded anyway
    try:
        return _run(args, data, jpegs, workers, cores, only, set_names)
    finally:
        torch.set_num_threads(threads)


def _run(args, data: Path, jpegs: list[Path], workers: list[int], cores: int, only: set[str],
         set_names: list[str]) -> int:
    C = _load_c()
    if C is None:
        print("bmclip._C not built: only the anchor and FFCV-style rows run", file=sys.stderr)
    info = machine_info(torchvision=torchvision.__version__, webdataset=getattr(wds, "__version__", "?"),
                        pillow=PIL.__version__, libjpeg_turbo=features.version("libjpeg_turbo") or "no")
    info.update(data=str(data), distinct_jpegs=len(jpegs), size=args.size, batch=args.batch, repeats=args.repeats,
                workers=workers, interpolation=args.interpolation, fidelity_windows=args.fidelity_windows)

    # both sets hold the figures build-dataset accepts (a refused one is counted, and absent from both)
    originals, builder, refused = [], [], {}
    for p in jpegs:
        data_p = p.read_bytes()
        try:
            builder.append(builder_jpeg(data_p))
        except ImageSkip as e:
            refused[str(p)] = e.reason
            continue
        originals.append(data_p)
    info["refused_by_builder"] = refused
    if refused:
        print(f"{len(refused)} figures refused by the builder, left out of both sets: {refused}", file=sys.stderr)
    if not originals:
        print(f"no figure under {data} passes the builder's checks", file=sys.stderr)
        return 2
    sets: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="loader_peers_") as tmp:
        for name in set_names:
            blobs = builder if name == "builder" else originals
            desc = (f"{len(blobs)} real figure JPEGs from {data.name}/ as `build-dataset` stores them (≤ "
                    f"{BUILDER_MAX_SIDE} px, q90)" if name == "builder"
                    else f"{len(blobs)} real figure JPEGs from {data.name}/ at full size")
            shards = write_shard_set(name, blobs, args.n, shard_count(workers), Path(tmp), desc)
            px = [Image.open(io.BytesIO(b)).size for b in blobs]
            shards.description += (f", mean {np.mean([len(b) for b in blobs]) / 1024:.0f} KB, "
                                   f"{np.mean([w * h for w, h in px]) / 1e6:.2f} MP; {shards.n} samples in "
                                   f"{len(shards.urls)} shards")
            print(f"{name}: {shards.description}", flush=True)
            with contextlib.ExitStack() as stack:
                remote, remote_info = None, None
                if args.remote and name == "builder" and C is not None:
                    remote, remote_info = _remote_sets(stack, shards, Path(tmp), args.remote_mbps * 1e6)
                speed = speed_rows(shards, args.size, args.batch, workers, args.repeats, C, args.interpolation, only,
                                   remote)
            fb = blobs[: args.fidelity_images] if args.fidelity_images else blobs
            fid = fidelity(fb, args.size, args.fidelity_windows, interpolation=args.interpolation, C=C)
            targets = targets_for(speed, fid, cores)
            sets[name] = {"description": shards.description, "samples": shards.n, "shards": len(shards.urls),
                          "speed": speed, "fidelity": fid, "targets": targets}
            if remote_info is not None:
                targets += remote_targets(speed, cores, remote_info["bytes_per_sample"],
                                          remote_info["link_bytes_per_s"])
                sets[name]["remote"] = remote_info
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    md = markdown(info, sets)
    print()
    print(md)
    if args.md:
        atomic_write_text(md + "\n", args.md)
    if args.out:
        write_json_atomic(args.out, {"info": info, "sets": sets})
    return 0


def _remote_sets(stack: contextlib.ExitStack, shards: ShardSet, tmp: Path, link_bytes_per_s: float
                 ) -> tuple[dict[str, ShardSet], dict]:
    """``shards`` uploaded to a loopback S3 server (closed with ``stack``), as the ShardSets of the remote rows: one
    straight to the server, one through a link throttled to ``link_bytes_per_s``; and what the targets need."""
    server: dict = {}
    proxy: dict = {}
    so = stack.enter_context(loopback_s3(server=server))
    urls = upload_s3(so, "bench-shards", shards.urls)
    host, port = so["endpoint_url"].rsplit("/", 1)[-1].split(":")
    throttled = stack.enter_context(throttled_link((host, int(port)), link_bytes_per_s, server=proxy))
    total = sum(os.path.getsize(u) for u in shards.urls)
    out = {}
    for row, endpoint, pids in zip(REMOTE_ROWS, (so["endpoint_url"], throttled),
                                   ((server["pid"],), (server["pid"], proxy["pid"]))):
        cache = tmp / f"cache-{row}"
        kwargs = {"cache_dir": str(cache), "storage_options": {**so, "endpoint_url": endpoint}}
        out[row] = ShardSet(row, urls, shards.blobs, shards.n, kwargs, f"{shards.name} shards over S3 ({row})",
                            server_pids=pids)
    info = {"bytes_per_sample": total / shards.n, "link_bytes_per_s": link_bytes_per_s, "shard_bytes": total,
            "urls": urls[:2] + (["..."] if len(urls) > 2 else [])}
    print(f"  remote: {len(urls)} shards ({total / 1e6:.1f} MB) on a loopback S3 server; throttled link "
          f"{link_bytes_per_s / 1e6:g} MB/s", flush=True)
    return out, info


if __name__ == "__main__":
    sys.exit(main())
