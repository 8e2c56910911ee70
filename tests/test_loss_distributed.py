"""2-process gloo runs: bmclip's ClipLoss/SigLipLoss give the global loss and DDP-exact gradients.

Two ranks each hold half of a batch produced by shared linear "towers" (the parameters DDP would
average). The float64 single-process reference computes the loss of the concatenated batch; after
DDP's averaging the ranks' parameter gradients must equal the reference ones, each rank's loss must
be open_clip's value for that rank, and the feature gradients must equal open_clip's
``gather_with_grad=True`` ones (world_size × the global-loss gradient, the DDP convention).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from bmclip.kernels import contrastive as C
from bmclip.kernels._triton_utils import HAS_TRITON, is_interpreted

LOCAL_B = 6
DIN = 24
D = 40
W_RANK = (1.0, 3.0, 0.5)  # per-rank upstream weights of the "weighted" case

TRITON_OK = HAS_TRITON and (is_interpreted(C._triton_probe_kernel) or torch.cuda.is_available())

_WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    import bmclip.kernels.contrastive_dist as L
    from bmclip.kernels import ClipLoss, SigLipLoss

    hops = [0]  # P2P ring steps started: the ring and gather paths give the same numbers, so count which ran
    _ring_start = L._ring_start
    L._ring_start = lambda *a, **k: hops.__setitem__(0, hops[0] + 1) or _ring_start(*a, **k)

    rank, world, init_file, data_file, out_file, triton_ok = sys.argv[1:7]  # triton_ok: "1" adds Triton
    rank, world, triton_ok = int(rank), int(world), triton_ok == "1"
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
    data = torch.load(data_file)
    b = data["X_img"].shape[0] // world
    rows = slice(rank * b, (rank + 1) * b)
    w_rank = data["w_rank"]

    def run(make_module, with_bias, weight=1.0, reduce="mean"):
        Wi = data["W_img"].clone().requires_grad_()
        Wt = data["W_txt"].clone().requires_grad_()
        s = data["scale"].clone().requires_grad_()
        bias = data["bias"].clone().requires_grad_() if with_bias else None
        img = data["X_img"][rows] @ Wi
        txt = data["X_txt"][rows] @ Wt
        img.retain_grad()
        txt.retain_grad()
        hops0 = hops[0]
        loss = make_module()(img, txt, s, bias)
        (weight * loss).backward()
        params = {"W_img": Wi, "W_txt": Wt, "scale": s}
        if with_bias:
            params["bias"] = bias
        out = {"loss": loss.item(), "g_img": img.grad.clone(), "g_txt": txt.grad.clone(), "ring_hops": hops[0] - hops0}
        for name, p in params.items():  # what DDP does to replicated parameters: all-reduce (mean)
            g = p.grad.clone()
            dist.all_reduce(g)
            out[name] = g / world if reduce == "mean" else g
        return out

    res = {}
    backends = ["torch"] + (["triton"] if triton_ok else [])
    for be in backends:
        for ring in (False, True):
            v = f"{be}{'_ring' if ring else ''}"
            kw = dict(rank=rank, world_size=world, backend=be, ring=ring)
            res[f"clip_local_{v}"] = run(lambda: ClipLoss(local_loss=True, gather_with_grad=True, **kw),
                                         with_bias=be == "triton")
            res[f"clip_global_{v}"] = run(lambda: ClipLoss(local_loss=False, gather_with_grad=False, **kw),
                                          with_bias=True)
            res[f"clip_weighted_{v}"] = run(lambda: ClipLoss(local_loss=True, gather_with_grad=True, **kw),
                                            with_bias=False, weight=w_rank[rank], reduce="sum")
            res[f"siglip_{v}"] = run(lambda: SigLipLoss(**kw), with_bias=True)
    try:
        from open_clip.loss import ClipLoss as OCClip, SigLipLoss as OCSig
    except ImportError:
        pass
    else:
        res["oc_clip_local"] = run(lambda: OCClip(local_loss=True, gather_with_grad=True, rank=rank,
                                                  world_size=world), with_bias=False)
        res["oc_clip_local_bias"] = run(lambda: OCClip(local_loss=True, gather_with_grad=True, rank=rank,
                                                       world_size=world), with_bias=True)
        res["oc_siglip"] = run(lambda: OCSig(rank=rank, world_size=world), with_bias=True)
    torch.save(res, out_file)
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def dist_results(request, tmp_path_factory):
    # world 2: every variant on both backends; world 3 (a ring whose neighbours differ): torch backend
    world = request.param
    tmp = tmp_path_factory.mktemp(f"dist_loss_w{world}")
    g = torch.Generator().manual_seed(1234 + world)
    B = world * LOCAL_B
    data = {
        "X_img": torch.randn(B, DIN, generator=g),
        "X_txt": torch.randn(B, DIN, generator=g),
        "W_img": torch.randn(DIN, D, generator=g) / DIN**0.5,
        "W_txt": torch.randn(DIN, D, generator=g) / DIN**0.5,
        "scale": torch.tensor(2.5),
        "bias": torch.tensor(-1.5),
        "w_rank": W_RANK[:world],
    }
    data["X_txt"] = data["X_txt"] + data["X_img"]  # positives correlate
    torch.save(data, tmp / "data.pt")
    (tmp / "worker.py").write_text(_WORKER)
    procs = [
        subprocess.Popen([sys.executable, str(tmp / "worker.py"), str(r), str(world), str(tmp / "rdzv"),
                          str(tmp / "data.pt"), str(tmp / f"rank{r}.pt"), "1" if (TRITON_OK and world == 2) else "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
        for r in range(world)
    ]
    errs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=600)
            errs.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{errs[r][-3000:]}"
    return data, [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


def _reference(data, loss_name, with_bias, weighted=False):
    """float64 single-process loss of the concatenated batch and its gradients (or Σ_r w_r·ℓ_r)."""
    Wi = data["W_img"].double().requires_grad_()
    Wt = data["W_txt"].double().requires_grad_()
    s = data["scale"].double().requires_grad_()
    bias = data["bias"].double().requires_grad_() if with_bias else None
    img = data["X_img"].double() @ Wi
    txt = data["X_txt"].double() @ Wt
    img.retain_grad()
    txt.retain_grad()
    x = s * img @ txt.T + (bias if with_bias else 0.0)
    B = x.shape[0]
    world = B // LOCAL_B
    if loss_name == "clip":
        lab = torch.arange(B)
        loss = (F.cross_entropy(x, lab) + F.cross_entropy(x.T, lab)) / 2
        if weighted:  # open_clip's per-rank local losses, weighted
            per_row = torch.logsumexp(x, 1) - x.diagonal()
            per_col = torch.logsumexp(x, 0) - x.diagonal()
            rows = [slice(r * LOCAL_B, (r + 1) * LOCAL_B) for r in range(world)]
            locs = [(per_row[sl].sum() + per_col[sl].sum()) * world / (2 * B) for sl in rows]
            loss = sum(w * lr for w, lr in zip(data["w_rank"], locs))
    else:
        z = 2 * torch.eye(B, dtype=x.dtype) - 1
        loss = -F.logsigmoid(z * x).sum() / B
    loss.backward()
    out = {"loss": loss.item(), "g_img": img.grad, "g_txt": txt.grad, "W_img": Wi.grad, "W_txt": Wt.grad,
           "scale": s.grad}
    if with_bias:
        out["bias"] = bias.grad
    return out


def _close(a, b, tol=2e-5):
    a = torch.as_tensor(a).double()
    b = torch.as_tensor(b).double()
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


VARIANTS = ["torch", "torch_ring", "triton", "triton_ring"]


def _get(ranks, prefix, variant):
    key = f"{prefix}_{variant}"
    if key not in ranks[0]:
        pytest.skip(f"{key} not run here (Triton runs at world size 2, where Triton can run)")
    # ring variants really passed chunks rank to rank (forward and backward); the others never did
    hops = [r[key]["ring_hops"] for r in ranks]
    assert all(h >= 2 for h in hops) if variant.endswith("ring") else not any(hops), (key, hops)
    return [r[key] for r in ranks]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_clip_local_loss_ddp_exact(dist_results, variant):
    data, ranks = dist_results
    world = len(ranks)
    res = _get(ranks, "clip_local", variant)
    with_bias = variant.startswith("triton")
    ref = _reference(data, "clip", with_bias)
    # the ranks' local losses average to the global loss of the concatenated batch
    assert abs(sum(r["loss"] for r in res) / world - ref["loss"]) < 2e-5
    # DDP-averaged parameter gradients == single-process gradients of the global loss
    for name in ("W_img", "W_txt", "scale") + (("bias",) if with_bias else ()):
        for r in res:
            assert _close(r[name], ref[name]), (name, r[name], ref[name])
    # each rank's own features receive world_size × dL/dfeat (never a wrong world-size scale)
    for rk, r in enumerate(res):
        rows = slice(rk * LOCAL_B, (rk + 1) * LOCAL_B)
        assert _close(r["g_img"], world * ref["g_img"][rows])
        assert _close(r["g_txt"], world * ref["g_txt"][rows])


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_clip_local_loss_matches_open_clip_per_rank(dist_results, variant):
    pytest.importorskip("open_clip")
    data, ranks = dist_results
    res = _get(ranks, "clip_local", variant)
    oc = [r["oc_clip_local_bias" if variant.startswith("triton") else "oc_clip_local"] for r in ranks]
    for r, o in zip(res, oc):
        assert abs(r["loss"] - o["loss"]) < 2e-5
        assert _close(r["g_img"], o["g_img"])
        assert _close(r["g_txt"], o["g_txt"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_clip_global_loss_every_rank(dist_results, variant):
    data, ranks = dist_results
    res = _get(ranks, "clip_global", variant)
    ref = _reference(data, "clip", True)
    for r in res:  # local_loss=False: every rank reports the global loss
        assert abs(r["loss"] - ref["loss"]) < 2e-5
        for name in ("W_img", "W_txt", "scale", "bias"):
            assert _close(r[name], ref[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_clip_unequal_upstream_grads(dist_results, variant):
    # rank r back-propagates w_r·ℓ_r: the summed gradients must be d(Σ_r w_r ℓ_r)/dθ exactly, which
    # needs each column term weighted by its owner's upstream gradient
    data, ranks = dist_results
    res = _get(ranks, "clip_weighted", variant)
    ref = _reference(data, "clip", False, weighted=True)
    for name in ("W_img", "W_txt", "scale"):
        for r in res:
            assert _close(r[name], ref[name]), (name, r[name], ref[name])


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_siglip_ddp_exact_and_open_clip_parity(dist_results, variant):
    data, ranks = dist_results
    world = len(ranks)
    res = _get(ranks, "siglip", variant)
    ref = _reference(data, "siglip", True)
    assert abs(sum(r["loss"] for r in res) / world - ref["loss"]) < 2e-5 * max(1, ref["loss"])
    for name in ("W_img", "W_txt", "scale", "bias"):
        for r in res:
            assert _close(r[name], ref[name]), name
    if "oc_siglip" in ranks[0]:
        for r, rr in zip(res, ranks):
            o = rr["oc_siglip"]
            assert abs(r["loss"] - o["loss"]) < 2e-5 * max(1, abs(o["loss"]))
            assert _close(r["g_img"], o["g_img"])
            assert _close(r["g_txt"], o["g_txt"])
