"""bmclip.kernels contrastive losses vs independent references (float64 full-matrix torch, open_clip).

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest before import).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from bmclip.kernels import ClipLoss, SigLipLoss, clip_loss, siglip_loss
from bmclip.kernels import contrastive as C
from bmclip.kernels import contrastive_torch as CTorch
from bmclip.kernels import contrastive_triton as CT
from bmclip.kernels._triton_utils import HAS_TRITON, is_interpreted, triton

INTERP = HAS_TRITON and is_interpreted(C._triton_probe_kernel)
needs_triton_here = pytest.mark.skipif(
    not (INTERP or torch.cuda.is_available()) or not HAS_TRITON,
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------
# float64 references: the full B×B matrix, plain torch ops, autograd for every gradient
# ---------------------------------------------------------------------------------------------------
def ref_clip(I, T, s, b):
    x = s * I @ T.T
    if b is not None:
        x = x + b
    lab = torch.arange(I.shape[0], device=I.device)
    return (F.cross_entropy(x, lab) + F.cross_entropy(x.T, lab)) / 2


def ref_siglip(I, T, s, b):
    x = s * I @ T.T
    if b is not None:
        x = x + b
    z = 2 * torch.eye(I.shape[0], dtype=x.dtype, device=x.device) - 1
    return -F.logsigmoid(z * x).sum() / I.shape[0]


LOSSES = {
    "clip": (clip_loss, ref_clip, 14.3, 0.7),
    "siglip": (siglip_loss, ref_siglip, 10.0, -10.0),
}


def make_inputs(B, D, dtype, seed, s_val, b_val, device=DEV):
    g = torch.Generator().manual_seed(seed)
    I = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    T = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    T = F.normalize(T + 0.5 * I, dim=-1)  # correlated positives, as after some training
    I = I.to(device=device, dtype=dtype).requires_grad_()
    T = T.to(device=device, dtype=dtype).requires_grad_()
    s = torch.tensor(s_val, device=device, requires_grad=True)
    b = None if b_val is None else torch.tensor(b_val, device=device, requires_grad=True)
    return I, T, s, b


def _count_backend_paths(mp):
    """Record which per-block implementations run: the Triton launchers or the torch chunked code."""
    calls = []
    for name in ("_tri_forward", "_tri_backward", "_torch_forward", "_torch_backward"):
        real = getattr(C, name)
        mp.setattr(C, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


def run_and_compare(loss_name, B, D, dtype, with_bias, backend, seed=0, s_val=None, b_val=None):
    fn, ref, s_def, b_def = LOSSES[loss_name]
    s_val = s_def if s_val is None else s_val
    b_val = (b_def if b_val is None else b_val) if with_bias else None
    I, T, s, b = make_inputs(B, D, dtype, seed, s_val, b_val)
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_backend_paths(mp)
        loss = fn(I, T, s, b, backend=backend)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        loss.backward()
    # the requested backend did the work (the torch backend also meets these tolerances: a Triton request
    # that ran the torch code would pass every comparison below)
    assert {c.split("_")[1] for c in calls} == {"tri" if backend == "triton" else "torch"}, calls
    assert {c.rsplit("_", 1)[1] for c in calls} == {"forward", "backward"}, calls

    I64 = I.detach().double().requires_grad_()
    T64 = T.detach().double().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    r = ref(I64, T64, s64, b64)
    r.backward()

    # fp32: IEEE dots, fp32 accumulation. fp16/bf16: grads are rounded to the input dtype, and the
    # backward's tensor-core operand dL/dx is rounded too (≈3 significant digits).
    gtol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert abs(loss.item() - r.item()) <= 2e-5 * max(1.0, abs(r.item())), (loss.item(), r.item())
    for name, got, want in (("dI", I.grad, I64.grad), ("dT", T.grad, T64.grad)):
        assert got is not None and got.dtype == dtype and got.shape == want.shape
        err = (got.double() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= gtol * scale + 1e-7, f"{name}: max err {err:.3e} vs max |ref| {scale:.3e}"
    # scalar grads are fp32 reductions of fp32 dL/dx: tight even for half inputs
    # (floor 0.1: Σ|dL/dx| is O(1), so cancelling sums such as CLIP's d bias = 0 get an absolute bound)
    stol = 1e-4 if dtype == torch.float32 else 1e-3
    assert abs(s.grad.item() - s64.grad.item()) <= stol * max(0.1, abs(s64.grad.item())), (
        s.grad.item(), s64.grad.item())
    if b is not None:
        # the CLIP bias gradient is exactly 0 in theory (softmax rows sum to 1): compare absolutely
        assert abs(b.grad.item() - b64.grad.item()) <= stol * max(0.1, abs(b64.grad.item())), (
            b.grad.item(), b64.grad.item())


SHAPES_B = [1, 2, 7, 333, 1000]
SHAPES_D = [64, 512, 768, 1000]


# ---------------------------------------------------------------------------------------------------
# Triton backend (interpreter on CPU): the full grid of losses, shapes and dtypes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_triton_here
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", SHAPES_D)
@pytest.mark.parametrize("B", SHAPES_B)
def test_triton_vs_float64(loss_name, B, D, dtype):
    # with and without bias in one test: the two compiled variants differ only in HAS_BIAS
    run_and_compare(loss_name, B, D, dtype, True, "triton", seed=B * 7 + D)
    run_and_compare(loss_name, B, D, dtype, False, "triton", seed=B * 7 + D + 1)


@pytest.mark.slow
@needs_triton_here
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_triton_large_scale_and_two_pass_columns(loss_name, monkeypatch):
    # logit_scale 100 (open_clip's clamp) stresses the online max/sum; a zero buffer limit forces the
    # transposed second forward launch for column LSEs (the path B=256k+ takes on a GPU).
    run_and_compare(loss_name, 333, 64, torch.float32, True, "triton", seed=5, s_val=100.0)
    monkeypatch.setattr(CT, "_COLPART_MAX_BYTES", 0)
    run_and_compare(loss_name, 333, 64, torch.float32, True, "triton", seed=6)
    run_and_compare(loss_name, 7, 512, torch.float16, False, "triton", seed=7)


@pytest.mark.gpu
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
@pytest.mark.parametrize("B,D", [(4096, 512), (3001, 768), (17, 1000)])
def test_triton_bf16_gpu(loss_name, B, D):
    run_and_compare(loss_name, B, D, torch.bfloat16, True, "triton", seed=B)
    run_and_compare(loss_name, B, D, torch.float32, False, "triton", seed=B + 1)


# The sm_90 ahead-of-time build of these kernels (as the launchers specialise them) is checked by
# tests/test_aot_compile.py through benchmarks/aot_compile_check.py.


# ---------------------------------------------------------------------------------------------------
# torch chunked backend
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("B", SHAPES_B)
def test_torch_vs_float64(loss_name, B, dtype):
    for D in SHAPES_D:
        run_and_compare(loss_name, B, D, dtype, True, "torch", seed=B + D)
        run_and_compare(loss_name, B, D, dtype, False, "torch", seed=B + D + 1)


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_torch_many_chunks(loss_name, monkeypatch):
    # 333 rows against 333 columns in chunks of 3 rows: chunk edges, partial last chunk, running col LSE
    monkeypatch.setattr(CTorch, "_TORCH_CHUNK_ELEMS", 1000)
    run_and_compare(loss_name, 333, 64, torch.float32, True, "torch", seed=11, s_val=100.0)


def test_auto_backend_choice():
    x = torch.randn(4, 8)
    assert C._resolve_backend("auto", x, x) == ("triton" if x.is_cuda else "torch")
    if torch.cuda.is_available() and HAS_TRITON:
        y = x.cuda()
        assert C._resolve_backend("auto", y, y) == "triton"


def test_backends_agree_and_python_float_scale():
    I, T, _, _ = make_inputs(50, 96, torch.float32, 3, 1.0, None)
    a = clip_loss(I, T, 20.0, backend="torch")
    b = clip_loss(I, T, torch.tensor(20.0), backend="auto")
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    c = siglip_loss(I, T, 10.0, -3.0, backend="torch")
    r = ref_siglip(I.detach().double(), T.detach().double(), 10.0, -3.0)
    assert abs(c.item() - r.item()) < 1e-4


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_torch_backend_ignores_enclosing_autocast(loss_name):
    # a training step under torch.autocast(bf16) must not turn the fp32 logit math into bf16
    fn = LOSSES[loss_name][0]
    I, T, s, b = make_inputs(64, 96, torch.float32, 9, 14.3, -1.0)
    plain = fn(I, T, s, b, backend="torch")
    gi = torch.autograd.grad(plain, I)[0]
    with torch.autocast(device_type=I.device.type, dtype=torch.bfloat16):
        cast = fn(I, T, s, b, backend="torch")
        gi_cast = torch.autograd.grad(cast, I)[0]
    assert cast.dtype == torch.float32
    assert abs(cast.item() - plain.item()) <= 1e-6 * abs(plain.item())
    assert torch.allclose(gi_cast, gi, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------------
# parity with open_clip 3.3's modules (the drop-in claim)
# ---------------------------------------------------------------------------------------------------
def _grads_of(module, I, T, s, b, **kw):
    I = I.detach().clone().requires_grad_()
    T = T.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    out = module(I, T, s, b, output_dict=True, **kw)
    assert set(out) == {"contrastive_loss"}
    out["contrastive_loss"].backward()
    return out["contrastive_loss"].item(), I.grad, T.grad, s.grad, (None if b is None else b.grad)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton_here)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_loss_matches_open_clip(backend, with_bias):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    I, T, s, b = make_inputs(200, 256, torch.float32, 21, 14.3, 0.5 if with_bias else None)
    ours = _grads_of(ClipLoss(backend=backend), I, T, s, b)
    theirs = _grads_of(open_clip_loss.ClipLoss(), I, T, s, b)
    assert abs(ours[0] - theirs[0]) < 1e-5 * max(1, abs(theirs[0]))
    for a, t in zip(ours[1:], theirs[1:]):
        if t is None:
            assert a is None
            continue
        assert torch.allclose(a, t, rtol=1e-4, atol=1e-6 * max(1.0, t.abs().max().item())), (a - t).abs().max()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton_here)])
def test_siglip_loss_matches_open_clip(backend):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    I, T, s, b = make_inputs(150, 128, torch.float32, 22, 10.0, -10.0)
    ours = _grads_of(SigLipLoss(backend=backend), I, T, s, b)
    theirs = _grads_of(open_clip_loss.SigLipLoss(), I, T, s, b)
    assert abs(ours[0] - theirs[0]) < 1e-5 * max(1, abs(theirs[0]))
    for a, t in zip(ours[1:], theirs[1:]):
        assert torch.allclose(a, t, rtol=1e-4, atol=1e-6 * max(1.0, t.abs().max().item())), (a - t).abs().max()


def test_module_plain_output_and_constructor_args():
    I, T, s, _ = make_inputs(9, 32, torch.float32, 1, 5.0, None)
    m = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=0, world_size=1)
    out = m(I, T, s)
    assert isinstance(out, torch.Tensor) and out.dim() == 0
    assert abs(out.item() - ref_clip(I.double(), T.double(), 5.0, None).item()) < 1e-5
    with pytest.raises(ValueError, match="horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring-of-fire")
    with pytest.raises(ValueError, match="rank"):
        ClipLoss(rank=2, world_size=2)


def test_distributed_module_without_process_group_raises():
    I, T, s, _ = make_inputs(4, 16, torch.float32, 1, 5.0, None)
    with pytest.raises(RuntimeError, match="process group"):
        ClipLoss(rank=0, world_size=2, backend="torch")(I, T, s)


# ---------------------------------------------------------------------------------------------------
# bad input → clear errors; explicit Triton request never falls back
# ---------------------------------------------------------------------------------------------------
def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="same"):
        clip_loss(x, torch.randn(5, 8), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        clip_loss(x[None], x[None], 1.0)
    with pytest.raises(TypeError, match="dtype"):
        clip_loss(x.long(), x.long(), 1.0)
    with pytest.raises(ValueError, match="backend"):
        clip_loss(x, x, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="single value"):
        siglip_loss(x, x, torch.ones(2), 0.0)
    with pytest.raises(TypeError, match="logit_scale"):
        clip_loss(x, x, "big")
    with pytest.raises(ValueError, match="B >= 1"):
        clip_loss(x[:0], x[:0], 1.0)


@pytest.mark.slow
def test_triton_backend_without_gpu_or_interpreter_raises():
    if torch.cuda.is_available():
        pytest.skip("this machine can run Triton natively")
    code = textwrap.dedent("""
        import torch
        from bmclip.kernels import clip_loss
        x = torch.randn(4, 8)
        try:
            clip_loss(x, x, 1.0, backend="triton")
        except RuntimeError as e:
            print("RAISED", e)
        else:
            print("NO ERROR")
        print("AUTO", clip_loss(x, x, 1.0).item())  # auto still works on CPU (torch backend)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "RAISED" in res.stdout and "TRITON_INTERPRET" in res.stdout, res.stdout
    assert "AUTO" in res.stdout


