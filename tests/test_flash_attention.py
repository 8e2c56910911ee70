"""Flash attention (kernels/flash_attention.py) against a float64 reference, forward and all three gradients.

Accuracy rule (flash-attn's): the kernel's max error vs float64 must be at most twice the error of a plain
torch implementation run in the same precision as the kernel, plus a small absolute floor. The floor
covers fp32 rounding noise: when both errors are ~1e-7 (a few ulps), "2x" is a coin toss, so we allow
FLOOR_ULPS fp32 ulps of the reference's magnitude on top (whatever the dtype: negligible for fp16/bf16);
a real bug (wrong mask, wrong block, wrong scale) gives errors of order 1e-2..1, far above it.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py); sizes are chosen so the
file takes well under a minute or two there while still covering lengths {1, 2, 17, 64, 100, 197, 256}
in one varlen batch, padded batches, head dims 32/64/128 (and a non-power-of-two one), causal and not.
"""

from __future__ import annotations

import importlib
import math
import sys

import pytest
import torch

# The package re-exports the function under the module's name, so fetch the module itself explicitly.
fa = importlib.import_module("bmclip.kernels.flash_attention")
fat = importlib.import_module("bmclip.kernels.flash_attention_triton")  # kernels, configs, launchers
flash_attention = fa.flash_attention

LENGTHS = [1, 2, 17, 64, 100, 197, 256]
FLOOR_ULPS = 64.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cu(lengths, device="cpu"):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _attention_torch(q, k, v, cu, causal, scale):
    """Plain torch attention per sequence, computed in the dtype of its inputs (varlen layout)."""
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qq, kk, vv = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        s = (qq @ kk.transpose(-1, -2)) * scale
        if causal:
            n = b - a
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        outs.append((torch.softmax(s, dim=-1) @ vv).transpose(0, 1))
    return torch.cat(outs, 0)


def _run(fn, q, k, v, do):
    """Output and (dq, dk, dv) of fn on fresh leaf copies of q, k, v."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    o = fn(*leaves)
    o.backward(do)
    return o.detach(), [t.grad for t in leaves]


def _triton_launches(fn, *args):
    """(fn(*args), number of times the Triton autograd Function ran): torch attention in the kernel's precision
    meets the 2x rule too, so a backend="triton" call that quietly computed with SDPA would pass the comparison."""
    calls = []
    real = fa._TritonFlashAttention.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fa._TritonFlashAttention, "apply", staticmethod(lambda *a: calls.append(1) or real(*a)))
        out = fn(*args)
    return out, len(calls)


def _check_against_reference(q, k, v, cu, causal, kernel_fn, padded_shape=None, backend="triton"):
    """Assert flash-attn's 2x rule for O, dQ, dK, dV; q/k/v are varlen-shaped (T, H, D)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    gen = torch.Generator(device="cpu").manual_seed(1234)
    do = torch.randn(q.shape, generator=gen).to(q.device, q.dtype)

    ref_o, ref_g = _run(lambda a, b, c: _attention_torch(a, b, c, cu, causal, scale),
                        *(t.double() for t in (q, k, v)), do.double())
    same_o, same_g = _run(lambda a, b, c: _attention_torch(a, b, c, cu, causal, scale), q, k, v, do)
    if padded_shape is None:
        (ker_o, ker_g), n = _triton_launches(_run, kernel_fn, q, k, v, do)
    else:
        (ker_o, ker_g), n = _triton_launches(
            _run, lambda a, b, c: kernel_fn(*(t.view(padded_shape) for t in (a, b, c))).flatten(0, 1), q, k, v, do)
    assert n == (1 if backend == "triton" else 0), (backend, n)

    # fp32 ulps for every dtype: the floor only absorbs fp32 rounding noise and is negligible for fp16/bf16.
    eps = torch.finfo(torch.float32).eps
    for name, ref, same, ker in zip(("out", "dq", "dk", "dv"), [ref_o, *ref_g], [same_o, *same_g], [ker_o, *ker_g]):
        assert ker.shape == ref.shape and ker.dtype == q.dtype, name
        assert torch.isfinite(ker).all(), f"{name}: non-finite values"
        err_ker = (ker.double() - ref).abs().max().item()
        err_same = (same.double() - ref).abs().max().item()
        floor = FLOOR_ULPS * eps * max(1.0, ref.abs().max().item())
        assert err_ker <= 2 * err_same + floor, (
            f"{name}: kernel error {err_ker:.3e} > 2 x torch-{q.dtype} error {err_same:.3e} + floor {floor:.1e}"
        )


