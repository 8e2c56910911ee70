"""Flash backends in the model: unpadded Triton text tower == padded SDPA tower; ViT Triton == ViT SDPA.

Both sides run in fp32 on the same parameters (the Triton side under TRITON_INTERPRET=1 on CPU), so they
must agree to fp32 rounding: outputs and every parameter gradient. The padded SDPA tower is A's reference
implementation (bmclip.model.bert); the unpadded one shares its modules (no parameter is renamed).
"""

from __future__ import annotations

import copy

import pytest
import torch

from bmclip.errors import ConfigError
from bmclip.model.attention import attention
from bmclip.model.bert import BertTextEncoder
from bmclip.model.config import TextConfig, VisionConfig
from bmclip.model.unpad import (
    bert_tokens_unpadded,
    cls_of_packed,
    pack_padding_mask,
    register_flash_backends,
    unpack,
)
from bmclip.model.vit import VisionTransformer

register_flash_backends()  # idempotent; the model package also does it on import once wired

# Captions of mixed length padded to the context length (pad id 0): a [CLS]-only caption, short ones,
# one filling the context exactly. Lengths straddle the interpreter's 64-token blocks.
CAPTION_LENGTHS = [1, 2, 9, 17, 40, 64, 70]
CONTEXT = 80


def _text_cfg(**kw) -> TextConfig:
    base = dict(vocab_size=300, width=64, layers=2, heads=2, mlp_dim=128, max_positions=128,
                context_length=CONTEXT, proj_hidden=48)
    base.update(kw)
    return TextConfig(**base)


def _captions(lengths, context, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=gen)
    return ids


@pytest.fixture
def triton_runs(monkeypatch):
    """Runs of the Triton flash-attention autograd Function, appended as they happen. The SDPA path gives the
    same numbers, so without this count an attn_backend="triton" that quietly ran SDPA would pass every check."""
    import importlib

    fa = importlib.import_module("bmclip.kernels.flash_attention")
    calls = []
    real = fa._TritonFlashAttention.apply
    monkeypatch.setattr(fa._TritonFlashAttention, "apply", staticmethod(lambda *a: calls.append(1) or real(*a)))
    return calls


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same_grads(a, b, atol=2e-5, rtol=1e-4):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def test_pack_padding_mask_and_unpack_roundtrip():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    packed = pack_padding_mask(mask)
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [0, 2, 5, 9]
    assert packed.indices.tolist() == [0, 1, 4, 6, 7, 8, 9, 10, 11]
    assert packed.max_seqlen == 4
    x = torch.arange(12.0).view(3, 4, 1)
    back = unpack(x.flatten(0, 1).index_select(0, packed.indices), packed)
    torch.testing.assert_close(back, torch.where(mask[..., None], x, torch.zeros_like(x)))
    with pytest.raises(ConfigError, match="bool"):
        pack_padding_mask(mask.long())


@pytest.mark.slow
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_unpadded_triton_text_tower_equals_padded_sdpa(grad_checkpointing, triton_runs):
    torch.manual_seed(0)
    enc = BertTextEncoder(_text_cfg(), embed_dim=32, backend="sdpa").train()  # dropout 0: train == eval
    enc.grad_checkpointing = grad_checkpointing
    ids = _captions(CAPTION_LENGTHS, CONTEXT, 300)

    ref = enc(ids)
    ref.square().sum().backward()
    ref_grads = _grads(enc)
    assert triton_runs == []

    enc_t = copy.deepcopy(enc)
    enc_t.zero_grad(set_to_none=True)
    mask = ids != 0
    mask[:, 0] = True
    x, packed = bert_tokens_unpadded(enc_t, ids, mask, "triton")
    assert x.shape == (sum(CAPTION_LENGTHS), 64)  # no padding token was computed
    out = enc_t.proj(cls_of_packed(x, packed))
    out.square().sum().backward()
    assert len(triton_runs) >= 2  # both layers (checkpointing re-runs them in backward)

    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    _assert_same_grads(_grads(enc_t), ref_grads)


def test_unpadded_tokens_equal_padded_real_rows(triton_runs):
    # Every real token's hidden state (not only [CLS]) matches the padded tower, including a caption with a
    # pad id in the middle (packing follows the mask, positions stay the original columns).
    torch.manual_seed(1)
    enc = BertTextEncoder(_text_cfg(layers=1), embed_dim=32).eval()
    enc.trim_padding = False
    ids = _captions([5, 30, 80], CONTEXT, 300, seed=2)
    ids[1, 10] = 0
    with torch.no_grad():
        ref = enc.forward_tokens(ids)
        mask = ids != 0
        mask[:, 0] = True
        x, packed = bert_tokens_unpadded(enc, ids, mask, "triton")
    got = unpack(x, packed)
    assert len(triton_runs) == 1
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-5, rtol=1e-4)