# ---------------------------------------------------------------------------------------------------
# memory: the torch backend at B=32768, D=512 (the full fp32 logit matrix alone is 4.3 GB)
# ---------------------------------------------------------------------------------------------------
_MEM_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch

    def hwm():
        # this process's own peak RSS (VmHWM, per address space). Not getrusage's ru_maxrss: Linux carries
        # that across exec, so a child of a big pytest process would report the parent's peak.
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    from bmclip.kernels import clip_loss
    torch.set_num_threads(2)
    B, D = int(sys.argv[1]), int(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    I = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
    T = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
    s = torch.tensor(1.0, requires_grad=True)
    clip_loss(I[:64], T[:64], s, backend="torch").backward()  # lazy initialisation out of the way
    I.grad = T.grad = s.grad = None
    before = hwm()
    loss = clip_loss(I, T, s, backend="torch")
    loss.backward()
    after = hwm()
    print(json.dumps({"loss": loss.item(), "growth": after - before, "peak": after,
                      "finite": bool(torch.isfinite(I.grad).all() and torch.isfinite(T.grad).all()),
                      "gnorm": float(I.grad.norm()), "ds": float(s.grad)}))
""")


@pytest.mark.slow  # 4 B×B×D fp32 GEMM passes at B=32768 on CPU: about a minute on 2 idle cores
def test_torch_backend_memory_32k():
    B, D = 32768, 512
    res = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(B), str(D)], capture_output=True, text=True,
                         timeout=1500)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["finite"]
    # growth = the peak RSS above the state with inputs allocated: grads (2×64 MB) + fp32 copies + chunks
    assert out["growth"] < 1.0e9, f"RSS grew by {out['growth'] / 1e9:.2f} GB"
    # the memory bound on the whole process (torch itself included): 1.23 GB measured on the dev VM
    assert out["peak"] < 1.5e9, f"process peak RSS {out['peak'] / 1e9:.2f} GB"
    # s = 1 and random unit features: logits in [-1, 1], so the loss is log(B) within ±1
    assert abs(out["loss"] - torch.log(torch.tensor(float(B))).item()) < 1.0
    assert out["gnorm"] > 0


@pytest.mark.slow
def test_bench_loss_quick_smoke(tmp_path):
    # the benchmark's CPU smoke mode runs and writes consistent JSON/CSV (timings are not checked)
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_loss.py")
    res = subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path / "bl")], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "bl.json").read_text())
    assert (tmp_path / "bl.csv").read_text().startswith("impl,B,D,")
    rows = {(r["impl"], r["B"]): r for r in data["rows"]}
    for B in (256, 640):
        ours = rows[("bmclip_torch", B)]
        assert ours["status"] == "ok" and ours["time_ms"] > 0
        for other in ("plain_torch", "open_clip"):
            if (other, B) in rows:  # same inputs, same loss
                assert abs(rows[(other, B)]["loss"] - ours["loss"]) < 1e-4 * abs(ours["loss"])


# ---------------------------------------------------------------------------------------------------
# Half-precision accuracy rule (flash-attention's): the loss and its gradients from fp16/bf16 features are
# within 2x the error of a torch reference computed the way an autocast training step computes it (the
# logit GEMM and its gradient GEMMs in the half dtype with fp32 accumulation, the loss math in fp32), both
# measured against float64, plus a few ulps.
# ---------------------------------------------------------------------------------------------------
class _Round(torch.autograd.Function):
    """Rounds to ``dtype`` in the forward and the gradient to ``dtype`` in the backward (an autocast cast)."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype).to(g.dtype), None


def _autocast_reference(loss_name, I, T, s, b, dtype):
    """open_clip under autocast, emulated in float64 with half-precision roundings where autocast has them.

    Features are half leaves (gradients rounded to the half dtype); ``s·I`` is a half product; the logit GEMM
    output is half; the loss math is fp32-or-better (here float64); its gradient reaches the GEMM as half.
    """
    I64 = I.detach().double().requires_grad_()
    T64 = T.detach().double().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    Ih, Th = _Round.apply(I64, dtype), _Round.apply(T64, dtype)
    sI = _Round.apply(_Round.apply(s64, dtype) * Ih, dtype)
    x = _Round.apply(sI @ Th.T, dtype)
    if b64 is not None:
        x = x + b64
    loss = _loss_of_logits(loss_name, x)
    loss.backward()
    rnd = lambda g: g.to(dtype).double()  # noqa: E731  (leaf grads come back in the half dtype)
    return loss.detach(), rnd(I64.grad), rnd(T64.grad), s64.grad, (None if b64 is None else b64.grad)


def _loss_of_logits(loss_name, x):
    lab = torch.arange(x.shape[0], device=x.device)
    if loss_name == "clip":
        return (F.cross_entropy(x, lab) + F.cross_entropy(x.T, lab)) / 2
    z = 2 * torch.eye(x.shape[0], dtype=x.dtype, device=x.device) - 1
    return -F.logsigmoid(z * x).sum() / x.shape[0]


def _float64_truth(loss_name, I, T, s, b):
    ref = LOSSES[loss_name][1]
    I64 = I.detach().double().requires_grad_()
    T64 = T.detach().double().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    loss = ref(I64, T64, s64, b64)
    loss.backward()
    return loss.detach(), I64.grad, T64.grad, s64.grad, (None if b64 is None else b64.grad)


def check_half_accuracy(loss_name, B, D, dtype, seed):
    fn, _, s_val, b_val = LOSSES[loss_name]
    I, T, s, b = make_inputs(B, D, dtype, seed, s_val, b_val)
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_backend_paths(mp)
        loss = fn(I, T, s, b, backend="triton")
        loss.backward()
    assert set(calls) == {"_tri_forward", "_tri_backward"}, calls
    assert loss.dtype == torch.float32 and I.grad.dtype == dtype and T.grad.dtype == dtype
    truth = _float64_truth(loss_name, I, T, s, b)
    ref = _autocast_reference(loss_name, I, T, s, b, dtype)
    ours = (loss.detach().double(), I.grad.double(), T.grad.double(), s.grad.double(), b.grad.double())
    eps = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    # the loss is logsumexp minus the positive logit: fp32 rounds both at the logits' size, so 4 ulps of the
    # largest logit (|s| |I| |T| + |b|), not of the loss (which is exactly 0 for B = 1: the two terms cancel)
    logit_max = abs(s.item()) * I.double().norm(dim=-1).max().item() * T.double().norm(dim=-1).max().item()
    logit_max += 0.0 if b is None else abs(b.item())
    ulps = (4 * 2.0 ** -23 * max(1.0, abs(truth[0].item()), logit_max), None, None, 1e-6, 1e-6)
    for k, name in enumerate(("loss", "dI", "dT", "ds", "db")):
        t, r, o = truth[k], ref[k], ours[k]
        err_ref = (r - t).abs().max().item()
        err = (o - t).abs().max().item()
        slack = ulps[k] if ulps[k] is not None else 4 * eps * t.abs().max().item()
        if k in (3, 4):  # the scalar grads: fp32 reductions, relative to the size of the sum
            slack *= max(1.0, abs(t.item()))
        assert err <= 2 * err_ref + slack, f"{name}: err {err:.3e} vs reference err {err_ref:.3e} (+{slack:.1e})"


@pytest.mark.slow
@needs_triton_here
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
@pytest.mark.parametrize("D", [512, 768])
@pytest.mark.parametrize("B", [1, 333, pytest.param(4096, marks=pytest.mark.slow)])
def test_fp16_accuracy_rule(loss_name, B, D):
    check_half_accuracy(loss_name, B, D, torch.float16, seed=B + D)


@pytest.mark.gpu
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
@pytest.mark.parametrize("D", [512, 768])
@pytest.mark.parametrize("B", [1, 333, 4096, 32768])
def test_bf16_accuracy_rule_gpu(loss_name, B, D):
    check_half_accuracy(loss_name, B, D, torch.bfloat16, seed=B + D)


# ---------------------------------------------------------------------------------------------------
# The work model (contrastive_triton.loss_work) and what the launchers really launch
# ---------------------------------------------------------------------------------------------------
def _kept_configs(kc):
    return CT.fwd_configs(kc), CT.bwd_configs(kc)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("loss", [CT.CLIP, CT.SIGLIP])
def test_work_model_passes_of_every_kept_config(loss):
    # D = 512: the row block and the accumulator hold all of D → 1 forward + 2 × 2 backward passes, exactly
    # (Triton 3.6-3.8). On Triton >= 3.9 that backward spills, so it runs 2 chunks of 256: 1 + 2 × 3 = 7.
    B = 4096
    if CT._RESIDENT_BWD:
        f512, b512 = _kept_configs(512)
        want, chunks = 5.0, (512, 0)
    else:
        f512, b512 = CT.fwd_configs(512), CT.bwd_configs(256, False)
        want, chunks = 7.0, (256, 0)
    assert CT._RESIDENT_BWD == (tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9))
    assert 1 <= len(f512) <= 4 and 1 <= len(b512) <= 4
    for fc in f512:
        for bc in b512:
            w = CT.loss_work(B, 512, torch.bfloat16, fc, bc, loss=loss, interpreted=False)
            assert w["passes"] == want, (fc, bc, w["passes"])
            assert w["bwd_chunks"] == chunks
            if CT._RESIDENT_BWD:
                assert all(x["k_trips"] == 1 for x in w["launches"])
    # D = 768: the true count of the plan the launcher uses — S backward D chunks cost S recomputes + 1 product
    # per orientation (S = 1: resident, 5 passes).
    bd0, bd1 = CT._plan("bwd", 768, False, False)
    S = -(-768 // (bd0 + bd1))
    assert S > 1  # no spill-free one-chunk backward at D = 768 (see the config notes)
    f0, f1 = CT._plan("fwd", 768, False, False)
    f768, b768 = CT.fwd_configs(f0 + f1), CT.bwd_configs(bd0 + bd1, S == 1)
    assert 1 <= len(f768) <= 4 and 1 <= len(b768) <= 4
    for fc in f768:
        for bc in b768:
            w = CT.loss_work(B, 768, torch.bfloat16, fc, bc, loss=loss, interpreted=False)
            assert w["passes"] == 1 + 2 * (S + 1), (fc, bc, w["passes"], S)
    # above the column-partial buffer limit the CLIP forward takes a second, transposed launch
    big = CT.loss_work(1 << 20, 512, torch.bfloat16, interpreted=False, loss=loss)
    assert big["passes"] == want + (1.0 if loss == CT.CLIP else 0.0)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fp32_is_never_autotuned():
    assert CT._mode(torch.float32, False) == (True, False)  # IEEE dots, fixed block
    assert CT._mode(torch.bfloat16, False) == (False, True)
    w = CT.loss_work(4096, 512, torch.float32, interpreted=False)
    assert w["fwd_config"] == CT._FP32_BLOCK and w["bwd_config"] == CT._FP32_BLOCK


@pytest.mark.slow
@needs_triton_here
@pytest.mark.parametrize("D", [512, 768])
def test_work_model_matches_the_launches(D, monkeypatch):
    # Run the GPU tiling (BM = BN = 64, D chunks ≤ 512 wide: D = 768 takes two chunks of 256 + 128 and the
    # non-resident path) under the interpreter, record every launch, and count its work from the grid and
    # the kernel's own loop bounds (range(0, N, BN) × range(0, D, KC)): it must be what loss_work says.
    if not INTERP:
        pytest.skip("the launch interception runs the fixed-block (interpreter) path")
    monkeypatch.setattr(CT, "_INTERP_BLOCK", dict(BM=64, BN=64, num_warps=8, num_stages=2))
    monkeypatch.setattr(CT, "_INTERP_MAXW", 512)
    seen = []
    real = CT._launch

    def spy(kernel, grid, args, meta):
        names = kernel.arg_names if hasattr(kernel, "arg_names") else kernel.fn.arg_names
        a = dict(zip(names, args))
        seen.append(dict(kernel="_bwd_kernel" if "REDUCE" in meta else "_fwd_kernel", grid=tuple(grid),
                         n_trips=len(range(0, a["N"], meta["BN"])),
                         k_trips=len(range(0, a["D"], meta["BD0"] + meta["BD1"])), rows=a["M"],
                         resident=meta["RESIDENT"]))
        return real(kernel, grid, args, meta)

    monkeypatch.setattr(CT, "_launch", spy)
    B = 200
    for loss_name, loss in (("clip", CT.CLIP), ("siglip", CT.SIGLIP)):
        seen.clear()
        run_and_compare(loss_name, B, D, torch.float16, True, "triton", seed=D)
        w = CT.loss_work(B, D, torch.float16, loss=loss)
        model = [{k: x[k] for k in ("kernel", "grid", "n_trips", "k_trips", "rows")} for x in w["launches"]]
        got = [{k: x[k] for k in ("kernel", "grid", "n_trips", "k_trips", "rows")} for x in seen]
        assert got == model
        assert all(x["resident"] == (x["k_trips"] == 1) for x in seen)
        if D == 768:  # the multi-chunk backward really ran: 2 D chunks per row block
            assert {x["grid"][1] for x in seen if x["kernel"] == "_bwd_kernel"} == {2}


@pytest.mark.slow  # ~30 compiles with ptxas: a few minutes on 2 shared cores
def test_every_kept_config_compiles_for_sm90(tmp_path):
    # Every autotune config the launchers can pick (both D-chunk classes, both losses, both backward
    # orientations) is built for sm_90 down to a cubin, within the card's shared memory.
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "aot_compile_check.py")
    out = tmp_path / "aot.json"
    res = subprocess.run([sys.executable, script, "--quick", "--only", "contrastive", "--configs", "all", "--json",
                          str(out)], capture_output=True, text=True, timeout=1800)
    if res.returncode == 77:
        pytest.skip(f"Triton cannot compile for sm_90 here: {res.stdout.strip()[-500:]}")
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["case_errors"] == [] and all(r["status"] == "ok" for r in data["results"])
    assert all(0 <= r["shared"] <= 232448 for r in data["results"])
    built = {(r["kernel"], r["config"]) for r in data["results"]}

    def label(c):
        return " ".join(f"{k}={v}" for k, v in c.kwargs.items()) + f" w{c.num_warps} s{c.num_stages}"

    kept = {("_fwd_kernel", label(c)) for kc in (512, 768) for c in CT.fwd_configs(kc)}
    kept |= {("_bwd_kernel", label(c)) for c in CT.bwd_configs(512) + CT.bwd_configs(256, resident=False)}
    assert kept <= built, kept - built


