"""Edge cases of the Triton kernels (bmclip.kernels) against independent float64 torch references.

* Strided (N,) parameters of the fused LayerNorm / bias-GELU (e.g. columns of one (N, 2) parameter): the
  kernels read them at unit stride, so they must reach the kernels contiguous.
* LayerNorm of constant and near-constant rows (variance 0 or tiny next to the mean), also at eps = 1e-12 (the
  text tower's ln_eps, where rstd = 1e6 amplifies any rounding of the mean): forward and backward.
* A strided 1-D cu_seqlens view for the Triton flash attention (the kernels read CU + b).
* SDPA varlen with no tokens: the output stays on the autograd graph, as the Triton path's does.
* Head dim 0: a clear ValueError from every backend.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py). Every backend="triton" call is
checked to have really launched the Triton path (never a silent torch fallback).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import types

import pytest
import torch
import torch.nn.functional as F

fo = importlib.import_module("bmclip.kernels.fused_ops")
fot = importlib.import_module("bmclip.kernels.fused_ops_triton")
fa = importlib.import_module("bmclip.kernels.flash_attention")
fat = importlib.import_module("bmclip.kernels.flash_attention_triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS32 = torch.finfo(torch.float32).eps
ULPS = 64.0  # allowed error: ULPS fp32 ulps of the reference's largest magnitude (a bug gives 1e-4..1 relative)


@contextlib.contextmanager
def _counting(owner, name):
    """Counts the calls of ``owner.name`` (the apply of an autograd Function that launches Triton kernels)."""
    calls = []
    real = getattr(owner, name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(owner, name, lambda *a: calls.append(1) or real(*a))
        yield calls


def _assert_close_ulps(name, got, ref, ulps=ULPS, scale=0.0):
    """max |got - ref| <= ulps fp32 ulps of max(|ref|, scale); ``scale``: the quantity's natural magnitude where
    the reference itself is (near) 0, e.g. dW of constant rows (float64 gives 1e-11, the kernel exactly 0)."""
    assert got is not None and got.shape == ref.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref).abs().max().item()
    bound = ulps * EPS32 * max(ref.abs().max().item(), scale, 1e-30)
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e} (|ref| {ref.abs().max().item():.3e})"


# ---------------------------------------------------------------------------------- strided parameters


def _ln_triton(x, w, b, eps, residual=None):
    with _counting(fo, "_ln_apply") as calls:
        out = fo.layer_norm(x, w, b, eps, residual=residual, backend="triton")
    assert len(calls) == 1
    return out


def _gelu_triton(x, b, approximate="none"):
    with _counting(fo, "_bias_gelu_apply") as calls:
        out = fo.bias_gelu(x, b, approximate=approximate, backend="triton")
    assert len(calls) == 1
    return out


def _ln_ref(x, w, b, eps, residual=None):
    s = x + residual if residual is not None else x
    y = F.layer_norm(s, (x.shape[-1],), w, b, eps)
    return (y, s) if residual is not None else y


@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_strided_weight_and_bias(residual):
    """weight/bias as the columns of one (N, 2) parameter (stride 2), x and residual non-contiguous 3-D views:
    output, sum and every gradient (x, residual, the (N, 2) parameter) match float64 torch."""
    g = torch.Generator().manual_seed(10)
    N = 40
    leaves = {
        "wb": torch.stack([1 + 0.3 * torch.randn(N, generator=g), 0.5 * torch.randn(N, generator=g)], 1),
        "x": torch.randn(6, 4, N, generator=g) * 2 + 0.5,  # used as a transpose: reshape copies it
        "r": torch.randn(4, 12, N, generator=g),  # used as [:, ::2]: rows of stride 2N, read in place
    }
    dy, ds = torch.randn(4, 6, N, generator=g), torch.randn(4, 6, N, generator=g)

    def run(fn, dtype):
        ls = {k: t.to(DEVICE, dtype).clone().requires_grad_(True) for k, t in leaves.items()}
        x, r, w, b = ls["x"].transpose(0, 1), ls["r"][:, ::2], ls["wb"][:, 0], ls["wb"][:, 1]
        assert not x.is_contiguous() and not r.is_contiguous() and w.stride() == b.stride() == (2,)
        out = fn(x, w, b, 1e-5, residual=r if residual else None)
        outs = out if residual else (out,)
        loss = (outs[0] * dy.to(DEVICE, dtype)).sum() + ((outs[1] * ds.to(DEVICE, dtype)).sum() if residual else 0)
        loss.backward()
        grads = {k: t.grad for k, t in ls.items() if k != "r" or residual}
        return [o.detach() for o in outs], grads

    ker_o, ker_g = run(_ln_triton, torch.float32)
    ref_o, ref_g = run(_ln_ref, torch.float64)
    for name, k, rf in zip(["y", "s"], ker_o, ref_o):
        _assert_close_ulps(name, k, rf)
    assert ker_g.keys() == ref_g.keys()
    for name in ref_g:
        _assert_close_ulps(f"d{name}", ker_g[name], ref_g[name])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_strided_bias(approximate):
    """bias as a column of an (N, 2) parameter (stride 2), x a non-contiguous view: output, dx and the
    parameter's gradient match float64 torch."""
    g = torch.Generator().manual_seed(11)
    N = 40
    leaves = {"xb": torch.randn(N, 2, generator=g), "x": torch.randn(6, 4, N, generator=g) * 3}
    dy = torch.randn(4, 6, N, generator=g)

    def run(fn, dtype):
        ls = {k: t.to(DEVICE, dtype).clone().requires_grad_(True) for k, t in leaves.items()}
        x, b = ls["x"].transpose(0, 1), ls["xb"][:, 1]
        assert not x.is_contiguous() and b.stride() == (2,)
        y = fn(x, b)
        (y * dy.to(DEVICE, dtype)).sum().backward()
        return y.detach(), {k: t.grad for k, t in ls.items()}

    ker_y, ker_g = run(lambda x, b: _gelu_triton(x, b, approximate), torch.float32)
    ref_y, ref_g = run(lambda x, b: F.gelu(x + b, approximate=approximate), torch.float64)
    _assert_close_ulps("y", ker_y, ref_y)
    for name in ref_g:
        _assert_close_ulps(f"d{name}", ker_g[name], ref_g[name])


