"""Fused LayerNorm (+ residual) and bias-GELU kernels (kernels/fused_ops.py) against float64 torch.

Accuracy rule (flash-attn's, as in test_flash_attention.py): for the output and every gradient, the kernel's
max error vs float64 must be at most twice the error of plain torch run in the kernel's precision, plus a
floor of FLOOR_ULPS fp32 ulps of the reference's magnitude (absorbs fp32 rounding noise when both errors are
a few ulps; negligible for fp16). A wrong formula, mask or partial-sum reduction gives errors of order 1e-2..1.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py). Also: the fused_ops switch of the model
(tiny preset, fp32): outputs and gradients equal the unfused model, parameter names unchanged.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

fo = importlib.import_module("bmclip.kernels.fused_ops")
fot = importlib.import_module("bmclip.kernels.fused_ops_triton")  # kernels, launch shapes

WIDTHS = [1, 7, 64, 768, 1000]
ROWS = [1, 3, 129]
FLOOR_ULPS = 64.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(fn, inputs, douts):
    """Outputs and input grads of fn on fresh leaf copies; douts weight each output (None = unused)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.to(d.dtype) * d).sum() for o, d in zip(outs, douts) if d is not None)
    loss.backward()
    return [o.detach() for o in outs], [t.grad if t is not None else None for t in leaves]


def _check(names, ref, same, ker, dtypes):
    eps32 = torch.finfo(torch.float32).eps
    for name, r, s, k, dt in zip(names, ref, same, ker, dtypes):
        assert k is not None and k.shape == r.shape, name
        assert k.dtype == dt, f"{name}: dtype {k.dtype}, expected {dt}"
        assert torch.isfinite(k).all(), f"{name}: non-finite values"
        err_ker = (k.double() - r).abs().max().item()
        err_same = (s.double() - r).abs().max().item()
        floor = FLOOR_ULPS * eps32 * max(r.abs().max().item(), 1e-30)
        assert err_ker <= 2 * err_same + floor, (
            f"{name}: kernel error {err_ker:.3e} > 2 x torch error {err_same:.3e} + {floor:.1e}"
        )