# ---------------------------------------------------------------------------------------------------
# open_clip's extension points (get_logits / get_ground_truth), subclasses, float64 features
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["fp32", "fp64", "fp16"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_get_logits_and_ground_truth_match_open_clip(dtype, with_bias):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    I, T, s, b = make_inputs(37, 48, dtype, 31, 14.3, -2.0 if with_bias else None)
    for ours, theirs in ((ClipLoss(), open_clip_loss.ClipLoss()), (SigLipLoss(), open_clip_loss.SigLipLoss())):
        got, want = ours.get_logits(I, T, s, b), theirs.get_logits(I, T, s, b)
        got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape == (37, 37)
            torch.testing.assert_close(g, w, rtol=0, atol=0)
            assert g.requires_grad  # differentiable, as subclasses rely on
    oc, ours = open_clip_loss.ClipLoss(), ClipLoss()
    got, want = ours.get_ground_truth(I.device, 37), oc.get_ground_truth(I.device, 37)
    assert got.dtype == want.dtype == torch.long and torch.equal(got, want)
    for neg in (False, True):
        got = SigLipLoss().get_ground_truth(I.device, dtype, 5, negative_only=neg)
        want = open_clip_loss.SigLipLoss().get_ground_truth(I.device, dtype, 5, negative_only=neg)
        assert got.dtype == want.dtype == dtype and torch.equal(got, want)


def test_ground_truth_cache_and_local_loss_offset_as_open_clip():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    for kw in ({"cache_labels": True}, {"cache_labels": False},
               {"cache_labels": True, "local_loss": True, "rank": 2, "world_size": 3}):
        ours, theirs = ClipLoss(**kw), open_clip_loss.ClipLoss(**kw)
        for n in (4, 4, 6):
            a, b = ours.get_ground_truth(torch.device("cpu"), n), theirs.get_ground_truth(torch.device("cpu"), n)
            assert torch.equal(a, b)
            assert (a is ours.get_ground_truth(torch.device("cpu"), n)) == kw["cache_labels"]
        assert ours.prev_num_logits == theirs.prev_num_logits


def _float64_case(loss_name):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    if loss_name == "clip":
        return ClipLoss, open_clip_loss.ClipLoss, 14.3, 0.5
    return SigLipLoss, open_clip_loss.SigLipLoss, 10.0, -10.0


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float64], ids=["scale32", "scale64"])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_float64_loss_and_grads_match_open_clip(loss_name, scale_dtype):
    ours_cls, theirs_cls, s_val, b_val = _float64_case(loss_name)
    I, T, s, b = make_inputs(150, 96, torch.float64, 41, s_val, b_val)
    s = s.detach().to(scale_dtype).requires_grad_()  # e.g. a model's fp32 logit_scale with fp64 features
    b = b.detach().to(scale_dtype).requires_grad_()
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_backend_paths(mp)
        ours = _grads_of(ours_cls(backend="auto"), I, T, s, b)
    assert sorted(set(calls)) == ["_torch_backward", "_torch_forward"]  # auto → torch for float64
    theirs = _grads_of(theirs_cls(), I, T, s, b)
    loss = ours_cls()(I, T, s, b)
    assert loss.dtype == theirs_cls()(I, T, s, b).dtype == torch.float64
    assert abs(ours[0] - theirs[0]) <= 1e-12 * max(1.0, abs(theirs[0])), (ours[0], theirs[0])
    for name, a, t in zip(("dI", "dT", "ds", "db"), ours[1:], theirs[1:]):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        # float64 math: agreement far beyond fp32 (the fp32 path only reaches ~1e-6)
        tol = 1e-10 if t.dtype == torch.float64 else 1e-6
        assert torch.allclose(a, t, rtol=tol, atol=tol * max(1.0, t.abs().max().item())), (name, (a - t).abs().max())


