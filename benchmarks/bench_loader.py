"""Loader throughput on real PMC figure JPEGs: open_clip-style pipeline vs PIL tricks vs DALI CPU vs ours.

One run, one process, same images for every method (a tar shard built from the real figure JPEGs in
``shared/data/pmc_samples``: elife-32671, PMC10802347, images_only/**, repeated to ``--n`` samples):

1. ``openclip``: webdataset-style streaming tar read + ``PIL.Image.open().convert("RGB")`` +
   open_clip 3.3.0's own train transform (RandomResizedCrop(224, scale=(0.9, 1), BICUBIC) + ToTensor +
   Normalize) + collate (torch.stack), on one core (torch threads = 1): what one DataLoader worker does.
2. ``pil_draft``: the same with ``Image.draft("RGB", (S, S))`` (libjpeg DCT-domain downscale) first.
3. ``pil_decode`` / ``ours_decode``: bare full-size decode only (PIL, and ``bmclip._C.Decoder.decode_image``).
4. ``dali_cpu_{1,2}t``: the trainer's DALI path (``data.augment_backend=dali``): ``ShardLoader(decode=False)``
   raw bytes + tokenizer -> ``bmclip.data.sources.DaliShardSource`` (host-drawn crop windows, prefetch 1)
   -> DALI CPU pipeline (decode + random resized crop + normalise), 1 and 2 DALI threads.
5. ``ours_{1,2}t``: ``ShardLoader`` (C++ decode + fused random resized crop into uint8 NHWC), 1 and 2
   decoder threads; ``ours_batch_{1,2}t`` is ``Decoder.decode_batch`` alone (no Python loader around it);
   ``ours_fast_{1,2}t`` the loader with ``decode_options={"dct_min_ratio": 1.0}`` (decode at the smallest
   DCT scale still >= the output size; the default keeps >= 2x for PIL-exact pixels).
6. ``ours_train_{1,2}t``: the trainer's default path as ``bmclip train`` builds it for one rank: the
   ``ShardLoader`` with its training options (``drop_last``, the bundled tokenizer, ``data.shuffle_buffer``)
   -> ``bmclip.data.sources.ShardSource`` -> ``bmclip.data.normalize.normalize_images`` (float32 NCHW),
   here on the CPU. With ``--gpu``, ``ours_gpu_norm_<cores>t`` is the same on CUDA (pinned ring, uint8
   host-to-device copy, normalisation on the GPU) and ``dali_gpu_<cores>t`` the DALI path with nvJPEG.

Each method runs ``--repeats`` times over all samples, the methods interleaved round-robin so that
each sees the same background load; the best (least disturbed) run is reported, as wall-clock img/s
and as img per CPU-second of the whole process (all threads), which is the steadier number on a shared
machine for the single-threaded methods. Targets: ours 1 thread >= 4x openclip; ours 2 threads >= 1.7x
ours 1 thread; ours 1 thread within 1.25x of the bare decode time (PIL's as the reference; ours also
shown).

    python benchmarks/bench_loader.py --out /tmp/bench_loader.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import functools
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bmclip._ext import load_ext
from bmclip.data.dali import DaliAugment, dali_available
from bmclip.data.loader import ShardLoader
from bmclip.data.normalize import normalize_images
from bmclip.data.sources import DaliShardSource, ShardSource
from bmclip.io import atomic_write_text
from bmclip.model.config import ModelConfig
from bmclip.tokenizer import get_tokenizer
from bmclip.train.config import DataSection

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = Path(os.environ.get("BMCLIP_SHARED", REPO.parent / "shared")) / "data" / "pmc_samples"
# CC BY figures kept in the repo (elife-32671, 1500 px): used where the shared samples are absent, e.g. on a
# GPU box that receives only the checkout
FIXTURE_DATA = REPO / "tests" / "fixtures"


def find_jpegs(root: Path) -> list[Path]:
    files = sorted(root.glob("elife-32671/*.jpg")) + sorted(root.glob("PMC10802347/*.jpg"))
    files += sorted(root.glob("images_only/**/*.jpg"))
    # the repo's fixtures (FIXTURE_DATA): two full-size eLife figures + five small ones, mean ~0.6 MP
    files += sorted(root.glob("images/*.jpg")) + sorted(root.glob("pmc/elife-32671/*.jpg"))
    return files


def build_shard(jpegs: list[Path], n: int, path: Path) -> list[bytes]:
    """A webdataset shard of n samples cycling over the JPEGs (KEY.jpg + KEY.txt); returns the bytes."""
    blobs = [p.read_bytes() for p in jpegs]
    out = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(n):
            data = blobs[i % len(blobs)]
            out.append(data)
            for ext, payload in (("jpg", data), ("txt", f"figure {i} from {jpegs[i % len(jpegs)].name}".encode())):
                ti = tarfile.TarInfo(f"sample{i:06d}.{ext}")
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    return out


def wds_samples(path: Path):
    """webdataset's tar_file_expander + group_by_keys, reduced to what matters for the timing."""
    cur_key, cur = None, {}
    with tarfile.open(path, "r|") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            data = tf.extractfile(m).read()
            if key != cur_key and cur:
                yield cur
                cur = {}
            cur_key = key
            cur[ext] = data
    if cur:
        yield cur


