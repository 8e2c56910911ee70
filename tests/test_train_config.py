"""bmclip.train.config: presets, YAML, typed --key=value overrides, errors naming the key."""

import subprocess
import sys

import pytest

from bmclip.errors import ConfigError
from bmclip.train.config import TrainConfig, config_from_dict, list_presets, load_config, parse_overrides


def test_presets_biomedclip_recipe():
    assert {"biomedclip", "tiny-cpu"} <= set(list_presets())
    c = load_config("biomedclip")
    assert (c.optim.lr, c.optim.beta1, c.optim.beta2, c.optim.eps, c.optim.weight_decay) == (5e-4, 0.9, 0.98, 1e-6, 0.2)
    assert c.optim.warmup_steps == 2000 and c.data.batch_size == 4096
    assert c.model.preset == "biomedclip-vit-b16-224" and c.model.grad_checkpointing
    assert c.loss.max_logit_scale == 100.0
    # 32 epochs of 15.28M pairs at 4,096 per step
    assert c.steps == -(-32 * 15_280_000 // 4096)


def test_nested_overrides_are_typed():
    c = load_config("tiny-cpu", ["--optim.lr=1e-4", "--steps", "7", "--optim.warmup_steps=7", "--data.synthetic=false",
                                 "--data.train=/x/{0..3}.tar", "--fault.nan_at_steps=[2,3]", "--model.compile=yes"])
    assert c.optim.lr == 1e-4 and isinstance(c.optim.lr, float)
    assert c.steps == 7 and isinstance(c.steps, int)
    assert c.data.synthetic is False and c.data.train == "/x/{0..3}.tar"
    assert c.fault.nan_at_steps == [2, 3]
    assert c.model.compile is True


@pytest.mark.parametrize("given", [["--data.train=/x/{0..3}.tar"], ["--data.val=s3://b/val-{0..1}.tar"]])
def test_shards_with_synthetic_data_are_an_error_not_ignored(given):
    """tiny-cpu starts synthetic: shards given without --data.synthetic=false would be silently unused."""
    with pytest.raises(ConfigError, match=r"data.synthetic: is true, so data\.(train|val)=.* would be ignored.*"
                                          r"--data.synthetic=false"):
        load_config("tiny-cpu", given)
    assert load_config("tiny-cpu", [*given, "--data.synthetic=false"]).data.synthetic is False


@pytest.mark.parametrize("override, key", [
    (["--optim.lrr=1"], "optim.lrr"),
    (["--stepz=3"], "stepz"),
    (["--steps=1.5"], "steps"),
    (["--steps=abc"], "steps"),
    (["--optim.lr=fast"], "optim.lr"),
    (["--model.compile=maybe"], "model.compile"),
    (["--optim=3"], "optim"),
    (["--steps.x=3"], "steps"),
    (["--precision=fp16"], "precision"),
    (["--model.patch_dropout=1.5"], "model.patch_dropout"),
    (["--data.batch_size=0"], "data.batch_size"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny-cpu", override)


def test_override_syntax_errors():
    with pytest.raises(ConfigError):
        parse_overrides(["steps=3"])
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--steps"])


def test_yaml_file_with_preset_and_typo(tmp_path):
    good = tmp_path / "run.yaml"
    good.write_text("preset: tiny-cpu\nsteps: 12\noptim:\n  lr: 3.0e-4\n  warmup_steps: 2\ndata:\n  batch_size: 32\n")
    c = load_config(str(good), ["--optim.lr=1e-3"])
    assert (c.steps, c.optim.lr, c.data.batch_size, c.model.preset) == (12, 1e-3, 32, "tiny")
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny-cpu\noptim:\n  learning_rate: 3.0e-4\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown training preset"):
        bad.write_text("preset: nope\n")
        load_config(str(bad))


def test_round_trip_dict():
    c = load_config("tiny-cpu", ["--optim.lr=0.01", "--fault.nan_at_steps=[4]"])
    assert config_from_dict(c.to_dict()) == c
    assert TrainConfig().to_dict()["optim"]["beta2"] == 0.98


def test_cli_reports_config_typo_cleanly():
    r = subprocess.run([sys.executable, "-m", "bmclip", "train", "tiny-cpu", "--optim.lrr=1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "optim.lrr" in r.stderr and "Traceback" not in r.stderr


def test_fused_ops_switch_reaches_the_model():
    import torch

    from bmclip.train.trainer import _build_model

    c = load_config("tiny-cpu", ["--model.fused_ops=true"])
    assert c.model.fused_ops is True
    model = _build_model(c, torch.device("cpu"))
    assert model.config.fused_ops is True
    off = _build_model(load_config("tiny-cpu"), torch.device("cpu"))
    assert off.config.fused_ops is False
    # same parameters either way (checkpoints interchangeable)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in off.named_parameters()]


def test_attn_backend_switches_reach_the_model():
    import torch

    from bmclip.train.trainer import _build_model

    default = load_config("tiny-cpu")
    assert default.model.attn_backend == "auto" and default.model.image_attn_backend is None
    c = load_config("tiny-cpu", ["--model.attn_backend=sdpa", "--model.text_attn_backend=triton"])
    model = _build_model(c, torch.device("cpu"))
    assert (model.config.attn_backend, model.config.image_attn_backend, model.config.text_attn_backend) == \
        ("sdpa", None, "triton")
    assert {layer.attn.attn_backend for layer in model.text.layers} == {"triton"}
    assert {blk.attn.attn_backend for blk in model.visual.blocks} == {"sdpa"}
    c = load_config("tiny-cpu", ["--model.image_attn_backend=xformers", "--model.text_attn_backend=none"])
    assert (c.model.image_attn_backend, c.model.text_attn_backend) == ("xformers", None)
    with pytest.raises(ConfigError, match=r"model\.image_attn_backend"):
        load_config("tiny-cpu", ["--model.image_attn_backend=flash"])
    with pytest.raises(ConfigError, match=r"model\.attn_backend"):
        load_config("tiny-cpu", ["--model.attn_backend=cudnn"])


@pytest.mark.parametrize("override, message", [
    ("--loss.backend=cuda", "loss.backend: must be auto, triton or torch (got 'cuda')"),
    ("--optim.min_lr=-1", "optim.min_lr: must be in [0, optim.lr"),
    ("--optim.min_lr=1", "optim.min_lr: must be in [0, optim.lr"),
    ("--optim.weight_decay=-0.1", "optim.weight_decay: must be a finite number >= 0, got -0.1"),
    ("--optim.eps=0", "optim.eps: must be a finite number > 0, got 0.0"),
    ("--val_every=-1", "val_every: must be >= 0"),
    ("--num_threads=-2", "num_threads: must be >= 0"),
    ("--data.num_threads=0", "data.num_threads: must be >= 1"),
    ("--data.shuffle_buffer=-1", "data.shuffle_buffer: must be >= 0"),
    ("--data.val_max_samples=-1", "data.val_max_samples: must be >= 1"),
    ("--data.synthetic_size=0", "data.synthetic_size: must be >= 1"),
])
def test_values_that_used_to_train_or_crash_late_are_refused_up_front(override, message):
    """Each was accepted: a negative min_lr drove the schedule below zero, a bad loss backend or a negative
    val_max_samples failed with a traceback after the out_dir was made, the rest were ignored or misread."""
    with pytest.raises(ConfigError) as e:
        load_config("tiny-cpu", [override]).validate()
    assert message in str(e.value)
