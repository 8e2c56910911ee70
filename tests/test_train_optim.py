"""AdamW parameter groups and the cosine warm-up schedule (reference: open_clip_train.scheduler)."""

import math

import pytest
import torch

from bmclip.errors import ConfigError
from bmclip.model import create_model
from bmclip.train.config import OptimSection, load_config
from bmclip.train.optim import CosineSchedule, build_optimizer, cosine_lr, no_decay_names

# open_clip_train/main.py's weight-decay rule (open_clip 3.3), the one BiomedCLIP was trained with; the test below
# checks that this is still its text
OPEN_CLIP_EXCLUDE = ("""exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or """
                     """'logit_scale' in n""")


def open_clip_exclude(n, p):
    return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n


EMBEDDINGS = ("visual.cls_token", "visual.pos_embed", "text.embeddings.word.weight",
              "text.embeddings.position.weight", "text.embeddings.token_type.weight")


def _weight_decays(opt) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}


def test_default_groups_are_open_clip_trains_rule():
    """BiomedCLIP was trained with open_clip_train, which decays embedding tables, the ViT position embedding and
    class token; bmclip used to exempt them (24.0M parameters of ViT-B/16 + PubMedBERT, 0.54M of tiny)."""
    import importlib.util
    from pathlib import Path

    main_py = Path(importlib.util.find_spec("open_clip_train.main").origin)  # read, not imported (2 s of imports)
    assert OPEN_CLIP_EXCLUDE in [ln.strip() for ln in main_py.read_text().splitlines()]

    m = create_model("tiny")
    names = dict(m.named_parameters())
    exempt = no_decay_names(m)
    assert exempt == {n for n, p in names.items() if open_clip_exclude(n, p)}
    assert exempt == {n for n, p in names.items() if p.ndim < 2} and "logit_scale" in exempt
    assert not exempt & set(EMBEDDINGS)
    opt = build_optimizer(m, OptimSection(weight_decay=0.2), "cpu")
    wd = _weight_decays(opt)
    assert len(wd) == len(names)
    assert all(wd[id(p)] == (0.0 if n in exempt else 0.2) for n, p in names.items())
    assert all(wd[id(names[n])] == 0.2 for n in (*EMBEDDINGS, "visual.patch_embed.weight", "text.proj.fc1.weight"))
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6


def test_default_groups_match_open_clip_on_biomedclips_own_parameter_names():
    """The rule applied to the names of the open_clip model BiomedCLIP is (timm ViT + HF BERT, through bmclip's
    interop mapping, q/k/v split) exempts exactly what bmclip exempts."""
    from bmclip.interop import _pairs, open_clip_state_dict

    with torch.device("meta"):
        m = create_model("biomedclip-vit-b16-224")
    oc = open_clip_state_dict(m)
    oc_exempt = {}
    for oc_keys, key in _pairs(m.config):
        verdicts = {open_clip_exclude(k, oc[k]) for k in oc_keys}
        assert len(verdicts) == 1, oc_keys  # q, k and v agree
        oc_exempt[key] = verdicts.pop()
    assert set(oc_exempt) == {n for n, _ in m.named_parameters()}
    assert no_decay_names(m) == {n for n, ex in oc_exempt.items() if ex}


def test_decay_embeddings_false_also_exempts_embedding_tables():
    m = create_model("tiny")
    names = dict(m.named_parameters())
    exempt = no_decay_names(m, decay_embeddings=False)
    assert exempt == {n for n, p in names.items() if p.ndim < 2} | set(EMBEDDINGS)
    c = load_config("tiny-cpu", ["--optim.decay_embeddings=false", "--optim.weight_decay=0.2"])
    wd = _weight_decays(build_optimizer(m, c.optim, "cpu"))
    assert all(wd[id(p)] == (0.0 if n in exempt else 0.2) for n, p in names.items())
    for n in ("visual.patch_embed.weight", "visual.blocks.0.attn.qkv.weight", "text.layers.0.attn.out.weight",
              "visual.proj.weight", "text.proj.fc1.weight"):
        assert wd[id(names[n])] == 0.2, n  # projection matrices are decayed either way


def test_resuming_with_the_other_grouping_is_a_one_line_error():
    """A checkpoint's AdamW state holds groups of fixed sizes: loading it into the other grouping is a torch
    ValueError. Checkpoints saved before optim.decay_embeddings existed used the timm-style grouping."""
    from bmclip.train.optim import check_resume_grouping

    old = load_config("tiny-cpu").to_dict()
    del old["optim"]["decay_embeddings"]
    with pytest.raises(ConfigError, match=r"^optim\.decay_embeddings: .*saved with optim\.decay_embeddings=false.*"
                                          r"--optim\.decay_embeddings=false"):
        check_resume_grouping(old, OptimSection())
    check_resume_grouping(old, OptimSection(decay_embeddings=False))
    check_resume_grouping(load_config("tiny-cpu").to_dict(), OptimSection())
    check_resume_grouping({}, OptimSection())  # nothing saved to compare with

    m = create_model("tiny")  # why: the saved state does not fit the other groups
    saved = build_optimizer(m, OptimSection(decay_embeddings=False), "cpu").state_dict()
    with pytest.raises(ValueError):
        build_optimizer(m, OptimSection(), "cpu").load_state_dict(saved)


@pytest.mark.parametrize("warmup,total", [(10, 100), (0, 50), (5, 5), (2000, 119375)])
def test_cosine_matches_open_clip(warmup, total):
    from open_clip_train.scheduler import cosine_lr as oc_cosine

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.0)
    ref = oc_cosine(opt, 5e-4, warmup, total)
    edges = {0, 1, max(warmup - 1, 0), warmup, total // 2, total - 1}
    steps = sorted(edges | set(range(0, total, max(total // 37, 1))))
    for s in steps:
        if warmup == total and s >= warmup:
            continue  # open_clip divides by zero here; we hold base_lr
        assert cosine_lr(s, base_lr=5e-4, warmup_steps=warmup, total_steps=total) == pytest.approx(ref(s), rel=1e-12)


def test_schedule_sets_param_groups_and_min_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    s = CosineSchedule(opt, base_lr=1.0, warmup_steps=4, total_steps=12, min_lr=0.1)
    assert s.set_step(0) == pytest.approx(0.25) and opt.param_groups[0]["lr"] == pytest.approx(0.25)
    assert s.set_step(4) == pytest.approx(1.0)
    assert s.set_step(8) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.9)
    assert s.set_step(12) == pytest.approx(0.1)
    assert s.set_step(50) == pytest.approx(0.1)