def test_launchers_take_strided_parameters():
    """The launchers of bmclip.kernels.fused_ops_triton (public) also accept strided (N,) parameters."""
    g = torch.Generator().manual_seed(12)
    N = 24
    x = torch.randn(5, N, generator=g).to(DEVICE)
    wb = torch.randn(N, 3, generator=g).to(DEVICE)
    w, b = wb[:, 0], wb[:, 2]
    y, _, _, _ = fot.ln_forward(x, None, w, b, 1e-5, None)
    _assert_close_ulps("ln y", y, F.layer_norm(x.double(), (N,), w.double(), b.double(), 1e-5))
    y = fot.bias_gelu_forward(x, b, False)
    _assert_close_ulps("gelu y", y, F.gelu(x.double() + b.double()))
    dy = torch.randn(5, N, generator=g).to(DEVICE)
    dx, db = fot.bias_gelu_backward(dy, x, b, False, True)
    x64, b64 = x.double().requires_grad_(True), b.double().requires_grad_(True)
    F.gelu(x64 + b64).backward(dy.double())
    _assert_close_ulps("gelu dx", dx, x64.grad)
    _assert_close_ulps("gelu db", db, b64.grad)


# ------------------------------------------------------------------------- constant / near-constant rows


def _rows(kind, n, g):
    """(4, n) fp32 rows: 'constant' (variance exactly 0), 'near' (|mean| >> std), 'mixed' (one of each + a
    plain row)."""
    const = torch.tensor([0.1, 0.3, -7.25, 1000.0])[:, None].expand(4, n)
    near = torch.tensor([1000.0, 3.0, -50.0, 0.1])[:, None] + torch.tensor([1e-3, 1e-6, 1e-4, 1e-7])[:, None] * (
        torch.randn(4, n, generator=g))
    if kind == "constant":
        return const.clone()
    if kind == "near":
        return near
    return torch.stack([const[0], near[0], near[1], 0.5 + 2 * torch.randn(n, generator=g)])


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("eps", [1e-5, 1e-12])
@pytest.mark.parametrize("kind", ["constant", "near", "mixed"])
def test_layer_norm_constant_and_near_constant_rows(kind, eps, residual):
    """Variance 0 (LayerNorm(x) is exactly the bias) or tiny next to the mean: the statistics must not lose the
    row's digits to the rounding of its mean (amplified by rstd, 1e6 at eps = 1e-12), forward or backward.
    Reference: float64 torch on the same fp32 (rounded) sum s."""
    g = torch.Generator().manual_seed(20)
    N = 768
    s32 = _rows(kind, N, g)
    if residual:  # x + r == s32 exactly in fp32: r = s32 - x with x a multiple of 2^-4 (exact differences)
        x = torch.round(s32 * 16) / 16
        r = s32 - x
        assert torch.equal(x + r, s32)
    else:
        x, r = s32, None
    w = torch.linspace(0.5, 1.5, N)
    b = torch.linspace(-1, 1, N)
    dy = torch.randn(4, N, generator=g)
    dev = lambda t: t.to(DEVICE) if t is not None else None

    xl, wl, bl = (dev(t).clone().requires_grad_(True) for t in (x, w, b))
    rl = dev(r).clone().requires_grad_(True) if residual else None
    out = _ln_triton(xl, wl, bl, eps, residual=rl)
    y = out[0] if residual else out
    if residual:
        assert torch.equal(out[1].cpu(), s32)
    y.backward(dev(dy))

    s64, w64, b64 = (t.double().requires_grad_(True) for t in (s32, w, b))
    y64 = F.layer_norm(s64, (N,), w64, b64, eps)
    y64.backward(dy.double())

    _assert_close_ulps("y", y.cpu(), y64.detach())
    _assert_close_ulps("dx", xl.grad.cpu(), s64.grad)
    if residual:
        _assert_close_ulps("dres", rl.grad.cpu(), s64.grad)
    _assert_close_ulps("dw", wl.grad.cpu(), w64.grad, scale=b64.grad.abs().max().item())
    _assert_close_ulps("db", bl.grad.cpu(), b64.grad)
    if kind != "near":  # constant rows: xhat is exactly 0, so y is exactly the bias
        const_rows = [0] if kind == "mixed" else [0, 1, 2, 3]
        assert torch.equal(y.detach().cpu()[const_rows], b.expand(len(const_rows), N))


