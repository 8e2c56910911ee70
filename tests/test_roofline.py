"""benchmarks/roofline.py: the FLOP and byte counts behind every floor, against independent counts.

Model FLOPs are checked against torch's FlopCounterMode on the real bmclip model (built on the meta device:
shapes only, nothing computed), open_clip's loss against FlopCounterMode on open_clip's own ClipLoss, and the
fused loss's 5 passes and the floors' arithmetic against numbers worked out by hand here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


rl = _load("roofline")
ROUND = rl.Device("round", bf16_tflops=1000.0, hbm_gbps=1000.0, source="test")  # 1e15 FLOP/s, 1e12 B/s


def _flops(fn) -> int:
    fc = FlopCounterMode(display=False)
    with fc:
        fn()
    return fc.get_total_flops()


# --- loss ----------------------------------------------------------------------------------------------------


def test_fused_loss_floor_by_hand():
    B, D = 32768, 512
    f = rl.loss_floor(B, D, ROUND)
    gemm = 2 * 32768 * 32768 * 512  # 1.0995e12 FLOPs per B×B×D product
    assert f.flops == 5 * gemm == 5_497_558_138_880
    assert f.bytes == 4 * B * D * 2 + 4 * B * 4  # I, T, dI, dT in bf16 + four fp32 LSE vectors
    assert f.compute_s == pytest.approx(5 * gemm / 1e15)
    assert f.floor_s == f.compute_s and f.bound == "compute"  # 5.5 ms of math vs 0.13 ms of traffic
    assert f.ratio(2 * f.floor_s) == pytest.approx(2.0)
    assert rl.loss_floor(B, D, ROUND, passes=4).flops == 4 * gemm


def test_open_clip_loss_floor_by_hand():
    B, D = 32768, 512
    f = rl.open_clip_loss_floor(B, D, ROUND)
    assert f.flops == 6 * 2 * B * B * D
    logits_bytes = 2 * 9 * B * B * 2  # two B×B matrices, 9 bf16 passes each
    assert f.bytes == logits_bytes + 4 * B * D * 2
    # kernels in sequence: GEMM time plus traffic time (6.6 ms + 38.7 ms at these round rates)
    assert f.floor_s == pytest.approx(6 * 2 * B * B * D / 1e15 + (logits_bytes + 4 * B * D * 2) / 1e12)
    assert rl.loss_min_memory_bytes(B, D) == 4 * B * D * 2 + 4 * B * 4
    assert rl.open_clip_loss_min_memory_bytes(B) == 4 * B * B * 2
    # the memory-floor ratio the 1/50 target is set against: 1/64 at D=512
    assert rl.open_clip_loss_min_memory_bytes(B) / rl.loss_min_memory_bytes(B, D) == pytest.approx(64, rel=1e-2)


def test_open_clip_clip_loss_runs_six_gemms():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    B, D = 48, 40
    g = torch.Generator().manual_seed(0)
    img = torch.randn(B, D, generator=g).requires_grad_()
    txt = torch.randn(B, D, generator=g).requires_grad_()
    scale = torch.tensor(14.0, requires_grad=True)
    counted = _flops(lambda: open_clip_loss.ClipLoss()(img, txt, scale).backward())
    assert counted == rl.open_clip_loss_floor(B, D, ROUND).flops == 6 * 2 * B * B * D


# --- attention -----------------------------------------------------------------------------------------------


def test_attention_flops_by_hand_and_by_flop_counter():
    b, s, h, d = 256, 197, 12, 64
    assert rl.attention_fwd_flops([s] * b, h, d) == 4 * 197 * 197 * 64 * 12 * 256 == 30_520_639_488
    q = torch.randn(3, h, 17, d, device="meta")
    counted = _flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert counted == rl.attention_fwd_flops([17] * 3, h, d)
    f = rl.attention_floor([s] * b, h, d, ROUND, name="vit")
    fwd, bwd = f.parts
    tok = b * s * h * d * 2
    assert fwd.flops == 30_520_639_488 and bwd.flops == 2.5 * 30_520_639_488
    assert fwd.bytes == 4 * tok + b * s * h * 4 and bwd.bytes == 8 * tok + 3 * b * s * h * 4
    assert f.floor_s == pytest.approx(max(fwd.flops / 1e15, fwd.bytes / 1e12) + max(bwd.flops / 1e15, bwd.bytes / 1e12))


def test_expected_lengths_keep_both_moments():
    lengths = rl.caption_lengths()
    assert len(lengths) > 100 and max(lengths) <= 256 and min(lengths) >= 3
    m1, m2 = rl.length_moments(lengths)
    xs = rl.expected_lengths(256, lengths)
    assert len(xs) == 256
    assert sum(xs) == pytest.approx(256 * m1) and sum(x * x for x in xs) == pytest.approx(256 * m2)
    assert rl.expected_lengths(4, padded_to=256) == [256.0] * 4
    # the text-layer floor: unpadded work is what the distribution says, padded work is 256² per caption
    un = rl.attention_fwd_flops(xs, 12, 64)
    assert un == pytest.approx(4 * 12 * 64 * 256 * m2)
    assert rl.attention_fwd_flops(rl.expected_lengths(256, padded_to=256), 12, 64) == 4 * 12 * 64 * 256 * 256 ** 2


# --- model FLOPs against FlopCounterMode on the real model ----------------------------------------------------


@pytest.fixture(scope="module")
def meta_model():
    from bmclip.model import create_model
    from bmclip.model.config import get_preset

    cfg = get_preset("biomedclip-vit-b16-224")
    with torch.device("meta"):
        model = create_model(cfg, attn_backend="sdpa")
    model.train()
    model.text.trim_padding = False  # the trim reads token counts on the host, which meta tensors have not
    return cfg, model


@pytest.mark.slow
def test_image_tower_flops_match_flop_counter(meta_model):
    cfg, model = meta_model
    img = torch.empty(1, 3, 224, 224, device="meta")
    counted = _flops(lambda: model.visual(img).sum().backward())
    f = rl.image_forward_flops(cfg)
    # training = 3 × forward, except that the pixels need no gradient: the patch embedding's backward is the
    # weight gradient only (1×, not 2×)
    assert counted == 3 * f["total"] - f["patch_embed"]
    assert f["total"] == pytest.approx(35.1e9, rel=0.01)  # ViT-B/16 at 224: ~17.6 GMACs


@pytest.mark.slow
@pytest.mark.parametrize("n", [9, 37, 130, 256])
def test_text_tower_flops_match_flop_counter(meta_model, n):
    cfg, model = meta_model
    ids = torch.full((1, n), 7, dtype=torch.long, device="meta")  # one caption, no padding: only real tokens
    counted = _flops(lambda: model.text(ids).sum().backward())
    assert counted == 3 * rl.text_forward_flops(cfg, float(n))["total"]


def test_train_flops_agree_with_the_trainers_count(meta_model):
    from bmclip.train.metrics import train_step_flops

    cfg, _ = meta_model
    lengths = [9, 37, 130, 256, 61, 100]
    b = len(lengths)
    per = [rl.train_flops_per_sample(cfg, [n, n], batch=b)["total"] for n in lengths]  # moments of one length
    assert sum(per) == pytest.approx(train_step_flops(cfg, batch=b, text_token_counts=lengths), rel=1e-12)
    # padded to 256: the same model with every caption 256 tokens long
    pad = rl.train_flops_per_sample(cfg, padded_to=256, batch=b)["total"]
    assert b * pad == pytest.approx(train_step_flops(cfg, batch=b, text_token_counts=[256] * b), rel=1e-12)


def test_train_step_floor_samples_per_second():
    cfg = rl._preset()
    t = rl.train_step_floor(cfg, ROUND, batch=512)
    assert t["samples_per_s_at_100"] == pytest.approx(1e15 / t["total"])
    assert t["samples_per_s_at_45"] == pytest.approx(0.45 * 1e15 / t["total"])
    tp = rl.train_step_floor(cfg, ROUND, padded_to=256, batch=512)
    assert tp["image"] == t["image"] and tp["text"] > 2 * t["text"] * 0.9  # mean length 123 of 256


# --- devices and the CLI ---------------------------------------------------------------------------------------


def test_device_figures_and_measured_replacements():
    assert rl.device_from("NVIDIA H200") == rl.DEVICES["H200"]
    assert rl.device_from("NVIDIA H100 80GB HBM3") == rl.DEVICES["H100 SXM"]
    assert rl.DEVICES["H200"].bf16_tflops == rl.DEVICES["H100 SXM"].bf16_tflops == pytest.approx(989.4)
    assert (rl.DEVICES["H100 SXM"].hbm_gbps, rl.DEVICES["H200"].hbm_gbps) == (3350.0, 4800.0)
    m = rl.device_from("NVIDIA H200", peak_tflops=790.0)
    assert (m.bf16_tflops, m.hbm_gbps) == (790.0, 4800.0) and "measured" in m.source
    with pytest.raises(ValueError, match="measured"):
        rl.device_from("NVIDIA H100 PCIe")
    assert rl.device_from("NVIDIA H100 PCIe", peak_tflops=600, hbm_gbps=2000).bf16_tflops == 600
    # a measured peak raises every compute-bound floor in proportion
    assert rl.loss_floor(32768, 512, m).floor_s == pytest.approx(
        rl.loss_floor(32768, 512, rl.DEVICES["H200"]).floor_s * 989.4 / 790.0)


def test_cli_names_both_cards_and_uses_measured_rates(capsys):
    assert rl.main([]) == 0
    out = capsys.readouterr().out
    assert "== H100 SXM: 989 TFLOP/s bf16, 3350 GB/s" in out and "== H200: 989 TFLOP/s bf16, 4800 GB/s" in out
    assert "fused, 5 passes" in out and "samples/s at 100% MFU" in out
    assert rl.main(["--peak-tflops", "790", "--hbm-gbps", "4300"]) == 0
    out = capsys.readouterr().out
    assert "at measured rates: 790 TFLOP/s bf16, 4300 GB/s" in out


# --- measured / floor summary of a suite run ---------------------------------------------------------------------


def _write(path: Path, data) -> None:
    path.write_text(json.dumps(data))


def test_summary_ratios_and_targets(tmp_path):
    _write(tmp_path / "peak.json", {"device": "NVIDIA H200", "matmul_bf16_tflops": 800.0, "copy_gbps": 4000.0})
    dev = rl.device_from("NVIDIA H200", peak_tflops=800.0, hbm_gbps=4000.0)
    fl32 = rl.loss_floor(32768, 512, dev).floor_s * 1e3
    _write(tmp_path / "bench_loss.json", {"meta": {}, "rows": [
        {"impl": "bmclip_triton", "B": 32768, "D": 512, "dtype": "bfloat16", "status": "ok",
         "time_ms": 1.25 * fl32, "peak_mem_mb": 150.0},
        {"impl": "open_clip", "B": 32768, "D": 512, "dtype": "bfloat16", "status": "ok",
         "time_ms": 2.0 * 1.25 * fl32, "peak_mem_mb": 150.0 * 60},
        {"impl": "bmclip_triton", "B": 1 << 20, "D": 512, "dtype": "bfloat16", "status": "ok", "time_ms": 9000.0},
        {"impl": "open_clip", "B": 1 << 20, "D": 512, "status": "OOM", "time_ms": None}]})
    flops = 100.0  # TFLOP per step
    _write(tmp_path / "bench_train.json", {"meta": {"preset": "biomedclip-vit-b16-224"}, "rows": [
        {"batch": 512, "grad_checkpointing": False, "model_tflop_per_step": flops,
         "bmclip": {"step_s": flops / 800.0 / 0.5, "samples_per_s": 512 / (flops / 400.0)},
         "open_clip": "oom"}]})
    (tmp_path / "bench_attention.json").write_text("{not json")
    text = rl.summary_report(tmp_path)
    assert "= 1.25x" in text  # the 32k row: 1.25 × its 5-pass floor at the measured peak
    lines = {ln.split("  goal")[0].strip(): ln for ln in text.split("targets:")[1].strip().splitlines()}
    get = {k.rsplit(" ", 1)[0].strip(): v for k, v in lines.items()}
    assert "MET" in get["loss B=32k: time / 5-pass floor (measured peak)"]
    assert "0.500x" in get["loss B=32k: time vs open_clip"] and "MET" in get["loss B=32k: time vs open_clip"]
    assert "1/60" in get["loss B=32k: peak memory vs open_clip"]
    assert "MET" in get["loss B=1M rows on one GPU"]
    assert "50.0%" in get["train B=512: MFU (measured peak)"] and "MET" in get["train B=512: MFU (measured peak)"]
    assert get["train B=512: samples/s vs open_clip"].rstrip().endswith("?")  # open_clip ran out of memory
    assert "missing" in get["attention ViT fwd+bwd vs fastest SDPA"]  # unreadable JSON: said, not raised


def test_summary_of_an_empty_run_says_what_is_missing(tmp_path):
    text = rl.summary_report(tmp_path)
    assert "peak.json missing" in text and text.count("missing") >= 8
