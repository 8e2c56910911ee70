"""Native BiomedCLIP model: configs, shapes, padding invariance, gradients, checkpointing, patch dropout."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from bmclip.errors import ConfigError, DataError
from bmclip.model import (
    IMAGE_MEAN,
    IMAGE_STD,
    ModelConfig,
    attention,
    create_model,
    get_preset,
    list_presets,
)


def _tiny(**kw):
    torch.manual_seed(0)
    return create_model("tiny", **kw)


def _batch(model, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = model.config.vision.image_size
    images = torch.randn(b, 3, s, s, generator=g)
    ctx = model.config.text.context_length
    ids = torch.randint(5, model.config.text.vocab_size, (b, ctx), generator=g)
    lengths = [ctx, 9, 17][:b] + [5] * max(0, b - 3)
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
    ids[:, 0] = 2  # a [CLS]-like first token
    return images, ids


def test_presets_and_roundtrip():
    assert set(list_presets()) >= {
        "biomedclip-vit-b16-224",
        "biomedclip-vit-b16-384",
        "biomedclip-vit-s16-224",
        "biomedclip-vit-m16-224",
        "tiny",
    }
    for name in list_presets():
        cfg = get_preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    s = get_preset("biomedclip-vit-s16-224")
    assert (s.vision.width, s.vision.heads) == (384, 6)
    m = get_preset("biomedclip-vit-m16-224")
    assert (m.vision.width, m.vision.heads) == (512, 8)
    assert get_preset("biomedclip-vit-b16-384").vision.image_size == 384
    b = get_preset("biomedclip-vit-b16-224")
    assert b.text.context_length == 256 and b.text.proj_hidden == 640 and b.embed_dim == 512
    assert math.isclose(b.init_logit_scale, math.log(1 / 0.07))


def test_config_errors_name_the_key():
    d = get_preset("tiny").to_dict()
    d["vision"]["patch_sise"] = 8
    with pytest.raises(ConfigError, match="vision.patch_sise"):
        ModelConfig.from_dict(d)
    d = get_preset("tiny").to_dict()
    d["embed_dimm"] = 3
    with pytest.raises(ConfigError, match="embed_dimm"):
        ModelConfig.from_dict(d)
    with pytest.raises(ConfigError, match="no-such"):
        get_preset("no-such")
    with pytest.raises(ConfigError, match="text.context_length"):
        create_model("tiny", text={"context_length": 1000})
    with pytest.raises(ConfigError, match="text.foo"):
        create_model("tiny", text={"foo": 1})
    with pytest.raises(ConfigError, match="attn_backend"):
        create_model("tiny", attn_backend="no-such-backend")
    with pytest.raises(ConfigError, match="vision.width"):
        create_model("tiny", vision={"width": 130})


def test_param_count_released_preset():
    with torch.device("meta"):  # parameter shapes only: no memory, no init time
        n = create_model("biomedclip-vit-b16-224").num_params()
    # The released model: ~195.9M without the (unused) BERT pooler, 196.5M with its 768*768+768 parameters.
    assert abs(n / 1e6 - 195.9) < 0.05
    assert abs((n + 768 * 768 + 768) / 1e6 - 196.5) < 0.05


def test_shapes_and_forward_dict():
    model = _tiny(init_logit_bias=-10.0).eval()
    images, ids = _batch(model)
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(ids)
        out = model(images, ids)
    d = model.config.embed_dim
    assert img.shape == (3, d) and txt.shape == (3, d)
    assert torch.allclose(out["image_features"], F.normalize(img, dim=-1))
    assert torch.allclose(out["text_features"], F.normalize(txt, dim=-1))
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].dim() == 0
    assert math.isclose(out["logit_scale"].item(), 1 / 0.07, rel_tol=1e-5)
    assert out["logit_bias"].item() == -10.0
    assert model(images, ids)["logit_bias"] is model.logit_bias
    assert len(IMAGE_MEAN) == 3 and len(IMAGE_STD) == 3


def test_bad_inputs_raise():
    model = _tiny().eval()
    with pytest.raises(DataError, match="images"):
        model.encode_image(torch.zeros(1, 3, 32, 32))
    with pytest.raises(DataError, match="max_positions"):
        model.encode_text(torch.ones(1, 1000, dtype=torch.long))
    with pytest.raises(DataError):
        model.encode_text(torch.ones(2, 3, 4, dtype=torch.long))


@pytest.mark.parametrize("trim", [True, False])
def test_padding_invariance(trim):
    model = _tiny().eval()
    model.text.trim_padding = trim
    g = torch.Generator().manual_seed(3)
    caps = [torch.randint(5, 4096, (n,), generator=g) for n in (7, 12, 30)]

    def pad(lens_to):
        ids = torch.zeros(len(caps), lens_to, dtype=torch.long)
        for i, c in enumerate(caps):
            ids[i, : len(c)] = c
        return ids

    with torch.no_grad():
        ref = model.encode_text(pad(30))
        for L in (31, 40, 64):
            torch.testing.assert_close(model.encode_text(pad(L)), ref, atol=2e-5, rtol=1e-5)
        # A caption alone equals the same caption inside a batch with longer ones.
        alone = model.encode_text(pad(30)[:1, :7])
        torch.testing.assert_close(alone, ref[:1], atol=2e-5, rtol=1e-5)
        # An all-padding row gives finite features rather than NaN.
        assert torch.isfinite(model.encode_text(torch.zeros(2, 8, dtype=torch.long))).all()


def test_attention_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 4:] = False
    out = attention(q, k, v, backend="sdpa", key_padding_mask=mask)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(8)
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    ref = s.softmax(-1) @ v.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="triton-nope"):
        attention(q, k, v, backend="triton-nope")


def _clip_loss(out):
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    if out["logit_bias"] is not None:
        logits = logits + out["logit_bias"]
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_gradient_flow_both_towers():
    model = _tiny(init_logit_bias=-1.0).train()
    images, ids = _batch(model)
    _clip_loss(model(images, ids)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_grad_checkpointing_same_outputs_and_grads(monkeypatch):
    import bmclip.model.bert as bert_mod
    import bmclip.model.vit as vit_mod

    # equal outputs and grads alone would also hold if the flag were ignored: count the checkpointed blocks
    calls = []
    for mod in (vit_mod, bert_mod):
        real = mod.checkpoint
        monkeypatch.setattr(mod, "checkpoint", lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    images, ids = _batch(_tiny())
    results = []
    for ckpt in (False, True):
        model = _tiny().train()
        model.set_grad_checkpointing(ckpt)
        assert model.visual.grad_checkpointing is ckpt and model.text.grad_checkpointing is ckpt
        calls.clear()
        out = model(images, ids)
        assert len(calls) == (model.config.vision.layers + model.config.text.layers if ckpt else 0)
        _clip_loss(out).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (o0, g0), (o1, g1) = results
    torch.testing.assert_close(o0["image_features"], o1["image_features"])
    torch.testing.assert_close(o0["text_features"], o1["text_features"])
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=1e-6, rtol=1e-5, msg=n)


def test_patch_dropout_only_in_training():
    model = _tiny(vision={"patch_dropout": 0.5})
    ref = _tiny()  # same seed -> same weights, no patch dropout
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    images, _ = _batch(model)
    n = model.config.vision.num_patches
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert model.visual.forward_tokens(images).shape[1] == n + 1
        torch.testing.assert_close(model.encode_image(images), ref.encode_image(images))
        model.train()
        toks = model.visual.forward_tokens(images)
        assert toks.shape[1] == 1 + n // 2
        a, b = model.encode_image(images), model.encode_image(images)
        assert not torch.allclose(a, b)  # a fresh random subset of patches each call


def test_patch_dropout_keeps_cls_and_real_patches():
    model = _tiny(vision={"patch_dropout": 0.75}).train()
    x = torch.randn(2, 16, 8)
    kept = model.visual.patch_dropout(x)
    assert kept.shape == (2, 4, 8)
    for bi in range(2):  # every kept token is one of that image's own patches, none repeated
        rows = {tuple(r.tolist()) for r in kept[bi]}
        assert len(rows) == 4 and rows <= {tuple(r.tolist()) for r in x[bi]}


def test_set_attn_backend_keeps_parameter_names():
    model = _tiny()
    names = [n for n, _ in model.named_parameters()]
    model.set_attn_backend("sdpa")
    assert [n for n, _ in model.named_parameters()] == names
    with pytest.raises(ConfigError, match="xyz"):
        model.set_attn_backend("xyz")
    assert model.config.attn_backend == "sdpa"


def test_text_dropout_only_in_training():
    model = _tiny(text={"dropout": 0.3})
    ref = _tiny()
    _, ids = _batch(model)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), ref.eval().encode_text(ids))
        model.train()
        assert not torch.allclose(model.encode_text(ids), model.encode_text(ids))


def test_create_model_from_config_and_dict():
    cfg = get_preset("tiny")
    a = create_model(cfg, embed_dim=32)
    assert a.config.embed_dim == 32 and cfg.embed_dim == 64  # the caller's config is not mutated
    b = create_model(cfg.to_dict(), vision={"layers": 1})
    assert len(b.visual.blocks) == 1 and b.config.vision.layers == 1
    with pytest.raises(ConfigError, match="embed_dimm"):
        create_model("tiny", embed_dimm=3)
    with pytest.raises(ConfigError):
        create_model(42)


def test_empty_batch():
    model = _tiny().eval()
    with torch.no_grad():
        assert model.encode_text(torch.zeros(0, 12, dtype=torch.long)).shape == (0, 64)
        assert model.encode_image(torch.zeros(0, 3, 64, 64)).shape == (0, 64)


def test_set_image_size_resamples_position_grid():
    timm_layers = pytest.importorskip("timm.layers")
    model = _tiny().eval()
    old = model.visual.pos_embed.detach().clone()
    model.set_image_size(64)  # same size: unchanged
    assert torch.equal(model.visual.pos_embed, old)
    for size in (96, 32):  # grow and shrink the 8x8 grid
        m = _tiny().eval()
        m.set_image_size(size)
        g = size // 8
        assert m.config.vision.image_size == size and m.visual.pos_embed.shape == (1, g * g + 1, 128)
        # Independent reference: timm's resample_abs_pos_embed (bicubic, antialiased, CLS kept).
        ref = timm_layers.resample_abs_pos_embed(old, [g, g], num_prefix_tokens=1)
        torch.testing.assert_close(m.visual.pos_embed.detach(), ref)
        with torch.no_grad():
            assert m.encode_image(torch.randn(2, 3, size, size)).shape == (2, 64)
        assert m.visual.pos_embed.requires_grad
    with pytest.raises(ConfigError, match="image_size"):
        model.set_image_size(70)


@pytest.mark.slow
def test_bf16_autocast_with_checkpointing():
    # The GPU recipe runs both towers under bf16 autocast; CPU autocast exercises the same dtype paths.
    model = _tiny(grad_checkpointing=True).train()
    images, ids = _batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, ids)
    _clip_loss({k: (v.float() if v is not None else None) for k, v in out.items()}).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        ref = model.encode_text(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.encode_text(ids).float()
    assert F.cosine_similarity(ref, low).min() > 0.999


# --- attention routing: "auto" per tower and device, per-tower overrides -------------------------------------


@pytest.fixture
def attn_paths(monkeypatch):
    """Counts of what really ran: SDPA switch calls, Triton flash-attention launches, unpadded text-tower runs."""
    attn_mod = importlib.import_module("bmclip.model.attention")  # the package re-exports a function of that name
    import bmclip.model.bert as bert_mod

    fa = importlib.import_module("bmclip.kernels.flash_attention")
    runs = {"sdpa": 0, "triton": 0, "unpadded": []}
    real_sdpa = attn_mod._BACKENDS["sdpa"]
    real_apply = fa._TritonFlashAttention.apply
    real_unpadded = bert_mod.bert_tokens_unpadded

    def sdpa(*a, **k):
        runs["sdpa"] += 1
        return real_sdpa(*a, **k)

    def apply(*a):
        runs["triton"] += 1
        return real_apply(*a)

    monkeypatch.setitem(attn_mod._BACKENDS, "sdpa", sdpa)
    monkeypatch.setattr(fa._TritonFlashAttention, "apply", staticmethod(apply))
    monkeypatch.setattr(bert_mod, "bert_tokens_unpadded", lambda *a, **k: runs["unpadded"].append(a[-1])
                        or real_unpadded(*a, **k))
    return runs


def test_auto_resolves_per_tower_and_device(monkeypatch):
    attn_mod = importlib.import_module("bmclip.model.attention")  # the package re-exports a function of that name

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # The CUDA decision without a GPU: whether compiled Triton can run is the one fact that is patched.
    monkeypatch.setattr(attn_mod, "_auto_text_triton", lambda d: d.type == "cuda")
    assert attn_mod.resolve_backend("auto", "image", cuda) == "sdpa"
    assert attn_mod.resolve_backend("auto", "text", cuda) == "triton"
    assert attn_mod.resolve_backend("auto", "image", cpu) == "sdpa"
    assert attn_mod.resolve_backend("auto", "text", cpu) == "sdpa"
    monkeypatch.setattr(attn_mod, "_auto_text_triton", lambda d: False)  # e.g. Triton not installed
    assert attn_mod.resolve_backend("auto", "text", cuda) == "sdpa"
    # Explicit names are taken as they are, whatever the device.
    assert attn_mod.resolve_backend("triton", "image", cpu) == "triton"
    assert attn_mod.resolve_backend("xformers", "text", cpu) == "xformers"
    with pytest.raises(ConfigError, match="flash2"):
        attn_mod.resolve_backend("flash2", "image", cpu)
    with pytest.raises(ConfigError, match="tower"):
        attn_mod.resolve_backend("auto", "audio", cpu)


def test_auto_default_runs_sdpa_in_both_towers_on_cpu(attn_paths):
    model = _tiny().train()
    assert model.config.attn_backend == "auto"
    assert model.attn_backends() == {"image": "sdpa", "text": "sdpa"}
    images, ids = _batch(model)
    _clip_loss(model(images, ids)).backward()
    cfg = model.config
    assert attn_paths == {"sdpa": cfg.vision.layers + cfg.text.layers, "triton": 0, "unpadded": []}


@pytest.mark.slow
def test_auto_cuda_choice_runs_vit_on_sdpa_and_text_unpadded_on_triton(monkeypatch, attn_paths):
    # What "auto" does on a CUDA machine, run on CPU: the towers follow resolve_backend's per-tower answer
    # (Triton runs here under the interpreter, in fp32).
    attn_mod = importlib.import_module("bmclip.model.attention")  # the package re-exports a function of that name

    monkeypatch.setattr(attn_mod, "_auto_text_triton", lambda d: True)
    model = _tiny().train()
    assert model.attn_backends() == {"image": "sdpa", "text": "triton"}
    images, ids = _batch(model)
    ref = _tiny().train()
    monkeypatch.setattr(attn_mod, "_auto_text_triton", lambda d: False)
    want = ref(images, ids)
    assert attn_paths["triton"] == 0
    attn_paths["sdpa"] = 0
    monkeypatch.setattr(attn_mod, "_auto_text_triton", lambda d: True)
    out = model(images, ids)
    _clip_loss(out).backward()
    cfg = model.config
    assert attn_paths == {"sdpa": cfg.vision.layers, "triton": cfg.text.layers, "unpadded": ["triton"]}
    torch.testing.assert_close(out["text_features"], want["text_features"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["image_features"], want["image_features"])


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["image", "text"])
def test_per_tower_override_runs_only_that_tower_on_triton(tower, attn_paths):
    model = _tiny(attn_backend="sdpa", **{f"{tower}_attn_backend": "triton"}).train()
    names = [n for n, _ in _tiny().named_parameters()]
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints do not depend on the routing
    other = "text" if tower == "image" else "image"
    assert model.attn_backends() == {tower: "triton", other: "sdpa"}
    images, ids = _batch(model)
    _clip_loss(model(images, ids)).backward()
    cfg = model.config
    n_tower = cfg.vision.layers if tower == "image" else cfg.text.layers
    n_other = cfg.text.layers if tower == "image" else cfg.vision.layers
    assert attn_paths["triton"] == n_tower and attn_paths["sdpa"] == n_other
    assert attn_paths["unpadded"] == (["triton"] if tower == "text" else [])


@pytest.mark.slow
def test_set_attn_backend_per_tower_and_both(attn_paths):
    model = _tiny()
    model.set_attn_backend("triton", tower="image")
    assert (model.config.attn_backend, model.config.image_attn_backend, model.config.text_attn_backend) == \
        ("auto", "triton", None)
    assert all(b.attn.attn_backend == "triton" for b in model.visual.blocks)
    assert all(la.attn.attn_backend == "auto" for la in model.text.layers)
    with torch.no_grad():
        model.encode_image(_batch(model)[0])
    assert attn_paths["triton"] == model.config.vision.layers and attn_paths["sdpa"] == 0
    # Setting both towers clears the overrides; the config rebuilds the same routing.
    model.set_attn_backend("sdpa")
    assert (model.config.attn_backend, model.config.image_attn_backend) == ("sdpa", None)
    assert model.attn_backends() == {"image": "sdpa", "text": "sdpa"}
    rebuilt = create_model(model.config)
    assert rebuilt.attn_backends() == model.attn_backends()
    with pytest.raises(ConfigError, match="tower"):
        model.set_attn_backend("sdpa", tower="audio")
    with pytest.raises(ConfigError, match="nope"):
        model.set_attn_backend("nope", tower="text")
    assert model.config.text_attn_backend is None


def test_bad_tower_backend_names_are_refused():
    with pytest.raises(ConfigError, match="image_attn_backend.*flash3"):
        create_model("tiny", image_attn_backend="flash3")
    with pytest.raises(ConfigError, match="text_attn_backend"):
        create_model("tiny", text_attn_backend="")
    d = get_preset("tiny").to_dict()
    d["text_attn_backend"] = "triton"
    assert ModelConfig.from_dict(d).tower_attn_backend("text") == "triton"
    old = get_preset("tiny").to_dict()
    del old["image_attn_backend"], old["text_attn_backend"]  # a config saved before the per-tower keys
    assert ModelConfig.from_dict(old).tower_attn_backend("image") == "auto"


@pytest.mark.gpu
def test_gpu_auto_routes_vit_to_sdpa_and_text_to_triton(attn_paths):
    model = _tiny().cuda().train()
    assert model.attn_backends() == {"image": "sdpa", "text": "triton"}
    images, ids = _batch(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images.cuda(), ids.cuda())
    _clip_loss({k: (v.float() if v is not None else None) for k, v in out.items()}).backward()
    cfg = model.config
    assert attn_paths == {"sdpa": cfg.vision.layers, "triton": cfg.text.layers, "unpadded": ["triton"]}


def test_split_heads_backward_has_no_select():
    # q, k, v come from one unbind: its backward stacks the three gradients, with no zero-filled
    # select_backward buffers and in-place adds (what qkv[0], qkv[1], qkv[2] would give).
    from bmclip.model.layers import SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(16, 2)
    x = torch.randn(2, 5, 16, requires_grad=True)
    q, k, v = attn.split_heads(x)
    ref = attn.qkv(x).view(2, 5, 3, 2, 8)
    for i, t in enumerate((q, k, v)):
        assert torch.equal(t, ref[:, :, i].transpose(1, 2))
    seen, stack = set(), [(q * 1 + k * 2 + v * 3).sum().grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(fn for fn, _ in node.next_functions)
    names = {type(n).__name__ for n in seen}
    assert "UnbindBackward0" in names, names
    assert not any("Select" in n for n in names), names
