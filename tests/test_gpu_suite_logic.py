"""CPU checks of the logic the one-shot GPU suite (benchmarks/gpu_suite.sh) depends on.

The suite stops each step with SIGINT at its deadline (``timeout --signal=INT``): every benchmark must then
leave the rows measured so far in its JSON. The correctness step limits autotuning to one config per kernel
through BMCLIP_AUTOTUNE_MAX_CONFIGS. The suite script itself is checked statically (every flag it passes is in
the called script's --help, the step limits leave 90 s of the 600 s call, the order of the steps, no fp32
autotuning, the wheel lists of gpu_prepare.sh and gpu_suite.sh agree) and by a dry run with a stand-in Python.
Nothing here needs a GPU or asserts a timing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from functools import cache
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up by name
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
    fa = importlib.import_module("bmclip.kernels.flash_attention_triton")  # the kernels and their autotuners
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


@pytest.mark.slow
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

    def fake_batch(args, b, device, mcfg, peak, rows=None, *, grad_checkpointing=False, profile=False):
        res = {"batch": b, "grad_checkpointing": grad_checkpointing}
        rows.append(res)
        res["bmclip"] = {"samples_per_s": 1.0, "step_s": 1.0, "mfu": None, "peak_mem_gib": None}
        if b == 4:
            raise KeyboardInterrupt  # stopped during the open_clip side of the second row
        res["open_clip"] = "oom"
        return res

    monkeypatch.setattr(bt, "bench_batch", fake_batch)
    out = tmp_path / "train.json"
    assert bt.main(["--batch", "2", "4", "8", "--attn-backend", "sdpa", "--out", str(out)]) == 130
    data = json.loads(out.read_text())
    assert data["meta"]["interrupted"] is True
    assert [r["batch"] for r in data["rows"]] == [2, 4]
    assert data["rows"][1]["bmclip"]["samples_per_s"] == 1.0 and "open_clip" not in data["rows"][1]


def test_bench_train_row_plan_and_no_checkpointing_default(tmp_path, monkeypatch):
    bt = _load("bench_train")
    seen = []

    def fake_batch(args, b, device, mcfg, peak, rows=None, *, grad_checkpointing=False, profile=False):
        seen.append((b, grad_checkpointing, profile))
        rows.append({"batch": b})
        return rows[-1]

    monkeypatch.setattr(bt, "bench_batch", fake_batch)
    monkeypatch.setenv("BMCLIP_AUTOTUNE_MAX_CONFIGS", "7")  # restored after the test; main sets it to 1 below
    assert bt.main(["--batch", "8", "16", "--no-open-clip"]) == 0
    assert seen == [(8, False, True), (16, False, False)]  # no checkpointing unless asked; one profiled row
    seen.clear()
    # what the suite runs: B=512 without checkpointing first, then the one checkpointing row
    assert bt.main(_suite_invocation("bench_train.py", tmp_path)[1]) == 0
    assert seen == [(512, False, True), (512, True, False)]
    assert os.environ["BMCLIP_AUTOTUNE_MAX_CONFIGS"] == "1"
    assert bt.row_plan([256, 1024], [512], False) == [(256, False), (512, True), (1024, False)]


@pytest.mark.slow
def test_bench_train_cpu_smoke_counts_flops_mfu_and_runs_a_bf16_loss(tmp_path):
    # The real step on CPU (tiny preset, bf16 autocast): the loss must see bf16 features (never an fp32 loss),
    # the FLOPs must equal an independent count from roofline.py, and MFU = FLOPs / step time / peak.
    bt = _load("bench_train")
    rl = _load("roofline")
    out = tmp_path / "train.json"
    assert bt.main(["--quick", "--preset", "tiny", "--no-open-clip", "--precision", "bf16", "--peak-tflops", "0.5",
                    "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["precision"] == "bf16" and data["meta"]["grad_checkpointing"] is False
    (row,) = data["rows"]
    ours = row["bmclip"]
    assert ours["loss_input_dtype"] == "bfloat16"
    assert ours["checkpointing"] == {"visual": False, "text": False}
    from bmclip.model.config import get_preset

    cfg = get_preset("tiny")
    lengths = bt.caption_lengths(4, cfg.text.context_length, 60.0, 0, "captions").tolist()
    independent = sum(rl.train_flops_per_sample(cfg, [n, n], batch=4)["total"] for n in lengths)
    assert row["model_tflop_per_step"] * 1e12 == pytest.approx(independent, rel=1e-12)
    assert row["mean_tokens"] == pytest.approx(sum(lengths) / 4)
    assert ours["samples_per_s"] == pytest.approx(4 / ours["step_s"])
    assert ours["mfu"] == pytest.approx(independent / ours["step_s"] / 0.5e12)
    # which attention ran: the configured backend per tower, and the attention ops one profiled step executed
    from bmclip.model import available_backends

    assert set(ours["attn_backends"]) == {"visual", "text"}
    for names in ours["attn_backends"].values():  # the model's own defaults, each a registered backend
        assert names and set(names) <= set(available_backends())
    calls = sum(a["calls"] for a in ours["profile"]["attention"] if "scaled_dot_product" in a["name"]
                and "backward" not in a["name"].lower() and not a["name"].startswith(("autograd", "Scaled")))
    assert calls >= cfg.vision.layers + cfg.text.layers


@pytest.mark.slow
def test_open_clip_baseline_checkpointing_is_what_the_row_says():
    # open_clip 3.3's HF text tower turns checkpointing on for set_grad_checkpointing(False) too: bench_train
    # must leave it off for the rows without checkpointing, and notice a tower that is not as asked.
    pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    from bmclip.model import create_model
    from bmclip.model.config import get_preset

    bt = _load("bench_train")
    cfg = get_preset("tiny")
    oc = bt.build_open_clip(cfg, timm_model="vit_tiny_patch16_224")  # small towers, same classes as the real one
    # the same work as bmclip's text tower: its dropout, no attention dropout (HF's defaults are 0.1 each)
    bert = oc.text.transformer.config
    assert (bert.hidden_dropout_prob, bert.attention_probs_dropout_prob) == (cfg.text.dropout, 0.0)
    assert bt.set_checkpointing(oc, False) == {"visual": False, "text": False}
    assert bt.set_checkpointing(oc, True) == {"visual": True, "text": True}
    oc = bt.build_open_clip(cfg, timm_model="vit_tiny_patch16_224")
    oc.text.transformer.gradient_checkpointing_enable()  # what open_clip's set_grad_checkpointing(False) does
    with pytest.raises(RuntimeError, match="text"):
        bt.set_checkpointing(oc, False)
    ours = create_model("tiny")
    assert bt.set_checkpointing(ours, True) == {"visual": True, "text": True}
    assert bt.set_checkpointing(ours, False) == {"visual": False, "text": False}


def test_peak_measurements_run_on_cpu(tmp_path):
    bench_common = _load("bench_common")

    assert bench_common.measure_matmul_tflops(torch.device("cpu"), n=64, warmup=1, iters=2) > 0
    assert bench_common.measure_copy_gbps(torch.device("cpu"), nbytes=1 << 20, warmup=1, iters=2) > 0
    assert bench_common.read_peak_json(tmp_path / "missing.json") == {}
    (tmp_path / "p.json").write_text('{"matmul_bf16_tflops": 790}')
    assert bench_common.read_peak_json(tmp_path / "p.json") == {"matmul_bf16_tflops": 790}


# --- the suite script itself ---------------------------------------------------------------------------------

SUITE = REPO / "benchmarks" / "gpu_suite.sh"
PREPARE = REPO / "benchmarks" / "gpu_prepare.sh"


def _joined(path: Path) -> str:
    return path.read_text().replace("\\\n", " ")


def _arrays(text: str) -> dict[str, list[tuple[list[str], str | None]]]:
    """NAME=(...) and NAME+=(...) assignments: name -> [(tokens, guard line or None)]."""
    out: dict = {}
    for m in re.finditer(r"(?m)^(.*?)\b(\w+)(\+?)=\(", text):
        i, depth = m.end(), 1
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        tokens = shlex.split(text[m.end():i - 1])
        guard = m.group(1) if "has_flag" in m.group(1) else None
        out.setdefault(m.group(2), []).append((tokens, guard))
    return out


def _invocations(text: str):
    """(script, tokens, guards) per `"$PY" benchmarks/X.py ...` in the suite, arrays expanded."""
    arrays = _arrays(text)
    found = []
    for line in text.splitlines():
        m = re.search(r'"\$PY" benchmarks/(\w+\.py)(.*)', line)
        if not m:
            continue
        tokens, guards = [], {}
        for tok in shlex.split(m.group(2)):
            a = re.fullmatch(r"\$\{(\w+)\[@\]\}", tok)
            if a:
                for toks, guard in arrays[a.group(1)]:
                    tokens += toks
                    for t in toks:
                        if guard and t.startswith("--"):
                            guards[t] = guard
            else:
                tokens.append(tok)
        found.append((m.group(1), tokens, guards))
    return found


def _suite_invocation(script: str, run: Path | str = "$RUN"):
    """The suite's call of ``script``: (script, tokens with $RUN replaced by ``run``, guards)."""
    (inv,) = [i for i in _invocations(_joined(SUITE)) if i[0] == script]
    return inv[0], [t.replace("$RUN", str(run)) for t in inv[1]], inv[2]


