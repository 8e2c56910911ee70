"""Faults: SIGKILL at a random step + auto-resume == uninterrupted run, BITWISE (CPU, deterministic);
a kill in the middle of a checkpoint write leaves the previous checkpoint valid and loadable."""

import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from bmclip.resolve import resolve_model
from bmclip.train import checkpoint as C

STEPS = 6
BASE = ["--steps", str(STEPS), "--ckpt_every=2", "--keep_last=10", "--data.batch_size=16", "--deterministic=true",
        "--num_threads=1", "--progress=false", "--model.patch_dropout=0.25", "--data.grad_accum=2",
        "--data.val_max_samples=32", "--log_every=1"]


def _run(out, *extra, expect_kill=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "bmclip", "train", "tiny-cpu", f"--out_dir={out}", *BASE, *extra],
                       capture_output=True, text=True, timeout=600, env=env)
    if expect_kill:
        assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    else:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _assert_same_final(a, b):
    fa = C.load_checkpoint(a / "checkpoints" / f"step_{STEPS:08d}")
    fb = C.load_checkpoint(b / "checkpoints" / f"step_{STEPS:08d}")
    assert fa["model"].keys() == fb["model"].keys()
    for k in fa["model"]:
        assert torch.equal(fa["model"][k], fb["model"][k]), k  # bitwise
    oa, ob = fa["train_state"]["optimizer"]["state"], fb["train_state"]["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)
    assert torch.equal(fa["rank_state"]["rng"]["torch"], fb["rank_state"]["rng"]["torch"])
    assert fa["rank_state"]["loader"] == fb["rank_state"]["loader"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(out)
    return out


@pytest.mark.slow
def test_sigkill_at_random_step_then_resume_is_bitwise(reference, tmp_path):
    # k >= 3: a checkpoint exists before the kill. (Killed at step 1 or 2, the rerun starts from scratch and
    # equals the reference whether or not resuming works: such a k tested nothing.)
    k = random.Random().randint(3, STEPS - 1)
    print(f"killing at step {k}")
    _run(tmp_path, f"--fault.kill_at_step={k}", expect_kill=True)
    latest = C.latest_valid(tmp_path / "checkpoints")
    # the kill comes before step k's own checkpoint: the newest valid one is the last even step < k
    expect = ((k - 1) // 2) * 2
    assert C.read_meta(latest)["step"] == expect
    r = _run(tmp_path)  # same command again: auto-resume from the newest valid checkpoint
    assert f"resumed from {latest} at step {expect}" in r.stdout + r.stderr
    assert f'"steps_this_run": {STEPS - expect},' in r.stdout  # the run summary: only the remaining steps ran
    _assert_same_final(reference, tmp_path)


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous(reference, tmp_path):
    _run(tmp_path, "--fault.kill_in_checkpoint_at_step=4", expect_kill=True)
    ck = tmp_path / "checkpoints"
    assert (ck / ".step_00000004.tmp").is_dir() and not (ck / "step_00000004").exists()
    latest = C.latest_valid(ck)
    assert latest == ck / "step_00000002"
    model = resolve_model(tmp_path).model  # the previous checkpoint is loadable
    assert model.config.vision.image_size == 64
    r = _run(tmp_path)
    assert f"resumed from {latest} at step 2" in r.stdout and f'"steps_this_run": {STEPS - 2},' in r.stdout
    assert not (ck / ".step_00000004.tmp").exists()  # the stale temp dir was replaced and renamed
    _assert_same_final(reference, tmp_path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Real webdataset shards (demo corpus -> PMC builder) and a tokenizer trained on their captions."""
    from bmclip.data.pmc.build import build_dataset
    from bmclip.demo import _read_captions
    from bmclip.demo_corpus import generate_corpus
    from bmclip.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("shards")
    pk = generate_corpus(root / "corpus", n_articles=24, seed=1)
    build_dataset(pk, root / "shards", max_side=96, dedup=False, val_fraction=0.0, test_fraction=0.0,
                  num_workers=1, progress=False)
    urls = sorted(str(p) for p in (root / "shards").glob("train-*.tar"))
    tok = Tokenizer.train(_read_captions(urls), vocab_size=1000, context_length=64)
    tok.save(root / "tok")
    return "::".join(urls), root / "tok"


@pytest.mark.slow
def test_sigkill_resume_bitwise_with_shard_loader(shards, tmp_path):
    # The loader's position (epoch, shard cursor, shuffle buffer, augmentation RNG) is part of the
    # checkpoint: 10 steps of 16 cross an epoch boundary of the ~50-60 training pairs.
    urls, tok = shards
    args = ["--steps=10", "--ckpt_every=3", "--data.synthetic=false", f"--data.train={urls}",
            f"--data.tokenizer={tok}", "--data.num_threads=2", "--data.shuffle_buffer=40", "--data.resampled=false",
            "--data.grad_accum=1"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _run(ref, *args)
    k = random.Random().randint(4, 9)
    print(f"killing at step {k}")
    _run(killed, *args, f"--fault.kill_at_step={k}", expect_kill=True)
    expect = ((k - 1) // 3) * 3  # the newest checkpoint before the kill (every 3 steps)
    # a rerun that started from scratch would also end equal to the reference: it must say it resumed
    r = _run(killed, *args)
    assert f"at step {expect}" in r.stdout + r.stderr and "resumed from" in r.stdout + r.stderr
    assert f'"steps_this_run": {10 - expect},' in r.stdout
    fa = C.load_checkpoint(ref / "checkpoints" / "step_00000010")
    fb = C.load_checkpoint(killed / "checkpoints" / "step_00000010")
    for name in fa["model"]:
        assert torch.equal(fa["model"][name], fb["model"][name]), name
    assert fa["rank_state"]["loader"] == fb["rank_state"]["loader"]
    assert fa["rank_state"]["loader"]["loader"]["epoch"] >= 1  # the runs really crossed an epoch
    assert (killed / "checkpoints" / "step_00000010" / "vocab.txt").is_file()  # tokenizer saved alongside


@pytest.mark.slow
def test_resume_after_the_shards_moved_to_another_place(shards, tmp_path):
    """A run killed, its shards copied elsewhere (node-local scratch of the next job), and the command rerun with
    the new location resumes at the same position, says so, and ends bitwise equal to an uninterrupted run."""
    import shutil

    urls, tok = shards
    common = ["--steps=6", "--ckpt_every=2", f"--data.tokenizer={tok}", "--data.synthetic=false",
              "--data.num_threads=2", "--data.shuffle_buffer=40", "--data.resampled=false", "--data.grad_accum=1"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _run(ref, *common, f"--data.train={urls}")
    _run(killed, *common, f"--data.train={urls}", "--fault.kill_at_step=5", expect_kill=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    moved = "::".join(str(shutil.copy(u, scratch)) for u in urls.split("::"))
    r = _run(killed, *common, f"--data.train={moved}")
    assert "[bmclip] data.train moved: " in r.stderr and "resumed from" in r.stdout, r.stderr[-2000:]
    assert '"steps_this_run": 2,' in r.stdout
    fa = C.load_checkpoint(ref / "checkpoints" / "step_00000006")
    fb = C.load_checkpoint(killed / "checkpoints" / "step_00000006")
    for name in fa["model"]:
        assert torch.equal(fa["model"][name], fb["model"][name]), name
    la, lb = fa["rank_state"]["loader"]["loader"], fb["rank_state"]["loader"]["loader"]
    assert {k: v for k, v in la.items() if k != "urls_sha1"} == {k: v for k, v in lb.items() if k != "urls_sha1"}
    # shards under other names are other data: refused in one line, as before
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    other = "::".join(str(shutil.copy(u, renamed / f"r{i}.tar")) for i, u in enumerate(urls.split("::")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "bmclip", "train", "tiny-cpu", f"--out_dir={killed}", *BASE, *common,
                        "--steps=8", f"--data.train={other}"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 2 and "trained on different data" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_resume_applies_this_runs_optimizer_settings(tmp_path):
    """A resume with other optim.weight_decay / beta2 / eps trains with them, as config.yaml says, and says so
    (the optimizer's load_state_dict brought the checkpoint's values back without a word)."""
    out = tmp_path / "run"
    _run(out, "--steps=2", "--optim.weight_decay=0.1", "--optim.beta2=0.98", "--optim.eps=1e-6")
    r = _run(out, "--steps=3", "--optim.weight_decay=0.0", "--optim.beta2=0.5", "--optim.eps=1e-3")
    assert ("[bmclip] resume: optim.beta2 0.98 -> 0.5, optim.eps 1e-06 -> 0.001, optim.weight_decay 0.1 -> 0.0 "
            "(this run's config applies") in r.stderr
    groups = C.load_checkpoint(out / "checkpoints" / "step_00000003")["train_state"]["optimizer"]["param_groups"]
    assert len(groups) == 2
    assert all(g["betas"] == (0.9, 0.5) and g["eps"] == 1e-3 and g["weight_decay"] == 0.0 for g in groups), groups
    first = C.load_checkpoint(out / "checkpoints" / "step_00000002")["train_state"]["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in first) == [0.0, 0.1]  # the first run's, as saved


@pytest.mark.slow
def test_resume_with_the_other_weight_decay_grouping_is_one_line(tmp_path):
    """AdamW's saved state fits only the groups it was saved with: a resume with the other optim.decay_embeddings
    is a one-line ConfigError saying which value resumes it (it was torch's ValueError traceback)."""
    out = tmp_path / "run"
    _run(out, "--steps=2", "--optim.decay_embeddings=false")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "bmclip", "train", "tiny-cpu", f"--out_dir={out}", *BASE, "--steps=3"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "optim.decay_embeddings: the checkpoint's optimizer state was saved with optim.decay_embeddings=false" \
        in r.stderr and "--optim.decay_embeddings=false" in r.stderr
    _run(out, "--steps=3", "--optim.decay_embeddings=false")
