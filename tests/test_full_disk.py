"""A full disk (and other places the machine refuses to write) is one clear line, never a traceback, and leaves
nothing half-written: a failed checkpoint names the newest complete one a rerun resumes from."""

import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from bmclip.cli import main
from bmclip.train import checkpoint as ckpt_mod

TRAIN = ["--data.batch_size=8", "--num_threads=1", "--log_every=1", "--val_every=0", "--optim.warmup_steps=1",
         "--tensorboard=false", "--progress=false"]


def _one_error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[bmclip] ")]
    assert len(lines) == 1 and lines[0].startswith(f"bmclip {command}: error: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def test_checkpoint_write_failure_is_one_line_naming_the_checkpoint_to_resume_from(tmp_path, monkeypatch, capsys):
    """torch.save reports a full disk as RuntimeError('unexpected pos ...') with the OSError as its context: the
    run stops with one line that says so, the partial checkpoint dir is gone, and the newest complete one stays."""
    real = ckpt_mod.save_model_file

    def full_at_step_4(state, config, path, **kw):
        if "step_00000004" in str(path):
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError(  # noqa: B904 - as torch raises it: the OSError only as the context
                    "[enforce fail at inline_container.cc:672] . unexpected pos 1763712 vs 1763600")
        return real(state, config, path, **kw)

    monkeypatch.setattr(ckpt_mod, "save_model_file", full_at_step_4)
    out = tmp_path / "run"
    assert main(["train", "tiny-cpu", f"--out_dir={out}", "--steps=6", "--ckpt_every=2", *TRAIN]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert f"writing checkpoint step_00000004 in {out / 'checkpoints'} failed: no space left on the device" in line
    assert "MB free there, the checkpoint needs about" in line
    assert "the newest complete checkpoint is step_00000002 (a rerun resumes from it)" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]  # no temp dir left
    monkeypatch.undo()
    assert main(["train", "tiny-cpu", f"--out_dir={out}", "--steps=6", "--ckpt_every=2", *TRAIN]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_an_unwritable_output_place_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    rc = main(["train", "tiny-cpu", f"--out_dir={tmp_path / 'file' / 'run'}", "--steps=2", *TRAIN])
    assert rc == 1
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "Not a directory" in line and str(tmp_path / "file") in line, line


def test_paths_that_cannot_be_made_are_one_line(tmp_path, capsys):
    """A folder needed where a file is (mkdir through it: EEXIST), and a place that does not exist and cannot be
    made (ENOENT: /proc takes no new files), are the operator's to fix: one line naming the path, exit 1."""
    (tmp_path / "file").write_text("not a folder")
    rc = main(["tokenizer", "train", "--input", str(tmp_path / "file"), "--vocab-size", "50",
               "--out", str(tmp_path / "file")])
    assert rc == 1
    line = _one_error_line(capsys.readouterr().err, "tokenizer")
    assert f"{tmp_path / 'file'} is a file, where a folder is needed" in line, line
    rc = main(["tokenizer", "train", "--input", str(tmp_path / "file"), "--vocab-size", "50",
               "--out", f"/proc/bmclip-test-{uuid.uuid4().hex[:6]}"])
    assert rc == 1
    line = _one_error_line(capsys.readouterr().err, "tokenizer")
    assert "No such file or directory: /proc/bmclip-test-" in line, line


@pytest.fixture
def full_disk(tmp_path):
    """A 4 MB tmpfs filled but for ~60 KB (root with mount rights only: skipped elsewhere)."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()[:200]}")
    try:
        st = os.statvfs(mnt)
        (mnt / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 60_000))
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "filler")


@pytest.mark.slow
def test_real_full_disk_train_eval_build(full_disk, tmp_path, capsys):
    from bmclip.demo_corpus import generate_corpus

    out = full_disk / "run"
    assert main(["train", "tiny-cpu", f"--out_dir={out}", "--steps=2", "--ckpt_every=0", *TRAIN]) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "writing checkpoint step_00000002" in line and "no space left on the device" in line, line
    assert "there is no complete checkpoint yet" in line
    assert not any(".tmp" in f for f in _files(full_disk)), _files(full_disk)

    pkgs = generate_corpus(tmp_path / "corpus", n_articles=6, seed=1)
    assert main(["build-dataset", *map(str, pkgs), "--output", str(full_disk / "shards"), "-j", "0",
                 "--no-progress"]) == 1
    line = _one_error_line(capsys.readouterr().err, "build-dataset")
    assert "No space left on device" in line, line
    # what a rerun resumes from, and no half-written file: at most the plan and the staging dir's lock file
    assert set(f for f in _files(full_disk) if "shards" in f) <= {"shards/_staging/plan.json",
                                                                    "shards/_staging/.build.lock"}, _files(full_disk)

    (full_disk / "filler").unlink()  # room for the shards, in tmp_path
    assert main(["build-dataset", *map(str, pkgs), "--output", str(tmp_path / "shards"), "-j", "0",
                 "--no-progress", "--no-dedup"]) == 0
    st = os.statvfs(full_disk)
    (full_disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 4_000))
    capsys.readouterr()
    rc = main(["eval", "retrieval", "tiny", "--shards", str(tmp_path / "shards" / "train-000000.tar"),
               "--out", str(full_disk / "ev"), "--device", "cpu", "--no-progress", "--batch-size", "4",
               "--storage-dtype", "float32"])
    assert rc == 1
    line = _one_error_line(capsys.readouterr().err, "eval")
    assert "No space left on device" in line, line
    assert [f for f in _files(full_disk) if f.startswith("ev")] == [], _files(full_disk)  # no temp npy left
