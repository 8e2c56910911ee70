"""FLOP counting (vs torch's FlopCounterMode), the MFU peak table, JSONL logging and PNG curves."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bmclip.model import create_model
from bmclip.train.metrics import (
    MetricsLogger,
    image_forward_flops,
    kept_patches,
    peak_tflops_for,
    plot_curves,
    read_jsonl,
    text_forward_flops,
    train_step_flops,
)


def _count(fn):
    # The math SDPA backend decomposes attention into matmuls that FlopCounterMode sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_forward_flops_match_flop_counter():
    torch.manual_seed(0)
    m = create_model("tiny").eval()
    b = 3
    x = torch.randn(b, 3, 64, 64)
    ids = torch.randint(1, 4000, (b, 64))  # all tokens real: the counter sees no padding
    assert _count(lambda: m.encode_image(x)) == b * image_forward_flops(m.config)
    assert _count(lambda: m.encode_text(ids)) == b * text_forward_flops(m.config, 64)
    m.train()
    m.config.vision.patch_dropout = 0.5
    assert kept_patches(64, 0.5) == 32
    assert _count(lambda: m.encode_image(x)) == b * image_forward_flops(m.config, 0.5)


def test_train_flops_three_times_forward_and_unpadded_tokens():
    torch.manual_seed(0)
    m = create_model("tiny").train()
    b = 4
    x = torch.randn(b, 3, 64, 64)
    ids = torch.randint(1, 4000, (b, 64))

    def step():
        o = m(x, ids)
        (o["image_features"].sum() + o["text_features"].sum()).backward()

    counted = _count(step)
    ours = train_step_flops(m.config, batch=b, text_token_counts=[64] * b) - 3 * 2 * b * b * m.config.embed_dim
    # 3x forward convention; the real backward skips the image-input gradient of the patch conv (<2%).
    assert counted <= ours and ours / counted < 1.02
    # Unpadded counting: captions of 10 and 30 tokens cost what they cost alone, not 2 x 64 tokens.
    two = train_step_flops(m.config, batch=2, text_token_counts=[10, 30], logit_columns=2)
    img = 3 * 2 * image_forward_flops(m.config)
    assert two == pytest.approx(img + 3 * (text_forward_flops(m.config, 10) + text_forward_flops(m.config, 30))
                                + 3 * 2 * 2 * 2 * m.config.embed_dim)
    with pytest.raises(ValueError):
        train_step_flops(m.config, batch=3, text_token_counts=[1, 2])


def test_peak_table():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("Some Laptop GPU") is None


def test_jsonl_and_curves(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for s in range(1, 6):
        log.log({"step": s, "kind": "train", "loss": 5.0 - s, "lr": 1e-3})
    log.log({"step": 5, "kind": "val", "image_to_text_R@1": 0.3, "text_to_image_R@1": 0.25, "chance_R@1": 0.01})
    log.log({"step": 6, "kind": "skip", "loss": float("nan")})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "kind": "tra')  # a torn line from a kill is ignored
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(recs) == 7 and recs[-1]["loss"] is None  # NaN written as null (valid JSON)
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    pngs = plot_curves(recs, tmp_path)
    assert [p.name for p in pngs] == ["loss.png", "recall.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.mark.slow
def test_cpu_peak_memory_is_this_process_not_its_parent():
    # A trainer started by a bigger process (torchrun's agent, pytest) must report its own peak RSS: Linux
    # carries getrusage's ru_maxrss across exec, so the child would have reported this process's 3 GB.
    import subprocess
    import sys

    import torch

    big = torch.ones(3 * 2**30, dtype=torch.uint8)  # touched: 3 GiB resident in this process
    code = "import torch; from bmclip.train.metrics import peak_memory_gb; print(peak_memory_gb(torch.device('cpu')))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    child_gb = float(res.stdout.strip().splitlines()[-1])
    assert 0.05 < child_gb < 2.5, child_gb  # torch's import alone is well under 2.5 GiB
    assert int(big[-1]) == 1