def test_switch_with_padding_mask_matches_sdpa_on_real_rows(triton_runs):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 2, 21, 32, generator=gen, requires_grad=True) for _ in range(3))
    mask = torch.ones(3, 21, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 17:] = False
    ref = attention(q, k, v, backend="sdpa", key_padding_mask=mask)
    got = attention(q, k, v, backend="triton", key_padding_mask=mask)
    assert len(triton_runs) == 1
    real = mask[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)
    assert (got[~real] == 0).all()


def _vit_cfg() -> VisionConfig:
    # 32x32 images, 8x8 patches: 16 patches + CLS = 17 tokens (not a block multiple); head dim 32.
    return VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_dim=128)


def test_vit_triton_equals_vit_sdpa(triton_runs):
    torch.manual_seed(0)
    vit = VisionTransformer(_vit_cfg(), embed_dim=32, backend="sdpa")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ref = vit(images)
    ref.square().sum().backward()
    ref_grads = _grads(vit)

    vit_t = copy.deepcopy(vit)
    vit_t.zero_grad(set_to_none=True)
    for blk in vit_t.blocks:
        blk.attn.attn_backend = "triton"
    assert triton_runs == []
    out = vit_t(images)
    out.square().sum().backward()
    assert len(triton_runs) == 2  # one per block
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    _assert_same_grads(_grads(vit_t), ref_grads)
    assert list(dict(vit_t.named_parameters())) == list(dict(vit.named_parameters()))


def test_flash_backends_refuse_attention_dropout_and_unavailable_xformers(monkeypatch):
    q = torch.randn(1, 2, 5, 32)
    with pytest.raises(ConfigError, match="dropout"):
        attention(q, q, q, backend="triton", dropout_p=0.1)
    import sys

    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with pytest.raises(ConfigError, match="xformers"):
        attention(q, q, q, backend="xformers")
    from bmclip.kernels import _triton_utils as TU

    monkeypatch.setattr(TU, "is_interpreted", lambda kernel: False)  # GPU-compiled kernels, CPU tensors
    with pytest.raises(ConfigError, match="triton"):
        attention(q, q, q, backend="triton")


@pytest.mark.slow
def test_model_switch_runs_text_unpadded_and_keeps_checkpoints_interchangeable(monkeypatch, triton_runs):
    # Through the public model API: set_attn_backend("triton") must (a) keep every parameter name, (b) make
    # encode_text run the packed path, (c) give the padded SDPA model's features and gradients.
    from bmclip.model import create_model
    from bmclip.model import unpad as unpad_mod

    torch.manual_seed(0)
    model = create_model("tiny", text={"context_length": CONTEXT, "max_positions": CONTEXT})
    ids = _captions([1, 3, 20, 64, 80], CONTEXT, 4096, seed=9)
    ref = model.encode_text(ids)
    ref.sum().backward()
    ref_grads = _grads(model.text)

    model_t = copy.deepcopy(model)
    model_t.zero_grad(set_to_none=True)
    model_t.set_attn_backend("triton")
    assert model_t.state_dict().keys() == model.state_dict().keys()
    calls = []
    real = unpad_mod.bert_tokens_unpadded
    monkeypatch.setattr("bmclip.model.bert.bert_tokens_unpadded",
                        lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    assert triton_runs == []
    out = model_t.encode_text(ids)
    out.sum().backward()
    assert calls == ["triton"] and len(triton_runs) == model_t.config.text.layers
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    _assert_same_grads(_grads(model_t.text), ref_grads)
    # A checkpoint saved under one backend loads into a model built for the other.
    fresh = create_model("tiny", attn_backend="triton", text={"context_length": CONTEXT, "max_positions": CONTEXT})
    fresh.load_state_dict(model.state_dict())


@pytest.mark.gpu
def test_gpu_bf16_unpadded_text_tower_as_accurate_as_padded_sdpa():
    # Under bf16 autocast on a GPU, the unpadded Triton tower must be about as close to the fp32 padded
    # SDPA tower as the bf16 padded SDPA tower is (flash-attn's 2x rule, applied to the whole tower).
    torch.manual_seed(0)
    cfg = _text_cfg(width=256, heads=4, mlp_dim=1024, layers=4, context_length=256, max_positions=256)
    enc = BertTextEncoder(cfg, embed_dim=64).cuda().eval()
    ids = _captions([1, 5, 37, 64, 99, 128, 200, 256] * 4, 256, 300, seed=3).cuda()
    with torch.no_grad():
        enc.trim_padding = False
        ref = enc(ids).double()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            sdpa_bf16 = enc(ids).double()
            for layer in enc.layers:
                layer.attn.attn_backend = "triton"
            triton_bf16 = enc(ids).double()
    err_sdpa = (sdpa_bf16 - ref).abs().max().item()
    err_triton = (triton_bf16 - ref).abs().max().item()
    assert err_triton <= 2 * err_sdpa + 1e-3, (err_triton, err_sdpa)
