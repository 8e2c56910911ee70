"""TrainConfig values that used to be accepted and then trained wrongly or failed late: each is refused by
load_config / validate() with one ConfigError naming the key, before a run starts; a warm-up longer than the run
is allowed and said."""

import pytest

from bmclip.errors import ConfigError
from bmclip.train.config import config_warnings, get_preset, list_presets, load_config
from bmclip.train.optim import cosine_lr


@pytest.mark.parametrize("override, message", [
    ("--seed=-1", "seed: must be an integer from 0 to 4294967295, got -1"),  # was a numpy error after the model build
    ("--seed=4294967296", "seed: must be an integer from 0 to 4294967295"),
    ("--peak_tflops=-5", "peak_tflops: must be a finite number >= 0"),  # was a negative MFU
    ("--optim.lr=inf", "optim.lr: must be a finite number > 0, got inf"),
    ("--optim.eps=inf", "optim.eps: must be a finite number > 0, got inf"),
    ("--optim.weight_decay=inf", "optim.weight_decay: must be a finite number >= 0, got inf"),
    ("--optim.grad_clip=inf", "optim.grad_clip: must be a finite number >= 0 (the max global grad norm; 0 disables"),
    ("--max_seconds=inf", "max_seconds: must be a finite number >= 0 (0 = no limit), got inf"),
    ("--loss.max_logit_scale=inf", "loss.max_logit_scale: must be a finite number > 0, got inf"),
    ("--fault.step_sleep_s=inf", "fault.step_sleep_s: must be a finite number >= 0, got inf"),
    ("--fault.data_sleep_s=inf", "fault.data_sleep_s: must be a finite number >= 0, got inf"),
    ("--out_dir=", "out_dir: must not be empty"),  # was the current folder
])
def test_out_of_range_and_non_finite_values_are_refused(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny-cpu", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_limits_themselves_are_accepted():
    c = load_config("tiny-cpu", ["--seed=4294967295", "--peak_tflops=0", "--max_seconds=0", "--optim.grad_clip=0"])
    assert (c.seed, c.peak_tflops) == (2**32 - 1, 0.0)
    assert load_config("tiny-cpu", ["--peak_tflops=989"]).peak_tflops == 989.0
    cfg = get_preset("tiny-cpu")
    cfg.seed = True  # programmatic: a bool is not a seed
    with pytest.raises(ConfigError, match="^seed: must be an integer"):
        cfg.validate()


def test_warmup_longer_than_the_run_is_a_warning_with_the_peak_it_would_reach():
    """biomedclip's 2,000 warm-up steps in a 1,000-step run: the LR only ever reaches half of optim.lr and the
    cosine part never runs. Allowed (open_clip allows it; a smoke run of a long recipe is legitimate), but said."""
    c = load_config("biomedclip", ["--steps=1000"])
    (w,) = config_warnings(c)
    assert w.startswith("optim.warmup_steps=2000 is more than steps=1000")
    assert "lr*steps/warmup_steps = 0.00025 instead of optim.lr=0.0005" in w and "--optim.warmup_steps=100" in w
    # as open_clip allows, warm-up may take the whole run: its last step reaches optim.lr, and nothing is said
    c = load_config("biomedclip", ["--steps=2000"])
    assert config_warnings(c) == []
    assert cosine_lr(c.steps - 1, base_lr=c.optim.lr, warmup_steps=c.optim.warmup_steps,
                     total_steps=c.steps) == c.optim.lr
    for name in list_presets():  # the bundled presets fit their own length
        assert config_warnings(get_preset(name).validate()) == []


@pytest.mark.slow
def test_a_run_says_its_config_warnings(tmp_path, capfd):
    from bmclip.train.trainer import train

    train(load_config("tiny-cpu", [f"--out_dir={tmp_path}", "--steps=1", "--data.batch_size=8", "--progress=false",
                                   "--num_threads=1", "--data.val_max_samples=16", "--tensorboard=false"]))
    err = capfd.readouterr().err
    assert "[bmclip] WARNING: optim.warmup_steps=20 is more than steps=1: the learning rate rises" in err


def test_yaml_nulls_mean_unset_or_are_refused(tmp_path):
    """`data: {val: }` used to be the val shard "None": the run trained every step, then failed at validation
    without its final checkpoint; `cache_dir: ~` and `out_dir:` became folders named None."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("preset: tiny-cpu\nmodel:\n  init_checkpoint: ~\ndata:\n  synthetic: false\n  train: x.tar\n"
                   "  val:\n  cache_dir: ~\n  tokenizer: null\n")
    c = load_config(str(cfg))
    assert (c.data.val, c.data.cache_dir, c.data.tokenizer, c.model.init_checkpoint) == ("", "", "", "")
    for key in ("out_dir", "resume", "precision"):
        cfg.write_text(f"preset: tiny-cpu\n{key}:\n")
        with pytest.raises(ConfigError, match=rf"^{key}: must not be null"):
            load_config(str(cfg))


def test_missing_val_shards_are_refused_before_the_run_starts(tmp_path):
    """data.val is read only at the first validation (by default the end of the run): a missing shard used to
    fail after all the training steps."""
    (tmp_path / "val-0.tar").write_bytes(b"")
    base = ["--data.synthetic=false", f"--data.train={tmp_path / 'train-0.tar'}", f"--out_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=r"^data\.val: 1 of 2 shard\(s\) not found: .*val-1\.tar$"):
        load_config("tiny-cpu", [*base, f"--data.val={tmp_path}/val-{{0..1}}.tar"])
    with pytest.raises(ConfigError, match=r"^data\.val: shard .* is a folder, not a \.tar shard"):
        load_config("tiny-cpu", [*base, f"--data.val={tmp_path}"])
    assert load_config("tiny-cpu", [*base, f"--data.val={tmp_path}/val-0.tar"]).data.val.endswith("val-0.tar")
    assert load_config("tiny-cpu", [*base, "--data.val=s3://bucket/val-{0..1}.tar"])  # remote: read when used

    from bmclip.train.trainer import train

    cfg = load_config("tiny-cpu", [*base, f"--data.val={tmp_path}/val-0.tar"])
    (tmp_path / "val-0.tar").unlink()
    with pytest.raises(ConfigError, match=r"^data\.val: "):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before the out_dir was made or the model was built


def test_synthetic_validation_uses_all_val_max_samples():
    """The synthetic held-out set was silently cut to 512 pairs (tiny-cpu asks for 1000); it is generated a batch
    at a time, the same pairs as synthetic_eval_set."""
    import torch

    from bmclip.data.sources import synthetic_eval_set
    from bmclip.train.validation import val_batches

    c = load_config("tiny-cpu")
    assert c.data.val_max_samples == 1000
    batches = list(val_batches(c.data, c.seed, 32, 16, None))
    images = torch.cat([im for im, _ in batches])
    ids = torch.cat([t for _, t in batches])
    ref = synthetic_eval_set(1000, 32, 16, seed=c.seed + 1000)
    assert torch.equal(images, ref["image"]) and torch.equal(ids, ref["input_ids"])
