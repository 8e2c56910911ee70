"""What an operator of ``bmclip train`` sees and is protected from: the out_dir lock, one-line refusals of a
checkpoint of another model / other data, the biomedclip vocabulary check, the loader's counters in the metrics,
plain progress lines off a terminal (a bar only on one), the start-up banner and config.yaml."""

import fcntl
import json
import os
import pty
import select
import socket
import struct
import subprocess
import sys
import termios
import time

import pytest

from bmclip.errors import ConfigError
from bmclip.train.config import load_config
from bmclip.train.metrics import read_jsonl
from bmclip.train.runctl import LOCK_NAME, OutDirLock

FAST = ["--steps=2", "--data.batch_size=16", "--num_threads=1", "--data.val_max_samples=32", "--log_every=1",
        "--optim.warmup_steps=1", "--tensorboard=false"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(out, *extra, timeout=600):
    return subprocess.run([sys.executable, "-m", "bmclip", "train", "tiny-cpu", f"--out_dir={out}", *FAST, *extra],
                          capture_output=True, text=True, timeout=timeout, env=_env())


def _one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bmclip train: error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------ out_dir lock

def _write_lock(out, host, pid):
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01T00:00:00Z"}))


def test_lock_refuses_a_live_run_and_takes_over_a_dead_ones(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_lock(tmp_path, socket.gethostname(), sleeper.pid)
        with pytest.raises(ConfigError, match=f"in use by a run on this host \\(pid {sleeper.pid}"):
            OutDirLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = OutDirLock(tmp_path).acquire()  # the same pid is dead now: a stale lock, taken over
    assert f"stale lock of pid {sleeper.pid}" in lock.note
    held = json.loads((tmp_path / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_another_host_is_refused_unless_broken(tmp_path):
    _write_lock(tmp_path, "gpu-node-17", 4242)
    with pytest.raises(ConfigError, match="locked by host gpu-node-17 \\(pid 4242.*--break_lock=true"):
        OutDirLock(tmp_path).acquire()
    lock = OutDirLock(tmp_path, break_lock=True).acquire()
    assert "gpu-node-17" in lock.note
    lock.release()


@pytest.mark.slow
def test_second_run_into_a_busy_out_dir_is_refused_in_one_line(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        _write_lock(tmp_path, socket.gethostname(), sleeper.pid)  # a live training process holds out_dir
        line = _one_line_error(_train(tmp_path))
        assert f"pid {sleeper.pid}" in line and "another --out_dir" in line
        assert not (tmp_path / "checkpoints").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------------------------------ reruns

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = _train(out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_rerun_with_another_model_is_one_line(finished_run):
    line = _one_line_error(_train(finished_run, "--model.preset=biomedclip-vit-s16-224", "--steps=4"))
    assert "of a different model" in line and "'tiny' there" in line and "'biomedclip-vit-s16-224' here" in line
    assert "--resume=none" in line and "another --out_dir" in line


@pytest.mark.slow
def test_rerun_with_other_data_is_one_line(finished_run):
    line = _one_line_error(_train(finished_run, "--data.synthetic_size=512", "--steps=4"))
    assert "trained on different data (data.synthetic_size 2048 there, 512 here)" in line
    assert "--resume=none" in line
    # the suggested way out works
    r = _train(finished_run, "--data.synthetic_size=512", "--steps=3", "--resume=none")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fresh start at step 0" in r.stdout
    # the earlier run's checkpoint (step 2) was moved aside, not mixed with (or pruned against) the new run's
    (aside,) = finished_run.glob("checkpoints.replaced-*")
    assert [p.name for p in aside.iterdir()] == ["step_00000002"]
    assert [p.name for p in (finished_run / "checkpoints").iterdir()] == ["step_00000003"]
    steps = [x["step"] for x in read_jsonl(finished_run / "metrics.jsonl") if x.get("kind") == "train"]
    assert steps == [1, 2, 3]  # the earlier run's rows were replaced, not duplicated


@pytest.mark.slow
def test_biomedclip_preset_refuses_the_bundled_vocabulary():
    r = subprocess.run([sys.executable, "-m", "bmclip", "train", "biomedclip", "--data.train=/nowhere/x.tar",
                        "--out_dir=/nonexistent-bmclip-out"], capture_output=True, text=True, timeout=300,
                       env=_env())
    line = _one_line_error(r)
    assert "data.tokenizer" in line and "vocab.txt" in line and "BiomedCLIP" in line and "4096" in line
    assert not os.path.exists("/nonexistent-bmclip-out")  # refused before anything was written

    from bmclip.train.trainer import _check_tokenizer_choice

    _check_tokenizer_choice(load_config("biomedclip", ["--data.synthetic=true"]))  # synthetic ids need none
    _check_tokenizer_choice(load_config("tiny-cpu", ["--data.synthetic=false", "--data.train=x.tar"]))  # it fits


# ------------------------------------------------------------------------------------------ loader counters

class _CountingSource:
    """A synthetic source that also reports loader counters (``data_stats``), as shard sources do."""

    def __init__(self, inner, skipped_per_batch):
        self.inner, self.skipped_per_batch = inner, skipped_per_batch
        self.read = self.skipped = 0

    def __next__(self):
        b = next(self.inner)
        # samples_read counts valid and skipped samples alike (the data_stats contract of bmclip.data.sources)
        self.read += len(b["input_ids"]) + self.skipped_per_batch
        self.skipped += self.skipped_per_batch
        return b

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, st):
        self.inner.load_state_dict(st)

    def data_stats(self):
        return {"samples_read": self.read, "samples_skipped": self.skipped,
                "skipped_by_reason": {"corrupt_image": self.skipped} if self.skipped else {},
                "tar_errors": 0, "example_error": "shard-000003.tar/abc.jpg: bad Huffman code" if self.skipped
                else None}


@pytest.mark.parametrize("skipped_per_batch", [0, 2])
def test_loader_counters_in_metrics_summary_and_skip_warning(tmp_path, monkeypatch, capsys, skipped_per_batch):
    from bmclip.train import trainer

    build = trainer._build_source
    monkeypatch.setattr(trainer, "_build_source",
                        lambda *a, **k: _CountingSource(build(*a, **k), skipped_per_batch))
    cfg = load_config("tiny-cpu", [f"--out_dir={tmp_path}", "--progress=false", *FAST, "--steps=3"])
    summary = trainer.train(cfg)
    err = capsys.readouterr().err
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("kind") == "train"]
    assert [r["data_samples_read"] for r in rows] == [(16 + skipped_per_batch) * i for i in (1, 2, 3)]
    assert [r["data_samples_skipped"] for r in rows] == [skipped_per_batch * i for i in (1, 2, 3)]
    rate = 2 / 18 if skipped_per_batch else 0.0
    assert rows[-1]["data_skip_rate"] == pytest.approx(rate)
    assert rows[-1]["data_skip_rate_exceeded"] is bool(skipped_per_batch)
    assert summary["data"]["samples_read"] == 3 * (16 + skipped_per_batch)
    assert summary["data"]["samples_skipped"] == 3 * skipped_per_batch
    warnings = [ln for ln in err.splitlines() if "WARNING: the data loader skipped" in ln]
    if skipped_per_batch:
        assert len(warnings) == 1  # once, not every log line
        assert "11.1% of the samples it read (2 of 18; data.max_skip_rate 1%): corrupt_image 2" in warnings[0]
        assert "bad Huffman code" in warnings[0]
        assert rows[-1]["data_skipped_by_reason"] == {"corrupt_image": 6}
    else:
        assert not warnings


# ------------------------------------------------------------------------------------------ what is printed

@pytest.mark.slow
def test_plain_lines_off_a_terminal_banner_and_config_yaml(tmp_path):
    r = _train(tmp_path, "--steps=4", "--log_every=2")  # progress=true (the default), output to pipes
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\r" not in r.stdout + r.stderr  # no progress-bar redraws in a log file
    lines = r.stdout.splitlines()
    steps = [ln for ln in lines if ln.startswith("[bmclip] step ")]
    assert [ln.split()[2] for ln in steps] == ["2/4", "4/4"]
    assert all(" loss " in ln and " samples/s " in ln and " data wait " in ln and " ETA " in ln for ln in steps)
    banner = "\n".join(ln for ln in lines if ln.startswith("[bmclip] ") and ln not in steps)
    for part in ("model tiny (", "M parameters", "data: synthetic (2048 pairs); global batch 16", "device cpu",
                 "world size 1", f"out_dir {tmp_path}", "fresh start at step 0", "4 steps"):
        assert part in banner, (part, banner)
    saved = load_config(str(tmp_path / "config.yaml"))
    assert saved.to_dict() == load_config("tiny-cpu", [f"--out_dir={tmp_path}", *FAST, "--steps=4",
                                                       "--log_every=2"]).to_dict()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
def test_progress_bar_on_a_terminal_and_errors_on_their_own_line(tmp_path):
    # stderr is a pseudo-terminal: the bar is drawn; an error in the middle of the run starts on a new line.
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    p = subprocess.Popen([sys.executable, "-m", "bmclip", "train", "tiny-cpu", f"--out_dir={tmp_path}", *FAST,
                          "--steps=6", "--fault.nan_at_steps=[2]", "--fault.max_nonfinite=1"],
                         stdout=subprocess.DEVNULL, stderr=slave, env=_env())
    os.close(slave)
    chunks, t0 = [], time.time()
    while time.time() - t0 < 600:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif p.poll() is not None:
            break
    os.close(master)
    assert p.wait(timeout=60) == 2
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "\rtrain:" in text and "it/s" in text  # tqdm's bar was drawn on the terminal
    i = text.index("bmclip train: error: ")
    assert text[i - 1] == "\n", repr(text[max(0, i - 80):i + 40])  # not glued to the bar's line
    assert "non-finite" in text[i:]


def test_signal_handler_requests_and_the_third_sigint_aborts(capfd):
    # Real signals to this process: requests are recorded (the loop acts on them at a step boundary); repeated
    # stop signals do not interrupt, the third SIGINT does (KeyboardInterrupt); handlers are restored afterwards.
    import signal

    from bmclip.train.runctl import StopSignals

    before = signal.getsignal(signal.SIGINT)
    s = StopSignals("checkpoint")
    assert s.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert s.take_checkpoint_request() and not s.take_checkpoint_request() and s.stop is None
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert s.stop == "SIGINT" and s.stop_signum() == signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)  # noted, ignored
        os.kill(os.getpid(), signal.SIGINT)  # noted, ignored
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        s.restore()
    assert signal.getsignal(signal.SIGINT) is before
    err = capfd.readouterr().err
    assert "SIGTERM again: already stopping (SIGINT)" in err and "1 more SIGINT aborts" in err
    assert "aborting without a checkpoint" in err


# ------------------------------------------------------------------------------------------ what a stopped run says


def _sigterm_after_step(monkeypatch, at_step: int) -> None:
    """Every run in this test sends itself SIGTERM when its step ``at_step`` ends (a step_end hook)."""
    import signal

    from bmclip.train import hooks as hooks_mod

    real = hooks_mod.FaultInjector.install

    def install(self, hooks):
        hooks = real(self, hooks)
        hooks.add("step_end", lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == at_step else None)
        return hooks

    monkeypatch.setattr(hooks_mod.FaultInjector, "install", install)


@pytest.mark.parametrize("resume", ["auto", "none"])
def test_a_stopped_run_says_how_to_resume_for_its_resume_setting(tmp_path, monkeypatch, capfd, resume):
    """'rerun the same command to resume' is only true with resume=auto: with resume=none the rerun sets the
    checkpoints aside and starts afresh, so the stop says to rerun with --resume=auto, which does resume."""
    from bmclip.train.trainer import train

    out = tmp_path / "run"
    over = ["--steps=4", "--data.batch_size=8", "--num_threads=1", "--log_every=1", "--val_every=0",
            "--optim.warmup_steps=1", "--tensorboard=false", "--progress=false", f"--out_dir={out}"]
    _sigterm_after_step(monkeypatch, 2)
    summary = train(load_config("tiny-cpu", [*over, f"--resume={resume}"]))
    assert summary["stopped_by_signal"] == "SIGTERM" and summary["steps"] == 2
    err = capfd.readouterr().err
    if resume == "auto":
        assert err.count("rerun the same command to resume") == 2, err  # at the signal and at the stop
        assert "--resume=auto" not in err
    else:
        assert "rerun the same command" not in err, err
        assert err.count("this run has resume=none: rerun it with --resume=auto to resume from that checkpoint") \
            == 2, err
    monkeypatch.undo()
    summary = train(load_config("tiny-cpu", [*over, "--resume=auto"]))  # what both messages lead to
    assert summary["steps"] == 4 and summary["steps_this_run"] == 2
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} at step 2" in capfd.readouterr().out


@pytest.mark.slow
def test_a_demo_stopped_in_training_stops_without_a_report(tmp_path, monkeypatch, capfd):
    """SIGTERM while the demo trains ends the demo (no evaluation of a half-trained model, no report.json, exit
    143 through the CLI) with the demo's own hint: the demo always trains from step 0, so it is rerun whole."""
    from bmclip.cli import main

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "report.json").write_text("{}")  # a finished earlier demo's: not this run's
    _sigterm_after_step(monkeypatch, 2)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--size", "ci"]) == 143
    err = capfd.readouterr().err
    assert "bmclip demo: stopped by SIGTERM" in err, err[-2000:]
    assert "the demo trains from step 0 each time: rerun the same command to run it again" in err, err[-2000:]
    assert "--resume" not in err and "to resume" not in err, err[-2000:]
    assert not (tmp_path / "demo" / "report.json").exists()


def test_a_slow_first_step_gets_a_line_of_its_own(tmp_path, monkeypatch, capsys):
    """Minutes of compiling and autotuning before the first `step N/` line must not read as a hung run: a slow
    first step is reported at once; a fast one adds nothing."""
    from bmclip.train import trainer as trainer_mod

    over = ["--steps=3", "--data.batch_size=8", "--num_threads=1", "--log_every=3", "--val_every=0",
            "--optim.warmup_steps=1", "--tensorboard=false", "--progress=false", "--fault.step_sleep_s=0.3"]
    monkeypatch.setattr(trainer_mod, "FIRST_STEP_NOTE_S", 0.25)
    trainer_mod.train(load_config("tiny-cpu", [*over, f"--out_dir={tmp_path / 'a'}"]))
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("[bmclip] step ")]
    assert lines[0].startswith("[bmclip] step 1: the first step took ") and "a line every 3 steps" in lines[0], out
    assert lines[1].startswith("[bmclip] step 3/3 ") and len(lines) == 2, out
    monkeypatch.setattr(trainer_mod, "FIRST_STEP_NOTE_S", 60.0)
    trainer_mod.train(load_config("tiny-cpu", [*over, f"--out_dir={tmp_path / 'b'}"]))
    assert "the first step took" not in capsys.readouterr().out
