"""TensorBoard logging: a short tiny run's event file holds exactly the JSONL scalars; tensorboard=false writes none."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install tensorboard)")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from bmclip.train.config import load_config  # noqa: E402
from bmclip.train.metrics import read_jsonl  # noqa: E402
from bmclip.train.trainer import train  # noqa: E402


def _cfg(out, *extra):
    return load_config("tiny-cpu", [f"--out_dir={out}", "--progress=false", "--steps=3", "--log_every=1",
                                    "--data.batch_size=16", "--data.val_max_samples=32", "--optim.warmup_steps=1",
                                    "--ckpt_every=0", "--num_threads=1", *extra])


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None


def test_tensorboard_scalars_equal_the_jsonl(tmp_path):
    train(_cfg(tmp_path, "--tensorboard=true", "--fault.nan_at_steps=[1]"))
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    # what the JSONL says, as (tag -> {step: value}); TensorBoard stores float32
    want: dict[str, dict[int, float]] = {}
    for r in recs:
        for k, v in r.items():
            if k != "step" and _numeric(v):
                want.setdefault(f"{r['kind']}/{k}", {})[r["step"]] = v
    got = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    assert set(got) == set(want)
    for tag, series in want.items():
        assert got[tag].keys() == series.keys(), tag
        for step, v in series.items():
            assert got[tag][step] == float(np.float32(v)), (tag, step, got[tag][step], v)
    # the scalars an operator reads are there for every logged train step, plus the skip and val lines
    for key in ("lr", "logit_scale", "samples_per_s", "samples_per_s_per_gpu", "data_wait_frac",
                "peak_mem_gb", "tflops_per_gpu", "nonfinite_skipped"):
        assert sorted(got[f"train/{key}"]) == [1, 2, 3], key
    # step 2 was skipped: its window has no finite loss or grad norm (null in the JSONL, no point here)
    assert sorted(got["train/loss"]) == sorted(got["train/grad_norm"]) == [1, 3]
    assert all(math.isfinite(v) for v in got["train/loss"].values())
    assert list(got["skip/nonfinite_skipped"].items()) == [(2, 1.0)]  # step 1 (0-based) injected NaN -> step 2
    assert "skip/loss" not in got  # a NaN loss is null in the JSONL and absent from TensorBoard
    assert got["val/image_to_text_R@1"].keys() == {3} and got["val/n"][3] == 32.0
    assert "train/mfu" not in got  # no bf16 peak on CPU: mfu is null, not a fake number


def test_tensorboard_false_writes_no_event_file(tmp_path):
    train(_cfg(tmp_path, "--tensorboard=false", "--steps=1"))
    assert (tmp_path / "metrics.jsonl").is_file()
    assert not (tmp_path / "tb").exists()
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