# --------------------------------------------------------------------------------------- flash attention


def _cu(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


def _attention64(q, k, v, cu, causal, scale):
    """Independent float64 attention, one sequence at a time; varlen layout (T, H, D)."""
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qq, kk, vv = (t[a:b].double().transpose(0, 1) for t in (q, k, v))
        s = (qq @ kk.transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        outs.append((torch.softmax(s, dim=-1) @ vv).transpose(0, 1))
    return torch.cat(outs, 0)


def _strided_cu(lengths):
    """cu_seqlens as column 0 of an (batch + 1, 2) int32 tensor: a 1-D view of stride 2 whose neighbours in
    memory are other (in-range, plausible) boundaries."""
    cu = _cu(lengths)
    other = torch.flip(cu, [0]).clone()
    view = torch.stack([cu, other], 1)[:, 0]
    assert view.stride() == (2,) and torch.equal(view, cu)
    return view


@pytest.mark.parametrize("given_max", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_triton_strided_cu_seqlens(causal, given_max):
    """backend='triton' with a strided cu_seqlens view: output and dq, dk, dv match float64 attention."""
    lengths = [5, 7, 12]
    cu = _strided_cu(lengths).to(DEVICE)
    g = torch.Generator().manual_seed(30)
    T, H, D = sum(lengths), 2, 16
    q, k, v, do = (torch.randn(T, H, D, generator=g).to(DEVICE) for _ in range(4))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with _counting(fa._TritonFlashAttention, "apply") as calls:
        o = fa.flash_attention(*leaves, cu_seqlens=cu, max_seqlen=max(lengths) if given_max else None,
                               causal=causal, backend="triton")
    assert len(calls) == 1
    o.backward(do)
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = _attention64(*ref_leaves, _cu(lengths), causal, 1 / math.sqrt(D))
    ref.backward(do.double())
    _assert_close_ulps("o", o.detach(), ref.detach())
    for name, got, want in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        _assert_close_ulps(name, got.grad, want.grad)


def test_flash_launchers_take_strided_cu_seqlens():
    """bmclip.kernels.flash_attention_triton.forward/backward (the launchers) with a strided cu_seqlens."""
    lengths = [3, 9, 4]
    cu = _strided_cu(lengths).to(DEVICE)
    g = torch.Generator().manual_seed(31)
    T, H, D = sum(lengths), 1, 16
    q, k, v, do = (torch.randn(T, H, D, generator=g).to(DEVICE) for _ in range(4))
    scale = 1 / math.sqrt(D)
    o, lse = fat.forward(q, k, v, cu, len(lengths), 0, max(lengths), False, scale)
    dq, dk, dv = fat.backward(do, q, k, v, o, lse, cu, len(lengths), 0, max(lengths), False, scale)
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = _attention64(*ref_leaves, _cu(lengths), False, scale)
    ref.backward(do.double())
    _assert_close_ulps("o", o, ref.detach())
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_leaves):
        _assert_close_ulps(name, got, want.grad)


def test_strided_cu_seqlens_sdpa_and_xformers_mapping():
    """The other paths read cu_seqlens through torch ops: the strided view gives the same attention (SDPA) and
    the same block-diagonal mask (xformers, checked without its kernels)."""
    lengths = [5, 7, 12]
    cu = _strided_cu(lengths).to(DEVICE)
    g = torch.Generator().manual_seed(32)
    q, k, v = (torch.randn(sum(lengths), 2, 16, generator=g).to(DEVICE) for _ in range(3))
    o = fa.flash_attention(q, k, v, cu_seqlens=cu, backend="sdpa")
    _assert_close_ulps("o", o, _attention64(q, k, v, _cu(lengths), False, 0.25))
    seen = {}
    mask_cls = types.SimpleNamespace(from_seqlens=lambda seqlens: seen.setdefault("seqlens", seqlens))
    fake_bias = types.SimpleNamespace(BlockDiagonalMask=mask_cls, BlockDiagonalCausalMask=mask_cls)
    fa._xformers_call(lambda q, k, v, attn_bias, scale: q, fake_bias, q, k, v, cu, False, 0.25)
    assert seen["seqlens"] == lengths


@pytest.mark.parametrize("backend", ["sdpa", "auto", "triton"])
@pytest.mark.parametrize("given_max", [False, True])
def test_empty_varlen_output_stays_on_the_graph(backend, given_max):
    """No tokens at all (two empty sequences): an empty output attached to q, k and v, whose backward gives
    empty gradients, on every backend (the Triton path's behaviour)."""
    cu = torch.tensor([0, 0, 0], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(0, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    o = fa.flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=0 if given_max else None, backend=backend)
    assert o.shape == (0, 2, 16) and o.requires_grad and o.grad_fn is not None
    o.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == (0, 2, 16)


def test_sdpa_rows_beyond_max_seqlen_are_zero_with_zero_grads():
    """max_seqlen=0 with tokens (a caller breaking the max_seqlen contract): zeros, still on the graph, zero
    (never NaN) gradients even for non-finite inputs."""
    cu = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
    q = torch.full((3, 1, 16), float("inf"), device=DEVICE, requires_grad=True)
    k = torch.randn(3, 1, 16, device=DEVICE, requires_grad=True)
    o = fa.flash_attention(q, k, k, cu_seqlens=cu, max_seqlen=0, backend="sdpa")
    assert torch.equal(o, torch.zeros_like(o)) and o.grad_fn is not None
    o.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(k.grad, torch.zeros_like(k))


@pytest.mark.parametrize("backend", ["triton", "sdpa", "xformers", "auto"])
@pytest.mark.parametrize("varlen", [False, True])
def test_head_dim_zero_is_a_value_error(backend, varlen):
    shape = (4, 2, 0) if varlen else (1, 4, 2, 0)
    q = torch.randn(shape, device=DEVICE)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE) if varlen else None
    with pytest.raises(ValueError, match="head dim"):
        fa.flash_attention(q, q, q, cu_seqlens=cu, backend=backend)
    with pytest.raises(ValueError, match="head dim"):  # an explicit softmax_scale must not skip the check
        fa.flash_attention(q, q, q, cu_seqlens=cu, softmax_scale=1.0, backend=backend)
