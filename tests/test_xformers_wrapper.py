"""flash_attention(backend="xformers"): how our layouts become xformers ``memory_efficient_attention`` calls.

xformers' CUDA kernels cannot run on CPU, so ``memory_efficient_attention`` is replaced by a float64
implementation of its documented semantics (xformers.ops.fmha.memory_efficient_attention's docstring: inputs
``[B, M, H, K]``, ``softmax(q k^T * scale + attn_bias) v``, scale defaulting to 1/sqrt(K)), where the bias
object is materialised with xformers' own ``materialize``. The real xformers mask classes are used, so a wrong
layout, mask class (causal or not, block-diagonal boundaries) or scale in our wrapper shows up against an
independent per-sequence float64 attention. Skipped when xformers is not importable (it is not a dependency).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

xops = pytest.importorskip("xformers.ops")
attn_bias = importlib.import_module("xformers.ops.fmha.attn_bias")
fa = importlib.import_module("bmclip.kernels.flash_attention")


def _reference(q, k, v, cu, causal, scale):
    """Independent float64 attention, one sequence at a time; varlen layout (T, H, D)."""
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qq, kk, vv = (t[a:b].double().transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        s = (qq @ kk.transpose(-1, -2)) * scale
        if causal:
            n = b - a
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((torch.softmax(s, dim=-1) @ vv).transpose(0, 1))
    return torch.cat(outs, 0)


class FakeMEA:
    """float64 memory_efficient_attention on CPU that records how it was called."""

    def __init__(self):
        self.calls = []

    def __call__(self, query, key, value, attn_bias=None, p=0.0, scale=None, **kw):
        self.calls.append({"shape": tuple(query.shape), "bias": attn_bias, "scale": scale, "p": p, "kw": kw})
        assert query.dim() == 4 and query.shape == key.shape == value.shape, "xformers wants [B, M, H, K]"
        b, m, h, d = query.shape
        s = 1.0 / math.sqrt(d) if scale is None else scale
        q, k, v = (t.double().transpose(1, 2) for t in (query, key, value))  # (B, H, M, K)
        logits = (q @ k.transpose(-1, -2)) * s
        if attn_bias is not None:
            logits = logits + attn_bias.materialize((m, m), dtype=torch.float64, device=query.device)
        return (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).to(query.dtype)


def _cu(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


def _check(fake, fn, q, k, v, cu, causal, scale):
    gen = torch.Generator().manual_seed(3)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    do = torch.randn(out.shape, generator=gen)
    out.backward(do)
    flat = lambda t: t.reshape(-1, *t.shape[-2:])  # padded (B, S, H, D) -> varlen-shaped (B*S, H, D)
    ref_leaves = [flat(t).detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = _reference(*ref_leaves, cu, causal, scale)
    ref.backward(flat(do).double())
    torch.testing.assert_close(flat(out).double(), ref.detach(), rtol=1e-6, atol=1e-6)
    for got, want, name in zip(leaves, ref_leaves, "qkv"):
        torch.testing.assert_close(flat(got.grad).double(), want.grad, rtol=1e-6, atol=1e-6, msg=f"d{name}")
    assert fake.calls and all(c["scale"] == scale and c["p"] == 0.0 for c in fake.calls)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("custom_scale", [False, True])
def test_varlen_maps_to_one_block_diagonal_call(causal, custom_scale):
    lengths = [1, 2, 17, 0, 64, 100, 5]  # mixed, including an empty sequence
    cu = _cu(lengths)
    heads, d = 3, 32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(int(cu[-1]), heads, d, generator=gen) for _ in range(3))
    scale = 0.3 if custom_scale else 1.0 / math.sqrt(d)
    fake = FakeMEA()
    _check(fake, lambda a, b, c: fa._xformers_call(fake, attn_bias, a, b, c, cu, causal, scale), q, k, v, cu,
           causal, scale)
    (call,) = fake.calls
    assert call["shape"] == (1, int(cu[-1]), heads, d)  # batch 1, sequences concatenated
    want = attn_bias.BlockDiagonalCausalMask if causal else attn_bias.BlockDiagonalMask
    assert type(call["bias"]) is want


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("custom_scale", [False, True])
def test_padded_layout_passes_through(causal, custom_scale):
    b, s, heads, d = 3, 37, 2, 16
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, s, heads, d, generator=gen) for _ in range(3))
    scale = 0.4 if custom_scale else 1.0 / math.sqrt(d)
    fake = FakeMEA()
    _check(fake, lambda a, c, e: fa._xformers_call(fake, attn_bias, a, c, e, None, causal, scale), q, k, v,
           _cu([s] * b), causal, scale)
    (call,) = fake.calls
    assert call["shape"] == (b, s, heads, d)
    if causal:
        assert isinstance(call["bias"], attn_bias.LowerTriangularMask)
    else:
        assert call["bias"] is None


def test_cpu_tensors_are_refused_not_faked():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(fa.FlashAttentionUnavailable, match="CUDA"):
        fa.flash_attention(q, q, q, backend="xformers")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_real_xformers_matches_reference(causal):
    lengths = [1, 2, 17, 64, 100, 197, 256]
    cu = _cu(lengths).cuda()
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(int(cu[-1]), 4, 64, generator=gen).cuda().half() for _ in range(3))
    try:
        out = fa.flash_attention(q, k, v, cu_seqlens=cu, causal=causal, backend="xformers")
    except (NotImplementedError, fa.FlashAttentionUnavailable) as e:  # a wheel without kernels for this torch
        pytest.skip(f"xformers kernels unavailable here: {e}")
    ref = _reference(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), causal, 1.0 / 8.0)
    same = _reference(q.cpu().float(), k.cpu().float(), v.cpu().float(), cu.cpu(), causal, 1.0 / 8.0).half()
    err = (out.cpu().double() - ref).abs().max().item()
    err_same = (same.double() - ref).abs().max().item()
    assert err <= 2 * err_same + 1e-3