def test_float64_backend_rules():
    from bmclip.kernels._triton_utils import BackendUnavailable

    x = torch.randn(6, 8, dtype=torch.float64)
    assert C._resolve_backend("auto", x, x) == "torch"
    assert C._resolve_backend("torch", x, x) == "torch"
    with pytest.raises(BackendUnavailable, match="float64"):
        clip_loss(x, x, 1.0, backend="triton")  # never falls back to torch silently
    with pytest.raises(BackendUnavailable, match="float64"):
        SigLipLoss(backend="triton")(x, x, 1.0, 0.0)
    # mixed fp64/fp32 features promote to float64
    assert clip_loss(x, x.float(), 2.0).dtype == torch.float64
    # the distributed path accumulates in fp32: float64 is refused clearly there
    with pytest.raises(TypeError, match="float64"):
        ClipLoss(rank=0, world_size=2, backend="torch")(x, x, 1.0)
    with pytest.raises(TypeError, match="float64"):
        SigLipLoss(rank=0, world_size=2, backend="torch")(x, x, 1.0, 0.0)


def test_distill_clip_loss_forward_on_our_get_logits_matches_open_clip():
    # open_clip's own DistillClipLoss.forward (it calls self.get_logits / self.get_ground_truth / self.dist_loss)
    # run on our ClipLoss equals open_clip's DistillClipLoss: values and gradients.
    open_clip_loss = pytest.importorskip("open_clip.loss")

    class OurDistill(ClipLoss):
        forward = open_clip_loss.DistillClipLoss.forward
        dist_loss = open_clip_loss.DistillClipLoss.dist_loss

    I, T, s, _ = make_inputs(40, 64, torch.float32, 51, 14.3, None)
    tI, tT, ts, _ = make_inputs(40, 64, torch.float32, 52, 20.0, None)

    def run(module):
        ins = [t.detach().clone().requires_grad_() for t in (I, T, s)]
        out = module(*ins, tI.detach(), tT.detach(), ts.detach(), output_dict=True)
        (out["contrastive_loss"] + out["distill_loss"]).backward()
        return [out["contrastive_loss"], out["distill_loss"]] + [t.grad for t in ins]

    for a, t in zip(run(OurDistill()), run(open_clip_loss.DistillClipLoss())):
        torch.testing.assert_close(a, t, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_subclass_overriding_get_logits_is_honoured_by_forward(loss_name):
    # A subclass that reshapes the logits (here: an additive margin on the positives) changes forward exactly
    # as in open_clip, whose forward calls get_logits; a subclass that overrides nothing keeps the fused path.
    open_clip_loss = pytest.importorskip("open_clip.loss")
    ours_base, theirs_base = (ClipLoss, open_clip_loss.ClipLoss) if loss_name == "clip" else (
        SigLipLoss, open_clip_loss.SigLipLoss)

    def margin_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        out = super(type(self), self).get_logits(image_features, text_features, logit_scale, logit_bias)
        eye = torch.eye(image_features.shape[0], dtype=image_features.dtype)
        return tuple(x - 3.0 * eye for x in out) if isinstance(out, tuple) else out - 3.0 * eye

    Ours = type("OursMargin", (ours_base,), {"get_logits": margin_logits})
    Theirs = type("TheirsMargin", (theirs_base,), {"get_logits": margin_logits})
    Plain = type("OursPlain", (ours_base,), {"extra": lambda self: None})
    I, T, s, b = make_inputs(30, 48, torch.float32, 61, 10.0, -5.0)
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_backend_paths(mp)
        got = _grads_of(Ours(), I, T, s, b)
        assert calls == []  # the materialised formulation ran, not the fused kernels
        plain = _grads_of(Plain(), I, T, s, b)
        assert calls  # no override: fused
    want = _grads_of(Theirs(), I, T, s, b)
    base = _grads_of(theirs_base(), I, T, s, b)
    assert abs(got[0] - want[0]) <= 1e-5 * abs(want[0]) and abs(got[0] - base[0]) > 1e-2  # the margin counts
    assert abs(plain[0] - base[0]) <= 1e-5 * abs(base[0])
    for a, t in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-7)
    if loss_name == "siglip":
        with pytest.raises(NotImplementedError, match="world_size"):
            Ours(rank=0, world_size=2)(I, T, s, b)