@cache
def _help(script: str) -> str:
    """The script's --help, in this process (argparse first thing in every main; no second torch import)."""
    import contextlib
    import io

    mod = _load(script[:-3])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    return buf.getvalue()


def test_gpu_scripts_parse():
    for sh in ("gpu_suite.sh", "gpu_env.sh", "gpu_dali.sh", "gpu_prepare.sh"):
        subprocess.run(["bash", "-n", str(REPO / "benchmarks" / sh)], check=True)


def test_every_flag_the_suite_passes_is_accepted():
    # Each flag must be in the called script's --help, unless the suite adds it only after probing that --help
    # (has_flag SCRIPT FLAG, for flags that branches working on those scripts add or rename).
    invocations = _invocations(_joined(SUITE))
    scripts = {s for s, _, _ in invocations}
    assert {"roofline.py", "bench_train.py", "bench_loss.py", "bench_attention.py", "bench_fused_ops.py",
            "bench_loader.py"} <= scripts
    for script, tokens, guards in invocations:
        help_text = _help(script)
        for flag in (t for t in tokens if t.startswith("--")):
            if flag in guards:
                assert re.search(rf"has_flag {re.escape(script)} {re.escape(flag)}(?![\w-])", guards[flag]), \
                    (script, flag)
            else:
                assert re.search(rf"{re.escape(flag)}(?![\w-])", help_text), f"{script} has no {flag}"