def run_pil_pipeline(path: Path, size: int, batch: int, draft: bool) -> int:
    tfm = _openclip_transform(size)
    n = 0
    imgs = []
    for s in wds_samples(path):
        im = Image.open(io.BytesIO(s["jpg"]))
        if draft:
            im.draft("RGB", (size, size))
        imgs.append(tfm(im.convert("RGB")))
        _ = s["txt"].decode("utf-8")
        if len(imgs) == batch:
            torch.stack(imgs)
            n += len(imgs)
            imgs = []
    if imgs:
        torch.stack(imgs)
        n += len(imgs)
    return n


_TFM = {}


def _openclip_transform(size: int):
    if size not in _TFM:
        import open_clip  # ~10 s to import (timm, hf): only when an open_clip baseline runs

        _TFM[size] = open_clip.image_transform(size, is_train=True)  # RRC(0.9, 1) bicubic, ToTensor, Normalize
    return _TFM[size]


def run_pil_decode(blobs: list[bytes]) -> int:
    for b in blobs:
        Image.open(io.BytesIO(b)).convert("RGB")
    return len(blobs)


def run_ours_decode(blobs: list[bytes], dec) -> int:
    arrs = [np.frombuffer(b, dtype=np.uint8) for b in blobs]
    for a in arrs:
        dec.decode_image(a)
    return len(blobs)


def run_ours_loader(path: Path, size: int, batch: int, threads: int, **decode_options) -> int:
    ld = ShardLoader([str(path)], batch_size=batch, image_size=size, num_threads=threads, seed=0,
                     shuffle_buffer=64, decode_options=decode_options)
    n = 0
    for b in ld:
        n += b["image"].shape[0]
    if ld.stats["skipped_total"]:
        raise RuntimeError(f"ours skipped samples: {ld.skipped}")
    return n


def run_ours_batch(blobs: list[bytes], size: int, batch: int, dec) -> int:
    arrs = [np.frombuffer(b, dtype=np.uint8) for b in blobs]
    out = np.empty((batch, size, size, 3), dtype=np.uint8)
    for i in range(0, len(arrs), batch):
        chunk = arrs[i : i + batch]
        reasons = dec.decode_batch(chunk, out[: len(chunk)], augment="random_resized_crop", seed=i)
        if any(r is not None for r in reasons):
            raise RuntimeError(f"decode failures: {reasons}")
    return len(arrs)


@functools.lru_cache(maxsize=1)
def trainer_tokenizer():
    """The tokenizer ``bmclip train`` uses by default (bundled vocabulary, the model's context length);
    built on first use, so the methods that need none run without it."""
    return get_tokenizer(context_length=ModelConfig().text.context_length)


def trainer_loader(path: Path, size: int, batch: int, threads: int, **kw) -> ShardLoader:
    """The ShardLoader ``bmclip train`` builds for one rank (bmclip.train.trainer._build_source)."""
    return ShardLoader([str(path)], batch_size=batch, image_size=size, num_threads=threads,
                       augment="random_resized_crop", shuffle=True, seed=0, rank=0, world_size=1, resampled=False,
                       shuffle_buffer=DataSection().shuffle_buffer, drop_last=True, tokenizer=trainer_tokenizer(), **kw)


def run_trainer_source(path: Path, size: int, batch: int, threads: int, device: torch.device) -> int:
    """One epoch of the trainer's default data path: ShardSource over the training ShardLoader, and each
    batch as the training step takes it (normalize_images to float32 NCHW and the token ids, on ``device``)."""
    ld = trainer_loader(path, size, batch, threads, pin_memory=device.type == "cuda")
    src = ShardSource(ld)
    n = 0
    try:
        for _ in range(len(ld)):
            b = next(src)
            images = normalize_images(b["image"], device)
            b["input_ids"].to(device, non_blocking=True)
            n += images.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        src.close()
    return n