def _rand(shape, dtype, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(3)]


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_varlen_mixed_lengths_fp32(head_dim, causal):
    cu = _cu(LENGTHS, DEVICE)
    q, k, v = _rand((cu[-1].item(), 2, head_dim), torch.float32, seed=head_dim + causal)
    _check_against_reference(
        q, k, v, cu, causal,
        lambda a, b, c: flash_attention(a, b, c, cu_seqlens=cu, max_seqlen=256, causal=causal, backend="triton"),
    )


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_mixed_lengths_fp16(causal):
    # fp16 is where the 2x rule has teeth: torch-fp16's own error is ~1e-3, the floor is negligible.
    cu = _cu(LENGTHS, DEVICE)
    q, k, v = _rand((cu[-1].item(), 2, 64), torch.float16, seed=7 + causal)
    _check_against_reference(
        q, k, v, cu, causal,
        lambda a, b, c: flash_attention(a, b, c, cu_seqlens=cu, causal=causal, backend="triton"),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "batch,seqlen,head_dim,causal",
    [(2, 197, 64, False), (2, 197, 64, True), (3, 17, 32, True), (2, 1, 128, False), (2, 100, 40, False)],
)
def test_padded_layout(batch, seqlen, head_dim, causal):
    q, k, v = _rand((batch * seqlen, 2, head_dim), torch.float32, seed=seqlen + head_dim)
    cu = _cu([seqlen] * batch, DEVICE)
    _check_against_reference(
        q, k, v, cu, causal,
        lambda a, b, c: flash_attention(a, b, c, causal=causal, backend="triton"),
        padded_shape=(batch, seqlen, 2, head_dim),
    )


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter block sizes only apply to TRITON_INTERPRET runs")
@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_small_unequal_blocks(monkeypatch, blocks, causal, dq_mode):
    # Many partial blocks with BLOCK_M != BLOCK_N: exercises the causal start/stop arithmetic both ways.
    monkeypatch.setattr(fat, "_INTERPRET_BLOCKS", {"fwd": blocks, "bwd_dkdv": blocks, "bwd_dq": blocks})
    monkeypatch.setattr(fa, "_BWD_DQ_MODE", dq_mode)
    lengths = [1, 2, 17, 33, 50]
    cu = _cu(lengths)
    q, k, v = _rand((cu[-1].item(), 1, 32), torch.float32, seed=11)
    _check_against_reference(
        q, k, v, cu, causal,
        lambda a, b, c: flash_attention(a, b, c, cu_seqlens=cu, causal=causal, backend="triton"),
    )


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_atomic_dq_backward_mode(monkeypatch, causal):
    # The optional FA2-style backward (dQ accumulated with atomics in the dK/dV kernel) obeys the same rule.
    monkeypatch.setattr(fa, "_BWD_DQ_MODE", "atomic")
    cu = _cu(LENGTHS, DEVICE)
    q, k, v = _rand((cu[-1].item(), 2, 32), torch.float32, seed=31 + causal)
    _check_against_reference(
        q, k, v, cu, causal,
        lambda a, b, c: flash_attention(a, b, c, cu_seqlens=cu, causal=causal, backend="triton"),
    )


BOUNDARY_LENGTHS = [1, 63, 64, 65, 197, 256, 257]  # around the interpreter's 64-token blocks and the 256 cut