def test_has_flag_probes_the_help_once_per_script(tmp_path):
    # has_flag greps the script's --help for the whole flag (a prefix does not count), running --help once.
    fn = re.search(r"(?ms)^has_flag\(\) \{.*?^\}", SUITE.read_text()).group(0)
    fake = tmp_path / "py"
    fake.write_text("#!/usr/bin/env bash\necho run >> \"$CALLS\"\n"
                    "printf '  --time-budget TIME_BUDGET\\n  --out OUT\\n'\n")
    fake.chmod(0o755)
    script = f'{fn}\nPY="{fake}"\nRUN="{tmp_path}"\n' \
             "has_flag bench_loss.py --time-budget && echo yes; has_flag bench_loss.py --time-budg && echo prefix; " \
             "has_flag bench_loss.py --no-such-flag || echo no; has_flag bench_loss.py --time && echo part; " \
             "has_flag bench_loss.py --out && echo out"
    env = {**os.environ, "CALLS": str(tmp_path / "calls")}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert out == ["yes", "no", "out"]
    assert (tmp_path / "calls").read_text().split() == ["run"]
    assert "--time-budget" in _help("bench_loss.py")  # the flag probed here is the real one


def _plans():
    text = SUITE.read_text()
    plans = [(m.group(1), int(m.group(2))) for m in re.finditer(r"(?m)^plan (\w+) (\d+)\s*$", text)]
    consts = {k: int(v) for k, v in re.findall(r"(?m)^(KILL_AFTER_S|BUDGET_S)=(\d+)\s*$", text)}
    return plans, consts


