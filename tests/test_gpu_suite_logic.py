"""CPU checks of the logic the one-shot GPU suite (benchmarks/gpu_suite.sh) depends on.

The suite stops each step with SIGINT at its time limit (``timeout --signal=INT``): every benchmark must then
leave the rows measured so far in its JSON. The correctness step limits autotuning to one config per kernel
through BMCLIP_AUTOTUNE_MAX_CONFIGS. Nothing here needs a GPU or asserts a timing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- BMCLIP_AUTOTUNE_MAX_CONFIGS -------------------------------------------------------------------------


def test_autotune_limit_env(monkeypatch):
    from bmclip.kernels._triton_utils import AUTOTUNE_MAX_CONFIGS_ENV, autotune_limit

    configs = ["a", "b", "c"]
    monkeypatch.delenv(AUTOTUNE_MAX_CONFIGS_ENV, raising=False)
    assert autotune_limit(configs) == configs
    monkeypatch.setenv(AUTOTUNE_MAX_CONFIGS_ENV, "")
    assert autotune_limit(configs) == configs
    monkeypatch.setenv(AUTOTUNE_MAX_CONFIGS_ENV, "1")
    assert autotune_limit(configs) == ["a"]
    monkeypatch.setenv(AUTOTUNE_MAX_CONFIGS_ENV, " 2 ")
    assert autotune_limit(configs) == ["a", "b"]
    monkeypatch.setenv(AUTOTUNE_MAX_CONFIGS_ENV, "9")
    assert autotune_limit(configs) == configs
    for bad in ("0", "-1", "one", "1.5"):
        monkeypatch.setenv(AUTOTUNE_MAX_CONFIGS_ENV, bad)
        with pytest.raises(ValueError, match=AUTOTUNE_MAX_CONFIGS_ENV):
            autotune_limit(configs)


def test_kernel_prune_functions_honour_the_limit(monkeypatch):
    # The autotuners call these on the GPU; with the limit set each keeps its first (pruned) config only.
    from bmclip.kernels import contrastive_triton as C
    from bmclip.kernels._triton_utils import AUTOTUNE_MAX_CONFIGS_ENV, HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("Triton is not importable here")
    fa = importlib.import_module("bmclip.kernels.flash_attention")  # the package re-exports a function of that name
    fwd, bwd = C._fwd_configs(), C._bwd_configs()
    monkeypatch.delenv(AUTOTUNE_MAX_CONFIGS_ENV, raising=False)
    full_fwd = C._prune_fwd(fwd, {"D": 512})
    full_bwd = C._prune_bwd(bwd, {"D": 512})
    full_fa = fa._prune_fp32_configs(fa._FWD_TUNED.configs, {"Q": torch.empty(1, dtype=torch.float32)})
    assert len(full_fwd) > 1 and len(full_bwd) > 1 and len(full_fa) > 1
    monkeypatch.setenv(AUTOTUNE_MAX_CONFIGS_ENV, "1")
    assert C._prune_fwd(fwd, {"D": 512}) == full_fwd[:1]
    assert C._prune_bwd(bwd, {"D": 512}) == full_bwd[:1]
    # fp32 attention: the first of the *small* tiles, never the spilling 128x64 one
    assert fa._prune_fp32_configs(fa._FWD_TUNED.configs, {"Q": torch.empty(1, dtype=torch.float32)}) == full_fa[:1]
    assert fa._prune_fp32_configs(fa._FWD_TUNED.configs, {"Q": torch.empty(1, dtype=torch.bfloat16)}) == \
        fa._FWD_TUNED.configs[:1]


# --- bench_loss --------------------------------------------------------------------------------------------


def _count_calls():
    calls = []

    def fn(I, T, s):
        calls.append(I.shape[0])
        return s * (I.float() * T.float()).sum()

    return fn, calls


def test_bench_loss_time_one_budget_covers_warmup():
    bl = _load("bench_loss")
    fn, calls = _count_calls()
    # a budget that the first call already exhausts: no warm-up, the peak step is the one timed step
    _, peak, _ = bl.time_one(fn, 8, 4, torch.float32, torch.device("cpu"), warmup=2, iters=10, time_budget_s=0.0)
    assert len(calls) == 2 and peak is None
    fn, calls = _count_calls()
    bl.time_one(fn, 8, 4, torch.float32, torch.device("cpu"), warmup=2, iters=10, time_budget_s=1e9)
    assert len(calls) == 1 + 2 + 10  # first call, warm-ups, timed steps (the peak step is the first of them)
    fn, calls = _count_calls()
    bl.time_one(fn, 8, 4, torch.float32, torch.device("cpu"), warmup=2, iters=10, time_budget_s=0.0,
                first_call=False)
    assert len(calls) == 1  # already compiled and tuned (B = 1M after 256k): the peak step only


def test_bench_loss_skips_first_call_only_when_tuned_at_a_big_batch(monkeypatch):
    bl = _load("bench_loss")
    seen = []

    def fake_time_one(fn, B, *args, first_call=True):
        seen.append((B, first_call))
        return 1e-3, None, 0.0

    monkeypatch.setattr(bl, "time_one", fake_time_one)

    class Args:
        warmup, iters, time_budget, torch_backend_max_b = 0, 1, 1.0, 1 << 30

    warm = set()
    for B in (4096, 65536, 262144, 1 << 20):
        bl._measure_row("bmclip_triton", None, B, 512, torch.bfloat16, torch.device("cpu"), Args, set(), None, warm)
        bl._measure_row("open_clip", None, B, 512, torch.bfloat16, torch.device("cpu"), Args, set(), None, warm)
    assert [f for _, f in seen[0::2]] == [True, True, True, False]  # 256k compiles the two-pass forward; 1M reuses it
    assert all(f for _, f in seen[1::2])  # baselines always get their first call


def test_bench_loss_interrupt_keeps_rows(tmp_path, monkeypatch):
    bl = _load("bench_loss")
    real = bl.time_one
    n = []

    def flaky(*args, **kwargs):
        n.append(1)
        if len(n) == 3:
            raise KeyboardInterrupt  # what the suite's `timeout --signal=INT` raises mid-measurement
        return real(*args, **kwargs)

    monkeypatch.setattr(bl, "time_one", flaky)
    out = tmp_path / "loss"
    assert bl.main(["--quick", "--out", str(out)]) == 130
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["interrupted"] is True
    assert [r["status"] for r in data["rows"]] == ["ok", "ok"]
    assert len(out.with_suffix(".csv").read_text().strip().splitlines()) == 3  # header + 2 rows


# --- bench_attention / bench_train -------------------------------------------------------------------------


def test_bench_attention_interrupt_keeps_rows(tmp_path, monkeypatch):
    ba = _load("bench_attention")
    written = []
    real_write = ba.write_json_atomic
    monkeypatch.setattr(ba, "write_json_atomic", lambda p, d: (written.append(len(d["rows"])), real_write(p, d)))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ba, "bench_text_attention", interrupted)
    out = tmp_path / "attn.json"
    assert ba.main(["--quick", "--sections", "vit,text_attn", "--out", str(out)]) == 130
    data = json.loads(out.read_text())
    assert data["env"]["interrupted"] is True
    methods = [r["method"] for r in data["rows"]]
    assert "triton" in methods and "triton_atomic_dq" not in methods  # the atomic-dQ variant comes last
    assert written[:2] == [1, 2]  # the JSON was rewritten after each row, not only at the end


def test_bench_train_interrupt_keeps_rows(tmp_path, monkeypatch):
    bt = _load("bench_train")

    def fake_batch(args, b, device, mcfg, peak, rows=None):
        res = {"batch": b}
        rows.append(res)
        res["bmclip"] = {"samples_per_s": 1.0, "step_s": 1.0, "mfu": None, "peak_mem_gib": None}
        if b == 4:
            raise KeyboardInterrupt  # stopped during the open_clip side of the second batch size
        res["open_clip"] = "oom"
        return res

    monkeypatch.setattr(bt, "bench_batch", fake_batch)
    out = tmp_path / "train.json"
    assert bt.main(["--batch", "2", "4", "8", "--attn-backend", "sdpa", "--out", str(out)]) == 130
    data = json.loads(out.read_text())
    assert data["meta"]["interrupted"] is True
    assert [r["batch"] for r in data["rows"]] == [2, 4]
    assert data["rows"][1]["bmclip"]["samples_per_s"] == 1.0 and "open_clip" not in data["rows"][1]


# --- the suite script itself ---------------------------------------------------------------------------------


def test_gpu_suite_scripts_parse_and_flags_exist():
    # bash -n catches syntax errors; every benchmark flag the suite passes must exist in that script's parser.
    for sh in ("gpu_suite.sh", "gpu_env.sh", "gpu_dali.sh"):
        subprocess.run(["bash", "-n", str(REPO / "benchmarks" / sh)], check=True)
    text = (REPO / "benchmarks" / "gpu_suite.sh").read_text()
    import re
    import shlex

    checked = 0
    for line in text.replace("\\\n", " ").splitlines():
        m = re.search(r'"\$PY" (benchmarks/bench_\w+\.py)(.*)', line)
        if not m:
            continue
        flags = [t.split("=")[0] for t in shlex.split(m.group(2)) if t.startswith("--")]
        help_text = subprocess.run([sys.executable, str(REPO / m.group(1)), "--help"], capture_output=True,
                                   text=True, check=True, cwd=REPO).stdout
        for f in flags:
            assert re.search(rf"{re.escape(f)}\b", help_text), f"{m.group(1)} has no {f}"
        checked += 1
    assert checked >= 5