def _record_launches(monkeypatch):
    """(which, constexprs) of every flash-attention kernel launch made through the launcher."""
    seen = []
    real = fat._launch

    def spy(kernel_plain, kernel_tuned, which, grid_fn, args, constexprs):
        seen.append((which, dict(constexprs)))
        return real(kernel_plain, kernel_tuned, which, grid_fn, args, constexprs)

    monkeypatch.setattr(fat, "_launch", spy)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(
    "causal,one_loop_max,dq_mode",
    [(False, 256, "separate"), (False, 256, "atomic"), (True, 256, "separate"), (True, 256, "atomic"),
     (True, 1024, "separate")],
)
def test_block_boundary_lengths_one_loop_and_split_loops(monkeypatch, causal, one_loop_max, dq_mode):
    # Non-causal attention and causal sequences up to ONE_LOOP_MAX_SEQLEN run one masked key loop; longer causal
    # ones an unmasked loop plus a masked tail. Both, at lengths around block boundaries, in both dQ modes.
    monkeypatch.setattr(fat, "ONE_LOOP_MAX_SEQLEN", one_loop_max)
    monkeypatch.setattr(fa, "_BWD_DQ_MODE", dq_mode)
    launches = _record_launches(monkeypatch)
    cu = _cu(BOUNDARY_LENGTHS, DEVICE)
    q, k, v = _rand((cu[-1].item(), 1, 32), torch.float32, seed=41 + causal)
    _check_against_reference(
        q, k, v, cu, causal,
        lambda a, b, c: flash_attention(a, b, c, cu_seqlens=cu, causal=causal, backend="triton"),
    )
    want_one_loop = (not causal) or max(BOUNDARY_LENGTHS) <= one_loop_max
    fwd = [c for which, c in launches if which == "fwd"]
    assert fwd and all(c["ONE_LOOP"] is want_one_loop for c in fwd)
    dkdv = [c for which, c in launches if which == "bwd_dkdv"]
    assert dkdv and all(c["ATOMIC_DQ"] is (dq_mode == "atomic") for c in dkdv)
    dq = [c for which, c in launches if which == "bwd_dq"]
    assert (dq == []) if dq_mode == "atomic" else (dq and all(c["ONE_LOOP"] is want_one_loop for c in dq))


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen", [1, 65, 197])
def test_padded_atomic_dq_fp16(monkeypatch, seqlen, causal):
    # The 5-matmul backward on the padded (ViT) layout in fp16, where the 2x rule has teeth.
    monkeypatch.setattr(fa, "_BWD_DQ_MODE", "atomic")
    batch, head_dim = 2, 64
    q, k, v = _rand((batch * seqlen, 2, head_dim), torch.float16, seed=seqlen + 3 * causal)
    _check_against_reference(
        q, k, v, _cu([seqlen] * batch, DEVICE), causal,
        lambda a, b, c: flash_attention(a, b, c, causal=causal, backend="triton"),
        padded_shape=(batch, seqlen, 2, head_dim),
    )


def test_bad_backward_mode_raises(monkeypatch):
    monkeypatch.setattr(fa, "_BWD_DQ_MODE", "fused")
    q = torch.randn(1, 4, 1, 16, device=DEVICE, requires_grad=True)
    out = flash_attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="dQ mode"):
        out.sum().backward()


def test_fused_qkv_views_and_empty_sequence():
    # Strided q/k/v views of one (T, 3, H, D) projection (how the model calls it), plus a zero-length
    # sequence inside the batch, must give the same result as contiguous copies.
    cu = _cu([5, 0, 19])
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(24, 3, 2, 32, generator=gen).to(DEVICE)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    got, n = _triton_launches(lambda: flash_attention(q, k, v, cu_seqlens=cu.to(DEVICE), backend="triton"))
    assert n == 1
    want = _attention_torch(q.double(), k.double(), v.double(), cu, False, 1 / math.sqrt(32))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_softmax_scale_is_applied():
    cu = _cu([9, 30])
    q, k, v = _rand((39, 1, 32), torch.float32, seed=5)
    got, n = _triton_launches(
        lambda: flash_attention(q, k, v, cu_seqlens=cu.to(DEVICE), softmax_scale=0.5, backend="triton"))
    assert n == 1
    want = _attention_torch(q.double(), k.double(), v.double(), cu, False, 0.5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_backend_matches_reference(causal):
    cu = _cu(LENGTHS)
    q, k, v = _rand((cu[-1].item(), 2, 32), torch.float32, seed=21)
    _check_against_reference(
        q, k, v, cu, causal,
        lambda a, b, c: flash_attention(a, b, c, cu_seqlens=cu.to(a.device), causal=causal, backend="sdpa"),
        backend="sdpa",
    )
    qp, kp, vp = (t[:3 * 17].view(3, 17, 2, 32) for t in (q, k, v))
    got = flash_attention(qp, kp, vp, causal=causal, backend="sdpa")
    want = _attention_torch(*(t.flatten(0, 1).double() for t in (qp, kp, vp)), _cu([17] * 3), causal,
                            1 / math.sqrt(32))
    torch.testing.assert_close(got.flatten(0, 1).double(), want, atol=1e-5, rtol=1e-5)


def test_auto_picks_sdpa_on_cpu_and_triton_on_cuda(monkeypatch):
    if not fa.HAS_TRITON:
        pytest.skip("Triton is not importable here")
    # Kernels decorated in interpreter mode (this CPU run) cannot take CUDA tensors: auto must not pick them.
    monkeypatch.setattr(fa, "is_interpreted", lambda kernel: True)
    assert fa.resolve_backend("auto", "cuda") == "sdpa"
    monkeypatch.setattr(fa, "is_interpreted", lambda kernel: False)  # compiled kernels, as on a GPU machine
    assert fa.resolve_backend("auto", "cpu") == "sdpa"
    assert fa.resolve_backend("auto", "cuda") == "triton"
    assert fa.resolve_backend("xformers", "cpu") == "xformers"


# --- errors: an explicit backend runs or raises, and bad input is refused clearly ------------------------


def test_triton_without_cuda_or_interpreter_raises(monkeypatch):
    # Kernels compiled for the GPU (not decorated in interpreter mode) cannot take CPU tensors.
    from bmclip.kernels import _triton_utils as TU

    monkeypatch.setattr(TU, "is_interpreted", lambda kernel: False)
    q = torch.randn(1, 4, 1, 32)
    with pytest.raises(fa.FlashAttentionUnavailable, match="TRITON_INTERPRET"):
        flash_attention(q, q, q, backend="triton")


def test_bf16_under_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 4, 1, 32, dtype=torch.bfloat16)
    with pytest.raises(fa.FlashAttentionUnavailable, match="bfloat16"):
        flash_attention(q, q, q, backend="triton")