def test_step_limits_keep_90_seconds_of_the_600_second_call():
    plans, consts = _plans()
    total = sum(limit for _, limit in plans)
    assert consts["BUDGET_S"] <= 600 - 90
    assert total + consts["KILL_AFTER_S"] <= consts["BUDGET_S"]
    # the arithmetic written in the header is the one the plan lines add up to
    header = SUITE.read_text().split("source ")[0]
    m = re.search(r"((?:\d+\+)+\d+) = (\d+) s, \+ (\d+) = (\d+) s <= (\d+) s", header)
    assert m, "the header states the budget sum"
    assert [int(x) for x in m.group(1).split("+")] == [limit for _, limit in plans]
    assert int(m.group(2)) == total and int(m.group(3)) == consts["KILL_AFTER_S"]
    assert int(m.group(4)) == total + consts["KILL_AFTER_S"] and int(m.group(5)) == consts["BUDGET_S"]
    # every step that runs is planned first (its deadline includes its own limit)
    steps = re.findall(r"(?m)^\s*run_step (\w+)", SUITE.read_text())
    assert set(steps) == {name for name, _ in plans}


def test_training_step_comes_right_after_the_correctness_pass():
    steps = re.findall(r"(?m)^\s*run_step (\w+)", SUITE.read_text())
    assert steps[:4] == ["wheels", "device", "peak", "gpu_tests"]
    assert steps[4] == "bench_train"
    assert steps.index("bench_loss") < steps.index("bench_attention") < steps.index("bench_fused_ops")
    assert steps[-3:] == ["build_ext", "bench_loader_gpu", "summary"]  # the C++ build only where the loader needs it


def test_no_step_autotunes_an_fp32_loss():
    text = _joined(SUITE)
    (tests_line,) = [ln for ln in text.splitlines() if re.search(r"run_step gpu_tests", ln)]
    assert "BMCLIP_AUTOTUNE_MAX_CONFIGS=1" in tests_line  # the fp32 checks compile one config, nothing tuned
    for script, tokens, _ in _invocations(text):
        assert not {"fp32", "float32"} & set(tokens), (script, tokens)
        for i, t in enumerate(tokens[:-1]):
            if t in ("--dtype", "--precision"):
                assert tokens[i + 1] in ("bf16", "fp16", "auto"), (script, tokens)
    _, loss_tokens, loss_guards = _suite_invocation("bench_loss.py")
    assert loss_tokens[loss_tokens.index("--dtype") + 1] == "bf16" and "--dtype" in loss_guards
    _, train_tokens, _ = _suite_invocation("bench_train.py")
    assert "--precision" not in train_tokens  # default auto: bf16 on CUDA (the loss then sees bf16 features)
    assert train_tokens[train_tokens.index("--autotune-max-configs") + 1] == "1"
    assert re.search(r'"--precision".*default="auto"', (REPO / "benchmarks" / "bench_train.py").read_text())


def _bash_array(text: str, name: str) -> list[str]:
    m = re.search(rf"(?m)^{name}=\(([^)]*)\)", text)
    assert m, name
    return shlex.split(m.group(1))


def test_prepare_downloads_exactly_what_the_suite_installs():
    prep, suite = PREPARE.read_text(), SUITE.read_text()

    def as_files(specs):  # open_clip_torch==3.3.0 -> open_clip_torch-3.3.0 (the wheel's file-name prefix)
        return [s.replace("-", "_").replace("==", "-") for s in specs]

    assert as_files(_bash_array(prep, "WHEELS")) == _bash_array(suite, "WHEELS")
    assert as_files(_bash_array(prep, "FALLBACK_WHEELS")) == _bash_array(suite, "FALLBACK_WHEELS")
    assert {w.split("-")[0] for w in _bash_array(suite, "WHEELS")} >= {"open_clip_torch", "ftfy", "wcwidth"}
    assert "--no-deps --only-binary=:all:" in prep and "--python-version 3.12" in prep
    assert '"$WHEEL_DIR/fallback/' in suite and "fetch .whl/fallback" in prep