def run_dali(path: Path, size: int, batch: int, threads: int, aug_cache: dict, device_id: int | None = None) -> int:
    """One epoch of the trainer's DALI path: DaliShardSource (host-drawn crops, prefetch 1) over the
    training ShardLoader(decode=False), DALI decode + crop + normalise (nvJPEG with ``device_id``)."""
    def make_augment():
        return DaliAugment(batch_size=batch, image_size=size, source="encoded", augment="random_resized_crop",
                           device_id=device_id, num_threads=threads, seed=0, host_params=True)

    key = (threads, device_id)
    if key not in aug_cache:  # pipeline construction is a one-off, not per-epoch cost
        aug_cache[key] = make_augment()
    ld = trainer_loader(path, size, batch, threads, decode=False)
    src = DaliShardSource(ld, make_augment, seed=0, rank=0, augment="random_resized_crop", scale=ld.scale,
                          ratio=ld.ratio, prefetch=1, aug=aug_cache[key])
    n = 0
    try:
        for _ in range(len(ld)):
            n += next(src)["images"].shape[0]
        if device_id is not None:
            torch.cuda.synchronize()
    finally:
        src.close()
    aug_cache[key] = src.aug  # rebuilt after a failed batch: keep the live one
    return n


def timed_round_robin(methods: dict, repeats: int) -> dict[str, dict]:
    """Run every method ``repeats`` times, interleaved (so each sees the same background load).

    Wall time (best run) and process CPU time (all threads; best run) per method. On a shared machine
    the CPU time of a single-threaded method is the steadier number; wall time is what a consumer sees.
    """
    runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            c0, t0 = time.process_time(), time.perf_counter()
            n = fn()
            runs[name].append((time.perf_counter() - t0, time.process_time() - c0, n))
    out = {}
    for name, rs in runs.items():
        n = rs[0][2]
        wall = min(r[0] for r in rs)
        cpu = min(r[1] for r in rs)
        out[name] = {"images": n, "wall_s_best": wall, "cpu_s_best": cpu, "wall_s_all": [r[0] for r in rs],
                     "cpu_s_all": [r[1] for r in rs], "images_per_s": n / wall, "images_per_cpu_s": n / cpu}
    return out


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="pmc_samples folder")
    ap.add_argument("--n", type=int, default=320, help="samples in the shard (JPEGs repeated)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="",
                    help="comma list of method names or fnmatch patterns, e.g. 'ours_1t,dali_gpu_*' (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    ap.add_argument("--gpu", action="store_true",
                    help="also time the trainer's GPU paths (DALI mixed decode; C++ loader + normalize_images), "
                         "all cores; "
                         "use --batch 256 on a GPU node")
    ap.add_argument("--peers", nargs=argparse.REMAINDER, default=None, metavar="ARGS",
                    help="run benchmarks/loader_peers.py with ARGS instead (ShardLoader vs webdataset + torchvision.io "
                         "+ v2 + DataLoader workers, with PSNR; its --help lists ARGS)")
    args = ap.parse_args(argv)
    if args.peers is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # loader_peers.py lives beside this script
        import loader_peers  # needs webdataset and torchvision, which the other rows do not

        return loader_peers.main(args.peers)

    jpegs = find_jpegs(args.data)
    if not jpegs and args.data == DEFAULT_DATA:
        print(f"no JPEGs under {args.data}: using the repo's fixtures {FIXTURE_DATA}", file=sys.stderr)
        args.data = FIXTURE_DATA
        jpegs = find_jpegs(args.data)
    if not jpegs:
        print(f"no JPEGs under {args.data}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # the baselines model one DataLoader worker process = one core
    only = {s for s in args.only.split(",") if s}

    tmp = tempfile.TemporaryDirectory(prefix="bench_loader_")
    shard = Path(tmp.name) / "pmc-000000.tar"
    blobs = build_shard(jpegs, args.n, shard)
    sizes = [Image.open(io.BytesIO(b)).size for b in blobs[: len(jpegs)]]
    info = {
        "machine": cpu_model(),
        "cores": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "data": str(args.data),
        "images": args.n,
        "distinct_jpegs": len(jpegs),
        "mean_jpeg_kb": round(sum(len(b) for b in blobs) / len(blobs) / 1024, 1),
        "mean_pixels_mp": round(float(np.mean([w * h for w, h in sizes])) / 1e6, 2),
        "size": args.size,
        "batch": args.batch,
    }
    try:
        C = load_ext()
        have_ours = hasattr(C, "Decoder")
    except ImportError:
        C, have_ours = None, False
    have_dali = dali_available()

    S, B, R = args.size, args.batch, args.repeats
    cpu = torch.device("cpu")
    methods = {
        "openclip": lambda: run_pil_pipeline(shard, S, B, draft=False),
        "pil_draft": lambda: run_pil_pipeline(shard, S, B, draft=True),
        "pil_decode": lambda: run_pil_decode(blobs),
    }
    if have_ours:
        dec1, dec2 = C.Decoder(1), C.Decoder(2)
        methods.update({
            "ours_decode": lambda: run_ours_decode(blobs, dec1),
            "ours_batch_1t": lambda: run_ours_batch(blobs, S, B, dec1),
            "ours_batch_2t": lambda: run_ours_batch(blobs, S, B, dec2),
            "ours_1t": lambda: run_ours_loader(shard, S, B, 1),
            "ours_2t": lambda: run_ours_loader(shard, S, B, 2),
            # DCT-domain downscale whenever the scaled image still covers the output (the rule);
            # the default (dct_min_ratio=2) keeps >= 2x the output size for PIL-exact fidelity
            "ours_fast_1t": lambda: run_ours_loader(shard, S, B, 1, dct_min_ratio=1.0),
            "ours_fast_2t": lambda: run_ours_loader(shard, S, B, 2, dct_min_ratio=1.0),
            "ours_train_1t": lambda: run_trainer_source(shard, S, B, 1, cpu),
            "ours_train_2t": lambda: run_trainer_source(shard, S, B, 2, cpu),
        })
    cache: dict = {}
    if have_dali:
        methods.update({
            "dali_cpu_1t": lambda: run_dali(shard, S, B, 1, cache),
            "dali_cpu_2t": lambda: run_dali(shard, S, B, 2, cache),
        })
    if args.gpu:
        if not torch.cuda.is_available():
            print("--gpu needs CUDA", file=sys.stderr)
            return 2
        threads = len(os.sched_getaffinity(0))
        gpu = torch.device("cuda", 0)
        methods[f"ours_gpu_norm_{threads}t"] = lambda: run_trainer_source(shard, S, B, threads, gpu)
        if have_dali:
            methods[f"dali_gpu_{threads}t"] = lambda: run_dali(shard, S, B, threads, cache, device_id=0)
    if not only or only & {"openclip", "pil_draft"}:
        _openclip_transform(S)  # import open_clip outside the timings

    methods = {k: v for k, v in methods.items() if not only or any(fnmatch.fnmatchcase(k, o) for o in only)}
    for name, fn in methods.items():
        fn()  # warm-up: page cache, lazy imports, thread pools, DALI pipeline build
        print(f"  warmed up {name}", flush=True)
    results = timed_round_robin(methods, R)

    base = results.get("openclip", {}).get("images_per_s")
    base_cpu = results.get("openclip", {}).get("images_per_cpu_s")
    print()
    print(f"machine: {info['machine']} ({info['cores']} cores), {info['date_utc']} UTC, "
          f"load {info['loadavg_at_start']}")
    print(f"{args.n} samples from {len(jpegs)} real PMC figure JPEGs, mean {info['mean_jpeg_kb']} KB, "
          f"{info['mean_pixels_mp']} MP; output {S}x{S}, batch {B}; best of {R} interleaved runs")
    print(f"{'method':16s} {'img/s':>9s} {'x openclip':>11s} {'img/cpu-s':>10s} {'x openclip':>11s}")
    for name, r in results.items():
        rel = f"{r['images_per_s'] / base:10.2f}x" if base else "-"
        rel_c = f"{r['images_per_cpu_s'] / base_cpu:10.2f}x" if base_cpu else "-"
        print(f"{name:16s} {r['images_per_s']:9.1f} {rel:>11s} {r['images_per_cpu_s']:10.1f} {rel_c:>11s}")

    targets = {}
    for ours in ("ours", "ours_fast"):
        if f"{ours}_1t" not in results:
            continue
        o1 = results[f"{ours}_1t"]
        if base:
            for kind, key, b in (("wall", "images_per_s", base), ("cpu", "images_per_cpu_s", base_cpu)):
                targets[f"{ours}_1t_vs_openclip ({kind})"] = {"value": o1[key] / b, "target": ">= 4.0"}
        if f"{ours}_2t" in results:
            targets[f"{ours}_2t_vs_{ours}_1t (wall)"] = {
                "value": results[f"{ours}_2t"]["images_per_s"] / o1["images_per_s"], "target": ">= 1.7"}
        for ref in ("pil_decode", "ours_decode"):
            if ref in results:
                for kind, key in (("wall", "images_per_s"), ("cpu", "images_per_cpu_s")):
                    targets[f"{ours}_1t_time_vs_{ref}_time ({kind})"] = {
                        "value": results[ref][key] / o1[key], "target": "<= 1.25"}
    if targets:
        print("\ntargets:")
        for k, v in targets.items():
            print(f"  {k:44s} {v['value']:6.2f}   (target {v['target']})")
    if not have_ours:
        print("\nbmclip._C.Decoder not available: 'ours' rows not measured")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps({"info": info, "results": results, "targets": targets}, indent=2), args.out)
        print(f"\nwrote {args.out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