def test_xformers_missing_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers...` raise ImportError
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    q = torch.randn(1, 4, 1, 32)
    with pytest.raises(fa.FlashAttentionUnavailable, match="xformers is not installed"):
        flash_attention(q, q, q, backend="xformers")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(backend="flash"), "backend must be one of"),
        (dict(cu_seqlens=torch.tensor([0, 4], dtype=torch.int64)), "int32"),
        (dict(cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)), "end at total_tokens=4"),
        (dict(cu_seqlens=torch.tensor([0, 3, 2, 4], dtype=torch.int32)), "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([4], dtype=torch.int32)), "at least 2"),
        (dict(cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), max_seqlen=-1), "max_seqlen"),
        (dict(cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), softmax_scale=float("nan")), "softmax_scale"),
    ],
)
def test_bad_varlen_arguments_raise(kwargs, match):
    q = torch.randn(4, 1, 32)
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attention(q, q, q, **kwargs)


def test_bad_shapes_and_dtypes_raise():
    q = torch.randn(2, 4, 1, 32)
    with pytest.raises(ValueError, match="same shape"):
        flash_attention(q, q, q[:, :3])
    with pytest.raises(ValueError, match="share a dtype"):
        flash_attention(q, q, q.double())
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        flash_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match=r"\(batch, seqlen, nheads, headdim\)"):
        flash_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="max_seqlen is only meaningful"):
        flash_attention(q, q, q, max_seqlen=4)
    with pytest.raises(TypeError, match="causal"):
        flash_attention(q, q, q, causal=1)
    big = torch.randn(1, 4, 1, 256)
    with pytest.raises(ValueError, match="head dim 256"):
        flash_attention(big, big, big, backend="triton")


# --- GPU-only: fp16/bf16 at model-like sizes, the autotuned launch path, xformers when present -----------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_gpu_half_precision(dtype, causal, head_dim):
    lengths = LENGTHS + [1000, 4096, 513]
    cu = _cu(lengths, "cuda")
    q, k, v = _rand((cu[-1].item(), 4, head_dim), dtype, seed=head_dim)
    _check_against_reference(
        q, k, v, cu, causal,
        lambda a, b, c: flash_attention(a, b, c, cu_seqlens=cu, causal=causal, backend="triton"),
    )


@pytest.mark.gpu
def test_gpu_vit_shape_padded_bf16():
    q, k, v = _rand((8 * 197, 12, 64), torch.bfloat16, seed=0)
    _check_against_reference(
        q, k, v, _cu([197] * 8, "cuda"), False,
        lambda a, b, c: flash_attention(a, b, c, backend="triton"), padded_shape=(8, 197, 12, 64),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_gpu_atomic_dq_bf16(monkeypatch, layout):
    # The 5-matmul backward, compiled, at the ViT shape (padded 197) and on captions around block boundaries.
    monkeypatch.setattr(fa, "_BWD_DQ_MODE", "atomic")
    if layout == "padded":
        q, k, v = _rand((8 * 197, 12, 64), torch.bfloat16, seed=2)
        _check_against_reference(q, k, v, _cu([197] * 8, "cuda"), False,
                                 lambda a, b, c: flash_attention(a, b, c, backend="triton"),
                                 padded_shape=(8, 197, 12, 64))
    else:
        cu = _cu(BOUNDARY_LENGTHS * 3, "cuda")
        q, k, v = _rand((cu[-1].item(), 12, 64), torch.bfloat16, seed=3)
        _check_against_reference(q, k, v, cu, False,
                                 lambda a, b, c: flash_attention(a, b, c, cu_seqlens=cu, backend="triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_xformers_matches_triton(causal):
    pytest.importorskip("xformers.ops")
    cu = _cu(LENGTHS, "cuda")
    q, k, v = _rand((cu[-1].item(), 4, 64), torch.float16, seed=1)
    _check_against_reference(
        q, k, v, cu, causal,
        lambda a, b, c: flash_attention(a, b, c, cu_seqlens=cu, causal=causal, backend="xformers"),
        backend="xformers",
    )


@pytest.mark.slow
def test_bench_attention_quick_smoke(tmp_path):
    # The GPU benchmark's CPU smoke mode runs end to end and writes its JSON (no timing is asserted).
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--sections", "vit,text_tower", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    methods = {(r["section"], r["method"]) for r in result["rows"] if "skipped" not in r}
    assert {("vit", "triton"), ("text_tower", "triton_unpadded"), ("text_tower", "sdpa_padded_to_context")} <= methods
    assert bench.attn_flops([3, 5], heads=2, head_dim=8) == 4 * 2 * 8 * (9 + 25)


def test_fp32_autotune_keeps_small_tiles_only():
    """fp32 launches on a GPU tune over <= 64x32 tiles, 2 stages; half precision keeps every config."""
    if not hasattr(fat, "_FWD_TUNED"):
        pytest.skip("Triton is not importable here")
    for tuned in (fat._FWD_TUNED, fat._DKDV_TUNED, fat._DKDV_ATOMIC_TUNED, fat._DQ_TUNED):
        cfgs = tuned.configs
        assert fat._prune_fp32_configs(cfgs, {"Q": torch.empty(1, dtype=torch.bfloat16)}) == cfgs
        assert fat._prune_fp32_configs(cfgs, {"Q": torch.empty(1, dtype=torch.float16)}) == cfgs
        small = fat._prune_fp32_configs(cfgs, {"Q": torch.empty(1, dtype=torch.float32)})
        assert small and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 2048 and c.num_stages <= 2 for c in small)


def test_atomic_dq_autotune_keeps_warpgroup_tiles_for_16_bit_inputs():
    """The atomic-dQ dK/dV kernel multiplies dS (BLOCK_M rows) by K: 16-bit inputs tune only BLOCK_M >= 64 (a
    32-row product compiles to mma.sync on sm_90), fp32 inputs keep their small tiles."""
    if not hasattr(fat, "_DKDV_ATOMIC_TUNED"):
        pytest.skip("Triton is not importable here")
    tuned = fat._DKDV_ATOMIC_TUNED
    assert any(c.kwargs["BLOCK_M"] < 64 for c in tuned.configs)  # the list itself is shared with the separate mode
    for dt in (torch.bfloat16, torch.float16):
        kept = tuned.early_config_prune(tuned.configs, {"Q": torch.empty(1, dtype=dt)}, HEAD_DIM=64)
        assert kept and all(c.kwargs["BLOCK_M"] >= 64 for c in kept)
    fp32 = tuned.early_config_prune(tuned.configs, {"Q": torch.empty(1, dtype=torch.float32)}, HEAD_DIM=64)
    assert fp32 and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 2048 for c in fp32)
    # the separate mode's dK/dV kernel has no dQ product there: it keeps the 32-row tile
    sep = fat._DKDV_TUNED.early_config_prune(fat._DKDV_TUNED.configs, {"Q": torch.empty(1, dtype=torch.bfloat16)},
                                             HEAD_DIM=64)
    assert any(c.kwargs["BLOCK_M"] < 64 for c in sep)


def test_backward_autotune_drops_spilling_configs_above_head_dim_64():
    """Configs that spill registers at head dim 128 (sm_90 ptxas) are tuned for head dims <= 64 only."""
    if not hasattr(fat, "_DKDV_TUNED"):
        pytest.skip("Triton is not importable here")
    bf16 = {"Q": torch.empty(1, dtype=torch.bfloat16)}
    for kernel, tuned in (("dkdv", fat._DKDV_TUNED), ("dkdv", fat._DKDV_ATOMIC_TUNED), ("dq", fat._DQ_TUNED)):
        prune = tuned.early_config_prune
        at64 = tuned.configs if tuned is not fat._DKDV_ATOMIC_TUNED else \
            [c for c in tuned.configs if c.kwargs["BLOCK_M"] >= 64]
        assert prune(tuned.configs, bf16, HEAD_DIM=64) == at64
        kept = [fat._entry(c) for c in prune(tuned.configs, bf16, HEAD_DIM=128)]
        assert kept and not set(kept) & fat._HD64_ONLY[kernel]
