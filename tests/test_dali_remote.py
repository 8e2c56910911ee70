"""The DALI data path (``DaliShardSource`` over ``ShardLoader(decode=False)``) with remote shards, on the
CPU DALI pipeline (``device_id=None``): shards served by Python's HTTP server with injected faults give
bitwise the same batches (pixels and token ids) as the same shards read locally, and resume exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install nvidia-dali-cuda130)")
pytest.importorskip("bmclip._C", reason="bmclip._C not built")
pytest.importorskip("fsspec", reason="remote shards need the cloud extra (fsspec)")
pytest.importorskip("aiohttp", reason="fsspec's HTTP backend needs aiohttp")

from _servers import FaultServer  # noqa: E402
from test_train_dali import S, _tok, _write_shard  # noqa: E402

from bmclip.data.dali import DaliAugment  # noqa: E402
from bmclip.data.loader import ShardLoader  # noqa: E402
from bmclip.data.sources import DaliShardSource  # noqa: E402

FAST = {"attempts": 3, "backoff_s": 0.05, "backoff_max_s": 0.2, "connect_timeout_s": 5.0, "read_timeout_s": 5.0}
BATCH = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dali_remote")
    paths = [folder / f"train-{i:06d}.tar" for i in range(3)]
    for p in paths:
        _write_shard(p, 16)
    return [str(p) for p in paths]


def source(urls, seed=3, prefetch=0, **loader_kw):
    ld = ShardLoader(urls, batch_size=BATCH, image_size=S, num_threads=1, seed=seed, shuffle_buffer=16,
                     drop_last=True, tokenizer=_tok, decode=False, **loader_kw)

    def make():
        return DaliAugment(batch_size=BATCH, image_size=S, source="encoded", augment="random_resized_crop",
                           device_id=None, num_threads=1, seed=seed, host_params=True)

    return DaliShardSource(ld, make, seed=seed, scale=ld.scale, ratio=ld.ratio, prefetch=prefetch)


def take(src, n):
    return [(b["images"].clone(), b["input_ids"].clone()) for b in (next(src) for _ in range(n))]


def assert_equal(got, want):
    assert len(got) == len(want)
    for (gi, gt), (wi, wt) in zip(got, want):
        assert torch.equal(gi, wi) and torch.equal(gt, wt)


def test_dali_over_http_equals_local_and_resumes(shards, tmp_path):
    srv = FaultServer(Path(shards[0]).parent)
    try:
        names = [Path(p).name for p in shards]
        srv.plan = {names[1]: ["503", "503"], names[2]: ["drop"]}
        n = 8  # 48 samples / 8 = 6 batches per epoch: crosses into the second epoch
        local = source(shards)
        want = take(local, n)
        local.close()
        remote_kw = dict(cache_dir=str(tmp_path / "cache"), fetch_options=FAST, prefetch_shards=1)
        remote = source(srv.urls(shards), prefetch=1, **remote_kw)  # DALI in its prefetch thread, too
        got = take(remote, n)
        st = remote.loader.stats
        remote.close()
        assert_equal(got, want)
        assert st["skipped"] == {} and st["fetch_failures"] == 0 and st["fetch_retries"] >= 3
        assert remote.bad_batches == 0
        # resume from a remote source's state after 3 batches (mid-epoch, mid-shard)
        a = source(srv.urls(shards), **remote_kw)
        take(a, 3)
        state = a.state_dict()
        a.close()
        b = source(srv.urls(shards), **remote_kw)
        b.load_state_dict(state)
        assert_equal(take(b, n - 3), want[3:])
        b.close()
    finally:
        srv.close()


def test_dali_remote_shard_that_fails_is_a_counted_skip(shards, tmp_path):
    srv = FaultServer(Path(shards[0]).parent)
    try:
        srv.plan = {Path(shards[1]).name: ["fail"]}
        src = source(srv.urls(shards), cache_dir=str(tmp_path / "cache"), fetch_options=FAST, shuffle=False)
        batches = take(src, 4)  # shards 0 and 2: 32 samples, 4 batches; the failing shard is skipped
        st = src.loader.stats
        src.close()
        assert len(batches) == 4 and all(torch.isfinite(i).all() for i, _ in batches)
        assert st["skipped"] == {"shard_fetch_failed": 1} and st["fetch_failures"] >= 1
        assert srv.gets[Path(shards[1]).name] >= FAST["attempts"]
        local = source([shards[0], shards[2]], shuffle=False)
        assert_equal(batches, take(local, 4))
        local.close()
    finally:
        srv.close()
