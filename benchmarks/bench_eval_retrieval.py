"""Blockwise retrieval metrics (bmclip.eval.retrieval) vs the dense N x N computation, same process.

Dense baseline: one (N, N) float32 similarity matrix in torch, ranks counted with the same pessimistic tie
rule (what a naive evaluation does; its memory grows as N^2). Blockwise: ``retrieval_ranks`` with tiles
of ``block x block``. Both must give identical ranks; the script checks that and reports wall time and the
size of the largest score buffer each method holds (analytic: N^2 vs block^2 float32 + two bool masks).

    python benchmarks/bench_eval_retrieval.py --n 4096 16384 --dim 512 --block 2048 --device cpu
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def dense_ranks(img: torch.Tensor, txt: torch.Tensor, tol: float):
    a = torch.nn.functional.normalize(img.float(), dim=1)
    b = torch.nn.functional.normalize(txt.float(), dim=1)
    s = a @ b.T
    d = (a.double() * b.double()).sum(1).float() - tol
    ge_r = s >= d[:, None]
    ge_c = s >= d[None, :]
    ge_r.fill_diagonal_(False)
    ge_c.fill_diagonal_(False)
    return ge_r.sum(1).cpu().numpy(), ge_c.sum(0).cpu().numpy()


def main() -> None:
    from bmclip.eval.retrieval import retrieval_ranks

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--block", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, D={args.dim}, "
          f"block={args.block}")
    print("| N | dense s (best) | blockwise s (best) | dense score buffer MiB | blockwise tile MiB | ranks equal |")
    print("|---:|---:|---:|---:|---:|---|")
    for n in args.n:
        g = torch.Generator().manual_seed(n)
        img = torch.randn(n, args.dim, generator=g).half()
        txt = (img.float() + 0.7 * torch.randn(n, args.dim, generator=g)).half()
        img, txt = img.to(args.device), txt.to(args.device)
        td, tb = [], []
        for _ in range(args.repeat):  # interleaved so that load changes hit both methods alike
            t = time.perf_counter()
            ref = dense_ranks(img, txt, 1e-5)
            td.append(time.perf_counter() - t)
            t = time.perf_counter()
            got = retrieval_ranks(img, txt, block=args.block, device=args.device)
            tb.append(time.perf_counter() - t)
        equal = bool(np.array_equal(ref[0], got[0]) and np.array_equal(ref[1], got[1]))
        dense_mib = n * n * (4 + 2) / 2**20  # float32 scores + two bool masks
        blk = min(n, args.block)
        tile_mib = blk * blk * (4 + 2) / 2**20
        print(f"| {n} | {min(td):.2f} | {min(tb):.2f} | {dense_mib:.0f} | {tile_mib:.0f} | {equal} |")


if __name__ == "__main__":
    main()
