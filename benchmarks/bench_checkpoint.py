"""What the checkpoint CRC32s cost: saving and loading a BiomedCLIP training checkpoint, three ways each.

``meta.json`` records each checkpoint file's CRC32, and loading checks them (a damaged ``model.pt`` otherwise loads
without a word). This measures what that costs, in one process, interleaved, on the full ``biomedclip-vit-b16-224``
model with AdamW moments (fp32; ~0.8 GB model.pt + ~1.6 GB train_state.pt):

- save: **no CRC** (before the CRCs), **read back** (the first CRC version: ``commit`` read every file back with
  ``file_crc32``), **while writing** (now: ``bmclip.io.Crc32`` over the bytes on their way to the file);
- load: **no CRC**, **CRC, then load** (the first version: ``verify_files`` before the load), **CRC beside load**
  (now: ``verifying`` runs the check in a thread while torch.load reads the same files).

The older variants are the current code with one function patched back (see ``_variant``), so all run on the same
files. Loads are timed **warm** (just written, in the page cache: a resume right after a crash) and **cold** (each
file's pages dropped first with ``posix_fadvise(DONTNEED)``, as on a fresh node). Also the bare zlib.crc32 rate.

Usage: python benchmarks/bench_checkpoint.py [--repeats 3] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine_info, write_json_atomic  # noqa: E402


def _drop_cache(root: Path) -> None:
    """Evict the page-cache pages of every file under ``root`` (they are clean: the writer fsynced them)."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class _NoCrc:
    value = 0

    def update(self, data) -> None:
        pass


SAVES = ("no CRC", "read back", "while writing")
LOADS = ("no CRC", "CRC, then load", "CRC beside load")


@contextlib.contextmanager
def _variant(save: str, load: str):
    """The checkpoint code with its save and load CRC steps as they were in ``save`` / ``load`` (SAVES, LOADS)."""
    from bmclip.io.checkpoint_dir import verify_files
    from bmclip.train import checkpoint as ck

    saved = ck.CheckpointWriter._crc_for, ck.file_crc32, ck.verifying
    if save == "no CRC":
        ck.CheckpointWriter._crc_for = lambda self, name: self._crc.setdefault(name, _NoCrc())
        ck.file_crc32 = lambda path, chunk=0: 0
    elif save == "read back":  # nothing recorded while writing: commit reads every file back
        ck.CheckpointWriter._crc_for = lambda self, name: _NoCrc()
    if load == "no CRC":
        ck.verifying = lambda *a, **k: contextlib.nullcontext()
    elif load == "CRC, then load":
        @contextlib.contextmanager
        def serial(ckpt, names=None, meta=None):
            verify_files(ckpt, names, meta)
            yield
        ck.verifying = serial
    try:
        yield
    finally:
        ck.CheckpointWriter._crc_for, ck.file_crc32, ck.verifying = saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default="biomedclip-vit-b16-224")
    ap.add_argument("--out", default=None, help="directory for the checkpoints (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    import torch

    from bmclip.model.clip import create_model
    from bmclip.train.checkpoint import CheckpointWriter, load_checkpoint

    torch.manual_seed(0)
    model = create_model(args.preset)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # fill the AdamW moments as a real step would
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    model_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_state = {"optimizer": opt.state_dict(), "step": 1, "counters": {}}
    cfg = model.config.to_dict()

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    root.mkdir(parents=True, exist_ok=True)

    def save(step: int) -> tuple[Path, float]:
        t0 = time.perf_counter()
        w = CheckpointWriter(root, step)
        w.begin()
        w.write_rank({"rng": {"x": torch.zeros(4)}, "loader": {}})
        w.write_main(model_sd, cfg, train_state)
        final = w.commit()
        return final, time.perf_counter() - t0

    def load(path: Path, cold: bool) -> float:
        if cold:
            _drop_cache(path)
        t0 = time.perf_counter()
        out = load_checkpoint(path)
        dt = time.perf_counter() - t0
        assert out["model"].keys() == model_sd.keys()
        return dt

    rows: dict[str, list[float]] = {}
    for s_, l_ in zip(SAVES, LOADS):
        rows[f"save, {s_}"] = []
        rows[f"load warm, {l_}"] = []
        rows[f"load cold, {l_}"] = []
    nbytes = 0
    try:
        for r in range(args.repeats):
            for i, (s_, l_) in enumerate(zip(SAVES, LOADS)):
                with _variant(s_, l_):
                    path, dt = save(len(SAVES) * r + i)
                    rows[f"save, {s_}"].append(dt)
                    nbytes = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
                    rows[f"load warm, {l_}"].append(load(path, cold=False))
                    rows[f"load cold, {l_}"].append(load(path, cold=True))
                    shutil.rmtree(path)
            print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        buf = os.urandom(256 << 20)
        t0 = time.perf_counter()
        zlib.crc32(buf)
        crc_gbps = len(buf) / (time.perf_counter() - t0) / 1e9
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)

    info = machine_info()
    print(f"# bench_checkpoint: {args.preset} + AdamW, {nbytes / 1e9:.2f} GB per checkpoint, "
          f"{args.repeats} interleaved repeats; {info['machine']}, {info['cores']} cores, "
          f"torch {info['torch']}, {info['date_utc']} UTC; disk: {root}")
    print(f"zlib.crc32 on in-memory bytes: {crc_gbps:.2f} GB/s")
    print(f"{'case':32s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'GB/s':>6s}")
    med = {}
    for name, ts in rows.items():
        med[name] = statistics.median(ts)
        print(f"{name:32s} {med[name]:9.2f} {min(ts):7.2f} {max(ts):7.2f} {nbytes / med[name] / 1e9:6.2f}")
    for what, names in (("save", SAVES), ("load warm", LOADS), ("load cold", LOADS)):
        base = med[f"{what}, {names[0]}"]
        for n in names[1:]:
            a = med[f"{what}, {n}"]
            print(f"{what}, {n}: {a - base:+.2f} s over no CRC ({(a / base - 1) * 100:+.0f} %)")
    if args.json:
        write_json_atomic(Path(args.json), {"info": info, "preset": args.preset, "bytes": nbytes,
                                            "crc32_gbps": crc_gbps, "runs_s": rows, "median_s": med})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
