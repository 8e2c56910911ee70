"""ShardLoader's batch buffers when batches leave the process, and its misuse errors.

- DataLoader worker processes (fork and spawn): every batch's pixels equal the single-process loader's,
  for many more batches than the ring has buffers, and stay so while the main process keeps them all
  (the worker used to hand out ring memory that torch then moved to shared memory and freed under the
  decoder: heap corruption, "free(): corrupted unsorted chunks").
- The same in the main process when the user moves batches to shared memory or pickles them for
  torch.multiprocessing (run in a child process: the old failure was heap corruption).
- The ring's memory is checked at construction (ConfigError), as are prefetch and num_threads bounds.
- A superseded iterator says so (RuntimeError) instead of ending quietly.
- A shard listed twice (by any spelling of its path) is a ConfigError, except with resampled=True.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bmclip.errors import ConfigError

pytest.importorskip("bmclip._C", reason="bmclip._C (C++ extension) not built")

from bmclip.data import loader_options  # noqa: E402
from bmclip.data.loader import LoaderOptions, ShardLoader  # noqa: E402

S = 16
REPO = Path(__file__).resolve().parent.parent


def noise_jpeg(uid: int) -> bytes:
    """A 24x20 noise image of its own per uid: any pixel from another sample or slot shows."""
    px = np.random.default_rng(uid).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shards(folder: Path, n_shards: int, per_shard: int) -> list[str]:
    paths, uid = [], 0
    for s in range(n_shards):
        p = folder / f"shard-{s:06d}.tar"
        with tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) as tf:
            for _ in range(per_shard):
                for ext, data in (("jpg", noise_jpeg(uid)), ("txt", f"caption {uid}".encode())):
                    ti = tarfile.TarInfo(f"s{uid:05d}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
                uid += 1
        paths.append(str(p))
    return paths


# prefetch=1: a ring of 4 buffers; 2 shards x 24 samples in batches of 2 = 12 batches per worker (3x the ring)
KW = dict(batch_size=2, image_size=S, prefetch=1, num_threads=1, shuffle=False)


def reference_pixels(urls: list[str], num_workers: int) -> dict[str, np.ndarray]:
    """key -> pixels from the single-process loader, split by split as the workers read them."""
    ref = {}
    for w in range(num_workers):
        for b in ShardLoader(urls, **KW, num_workers=num_workers, worker_id=w):
            for k, im in zip(b["key"], b["image"]):
                ref[k] = im.numpy().copy()
    return ref


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_worker_batches_equal_the_single_process_ones(tmp_path, context):
    urls = write_shards(tmp_path, 2, 24)
    ref = reference_pixels(urls, 2)
    assert len(ref) == 48
    dl = torch.utils.data.DataLoader(ShardLoader(urls, **KW), batch_size=None, num_workers=2,
                                     multiprocessing_context=context, timeout=60)
    batches = list(dl)  # the main process keeps every batch while the workers go on decoding
    assert len(batches) == 24
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(ref)
    wrong = [k for b in batches for k, im in zip(b["key"], b["image"]) if not np.array_equal(im.numpy(), ref[k])]
    assert wrong == []


def test_batches_moved_to_shared_memory_in_the_main_process(tmp_path):
    """share_memory_() and torch.multiprocessing pickling of batches in the loader's own process: the
    decoder keeps its ring, every batch has its own pixels, and a shared batch stays valid afterwards."""
    urls = write_shards(tmp_path, 1, 24)
    script = textwrap.dedent(f"""
        import numpy as np
        import torch.multiprocessing  # registers torch's pickling reductions (shared memory)
        from multiprocessing.reduction import ForkingPickler
        from bmclip.data.loader import ShardLoader
        kw = {KW!r}
        ref = {{k: im.numpy().copy() for b in ShardLoader({urls!r}, **kw) for k, im in zip(b["key"], b["image"])}}
        kept, n, sent = [], 0, []
        for i, b in enumerate(ShardLoader({urls!r}, **kw)):
            for k, im in zip(b["key"], b["image"]):
                assert np.array_equal(im.numpy(), ref[k]), ("handed out", i, k)
            if i % 2:
                b["image"].share_memory_()
            else:
                sent.append(ForkingPickler.dumps(b["image"]))  # what sending through a torch Queue does
            kept.append(b)
            n += 1
        for i, b in enumerate(kept):  # moved to shared memory: a copy of its own, not the reused ring buffer
            assert b["image"].is_shared(), i
            for k, im in zip(b["key"], b["image"]):
                assert np.array_equal(im.numpy(), ref[k]), ("kept", i, k)
        print("batches", n, "ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0 and "batches 12 ok" in p.stdout, (p.returncode, p.stdout, p.stderr[-3000:])


# -- memory and thread bounds ----------------------------------------------------------------------


def test_ring_memory_is_checked_at_construction(tmp_path, monkeypatch):
    urls = write_shards(tmp_path, 1, 2)
    monkeypatch.setattr(loader_options, "_physical_memory", lambda: 32 << 30)
    # 15 GB per batch fits in 32 GiB; the ring of prefetch + 3 = 5 such batches (75 GB) does not (it was a raw
    # torch RuntimeError "can't allocate" at the first batch)
    with pytest.raises(ConfigError, match=r"ring of 5 batch buffers \(prefetch \+ 3\) = 70\.1 GiB.*32\.0 GiB"):
        ShardLoader(urls, batch_size=100000, image_size=224)
    ShardLoader(urls, batch_size=100000, image_size=224, decode=False)  # raw bytes: no ring
    ShardLoader(urls, batch_size=20000, image_size=224)  # 3 GB per batch, 15 GB of ring
    with pytest.raises(ConfigError, match="batch_size=20000 at image_size=224 with prefetch=10 needs a ring of 13"):
        ShardLoader(urls, batch_size=20000, image_size=224, prefetch=10)


@pytest.mark.parametrize("bad, match", [
    ({"prefetch": 10**6}, "prefetch must be an integer from 1 to 64, got 1000000"),
    ({"prefetch": 65}, "prefetch must be an integer from 1 to 64"),
    ({"num_threads": 10000}, "num_threads must be an integer from 1 to 256, got 10000"),  # was the extension's
    ({"num_threads": 257}, "num_threads must be an integer from 1 to 256"),  # ValueError at the first batch
])
def test_prefetch_and_thread_bounds_are_config_errors(tmp_path, bad, match):
    urls = write_shards(tmp_path, 1, 2)
    with pytest.raises(ConfigError, match=match):
        ShardLoader(urls, batch_size=2, image_size=S, **bad)


def test_thread_and_prefetch_limits_work(tmp_path, monkeypatch):
    urls = write_shards(tmp_path, 1, 4)
    ld = ShardLoader(urls, batch_size=2, image_size=S, num_threads=256, prefetch=64, shuffle=False)
    assert [k for b in ld for k in b["key"]] == [f"s{u:05d}" for u in range(4)]
    # the default (this process's cores) stays within the decoder's limit on a machine with more cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(512)), raising=False)
    assert LoaderOptions(batch_size=2, image_size=S).num_threads == 256


# -- one iteration at a time -----------------------------------------------------------------------


def test_a_superseded_iterator_says_so(tmp_path):
    urls = write_shards(tmp_path, 1, 10)
    ld = ShardLoader(urls, batch_size=2, image_size=S, shuffle=False)
    i1 = iter(ld)
    assert next(i1)["key"] == ["s00000", "s00001"]
    i2 = iter(ld)
    assert next(i2)["key"] == ["s00002", "s00003"]  # continues after the last batch handed out
    with pytest.raises(RuntimeError, match=r"superseded by a newer iter\(loader\)"):
        next(i1)
    with pytest.raises(RuntimeError, match="superseded"):  # and stays so
        next(i1)
    assert [k for b in i2 for k in b["key"]] == [f"s{u:05d}" for u in range(4, 10)]
    with pytest.raises(StopIteration):  # an iterator that ended (or was closed) just ends
        next(i2)
    with pytest.raises(RuntimeError, match="superseded"):  # was [] without a word
        list(zip(iter(ld), iter(ld)))
    it = iter(ld)
    next(it)
    state = ld.state_dict()
    ld.set_epoch(3)
    with pytest.raises(RuntimeError, match=r"superseded by loader\.set_epoch\(\)"):
        next(it)
    it = iter(ld)
    next(it)
    ld.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"superseded by loader\.load_state_dict\(\)"):
        next(it)
    it = iter(ld)
    next(it)
    it.close()
    with pytest.raises(StopIteration):
        next(it)