FAKE_PY = r"""#!/usr/bin/env bash
{ printf '%q ' "$@"
  echo "| MAXCFG=${BMCLIP_AUTOTUNE_MAX_CONFIGS:-} TCA=${TRITON_CACHE_AUTOTUNING:-} PP=$PYTHONPATH"; } >>"$FAKE_LOG"
case "$1" in
    -c) case "$2" in *"import xdist"*|*"'open_clip'"*) exit 0 ;; *) exit 1 ;; esac ;;
    -m) exit 0 ;;
esac
for a in "$@"; do
    case "$a" in
        --help) cat "$HELP_DIR/$(basename "$1")" ; exit 0 ;;
        --summary) exec "$REAL_PY" "$@" ;;
    esac
done
echo "pretend $*"
exit 0
"""


def test_suite_dry_run_with_a_stand_in_python(tmp_path):
    # The whole script end to end with a stand-in for python3 that records its calls: --help and the summary run
    # for real, everything else pretends. No pybind11 and no bmclip._C: the loader and its build are skipped;
    # the stand-in says the box's timm is too old, so the fallback timm wheel is installed too.
    whl = tmp_path / "whl"
    (whl / "fallback").mkdir(parents=True)
    wheels = _bash_array(SUITE.read_text(), "WHEELS")
    (fallback,) = _bash_array(SUITE.read_text(), "FALLBACK_WHEELS")
    for w in wheels:
        (whl / f"{w}-py3-none-any.whl").write_bytes(b"")
    (whl / "fallback" / f"{fallback}-py3-none-any.whl").write_bytes(b"")
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    log, out, run, helps = tmp_path / "calls.log", tmp_path / "out", tmp_path / "run", tmp_path / "help"
    helps.mkdir()
    for script in ("bench_loss.py", "bench_attention.py"):  # the real --help texts, for the suite's probes
        (helps / script).write_text(_help(script))
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(out), "GPU_SUITE_RUN": str(run), "WHEEL_DIR": str(whl),
           "FAKE_LOG": str(log), "REAL_PY": sys.executable, "HELP_DIR": str(helps)}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(["bash", str(SUITE)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    calls = log.read_text().splitlines()
    runs = [c for c in calls if "--help" not in c and not c.startswith("-c ")]
    kinds = []
    for c in runs:
        m = re.search(r"benchmarks/(\w+\.py)", c)
        kinds.append(m.group(1) if m else " ".join(shlex.split(c.split("|")[0])[:2]))
    assert kinds == ["-m pip", "roofline.py", "-m pytest", "bench_train.py", "bench_loss.py", "bench_attention.py",
                     "bench_fused_ops.py", "roofline.py"]
    pip = shlex.split(runs[0].split("|")[0])
    installed = sorted(Path(a).name for a in pip if a.endswith(".whl"))
    assert installed == sorted(f"{w}-py3-none-any.whl" for w in [*wheels, fallback])
    assert "--measure" in runs[1] and "--summary" in runs[-1]
    assert "MAXCFG=1" in runs[2] and "-m gpu" in runs[2]
    assert all("TCA=1" in c for c in runs[1:])  # Triton keeps tuning results on disk in every step
    assert all(":/tmp/site" in c for c in runs[1:])  # the installed wheels are importable in every step
    loss = shlex.split(runs[4].split("|")[0])
    assert loss[loss.index("--sizes") + 1] == "32768,65536,1048576" and loss[loss.index("--dtype") + 1] == "bf16"
    # at most 8 files come back from $OUT: the archive, the status, the log, the summary
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["gpu_suite_results.tar.gz", "status.txt", "suite.log", "summary.txt"]
    with tarfile.open(out / "gpu_suite_results.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"peak.log", "gpu_tests.log", "bench_train.log", "bench_loss.log", "summary.log"} <= names
    status = (out / "status.txt").read_text()
    for step in ("wheels", "peak", "gpu_tests", "bench_train", "bench_loss", "bench_attention", "summary"):
        assert re.search(rf"(?m)^{step} rc=0 seconds=\d+$", status), status
    assert "targets:" in (out / "summary.txt").read_text() and "targets:" in res.stdout
