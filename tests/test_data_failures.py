"""Data that yields nothing: every loader path ends with a DataError naming the cause (empty tar, bad
tar header, undecodable images, a batch larger than the data), quickly and with bounded memory; Ctrl-C
(a real SIGINT) stops a run within seconds; skips are counted and exposed as ``data_stats()``.

Shards are real tar files written here; the subprocess tests run the CLI / a loader script as a user would.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bmclip.errors import DataError

pytest.importorskip("bmclip._C", reason="bmclip._C (C++ extension) not built")

from bmclip.data.loader import ShardLoader  # noqa: E402
from bmclip.data.sources import ShardSource, SyntheticSource  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
S = 16


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def jpeg(colour=(200, 30, 60), size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, bytes, bytes | None]]) -> str:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, img, txt in samples:
            add_member(tf, f"{key}.jpg", img)
            if txt is not None:
                add_member(tf, f"{key}.txt", txt)
    return str(path)


def good_tar(path: Path, n: int) -> str:
    return write_tar(path, [(f"s{i:05d}", jpeg((10 * i % 256, 80, 160)), f"caption {i}".encode()) for i in range(n)])


def undecodable_tar(path: Path, n: int = 8) -> str:
    return write_tar(path, [(f"s{i:05d}", b"\xff\xd8\xff\xe0 not a jpeg" * 4, f"caption {i}".encode())
                            for i in range(n)])


def empty_tar(path: Path) -> str:
    path.write_bytes(b"")
    return str(path)


def garbage_tar(path: Path) -> str:
    path.write_bytes(bytes(np.random.default_rng(0).integers(1, 256, 4096, dtype=np.uint8)))
    return str(path)


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[2, len(t) % 50 + 5, 3] for t in texts], dtype=torch.long)


def drain(loader, limit=50):
    n = 0
    for _ in loader:
        n += 1
        if n >= limit:
            break
    return n


def raises_within(fn, exc_type, pattern: str, limit_s: float = 30.0):
    """``fn()`` must raise ``exc_type`` matching ``pattern`` within ``limit_s`` (run in a thread, so that a
    loader that loops forever fails the test instead of hanging it)."""
    box: dict = {}

    def run():
        try:
            box["ret"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["exc"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit_s)
    if t.is_alive():
        pytest.fail(f"no {exc_type.__name__} within {limit_s} s (still running)")
    e = box.get("exc")
    assert isinstance(e, exc_type), f"expected {exc_type.__name__}, got {box}"
    assert re.search(pattern, str(e)), str(e)
    return e


# ---------------------------------------------------------------------------------------------------
# one message per cause


CAUSES = {
    "empty": (empty_tar, r"empty tar file"),
    "garbage": (garbage_tar, r"bad tar header in 1 of 1 shard\(s\).*bad header checksum at offset 0"),
    "undecodable": (undecodable_tar, r"all 8 images .* are undecodable .*e\.g\. s0000\d: jpeg: "),
}


@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("cause", sorted(CAUSES))
def test_loader_names_the_cause_of_an_empty_pass(tmp_path, cause, resampled):
    make, pattern = CAUSES[cause]
    url = make(tmp_path / f"{cause}.tar")
    ld = ShardLoader([url], batch_size=4, image_size=S, resampled=resampled, shuffle_buffer=10, num_threads=1)
    t0 = time.perf_counter()
    raises_within(lambda: drain(ld, limit=10**9), DataError, pattern)
    assert time.perf_counter() - t0 < 10
    if cause == "undecodable":  # the skips of the failed pass are in stats()
        st = ld.stats
        assert st["skipped"]["corrupt_image"] >= 8 and st["example_error"].startswith("s0000")


@pytest.mark.parametrize("cause", sorted(CAUSES))
def test_shard_source_names_the_cause(tmp_path, cause):
    make, pattern = CAUSES[cause]
    url = make(tmp_path / f"{cause}.tar")
    src = ShardSource(ShardLoader([url], batch_size=4, image_size=S, drop_last=True, tokenizer=tokenize,
                                  num_threads=1))
    raises_within(lambda: next(src), DataError, pattern)


def test_batch_larger_than_the_data_says_both_numbers(tmp_path):
    url = good_tar(tmp_path / "three.tar", 3)
    src = ShardSource(ShardLoader([url], batch_size=4, image_size=S, drop_last=True, tokenizer=tokenize,
                                  num_threads=1))
    raises_within(lambda: next(src), DataError, r"only 3 valid samples per epoch, fewer than the batch size 4; use a "
                                                r"smaller --data\.batch_size \(at most 3\)")


def test_mixed_bad_and_good_keeps_training_and_counts(tmp_path):
    """One good shard among broken ones: no error, every skip counted and exposed by data_stats()."""
    urls = [good_tar(tmp_path / "good.tar", 6), undecodable_tar(tmp_path / "bad.tar", 5),
            empty_tar(tmp_path / "empty.tar"), garbage_tar(tmp_path / "garbage.tar")]
    src = ShardSource(ShardLoader(urls, batch_size=3, image_size=S, drop_last=True, tokenizer=tokenize,
                                  shuffle=False, num_threads=1))
    keys = [k for _ in range(2) for k in next(src)["key"]]
    assert sorted(keys) == [f"s{i:05d}" for i in range(6)]
    with pytest.raises(StopIteration):  # the epoch's remaining shards are read to its end
        next(src._it)
    src._it = None
    d = src.data_stats()
    assert d["samples_skipped"] == 5 and d["skipped_by_reason"] == {"corrupt_image": 5}
    assert d["samples_read"] == 11
    assert d["tar_errors"] == 2  # the empty and the garbage shard
    assert d["example_error"].startswith("s0000") and "jpeg" in d["example_error"]


def test_split_without_samples_of_its_own_just_ends(tmp_path):
    """More splits than samples (a worker whose share is empty) is not an error: the data is fine."""
    url = good_tar(tmp_path / "one.tar", 1)
    got = [drain(ShardLoader([url], batch_size=1, image_size=S, num_workers=2, worker_id=w, num_threads=1))
           for w in range(2)]
    assert sorted(got) == [0, 1]


def _epoch_giving(split: int, shard: int, n_shards: int, n_splits: int, seed: int = 0) -> int:
    """The first epoch whose shuffled plan gives ``split`` exactly the one shard ``shard``."""
    from bmclip.data.shards import shard_order, split_shards

    return next(e for e in range(64) if split_shards(shard_order(n_shards, seed, e, True), split, n_splits)[0]
                == [shard])


@pytest.mark.parametrize("cause", ["empty", "undecodable"])
def test_a_ranks_empty_epoch_names_its_own_shards_and_moves_on(tmp_path, cause):
    """2 ranks, one shard good and one bad: the rank dealt only the bad one for an epoch gets an EmptySplitEpoch
    naming that shard (not the good one, not "every shard"), and its loader is already at the next epoch. (It named
    all shards, as "every shard is an empty tar file" or "2 shards (good.tar, ...)", and stayed in the epoch.)"""
    from bmclip.data.cursor import EmptySplitEpoch

    make, pattern = CAUSES[cause]
    urls = [make(tmp_path / "bad.tar"), good_tar(tmp_path / "good.tar", 8)]
    e = _epoch_giving(1, 0, 2, 2)
    ld = ShardLoader(urls, batch_size=4, image_size=S, num_threads=1, rank=1, world_size=2, epoch=e)
    err = raises_within(lambda: drain(ld, limit=10**9), EmptySplitEpoch, pattern)
    msg = str(err)
    assert "bad.tar" in msg and "good.tar" not in msg and "its 1 shard" in msg
    assert "split 1/2" in msg and err.reassigned
    assert ld.epoch == e + 1 and ld.state_dict()["epoch"] == e + 1  # moved on, like an epoch end
    # an epoch that deals this rank the good shard reads it whole
    e2 = _epoch_giving(1, 1, 2, 2)
    ld.set_epoch(e2)
    assert drain(ld) == 2
    # a single process reading both shards has data: no error at all (the bad shard is a counted skip)
    assert drain(ShardLoader(urls, batch_size=4, image_size=S, num_threads=1, epoch=e)) == 2


def test_training_source_goes_past_a_ranks_empty_epochs_and_gives_up_on_a_rank_that_never_has_data(
        tmp_path, capfd):
    from bmclip.data.sources import MAX_EMPTY_EPOCHS

    urls = [empty_tar(tmp_path / "empty.tar"), good_tar(tmp_path / "good.tar", 8)]
    e = _epoch_giving(1, 0, 2, 2)
    src = ShardSource(ShardLoader(urls, batch_size=4, image_size=S, drop_last=True, tokenizer=tokenize,
                                  num_threads=1, rank=1, world_size=2, epoch=e))
    keys = [k for _ in range(4) for k in next(src)["key"]]  # two epochs' worth of the good shard
    assert sorted(set(keys)) == [f"s{i:05d}" for i in range(8)] and len(keys) == 16
    err = capfd.readouterr().err
    assert f"[bmclip] rank 1: no samples in split 1/2 (epoch {e}): its 1 shard ({urls[0]})" in err
    assert "going on with the next epoch" in err
    # every shard empty: each epoch moves on, and after MAX_EMPTY_EPOCHS in a row the rank gives up, saying why
    urls = [empty_tar(tmp_path / "e0.tar"), empty_tar(tmp_path / "e1.tar")]
    ld = ShardLoader(urls, batch_size=4, image_size=S, drop_last=True, tokenizer=tokenize, num_threads=1, rank=0,
                     world_size=2)
    raises_within(lambda: next(ShardSource(ld)), DataError,
                  rf"rank 0 of 2 got no valid sample from its shards \({MAX_EMPTY_EPOCHS} epochs in a row\): each "
                  r"rank needs shards with valid samples of its own every epoch")
    assert ld.epoch == MAX_EMPTY_EPOCHS
    # without reshuffling (shards in a fixed order) the next epoch deals the same shards: the first one is final
    ld = ShardLoader(urls, batch_size=4, image_size=S, drop_last=True, tokenizer=tokenize, num_threads=1, rank=0,
                     world_size=2, shuffle=False)
    raises_within(lambda: next(ShardSource(ld)), DataError, r"rank 0 of 2 got no valid sample from its shards: ")
    assert ld.epoch == 1


def test_data_stats_of_every_source(tmp_path):
    syn = SyntheticSource(size=8, global_batch=4, image_size=8, context_length=6, seed=0)
    next(syn)
    assert syn.data_stats() == {"samples_read": 0, "samples_skipped": 0, "skipped_by_reason": {}, "tar_errors": 0,
                                "example_error": None}
    src = ShardSource(ShardLoader([good_tar(tmp_path / "g.tar", 4)], batch_size=2, image_size=S, tokenizer=tokenize,
                                  num_threads=1))
    next(src)
    d = src.data_stats()
    assert d["samples_read"] == 2 and d["samples_skipped"] == 0 and d["example_error"] is None
    assert isinstance(d["skipped_by_reason"], dict) and d["tar_errors"] == 0


def test_tar_lost_tail_is_counted(tmp_path):
    """A bad header in the middle of a shard: the samples after it are counted as lost, with a reason."""
    p = tmp_path / "mid.tar"
    good_tar(p, 10)
    data = bytearray(p.read_bytes())
    with tarfile.open(p) as tf:
        members = tf.getmembers()
    off = members[8].offset  # header of sample 4's image (2 members per sample)
    data[off : off + 512] = b"\x07" * 512
    p.write_bytes(bytes(data))
    from bmclip import _C

    idx = _C.TarIndex(str(p))
    assert idx.damage == "bad_header" and len(idx) == 3 and idx.dropped == 1  # s00003 open at the damage
    assert idx.lost_tail_samples == 6  # s00004 (its txt member still has a header) ... s00009
    assert idx.lost_tail_bytes == len(data) - off
    ld = ShardLoader([str(p)], batch_size=3, image_size=S, shuffle=False, num_threads=1)
    assert sum(len(b["key"]) for b in ld) == 3
    st = ld.stats
    assert st["skipped"]["tar_lost_tail"] == 6 and st["skipped"]["damaged_tar_sample"] == 1
    assert st["lost_tail_bytes"] == len(data) - off and st["tar_damaged_shards"] == 1
    # the Python shard reader (evaluation's) reports the same tail
    from bmclip.data import tario

    skipped: list = []
    assert len(list(tario.iter_shard_samples([str(p)], skipped))) >= 3
    assert any("tar_lost_tail: 6 sample(s)" in r for _, r in skipped), skipped


# ---------------------------------------------------------------------------------------------------
# evaluation readers


def test_eval_shard_reader_names_the_cause(tmp_path):
    from bmclip.eval import batching, datasets

    bad = undecodable_tar(tmp_path / "bad.tar", 5)
    with pytest.raises(DataError, match=r"all 5 images are undecodable; e\.g\. s0000\d: "):
        list(batching.iter_shard_pairs(bad, 16, batch_size=4, skipped=[]))
    with pytest.raises(DataError, match="empty tar file"):
        list(batching.iter_shard_pairs(empty_tar(tmp_path / "e.tar"), 16, skipped=[]))
    with pytest.raises(DataError, match="bad tar header"):
        list(batching.iter_shard_pairs(garbage_tar(tmp_path / "g.tar"), 16, skipped=[]))
    ds = datasets.FileListDataset([(tmp_path / "nope.png", 0), (tmp_path / "nada.png", 0)], ["a"])
    with pytest.raises(DataError, match=r"none of the 2 images could be read; e\.g\. .*n[oa]"):
        list(batching.iterate_batches(ds, 16, batch_size=4, workers=1))


# ---------------------------------------------------------------------------------------------------
# subprocesses: a real run ends quickly; a real SIGINT stops it in every state


def _slow_bad_jpeg() -> bytes:
    """A large JPEG cut at 97%: libjpeg decodes almost all of it before reporting the damage."""
    rng = np.random.default_rng(1)
    img = (rng.random((1200, 1600, 3)) * 40 + np.linspace(0, 200, 1600)[None, :, None]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[: int(len(data) * 0.97)]


class Child:
    """A subprocess whose stdout+stderr is collected in the background, its peak memory sampled while it runs.

    The peak is the child's own VmHWM read from /proc while it runs (the last reading before it exits). Not
    ru_maxrss from wait4: Linux carries the forking parent's RSS at fork time into the child's ru_maxrss across
    exec, so inside a pytest process of several GB the child would report the test runner's memory.
    """

    def __init__(self, argv: list[str], cwd: Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self.out = b""
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        self.rc = None
        self.maxrss_mb = 0.0

    def _sample_hwm(self) -> None:
        try:
            with open(f"/proc/{self.p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.maxrss_mb = max(self.maxrss_mb, int(line.split()[1]) / 1024)
                        return
        except (OSError, ValueError):  # exited (or a zombie without memory figures) between two readings
            pass

    def _read(self):
        while True:
            chunk = os.read(self.p.stdout.fileno(), 65536)
            if not chunk:
                return
            self.out += chunk

    def wait_for(self, marker: bytes, timeout: float) -> None:
        t0 = time.monotonic()
        while marker not in self.out:
            self._sample_hwm()
            if self.p.poll() is not None or time.monotonic() - t0 > timeout:
                self.kill()
                pytest.fail(f"child never printed {marker!r}: {self.out.decode(errors='replace')[-3000:]}")
            time.sleep(0.05)

    def wait(self, timeout: float) -> float:
        """Seconds until the child exited (fails the test, killing it, after ``timeout``)."""
        t0 = time.monotonic()
        while True:
            self._sample_hwm()
            pid, status, _ru = os.wait4(self.p.pid, os.WNOHANG)
            if pid:
                self.p.returncode = self.rc = os.waitstatus_to_exitcode(status)
                self._t.join(5)
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                self.kill()
                pytest.fail(f"child still running {timeout} s later: {self.out.decode(errors='replace')[-3000:]}")
            time.sleep(0.05)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")


def _cli(tmp_path: Path, train: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bmclip", "train", "tiny-cpu", f"--data.train={train}", "--data.resampled=true",
            "--data.synthetic=false", "--data.batch_size=4", f"--out_dir={tmp_path / 'run'}", "--data.num_threads=1",
            *extra]


@pytest.mark.slow
def test_cli_all_undecodable_resampled_ends_quickly_with_the_cause(tmp_path):
    """The reproduction of a run that used to sit at 0 % forever with growing memory."""
    url = undecodable_tar(tmp_path / "bad.tar")
    child = Child(_cli(tmp_path, url, "--steps=3"), tmp_path)
    child.wait(timeout=240)
    assert child.rc == 2, child.text[-2000:]
    assert "error: no valid sample: all 8 images" in child.text and "undecodable" in child.text
    assert 0 < child.maxrss_mb < 2500, child.maxrss_mb


@pytest.mark.slow
@pytest.mark.parametrize("where", ["cli", "loader"])
def test_sigint_stops_a_busy_all_bad_pass_within_seconds(tmp_path, where):
    """SIGINT while the producer is decoding (C++ busy) and the consumer waits on it, in a resampled
    pass over failing samples that would take minutes to exhaust: the run ends in seconds, cleanly."""
    p = write_tar(tmp_path / "slow.tar", [(f"s{i:05d}", _slow_bad_jpeg(), b"caption") for i in range(4)])
    urls = [p] * 150  # 150 "shards": a resampled pass must draw them all (~800 draws x 4 slow failures)
    if where == "cli":
        child = Child(_cli(tmp_path, "::".join(urls), "--steps=100"), tmp_path)
        child.wait_for(b"train:", timeout=240)
    else:
        script = textwrap.dedent(f"""
            import sys
            from bmclip.data.loader import ShardLoader
            ld = ShardLoader({urls!r}, batch_size=4, image_size=224, resampled=True, num_threads=1)
            print("ready", flush=True)
            try:
                for b in ld:
                    pass
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                sys.exit(130)
        """)
        child = Child([sys.executable, "-c", script], tmp_path)
        child.wait_for(b"ready", timeout=120)
    time.sleep(2.0)
    assert child.p.poll() is None, child.text[-2000:]  # still searching for a valid sample
    os.kill(child.p.pid, signal.SIGINT)
    took = child.wait(timeout=30)
    if where == "cli":
        # the trainer's own handler: a stop signal while waiting for data ends the run at once, with the
        # checkpoint of the last finished step (none here: no batch was ever complete)
        assert child.rc == 130, child.text[-2000:]
        assert "SIGINT while waiting for data" in child.text and "stopped by SIGINT at step 0" in child.text, \
            child.text[-2000:]
    else:
        assert child.rc == 130 and "interrupted" in child.text, child.text[-2000:]
    assert "Traceback" not in child.text, child.text[-3000:]
    assert took < 10, took
    assert child.maxrss_mb < 2500, child.maxrss_mb


@pytest.mark.slow
def test_sigint_while_consumer_waits_on_a_busy_producer(tmp_path):
    """Valid but slow data (large images, one decode thread): SIGINT while the consumer waits."""
    rng = np.random.default_rng(2)
    big = Image.fromarray((rng.random((1500, 2000, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=95)
    p = write_tar(tmp_path / "big.tar", [(f"s{i:05d}", buf.getvalue(), b"caption") for i in range(6)])
    script = textwrap.dedent(f"""
        import sys
        from bmclip.data.loader import ShardLoader
        ld = ShardLoader([{p!r}], batch_size=6, image_size=224, resampled=True, num_threads=1,
                         decode_options={{"dct_scaling": False}})
        it = iter(ld)
        next(it)
        print("ready", flush=True)
        try:
            for b in it:
                pass
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
    """)
    child = Child([sys.executable, "-c", script], tmp_path)
    child.wait_for(b"ready", timeout=180)
    time.sleep(0.5)
    os.kill(child.p.pid, signal.SIGINT)
    took = child.wait(timeout=30)
    assert child.rc == 130 and "interrupted" in child.text, child.text[-2000:]
    assert took < 10, took