def _ln_inputs(rows, width, dtype, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * 2 + 0.5  # a non-zero mean, so centring matters
    r = torch.randn(rows, width, generator=g) if residual else None
    w = 1 + 0.1 * torch.randn(width, generator=g)
    b = 0.1 * torch.randn(width, generator=g)
    dy = torch.randn(rows, width, generator=g)
    ds = torch.randn(rows, width, generator=g) if residual else None
    cast = lambda t: t.to(DEVICE, dtype) if t is not None else None
    return [cast(x), cast(r), cast(w), cast(b)], [cast(dy), cast(ds)]


@contextlib.contextmanager
def _count_kernel_calls():
    """{fo function name: calls} of the two autograd Functions that launch the fused Triton kernels."""
    calls = {"_ln_apply": 0, "_bias_gelu_apply": 0}
    with pytest.MonkeyPatch.context() as mp:
        for name in calls:
            real = getattr(fo, name)

            def spy(*a, _real=real, _name=name):
                calls[_name] += 1
                return _real(*a)

            mp.setattr(fo, name, spy)
        yield calls


def _kernel_path_runs(backend, name):
    """Calls fo.layer_norm / fo.bias_gelu through ``call()``, asserting that the autograd Function launching the
    Triton kernels (fo.<name>) ran iff backend is "triton": the torch backend also meets the 2x rule, so a
    Triton request that quietly computed with torch would pass every comparison."""

    def run(call):
        with _count_kernel_calls() as calls:
            out = call()
        assert calls[name] == (1 if backend == "triton" else 0), (backend, name, calls)
        return out

    return run


def _ln_fn(backend, eps=1e-5):
    def fn(x, r, w, b):
        return _kernel_path_runs(backend, "_ln_apply")(lambda: fo.layer_norm(x, w, b, eps, residual=r, backend=backend))

    return fn


def _check_layer_norm(inputs, douts, dtype, residual):
    """Triton layer_norm vs float64 torch (flash-attn's 2x rule against same-precision torch); outputs of
    the kernel and of same-precision torch."""
    ref_o, ref_g = _run(_ln_fn("torch"), [t.double() if t is not None else None for t in inputs],
                        [d.double() if d is not None else None for d in douts])
    same_o, same_g = _run(_ln_fn("torch"), inputs, douts)
    ker_o, ker_g = _run(_ln_fn("triton"), inputs, douts)
    names = ["y"] + (["s"] if residual else []) + ["dx"] + (["dres"] if residual else []) + ["dw", "db"]
    pick = lambda o, g: o + [t for t in g if t is not None]
    _check(names, pick(ref_o, ref_g), pick(same_o, same_g), pick(ker_o, ker_g), [dtype] * len(names))
    return ker_o, same_o


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_layer_norm_matches_float64(width, rows, dtype, residual):
    inputs, douts = _ln_inputs(rows, width, dtype, residual, seed=width * 1000 + rows)
    ker_o, same_o = _check_layer_norm(inputs, douts, dtype, residual)
    if residual:  # the sum is the rounded x + r, exactly as torch computes it
        assert torch.equal(ker_o[1], same_o[1])


def _gelu_inputs(rows, width, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * 3  # tails out to |z| ~ 10: erf saturation, tanh clamp
    b = 0.5 * torch.randn(width, generator=g)
    dy = torch.randn(rows, width, generator=g)
    return [x.to(DEVICE, dtype), b.to(DEVICE, dtype)], [dy.to(DEVICE, dtype)]


def _gelu_fn(backend, approximate):
    return lambda x, b: _kernel_path_runs(backend, "_bias_gelu_apply")(
        lambda: fo.bias_gelu(x, b, approximate=approximate, backend=backend))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_bias_gelu_matches_float64(width, rows, dtype, approximate):
    inputs, douts = _gelu_inputs(rows, width, dtype, seed=width * 1000 + rows)
    ref_o, ref_g = _run(_gelu_fn("torch", approximate), [t.double() for t in inputs], [douts[0].double()])
    same_o, same_g = _run(_gelu_fn("torch", approximate), inputs, douts)
    ker_o, ker_g = _run(_gelu_fn("triton", approximate), inputs, douts)
    _check(["y", "dx", "db"], ref_o + ref_g, same_o + same_g, ker_o + ker_g, [dtype] * 3)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_pointwise_accuracy_fp32(approximate):
    """GELU and its derivative on a dense grid over [-12, 12]: within a few fp32 ulps of float64.

    Exact GELU goes through tl.math.erf (math.erf under the interpreter, libdevice erff on the GPU); this
    pins that no low-accuracy erf (e.g. Abramowitz-Stegun 7.1.26, ~1e-7 relative to erf, far worse near 0
    in relative terms) sneaks in.
    """
    z = torch.linspace(-12, 12, 24001, dtype=torch.float32, device=DEVICE).reshape(1, -1)
    zero = torch.zeros(z.shape[1], device=DEVICE)
    zl = z.detach().clone().requires_grad_(True)
    y = fo.bias_gelu(zl, zero, approximate=approximate, backend="triton")
    y.backward(torch.ones_like(y))
    z64 = z.double().requires_grad_(True)
    y64 = F.gelu(z64, approximate=approximate)
    y64.backward(torch.ones_like(y64))
    err_y = (y.detach().double() - y64.detach()).abs()
    err_d = (zl.grad.double() - z64.grad).abs()
    eps32 = torch.finfo(torch.float32).eps
    # Absolute error bound of ~4 ulps of max(|y|, 1): 1e-7-class near zero, ulp-scaled in the linear tail.
    assert (err_y <= 4 * eps32 * y64.detach().abs().clamp_min(1.0)).all(), err_y.max().item()
    assert (err_d <= 4 * eps32 * z64.grad.abs().clamp_min(1.0)).all(), err_d.max().item()


@pytest.mark.slow
def test_many_blocks_and_partial_sums(monkeypatch):
    """Tiny blocks: 129 row blocks, 3 backward programs each walking many of them, partial sums reduced."""
    monkeypatch.setattr(fot, "_INTERPRET_BLOCK_ELEMS", 64)
    monkeypatch.setattr(fot, "_INTERPRET_BWD_PROGRAMS", 3)
    inputs, douts = _ln_inputs(129, 100, torch.float32, True, seed=7)
    ref = _run(_ln_fn("torch"), [t.double() for t in inputs], [d.double() for d in douts])
    same = _run(_ln_fn("torch"), inputs, douts)
    ker = _run(_ln_fn("triton"), inputs, douts)
    flat = lambda r: r[0] + r[1]
    _check(["y", "s", "dx", "dres", "dw", "db"], flat(ref), flat(same), flat(ker), [torch.float32] * 6)
    inputs, douts = _gelu_inputs(129, 100, torch.float32, seed=8)
    ref = _run(_gelu_fn("torch", "none"), [t.double() for t in inputs], [douts[0].double()])
    same = _run(_gelu_fn("torch", "none"), inputs, douts)
    ker = _run(_gelu_fn("triton", "none"), inputs, douts)
    _check(["y", "dx", "db"], flat(ref), flat(same), flat(ker), [torch.float32] * 3)


def test_layer_norm_mixed_dtypes_like_autocast():
    """fp16 branch output + fp32 residual stream + fp32 parameters (what bf16 autocast hands the ViT block).

    y keeps x's dtype (fp16), the sum is fp32 (type promotion), the residual's grad fp32, dW/dB fp32.
    """
    g = torch.Generator().manual_seed(3)
    x = torch.randn(33, 768, generator=g).to(DEVICE, torch.float16)
    r = (torch.randn(33, 768, generator=g) * 4).to(DEVICE)
    w = (1 + 0.1 * torch.randn(768, generator=g)).to(DEVICE)
    b = (0.1 * torch.randn(768, generator=g)).to(DEVICE)
    dy = torch.randn(33, 768, generator=g).to(DEVICE, torch.float16)
    ds = torch.randn(33, 768, generator=g).to(DEVICE)
    ref = _run(_ln_fn("torch"), [x.double(), r.double(), w.double(), b.double()], [dy.double(), ds.double()])
    same = _run(_ln_fn("torch"), [x, r, w, b], [dy, ds])
    ker = _run(_ln_fn("triton"), [x, r, w, b], [dy, ds])
    flat = lambda res: res[0] + res[1]
    dtypes = [torch.float16, torch.float32, torch.float16, torch.float32, torch.float32, torch.float32]
    _check(["y", "s", "dx", "dres", "dw", "db"], flat(ref), flat(same), flat(ker), dtypes)
    # bias_gelu: fp16 activations with an fp32 bias -> fp16 output, fp32 bias grad.
    ref = _run(_gelu_fn("torch", "none"), [x.double(), b.double()], [dy.double()])
    same = _run(_gelu_fn("torch", "none"), [x, b], [dy])
    ker = _run(_gelu_fn("triton", "none"), [x, b], [dy])
    _check(["y", "dx", "db"], flat(ref), flat(same), flat(ker), [torch.float16, torch.float16, torch.float32])


def test_residual_grads_do_not_alias_across_backward_calls():
    """x and residual leaves get separate gradient tensors: a second backward must not double-count."""
    inputs, douts = _ln_inputs(5, 16, torch.float32, True, seed=11)
    got = []
    for backend in ("torch", "triton"):
        x, r, w, b = (t.detach().clone().requires_grad_(True) for t in inputs)
        y, s = fo.layer_norm(x, w, b, residual=r, backend=backend)
        (y * douts[0]).sum().backward(retain_graph=True)
        (s * douts[1]).sum().backward()
        got.append((x.grad.clone(), r.grad.clone()))
    for a, c in zip(got[0], got[1]):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_double_backward_raises():
    """The kernels' backward is not itself differentiable: create_graph + a second grad must raise."""
    x = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    w = torch.ones(16, device=DEVICE, requires_grad=True)
    for y in (fo.layer_norm(x, w, None, backend="triton"), fo.bias_gelu(x, w, backend="triton")):
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            g.sum().backward()


@pytest.mark.slow
def test_torch_compile_graph_breaks_around_the_kernels():
    """Inside torch.compile the Triton path runs eagerly (a graph break), with the same values and grads."""
    inputs, douts = _ln_inputs(5, 64, torch.float32, True, seed=4)

    def f(x, r, w, b):
        y, s = fo.layer_norm(x, w, b, residual=r, backend="triton")
        return fo.bias_gelu(2 * y, b, backend="triton"), s

    torch._dynamo.reset()
    compiled = _run(torch.compile(f, backend="aot_eager"), inputs, douts)
    plain = _run(f, inputs, douts)
    for a, c in zip(compiled[0] + compiled[1], plain[0] + plain[1]):
        assert torch.equal(a, c)


def test_shapes_strides_and_empty():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(64, 3, 48, generator=g).to(DEVICE)
    x = base.transpose(0, 1)  # (3, 64, 48), a non-contiguous view
    w, b = torch.randn(48, generator=g).to(DEVICE), torch.randn(48, generator=g).to(DEVICE)
    ker = fo.layer_norm(x, w, b, 1e-6, backend="triton")
    ref = F.layer_norm(x.double(), (48,), w.double(), b.double(), 1e-6)
    assert ker.shape == x.shape
    torch.testing.assert_close(ker.double(), ref, rtol=1e-5, atol=1e-5)
    # Gradient from .sum(): an expanded (stride 0) dY.
    xl = x.detach().clone().requires_grad_(True)
    fo.bias_gelu(xl, b, backend="triton").sum().backward()
    x64 = x.double().requires_grad_(True)
    F.gelu(x64 + b.double()).sum().backward()
    torch.testing.assert_close(xl.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    # No rows: empty outputs, zero parameter gradients.
    e = torch.zeros(0, 48, device=DEVICE, requires_grad=True)
    wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y, s = fo.layer_norm(e, wl, bl, residual=torch.zeros(0, 48, device=DEVICE), backend="triton")
    (y.sum() + s.sum()).backward()
    assert y.shape == (0, 48)
    assert torch.equal(wl.grad, torch.zeros_like(w)) and torch.equal(bl.grad, torch.zeros_like(b))
    y = fo.bias_gelu(e, bl, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 48)


def test_no_weight_or_bias():
    inputs, douts = _ln_inputs(9, 40, torch.float32, False, seed=2)
    x = inputs[0]
    for w, b in ((None, None), (inputs[2], None), (None, inputs[3])):
        ref = _run(lambda x, w, b: fo.layer_norm(x, w, b, backend="torch"),
                   [x.double(), *(t.double() if t is not None else None for t in (w, b))], [douts[0].double()])
        same = _run(lambda x, w, b: fo.layer_norm(x, w, b, backend="torch"), [x, w, b], douts[:1])
        ker = _run(lambda x, w, b: fo.layer_norm(x, w, b, backend="triton"), [x, w, b], douts[:1])
        keep = [i for i, t in enumerate(ref[1]) if t is not None]
        pick = lambda r, keep=keep: r[0] + [r[1][i] for i in keep]
        _check(["y", "dx", "dw", "db"][: 1 + len(keep)], pick(ref), pick(same), pick(ker),
               [torch.float32] * (1 + len(keep)))


def test_backend_selection_and_errors():
    x = torch.randn(4, 8)
    w, b = torch.ones(8), torch.zeros(8)
    # auto on CPU is plain torch (the interpreter is never chosen implicitly): bitwise F.layer_norm.
    assert torch.equal(fo.layer_norm(x, w, b, backend="auto"), F.layer_norm(x, (8,), w, b, 1e-5))
    assert torch.equal(fo.bias_gelu(x, b, backend="auto"), F.gelu(x + b))
    # float64 and rows wider than the kernel's limit: torch only; an explicit triton request raises.
    with pytest.raises(ValueError, match="float64"):
        fo.layer_norm(x.double(), w.double(), b.double(), backend="triton")
    wide = torch.randn(2, fo.MAX_LN_WIDTH + 1)
    with pytest.raises(ValueError, match="row width"):
        fo.layer_norm(wide, None, None, backend="triton")
    torch.testing.assert_close(fo.layer_norm(wide, None, None), F.layer_norm(wide, (wide.shape[1],)))
    # Tensors Triton cannot reach here (meta device): explicit triton raises, never falls back.
    meta = torch.empty(4, 8, device="meta")
    with pytest.raises(fo.FusedOpsUnavailable):
        fo.layer_norm(meta, None, None, backend="triton")
    with pytest.raises(fo.FusedOpsUnavailable):
        fo.bias_gelu(meta, torch.empty(8, device="meta"), backend="triton")
    bad = [
        (lambda: fo.layer_norm(x, torch.ones(7), b), "weight must have shape"),
        (lambda: fo.layer_norm(x, w, b, residual=torch.randn(4, 7)), "residual shape"),
        (lambda: fo.layer_norm(x, w, b, eps=0.0), "eps"),
        (lambda: fo.layer_norm(x, w, b, backend="cuda"), "backend must be one of"),
        (lambda: fo.layer_norm(x.long(), w, b), "float32"),
        (lambda: fo.layer_norm(torch.randn(4, 0), None, None), "non-empty last dimension"),
        (lambda: fo.bias_gelu(x, torch.zeros(7)), "bias must have shape"),
        (lambda: fo.bias_gelu(x, b, approximate="sigmoid"), "approximate"),
    ]
    for call, msg in bad:
        with pytest.raises(ValueError, match=msg):
            call()
    with pytest.raises(TypeError):
        fo.bias_gelu(x, [0.0] * 8)


# ----------------------------------------------------------------------------------------------- model


def _tiny_batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=g)
    ids = torch.randint(5, 4096, (3, 20), generator=g)
    ids[0, 9:] = 0  # mixed caption lengths: padding / packing paths differ per row
    ids[2, 15:] = 0
    return images, ids


@pytest.mark.slow
@pytest.mark.parametrize("attn_backend", ["sdpa", "triton"])
def test_model_fused_ops_equal_unfused(attn_backend):
    """Tiny model, fp32: fused_ops on == off for both towers' outputs and every parameter's gradient.

    attn_backend="triton" also runs the unpadded (packed-token) text tower through the fused ops.
    """
    from bmclip.model import create_model

    torch.manual_seed(0)
    model = create_model("tiny", attn_backend=attn_backend)
    with torch.no_grad():  # non-trivial LayerNorm parameters and biases, so every fused path matters
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.add_(0.05 * torch.randn_like(p))
    images, ids = _tiny_batch()
    keys = list(model.state_dict())
    results = []
    for fused in (False, True):
        model.set_fused_ops(fused)
        model.zero_grad(set_to_none=True)
        with _count_kernel_calls() as calls:
            out = model(images, ids)
        # equal outputs alone would also hold if the switch were ignored: the kernels ran iff fused
        assert (calls["_ln_apply"] > 0 and calls["_bias_gelu_apply"] > 0) if fused else not any(calls.values()), calls
        (out["image_features"].square().sum() + (out["image_features"] @ out["text_features"].T).sum()
         + out["text_features"].sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out["image_features"].detach(), out["text_features"].detach(), grads))
        assert list(model.state_dict()) == keys  # the switch never renames or adds parameters
    (img0, txt0, g0), (img1, txt1, g1) = results
    assert model.config.fused_ops is True
    torch.testing.assert_close(img1, img0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt1, txt0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys() and any("norm" in k for k in g0) and any("fc1.bias" in k for k in g0)
    for name in g0:
        scale = g0[name].abs().max().item() + 1e-6
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def _model_step(model, images, ids, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(images, ids)
    img, txt = out["image_features"].float(), out["text_features"].float()
    (img.sum() + 2 * (img @ txt.T).sum()).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return torch.cat([img.detach().flatten(), txt.detach().flatten()]), grads


@pytest.mark.slow
def test_model_fused_ops_under_bf16_autocast_as_accurate_as_unfused():
    """bf16 autocast (fp32 residual stream, bf16 branches: the mixed-dtype kernel paths), grad checkpointing on:
    the fused model's error vs the fp32 model is at most ~2x the unfused autocast model's (features and the
    relative norm of all gradients)."""
    from bmclip.model import create_model

    torch.manual_seed(1)
    model = create_model("tiny", grad_checkpointing=True).train()
    images, ids = _tiny_batch()
    ref_out, ref_g = _model_step(model, images, ids, autocast=False)
    errs = {}
    for fused in (False, True):
        model.set_fused_ops(fused)
        with _count_kernel_calls() as calls:
            out, g = _model_step(model, images, ids, autocast=True)
        assert (calls["_ln_apply"] > 0 and calls["_bias_gelu_apply"] > 0) if fused else not any(calls.values()), calls
        errs[fused] = ((out - ref_out).abs().max().item(), ((g - ref_g).norm() / ref_g.norm()).item())
    assert errs[False][0] > 0  # autocast really ran in bf16
    assert errs[True][0] <= 2 * errs[False][0] + 1e-3, errs
    assert errs[True][1] <= 2 * errs[False][1] + 1e-3, errs


def test_model_fused_ops_config_and_errors():
    from bmclip.errors import ConfigError
    from bmclip.model import ModelConfig, create_model

    cfg = ModelConfig.from_dict({**create_model("tiny").config.to_dict(), "fused_ops": True})
    assert cfg.fused_ops is True
    with pytest.raises(ConfigError, match="fused_ops"):
        ModelConfig.from_dict({**cfg.to_dict(), "fused_ops": "yes"})
    model = create_model("tiny", fused_ops=True)
    assert all(m.fused_ops for m in model.modules() if hasattr(m, "fused_ops"))
    # Where Triton cannot run (here: meta tensors), the explicit switch is a clean ConfigError.
    model = model.to("meta")
    with pytest.raises(ConfigError, match="fused_ops=True"):
        model.encode_image(torch.empty(1, 3, 64, 64, device="meta"))


# --------------------------------------------------------------------------------- compiled path (no GPU)

_AOT_SCRIPT = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print("SKIP", exc)
    sys.exit(0)
from bmclip.kernels import fused_ops_triton as fo

def build(fn, types, consts, warps):
    sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps})
    assert "ptx" in k.asm and "cubin" in k.asm
    print("OK", fn.__name__, consts, flush=True)

i32 = lambda *names: {n: "i32" for n in names}
for dt, rdt in (("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")):
    for n in (768, 8192):
        bn = fo._pow2(n)
        bm, w = fo._row_blocks(1 << 20, bn, False, False)
        for res in (False, True):
            t = {"X": "*" + dt, "R": "*" + rdt, "W": "*fp32", "B": "*fp32", "Y": "*" + dt, "S": "*" + rdt,
                 "MEAN": "*fp32", "RSTD": "*fp32", "eps": "fp32", **i32("M", "N", "stride_x", "stride_r",
                                                                        "stride_y", "stride_s")}
            build(fo._ln_fwd_kernel, t, dict(BLOCK_M=bm, BLOCK_N=bn, HAS_RES=res, HAS_W=True, HAS_B=True), w)
        bm, w = fo._row_blocks(1 << 20, bn, False, True)
        for res in (False, True):
            t = {"DY": "*" + dt, "DS": "*" + rdt, "S": "*" + (rdt if res else dt), "W": "*fp32", "MEAN": "*fp32",
                 "RSTD": "*fp32", "DX": "*" + dt, "DR": "*" + rdt, "DW_PART": "*fp32", "DB_PART": "*fp32",
                 **i32("M", "N", "stride_dy", "stride_ds", "stride_s", "stride_dx", "stride_dr")}
            build(fo._ln_bwd_kernel, t, dict(BLOCK_M=bm, BLOCK_N=bn, HAS_DS=res, HAS_DR=res, HAS_W=True,
                                             HAS_DW=True, HAS_DB=True), w)
    for approx in (False, True):
        bm, bn, w = fo._gelu_blocks(1 << 20, 3072, False, False)
        t = {"X": "*" + dt, "B": "*fp32", "Y": "*" + dt, **i32("M", "N", "stride_x", "stride_y")}
        build(fo._bias_gelu_fwd_kernel, t, dict(BLOCK_M=bm, BLOCK_N=bn, APPROX_TANH=approx), w)
        bm, bn, w = fo._gelu_blocks(1 << 20, 3072, False, True)
        t = {"DY": "*" + dt, "X": "*" + dt, "B": "*fp32", "DX": "*" + dt, "DB_PART": "*fp32",
             **i32("M", "N", "stride_dy", "stride_x", "stride_dx")}
        build(fo._bias_gelu_bwd_kernel, t, dict(BLOCK_M=bm, BLOCK_N=bn, APPROX_TANH=approx, HAS_DB=True), w)
"""


@pytest.mark.slow  # 36 ahead-of-time compiles with ptxas: ~30 s on 2 busy cores
def test_kernels_compile_for_sm90():
    """The interpreter never runs Triton's compiler: build the GPU code (sm_90 cubins, no GPU needed) for the
    launch shapes the heuristics pick (ViT/BERT width 768, the 8192 maximum, MLP 3072), bf16 with an fp32
    residual stream (autocast), fp16 and fp32, so type/layout/resource errors show up in CPU CI."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    if res.stdout.startswith("SKIP"):
        pytest.skip(f"this Triton has no AOT API: {res.stdout.strip()}")
    assert res.stdout.count("OK") == 36, res.stdout


# ------------------------------------------------------------------------------------------- GPU (bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("width", [768, 1000, 8192])
def test_gpu_bf16_layer_norm(width, residual):
    inputs, douts = _ln_inputs(2048, width, torch.bfloat16, residual, seed=width)
    _check_layer_norm(inputs, douts, torch.bfloat16, residual)


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("width", [768, 3072, 1000])
def test_gpu_bf16_bias_gelu(width, approximate):
    inputs, douts = _gelu_inputs(4096, width, torch.bfloat16, seed=width)
    ref_o, ref_g = _run(_gelu_fn("torch", approximate), [t.double() for t in inputs], [douts[0].double()])
    same_o, same_g = _run(_gelu_fn("torch", approximate), inputs, douts)
    ker_o, ker_g = _run(_gelu_fn("triton", approximate), inputs, douts)
    _check(["y", "dx", "db"], ref_o + ref_g, same_o + same_g, ker_o + ker_g, [torch.bfloat16] * 3)


@pytest.mark.gpu
def test_gpu_fp32_gelu_pointwise_accuracy_compiled():
    """libdevice erff on the GPU: the compiled kernel meets the same few-ulp bound as the interpreter."""
    test_gelu_pointwise_accuracy_fp32("none")
    test_gelu_pointwise_accuracy_fp32("tanh")


def test_bench_refuses_to_run_without_cuda(capsys):
    """benchmarks/bench_fused_ops.py never times the interpreter: without CUDA it exits 2 and says why."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the benchmark would really run")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_fused_ops.py"
    spec = importlib.util.spec_from_file_location("bench_fused_ops", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--shapes", "vit"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