# -- a shard listed twice --------------------------------------------------------------------------


def test_a_shard_listed_twice_is_a_config_error(tmp_path):
    a, b = write_shards(tmp_path, 2, 4)
    link = tmp_path / "link.tar"
    link.symlink_to(a)
    other = str(tmp_path / "sub" / ".." / Path(a).name)
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError, match=re.escape(f"shard '{a}' is listed twice")):
        ShardLoader([a, b, a], batch_size=2, image_size=S)
    for twin in (str(link), other, "file://" + a):
        with pytest.raises(ConfigError, match=re.escape(f"shards '{a}' and '{twin}' are the same file")):
            ShardLoader([a, b, twin], batch_size=2, image_size=S)
    with pytest.raises(ConfigError, match="listed twice"):  # remote: the same URL (nothing is fetched to say so)
        ShardLoader(["s3://bucket/x.tar", "s3://bucket/y.tar", "s3://bucket/x.tar"], batch_size=2, image_size=S)
    with pytest.raises(ConfigError, match="listed twice"):  # the brace/"::" expansion is checked too
        ShardLoader(f"{a}::{a}", batch_size=2, image_size=S)
    # resampled: shards are drawn with replacement, a repeat weights the draw
    ld = ShardLoader([a, a, b], batch_size=2, image_size=S, resampled=True)
    assert len(next(iter(ld))["key"]) == 2
    ShardLoader([a, b], batch_size=2, image_size=S)


def test_a_folder_given_as_a_shard_is_named_as_a_folder(tmp_path):
    from bmclip.data.loader import ShardLoader
    from bmclip.errors import DataError

    (tmp_path / "shards.tar").mkdir()  # was "1 shard(s) not found"
    with pytest.raises(DataError, match="shards.tar is a folder, not a .tar shard"):
        ShardLoader([str(tmp_path / "shards.tar")], batch_size=2, image_size=16)
