"""GradCache accumulation keeps the loss global: its gradients equal one big forward/backward."""

import pytest
import torch
from bmclip.kernels import ClipLoss, SigLipLoss

from bmclip.model import create_model
from bmclip.train.gradcache import forward_backward


def _model(patch_dropout=0.0, bias=None):
    torch.manual_seed(0)
    kw = {"init_logit_bias": bias} if bias is not None else {}
    m = create_model("tiny", vision={"patch_dropout": patch_dropout}, **kw).double().train()
    return m


def _batch(b=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 3, 64, 64, generator=g, dtype=torch.float64)
    ids = torch.randint(1, 4000, (b, 64), generator=g)
    ids[:, 10:] = 0  # padded captions
    return x, ids


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _forward_batch_sizes(m):
    """List filled with the batch size of every model forward (the chunked path must really run in chunks:
    a full-batch forward gives the same loss and gradients, so equality alone cannot tell)."""
    sizes = []
    m.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    return sizes


def _loss_fn(kind):
    if kind == "clip":
        lf = ClipLoss()
        return lambda i, t, s, b: lf(i, t, s)
    lf = SigLipLoss()
    return lambda i, t, s, b: lf(i, t, s, b)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gradcache_equals_full_batch(kind):
    # fp64 so that the comparison is about the algorithm, not float summation order.
    x, ids = _batch()
    loss_fn = _loss_fn(kind)
    m = _model(bias=-10.0 if kind == "siglip" else None)
    sizes = _forward_batch_sizes(m)
    full = forward_backward(m, x, ids, loss_fn, chunks=1)
    g_full = _grads(m)
    m.zero_grad(set_to_none=True)
    assert sizes == [8]
    sizes.clear()
    cached = forward_backward(m, x, ids, loss_fn, chunks=4)
    g_cached = _grads(m)
    assert sizes == [2] * 8  # 4 chunks without grad, then each replayed with grad
    torch.testing.assert_close(cached, full, rtol=1e-10, atol=1e-12)
    assert set(g_cached) == set(g_full) and "logit_scale" in g_full
    if kind == "siglip":
        assert "logit_bias" in g_full
    for n in g_full:
        torch.testing.assert_close(g_cached[n], g_full[n], rtol=1e-8, atol=1e-10, msg=n)
    # ... and NOT what naive per-chunk loss accumulation gives (fewer negatives): the test can fail.
    m.zero_grad(set_to_none=True)
    for xc, ic in zip(x.chunk(4), ids.chunk(4)):
        forward_backward(m, xc, ic, lambda i, t, s, b: loss_fn(i, t, s, b) / 4, chunks=1)
    assert not torch.allclose(_grads(m)["visual.proj.weight"], g_full["visual.proj.weight"], rtol=1e-3)


def test_gradcache_replays_patch_dropout_rng():
    # Reference: every chunk forwarded WITH grad in sequence (same RNG stream), global loss, one backward.
    x, ids = _batch()
    loss_fn = _loss_fn("clip")
    m = _model(patch_dropout=0.5)
    torch.manual_seed(123)
    fi, ft = [], []
    for xc, ic in zip(x.chunk(2), ids.chunk(2)):
        o = m(xc, ic)
        fi.append(o["image_features"])
        ft.append(o["text_features"])
    ref_loss = loss_fn(torch.cat(fi).float(), torch.cat(ft).float(), o["logit_scale"].float(), None)
    ref_loss.backward()
    g_ref = _grads(m)
    after_ref = torch.rand(1)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    sizes = _forward_batch_sizes(m)
    loss = forward_backward(m, x, ids, loss_fn, chunks=2)
    assert sizes == [4] * 4
    assert torch.rand(1) == after_ref  # the RNG stream advanced exactly as in the reference
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)
    for n in g_ref:
        torch.testing.assert_close(_grads(m)[n], g_ref[n], rtol=1e-8, atol=1e-10, msg=n)


def test_nan_injection_and_chunk_divisibility():
    x, ids = _batch(6)
    m = _model()
    loss = forward_backward(m, x, ids, _loss_fn("clip"), chunks=3, inject_nan=True)
    assert torch.isnan(loss)
    with pytest.raises(ValueError, match="divisible"):
        forward_backward(m, x, ids, _loss_fn("clip"), chunks=4)


@pytest.mark.parametrize("chunks", [1, 2])
def test_features_reach_the_loss_in_the_autocast_dtype(chunks):
    # Under bf16 autocast the loss gets bf16 features (its GEMMs then run on tensor cores, as open_clip's do
    # under autocast) and an fp32 logit scale/bias; without autocast it gets fp32. Both paths of
    # forward_backward, and the bf16 step really trains (finite, close to the fp32 step's loss and gradients).
    x, ids = _batch()
    x = x.float()
    seen = []
    lf = SigLipLoss(backend="torch")

    def loss_fn(i, t, s, b):
        seen.append((i.dtype, t.dtype, s.dtype, None if b is None else b.dtype))
        return lf(i, t, s, b)

    results = {}
    for name, autocast in (("fp32", None), ("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
        m = _model(bias=-10.0).float()
        seen.clear()
        kw = {} if autocast is None else {"autocast": autocast}
        loss = forward_backward(m, x, ids, loss_fn, chunks=chunks, **kw)
        want = torch.float32 if name == "fp32" else torch.bfloat16
        assert seen == [(want, want, torch.float32, torch.float32)]
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        results[name] = (loss, _grads(m))
    (l32, g32), (l16, g16) = results["fp32"], results["bf16"]
    assert l16.item() == pytest.approx(l32.item(), rel=3e-2)
    w32, w16 = g32["visual.proj.weight"], g16["visual.proj.weight"]
    assert w16.dtype == torch.float32 and torch.isfinite(w16).all()
    assert (w16 - w32).norm() <= 0.1 * w32.norm()
