"""AdamW parameter groups and the cosine warm-up schedule (reference: open_clip_train.scheduler)."""

import math

import pytest
import torch

from bmclip.model import create_model
from bmclip.train.config import OptimSection
from bmclip.train.optim import CosineSchedule, build_optimizer, cosine_lr, no_decay_names


def test_no_decay_on_gains_biases_embeddings_logit_scale():
    m = create_model("tiny")
    exempt = no_decay_names(m)
    names = dict(m.named_parameters())
    for n, p in names.items():
        if p.ndim < 2:
            assert n in exempt, n  # LayerNorm gains/biases, Linear biases, logit_scale
    for n in ("logit_scale", "visual.cls_token", "visual.pos_embed", "text.embeddings.word.weight",
              "text.embeddings.position.weight", "text.embeddings.token_type.weight"):
        assert n in exempt, n
    for n in ("visual.patch_embed.weight", "visual.blocks.0.attn.qkv.weight", "visual.blocks.0.mlp.fc1.weight",
              "text.layers.0.attn.out.weight", "visual.proj.weight", "text.proj.fc1.weight"):
        assert n in names and n not in exempt, n
    opt = build_optimizer(m, OptimSection(weight_decay=0.2), "cpu")
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(wd) == len(names)
    assert all(wd[id(p)] == (0.0 if n in exempt else 0.2) for n, p in names.items())
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6


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