_GET_LOGITS_WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from open_clip.loss import ClipLoss as OCClip
    from bmclip.kernels import ClipLoss

    rank, world, init_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
    g = torch.Generator().manual_seed(7)
    b, d = 5, 12
    X_img = torch.randn(world * b, d, generator=g, dtype=torch.float64)
    X_txt = torch.randn(world * b, d, generator=g, dtype=torch.float64)
    R = torch.randn(world * b, world * b, generator=g, dtype=torch.float64)  # a fixed upstream weighting
    rows = slice(rank * b, (rank + 1) * b)
    checked = 0
    for local_loss in (False, True):
        for with_grad in (False, True):
            kw = dict(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world)
            outs = []
            for cls in (ClipLoss, OCClip):
                img = X_img[rows].clone().requires_grad_()
                txt = X_txt[rows].clone().requires_grad_()
                s = torch.tensor(3.0, requires_grad=True)
                m = cls(**kw)
                lpi, lpt = m.get_logits(img, txt, s, torch.tensor(-1.0))
                if cls is OCClip and not local_loss:
                    # open_clip 3.3 adds the bias twice here (logits_per_text is a view of logits_per_image
                    # and both get += bias in place); bmclip adds it once. Cross-entropy rows/columns are
                    # invariant to that constant shift, so open_clip's loss is unaffected.
                    lpi, lpt = lpi + 1.0, lpt + 1.0
                (lpi * R[: lpi.shape[0], : lpi.shape[1]]).sum().backward(retain_graph=True)
                (lpt * R[: lpt.shape[1], : lpt.shape[0]].T).sum().backward()
                labels = m.get_ground_truth(img.device, lpi.shape[0])
                outs.append((lpi.detach(), lpt.detach(), labels, img.grad, txt.grad, s.grad))
            for a, t in zip(*outs):
                assert a.dtype == t.dtype and a.shape == t.shape, (kw, a.shape, t.shape)
                assert torch.allclose(a, t, rtol=1e-12, atol=1e-12), (kw, (a - t).abs().max())
            checked += 1
    assert checked == 4
    dist.barrier()
    dist.destroy_process_group()
    print("OK", rank)
""")


@pytest.mark.slow
def test_get_logits_distributed_matches_open_clip(tmp_path):
    # Two gloo ranks: get_logits gathers like open_clip's gather_features for every local_loss /
    # gather_with_grad combination — same logits, labels and gradients reaching each rank's own features.
    pytest.importorskip("open_clip.loss")
    (tmp_path / "worker.py").write_text(_GET_LOGITS_WORKER)
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(r), "2", str(tmp_path / "rdzv")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
             for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {r}" in out, f"rank {r}:\n{err[-3000:]}"
