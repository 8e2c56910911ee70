"""Decoder-level benchmark for bmclip._C: fidelity (PSNR vs Pillow/torchvision) and speed of the fused
JPEG decode + crop + resize, per DCT-scaling setting, on real PMC figure JPEGs.

    python benchmarks/bench_decode.py [--data DIR] [--size 224] [--repeats 5] [--out results.json]

Fidelity: for every JPEG and both transforms (RandomResizedCrop as torchvision's ``resized_crop``,
centre = ``Resize`` + ``CenterCrop``), the reference is Pillow's full decode + bicubic resize of the
crop ``bmclip._C.crop_box`` reports; PSNR per image, min/median over all.
Speed: single-threaded img/s (wall) and img per CPU-second, methods interleaved (best of N), with
Pillow's bare decode and Pillow decode + crop + bicubic resize in the same process as baselines.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import pillow_crop_resize, psnr, write_json_atomic  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = Path(os.environ.get("BMCLIP_SHARED", REPO.parent / "shared")) / "data" / "pmc_samples"


def reference(im: Image.Image, C, size: int, seed: int, i: int, augment: str) -> np.ndarray:
    """Pillow (= torchvision on PIL images) output for the crop decode_batch picks for sample i."""
    window, resized, off = C.crop_box(im.width, im.height, size, seed, i, augment)
    if augment == "random_resized_crop":
        return pillow_crop_resize(im, window, resized)
    r = np.asarray(im.resize(resized, Image.BICUBIC))
    return r[off[1] : off[1] + size, off[0] : off[0] + size]


SETTINGS = {
    "exact (no DCT scaling)": {"dct_scaling": False},
    "dct_min_ratio=2 (default)": {},
    "dct_min_ratio=1.5": {"dct_min_ratio": 1.5},
    "dct_min_ratio=1": {"dct_min_ratio": 1.0},
}


def fidelity(C, blobs: list[bytes], size: int) -> dict:
    dec = C.Decoder(1)
    res = {}
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    for name, kw in SETTINGS.items():
        vals = []
        for augment in ("random_resized_crop", "center"):
            out = np.zeros((len(blobs), size, size, 3), np.uint8)
            reasons = dec.decode_batch(blobs, out, augment=augment, seed=3, **kw)
            assert all(r is None for r in reasons), reasons
            vals += [psnr(out[i], reference(pil[i], C, size, 3, i, augment)) for i in range(len(blobs))]
        finite = [v for v in vals if np.isfinite(v)]
        res[name] = {
            "min_db": min(vals),
            "median_db": float(np.median(vals)),
            "exact_fraction": 1 - len(finite) / len(vals),
        }
    return res


def speed(C, blobs: list[bytes], size: int, repeats: int) -> dict:
    dec = C.Decoder(1)
    out = np.zeros((len(blobs), size, size, 3), np.uint8)

    def pil_decode():
        for b in blobs:
            Image.open(io.BytesIO(b)).load()

    def pil_rrc():
        for i, b in enumerate(blobs):
            im = Image.open(io.BytesIO(b)).convert("RGB")
            window, resized, _ = C.crop_box(im.width, im.height, size, 0, i)
            im.crop(window).resize(resized, Image.BICUBIC)

    methods = {
        "Pillow bare decode": pil_decode,
        "Pillow decode + RRC bicubic": pil_rrc,
        "_C decode_image (bare decode)": lambda: [dec.decode_image(b) for b in blobs],
    }
    for name, kw in SETTINGS.items():
        methods[f"_C decode_batch RRC, {name}"] = lambda kw=kw: dec.decode_batch(blobs, out, seed=0, **kw)
    for fn in methods.values():
        fn()  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            runs[name].append((time.perf_counter() - t0, time.process_time() - c0))
    n = len(blobs)
    return {
        k: {"images_per_s": n / min(r[0] for r in v), "images_per_cpu_s": n / min(r[1] for r in v)}
        for k, v in runs.items()
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder searched for *.jpg")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    from bmclip._ext import load_ext

    C = load_ext()
    files = sorted(args.data.rglob("*.jpg"))
    if not files:
        print(f"no *.jpg under {args.data}", file=sys.stderr)
        return 2
    blobs = [f.read_bytes() for f in files]
    px = np.mean([np.prod(C.image_info(b)[:2]) for b in blobs]) / 1e6
    fid = fidelity(C, blobs, args.size)
    spd = speed(C, blobs, args.size, args.repeats)
    print(
        f"{len(blobs)} JPEGs from {args.data}, mean {np.mean([len(b) for b in blobs]) / 1e3:.0f} KB, "
        f"{px:.2f} MP; output {args.size}; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"\n{'setting':32s} {'min PSNR':>9s} {'median':>8s} {'bit-exact':>9s}")
    for k, v in fid.items():
        print(f"{k:32s} {v['min_db']:9.2f} {v['median_db']:8.2f} {v['exact_fraction']:9.0%}")
    base = spd["Pillow bare decode"]
    print(f"\n{'method (1 thread)':52s} {'img/s':>7s} {'img/cpu-s':>10s} {'x PIL decode (cpu)':>19s}")
    for k, v in spd.items():
        ratio = v["images_per_cpu_s"] / base["images_per_cpu_s"]
        print(f"{k:52s} {v['images_per_s']:7.1f} {v['images_per_cpu_s']:10.1f} {ratio:19.2f}")
    if args.out:
        write_json_atomic(args.out, {"fidelity": fid, "speed": spd, "n": len(blobs), "size": args.size})
    return 0


if __name__ == "__main__":
    sys.exit(main())
