"""2-process gloo DDP and FSDP2 (torchrun, CPU) equal 1 process on the same global batch; dead-rank resume."""

import os
import re
import subprocess
import sys

import pytest
import torch

from bmclip.train import checkpoint as C

STEPS = 3
BASE = ["--steps", str(STEPS), "--data.batch_size=16", "--num_threads=1", "--progress=false", "--log_every=1",
        "--data.val_max_samples=32", "--optim.warmup_steps=1", "--ckpt_every=0"]


def _why(r):
    """The informative lines of a failed run's output (torchrun repeats long tracebacks per rank)."""
    lines = (r.stdout + r.stderr).splitlines()
    keep = [ln for ln in lines if any(w in ln for w in ("Error", "error:", "exitcode", "resumed", "Traceback"))]
    return "\n".join(keep[-40:]) + "\n----\n" + r.stderr[-1500:]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bmclip",
            "train", "tiny-cpu"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run and one 2-process DDP run on the same global batch (shared by the tests)."""
    tmp = tmp_path_factory.mktemp("ddp")
    single, multi = tmp / "single", tmp / "ddp"
    r = subprocess.run([sys.executable, "-m", "bmclip", "train", "tiny-cpu", f"--out_dir={single}", *BASE],
                       capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, _why(r)
    # Each rank holds 8 of the 16 rows and splits them into 2 GradCache chunks: the loss stays global.
    r = subprocess.run(TORCHRUN + [f"--out_dir={multi}", *BASE, "--data.grad_accum=2"],
                       capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, _why(r)
    assert "parallel over 2 ranks: ddp" in r.stdout, r.stdout[-2000:]
    return single, multi


@pytest.mark.slow
def test_two_process_ddp_equals_single_process(runs, tmp_path):
    single, multi = runs
    ck = multi / "checkpoints" / f"step_{STEPS:08d}"
    assert C.read_meta(ck)["world_size"] == 2 and (ck / "rank_00001.pt").is_file()
    a = C.load_checkpoint(single / "checkpoints" / f"step_{STEPS:08d}")["model"]
    b = C.load_checkpoint(ck)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=k)
    # FSDP2 (parameters sharded per block/tower; the 0-dim logit scale replicated) gives the same weights
    fsdp = tmp_path / "fsdp"
    r = subprocess.run([*TORCHRUN, f"--out_dir={fsdp}", *BASE, "--parallel=fsdp"],
                       capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, _why(r)
    # FSDP2 really sharded (an fsdp run that fell back to DDP would give the same weights)
    m = re.search(r"parallel over 2 ranks: fsdp: (\d+) of (\d+) parameters sharded", r.stdout)
    assert m and 0 < int(m[1]) < int(m[2]), r.stdout[-2000:]  # all but the 0-dim logit scale
    f = C.load_checkpoint(fsdp / "checkpoints" / f"step_{STEPS:08d}")["model"]
    assert f.keys() == a.keys()
    for k in a:
        torch.testing.assert_close(f[k], a[k], rtol=1e-4, atol=2e-5, msg=k)
    # the weights did move (so equality is not trivial)
    from bmclip.model import create_model

    torch.manual_seed(0)
    init = create_model("tiny").state_dict()
    assert (a["visual.proj.weight"] - init["visual.proj.weight"]).abs().max() > 1e-3
    logs = [line for line in (multi / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in line]
    assert len(logs) == STEPS and '"world_size": 2' in logs[-1]


@pytest.mark.slow
def test_dead_rank_job_resumes_from_last_checkpoint(runs, tmp_path):
    # What torchrun --max-restarts does after a rank dies is to start every worker again with the same
    # command; auto-resume must then continue from the last checkpoint and finish with the weights of a
    # run that never failed (the DDP run above). Here the two launches are explicit (the first one fails
    # when rank 1 dies).
    ref, restarted = runs[1], tmp_path / "restarted"
    cmd = [*TORCHRUN, *BASE, "--data.grad_accum=2", "--ckpt_every=1"]
    r = subprocess.run([*cmd, f"--out_dir={restarted}", "--fault.kill_at_step=2", "--fault.kill_rank=1"],
                       capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode != 0 and (restarted / ".fault_killed_step2_rank1").exists()
    assert C.latest_valid(restarted / "checkpoints").name == "step_00000001"
    r = subprocess.run([*cmd, f"--out_dir={restarted}", "--fault.kill_at_step=2", "--fault.kill_rank=1"],
                       capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, _why(r)
    assert "resumed from" in r.stdout + r.stderr
    a = C.load_checkpoint(ref / "checkpoints" / f"step_{STEPS:08d}")["model"]
    c = C.load_checkpoint(restarted / "checkpoints" / f"step_{STEPS:08d}")["model"]
    for k in a:
        assert torch.equal(c[k], a[k]), k
