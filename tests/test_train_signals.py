"""Real signals on CPU runs: SIGTERM / SIGINT / SIGUSR1 write a checkpoint at the step they arrive at (every rank
the same step), and rerunning the same command resumes to BITWISE the weights of an uninterrupted run.

The interrupted runs sleep after each step (``fault.step_sleep_s``, numerics unchanged) so that a loaded machine
still leaves a window; each signal is sent only after the run printed a ``step N/`` line.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from bmclip.train import checkpoint as C
from bmclip.train.metrics import read_jsonl

STEPS = 12
BASE = ["--steps", str(STEPS), "--ckpt_every=0", "--keep_last=10", "--data.batch_size=16", "--deterministic=true",
        "--num_threads=1", "--progress=false", "--data.val_max_samples=32", "--log_every=1"]
TIMEOUT = 900  # generous: the machine may be shared and slow


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _cmd(out, *extra):
    return [sys.executable, "-m", "bmclip", "train", "tiny-cpu", f"--out_dir={out}", *BASE, *extra]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bmclip",
            "train", "tiny-cpu"]


def _run(cmd, ok=True):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    if ok:
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r


class _Live:
    """A training subprocess whose output is collected by threads (so a marker can be awaited)."""

    def __init__(self, cmd):
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(s, buf), daemon=True)
                         for s, buf in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, buf):
        for line in stream:
            buf.append(line)

    def wait_for(self, text, timeout=TIMEOUT):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if any(text in ln for ln in self.out + self.err):
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        self.p.kill()
        raise AssertionError(f"never saw {text!r}; rc={self.p.poll()}\n{''.join(self.out)[-2000:]}\n"
                             f"{''.join(self.err)[-2000:]}")

    def finish(self, timeout=TIMEOUT):
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise
        for t in self._threads:
            t.join(timeout=30)
        return rc, "".join(self.out), "".join(self.err)


def _assert_same_final(a: Path, b: Path, steps=STEPS, ranks=(0,)):
    for rank in ranks:
        fa = C.load_checkpoint(a / "checkpoints" / f"step_{steps:08d}", rank)
        fb = C.load_checkpoint(b / "checkpoints" / f"step_{steps:08d}", rank)
        assert fa["model"].keys() == fb["model"].keys()
        for k in fa["model"]:
            assert torch.equal(fa["model"][k], fb["model"][k]), k  # bitwise
        oa, ob = fa["train_state"]["optimizer"]["state"], fb["train_state"]["optimizer"]["state"]
        for i in oa:
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(oa[i][k], ob[i][k]), (i, k)
        assert torch.equal(fa["rank_state"]["rng"]["torch"], fb["rank_state"]["rng"]["torch"])
        assert fa["rank_state"]["loader"] == fb["rank_state"]["loader"]


def _stopped_step(out: Path) -> int:
    """The only checkpoint (ckpt_every=0: nothing but the signal writes one before the end)."""
    ck = C.list_checkpoints(out / "checkpoints")
    assert len(ck) == 1, ck
    step, path = ck[0]
    assert C.is_valid(path) and C.read_meta(path)["step"] == step
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dir left behind
    return step


def _train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r.get("kind") == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(_cmd(out))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_stop_signal_checkpoints_and_resume_is_bitwise(reference, tmp_path, sig):
    live = _Live(_cmd(tmp_path, "--fault.step_sleep_s=0.5"))
    live.wait_for("[bmclip] step 3/")
    os.kill(live.p.pid, getattr(signal, sig))
    if sig == "SIGINT":  # a second Ctrl-C while stopping must not cut the checkpoint short
        # the first one lands in a step ("stopping after step N") or in the wait for the next batch ("while
        # waiting for data: stopping at step N"); either way the run is now stopping
        live.wait_for("with a checkpoint (rerun the same command to resume)")
        os.kill(live.p.pid, signal.SIGINT)
    rc, out, err = live.finish()
    assert rc == 128 + getattr(signal, sig), (rc, err[-2000:])
    k = _stopped_step(tmp_path)
    assert 3 <= k < STEPS
    assert f"stopped by {sig} at step {k} of {STEPS}" in err
    summary = json.loads(out[out.index("\n{") + 1:])
    assert summary["stopped_by_signal"] == sig and summary["steps"] == k
    assert not (tmp_path / ".bmclip.lock").exists()  # released on the way out
    # the same command again resumes from the signal's checkpoint and ends bitwise equal to the reference
    r = _run(_cmd(tmp_path))
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{k:08d}'} at step {k}" in r.stdout
    assert f'"steps_this_run": {STEPS - k},' in r.stdout
    _assert_same_final(reference, tmp_path)
    assert _train_steps(tmp_path) == list(range(1, STEPS + 1))  # every step once, none duplicated


@pytest.mark.slow
def test_sigint_while_waiting_for_data_checkpoints_at_once_and_resume_is_bitwise(reference, tmp_path):
    """A loader that takes seconds per batch (a damaged data set being searched): SIGINT during that wait stops
    the run at once with the checkpoint of the last finished step, not after the next batch arrives."""
    live = _Live(_cmd(tmp_path, "--fault.data_sleep_s=8"))
    live.wait_for("[bmclip] step 3/")
    time.sleep(0.5)  # inside the next 8 s data wait
    t0 = time.time()
    os.kill(live.p.pid, signal.SIGINT)
    rc, out, err = live.finish()
    took = time.time() - t0
    assert rc == 130, (rc, err[-2000:])
    assert "SIGINT while waiting for data: stopping at step" in err, err[-2000:]
    assert took < 6, took  # did not wait out the 8 s batch (the checkpoint write and exit take well under 6 s)
    k = _stopped_step(tmp_path)
    assert 3 <= k < STEPS
    assert f"stopped by SIGINT at step {k} of {STEPS}" in err
    r = _run(_cmd(tmp_path))
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{k:08d}'} at step {k}" in r.stdout
    _assert_same_final(reference, tmp_path)
    assert _train_steps(tmp_path) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_usr1_checkpoints_and_continues(reference, tmp_path):
    live = _Live(_cmd(tmp_path, "--fault.step_sleep_s=0.3", "--keep_last=10"))
    live.wait_for("[bmclip] step 3/")
    os.kill(live.p.pid, signal.SIGUSR1)
    rc, out, err = live.finish()
    assert rc == 0, err[-2000:]
    steps = [s for s, _ in C.list_checkpoints(tmp_path / "checkpoints")]
    assert len(steps) == 2 and 3 <= steps[0] < STEPS and steps[1] == STEPS, steps
    assert f"SIGUSR1: checkpoint {tmp_path / 'checkpoints' / f'step_{steps[0]:08d}'} written; continuing" in err
    _assert_same_final(reference, tmp_path)  # the extra checkpoint does not perturb training


@pytest.mark.slow
def test_usr1_stop_mode_stops_cleanly(tmp_path):
    live = _Live(_cmd(tmp_path, "--fault.step_sleep_s=0.5", "--on_usr1=stop"))
    live.wait_for("[bmclip] step 2/")
    os.kill(live.p.pid, signal.SIGUSR1)
    rc, out, err = live.finish()
    assert rc == 0, err[-2000:]
    k = _stopped_step(tmp_path)
    assert 2 <= k < STEPS and f"stopped by SIGUSR1 at step {k}" in err
    assert not (tmp_path / "open_clip").exists()


@pytest.mark.slow
def test_metrics_rows_past_the_checkpoint_are_dropped_on_resume(tmp_path):
    # SIGKILL after step 5 with the newest checkpoint at step 4: step 5 is logged, then replayed by the rerun.
    cmd = _cmd(tmp_path, "--ckpt_every=2", "--steps=8")
    _run(cmd + ["--fault.kill_at_step=5"], ok=False)
    assert _train_steps(tmp_path) == [1, 2, 3, 4, 5]
    r = _run(cmd)
    assert "dropped 1 rows past step 4" in r.stdout
    assert _train_steps(tmp_path) == list(range(1, 9))


# ------------------------------------------------------------------------------------------ torchrun (gloo)

DDP_ARGS = ["--steps", str(STEPS), "--ckpt_every=0", "--data.batch_size=16", "--num_threads=1", "--progress=false",
            "--log_every=1", "--data.val_max_samples=32", "--deterministic=true"]


def _worker_pids(agent_pid: int, timeout=TIMEOUT) -> dict[int, int]:
    """{rank: pid} of torchrun's workers, found from the agent's child list and each child's RANK."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = {}
        try:
            kids = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
        except OSError:
            kids = []
        for pid in map(int, kids):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for kv in env:
                if kv.startswith(b"RANK="):
                    found[int(kv[5:])] = pid
        if len(found) == 2:
            return found
        time.sleep(0.1)
    raise AssertionError("torchrun workers not found")


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    ref = tmp_path_factory.mktemp("ddp_ref")
    _run([*TORCHRUN, f"--out_dir={ref}", *DDP_ARGS])
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rank1", "torchrun"])
def test_torchrun_sigterm_stops_both_ranks_at_one_step(ddp_reference, tmp_path, target):
    # rank1: only rank 1 receives SIGTERM; rank 0 learns of it at the step boundary.
    # torchrun: the agent receives it (Ctrl-C, scancel) and forwards it to its workers.
    cut = tmp_path / "cut"
    live = _Live([*TORCHRUN, f"--out_dir={cut}", *DDP_ARGS, "--fault.step_sleep_s=0.5"])
    workers = _worker_pids(live.p.pid)
    live.wait_for("[bmclip] step 3/")
    os.kill(workers[1] if target == "rank1" else live.p.pid, signal.SIGTERM)
    rc, out, err = live.finish()
    assert rc != 0  # the job did not finish
    k = _stopped_step(cut)
    assert 3 <= k < STEPS, (k, err[-2000:])
    files = C.read_meta(cut / "checkpoints" / f"step_{k:08d}")["files"]
    assert {"rank_00000.pt", "rank_00001.pt"} <= set(files)  # both ranks wrote their state at step k
    assert f"stopped by SIGTERM at step {k} of {STEPS}" in err
    r = _run([*TORCHRUN, f"--out_dir={cut}", *DDP_ARGS])
    assert f"at step {k}" in r.stdout and "resumed from" in r.stdout
    _assert_same_final(ddp_reference, cut, ranks=(0, 1))
    assert _train_steps(cut) == list(range(1, STEPS + 1))
