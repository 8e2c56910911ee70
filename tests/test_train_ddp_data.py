"""2-rank runs (torchrun, gloo, CPU) over data that is not the same on every rank: a rank dealt only an empty shard
for an epoch, a resume onto more ranks after the shards moved, DALI batch skips on a rank other than 0."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from test_data_failures import empty_tar, good_tar
from test_train_ddp import _env, _why

pytest.importorskip("bmclip._C", reason="bmclip._C (C++ extension) not built")

pytestmark = pytest.mark.slow

COMMON = ["--data.batch_size=8", "--num_threads=1", "--progress=false", "--log_every=1", "--data.synthetic=false",
          "--data.resampled=false", "--data.num_threads=1", "--tensorboard=false", "--optim.warmup_steps=1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), **kw)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_rank_dealt_only_an_empty_shard_goes_on_with_the_next_epoch(tmp_path):
    """3 shards (16, 16, 0 samples) over 2 ranks: in some epoch one rank gets only the empty shard. One process
    trains through it; so must 2 ranks (the job died there, naming the good shards as empty)."""
    urls = [good_tar(tmp_path / "a.tar", 16), good_tar(tmp_path / "b.tar", 16), empty_tar(tmp_path / "c.tar")]
    out = tmp_path / "run"
    r = _run([*TORCHRUN, "-m", "bmclip", "train", "tiny-cpu", f"--out_dir={out}", "--steps=20", "--ckpt_every=0",
              f"--data.train={'::'.join(urls)}", *COMMON])
    assert r.returncode == 0, _why(r)
    said = [ln for ln in r.stderr.splitlines() if "going on with the next epoch" in ln]
    assert said and all(f"its 1 shard ({urls[2]}): every shard is an empty tar file" in ln for ln in said), said
    assert [row["step"] for row in _rows(out) if row["kind"] == "train"] == list(range(1, 21))


def test_resume_onto_more_ranks_after_the_shards_moved(tmp_path):
    """1 process, then 2 ranks on the same shards copied elsewhere: the new rank has no loader state of its own in
    the checkpoint, so it takes rank 0's verdict on the move (it said "trained on different data" and the job
    failed, while rank 0 said the shards had moved)."""
    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir()
    urls = [good_tar(a / f"train-{i:06d}.tar", 16) for i in range(2)]
    out = tmp_path / "run"
    base = ["-m", "bmclip", "train", "tiny-cpu", f"--out_dir={out}", "--ckpt_every=2", *COMMON]
    r = _run([sys.executable, *base, "--steps=2", f"--data.train={'::'.join(urls)}"])
    assert r.returncode == 0, _why(r)
    shutil.copytree(a, b)
    shutil.rmtree(a)
    r = _run([*TORCHRUN, *base, "--steps=4", f"--data.train={'::'.join(u.replace(str(a), str(b)) for u in urls)}"])
    assert r.returncode == 0, _why(r)
    text = r.stdout + r.stderr
    assert text.count("[bmclip] data.train moved:") == 1 and "so resuming (if these are other shards" in text
    assert "world size changed (1 -> 2)" in text and "resumed from" in text and "trained on different data" not in text
    assert [row["step"] for row in _rows(out) if row["kind"] == "train"] == [1, 2, 3, 4]


def test_dali_batch_skips_of_every_rank_are_logged_and_counted(tmp_path):
    """Each rank meets one batch DALI cannot decode: metrics.jsonl has a data_skip row from each rank, and
    data_bad_batches is the sum (rows of rank 1 were dropped and the count was rank 0's)."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed")
    from test_train_dali import _write_shard

    urls = []
    for i in range(2):
        p = tmp_path / f"train-{i:06d}.tar"
        _write_shard(p, 24, corrupt_at=1)  # the first batch of each shard holds a JPEG cut short
        urls.append(str(p))
    # the loader's header check refuses a JPEG without its end marker; let it through, so that DALI meets it
    script = tmp_path / "train_lenient.py"
    script.write_text(textwrap.dedent("""
        import sys
        from bmclip.data import producer
        from bmclip.cli import main

        real = producer.BatchAssembler._header_check

        def lenient(self, buf):
            why = real(self, buf)
            return None if why is not None and why.startswith("jpeg: premature end") else why

        producer.BatchAssembler._header_check = lenient
        sys.exit(main(sys.argv[1:]))
    """))
    out = tmp_path / "run"
    r = _run([*TORCHRUN, str(script), "train", "tiny-cpu", f"--out_dir={out}", "--steps=2", "--ckpt_every=0",
              f"--data.train={'::'.join(urls)}", "--data.augment_backend=dali", "--data.shuffle_buffer=0", *COMMON])
    assert r.returncode == 0, _why(r)
    rows = _rows(out)
    skips = [row for row in rows if row["kind"] == "data_skip"]
    assert sorted(row["rank"] for row in skips) == [0, 1], skips
    train = [row for row in rows if row["kind"] == "train"]
    assert train[-1]["data_bad_batches"] == 2
    assert train[-1]["data_skipped_by_reason"]["dali_decode_error"] == 2 * 4  # 4 samples per rank's batch
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["data_bad_batches"] == 2
