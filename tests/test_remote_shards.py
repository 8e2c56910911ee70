"""Remote shards against real servers on loopback: an S3 API (moto's server, through s3fs), Python's HTTP
server with faults injected by the server (503 bursts, a connection dropped mid-shard, a stalled response,
a shard that always fails, a throttled link), ``pipe:`` commands and ``file://``.

The reference for every remote run is the same ShardLoader over the same shards as local files: same
seed, same split, so the keys must come out in the same order (and every sample exactly once per epoch).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bmclip.errors import DataError

pytest.importorskip("bmclip._C", reason="bmclip._C (C++ extension) not built")
pytest.importorskip("fsspec", reason="remote shards need the cloud extra (fsspec)")
pytest.importorskip("aiohttp", reason="fsspec's HTTP backend needs aiohttp")

from _servers import FaultServer, moto_server, set_s3_env  # noqa: E402
from _servers import upload_to_s3 as _upload  # noqa: E402
from test_loader import collect, write_shards  # noqa: E402

from bmclip.data.loader import ShardLoader  # noqa: E402

S = 16
FAST = {"attempts": 3, "backoff_s": 0.05, "backoff_max_s": 0.2, "connect_timeout_s": 5.0, "read_timeout_s": 5.0}


def loader(urls, cache_dir, **kw):
    opts = dict(batch_size=4, image_size=S, seed=7, num_threads=1, shuffle_buffer=6, cache_dir=str(cache_dir),
                fetch_options=FAST)
    opts.update(kw)
    return ShardLoader(urls, **opts)


def local_keys(paths, **kw):
    opts = dict(batch_size=4, image_size=S, seed=7, num_threads=1, shuffle_buffer=6)
    opts.update(kw)
    return collect(ShardLoader(paths, **opts))


def digest(batch) -> str:
    return hashlib.sha1(batch["image"].numpy().tobytes()).hexdigest()


def cached_files(cache_dir: Path) -> list[Path]:
    """Complete shard copies in every cache folder under cache_dir (not the lock, not temp files)."""
    return [p for p in cache_dir.glob("bmclip-shards-*/*") if not p.name.startswith(".")]


def cached_bytes(cache_dir: Path) -> int:
    """Bytes of the complete shard copies now in the cache (the cache thread may evict one while we look)."""
    total = 0
    for p in cached_files(cache_dir):
        with contextlib.suppress(FileNotFoundError):  # evicted between the listing and the stat
            total += p.stat().st_size
    return total


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    return write_shards(folder, 5, 6)


@pytest.fixture
def http(shards):
    srv = FaultServer(Path(shards[0]).parent)
    yield srv
    srv.close()


# ---------------------------------------------------------------------------------------------------
def test_http_epoch_matches_local_and_cache_is_emptied(shards, http, tmp_path):
    """Every sample once per rank assignment, in the local loader's order; the cache folder goes with the loader."""
    cache = tmp_path / "cache"
    for world in (1, 2):
        everything = []
        for rank in range(world):
            ld = loader(http.urls(shards), cache, rank=rank, world_size=world)
            keys = collect(ld)
            assert keys == local_keys(shards, rank=rank, world_size=world)
            st = ld.stats
            assert st["skipped"] == {} and st["fetch_failures"] == 0 and st["fetch_retries"] == 0
            assert st["shards_fetched"] >= len({int(k[1:]) // 6 for k in keys})
            everything += keys
            folder = ld._cache.dir
            del ld
            gc.collect()
            deadline = time.monotonic() + 10  # a download ahead in flight stops at its next chunk
            while folder.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not folder.exists()
        assert sorted(everything) == sorted(f"s{u:05d}" for u in range(30))
    assert list(cache.iterdir()) == []


def test_http_bytes_fetched_and_evicted_after_use(shards, http, tmp_path):
    cache = tmp_path / "cache"
    ld = loader(http.urls(shards), cache, shuffle=False, prefetch_shards=0)
    keys = collect(ld)
    assert keys == [f"s{u:05d}" for u in range(30)]
    st = ld.stats
    assert st["shards_fetched"] == 5 and st["fetch_wait_s"] > 0
    assert st["bytes_fetched"] == sum(os.path.getsize(p) for p in shards)
    assert http.gets == {Path(p).name: 1 for p in shards}  # each shard downloaded once
    assert ld._cache.stats()["cache_bytes_used"] == 0
    assert cached_files(cache) == []  # each copy deleted once the loader was done with it


def test_downloads_are_not_fsynced_but_land_whole(shards, http, tmp_path, monkeypatch):
    """A cached copy is deleted at the next start, so it is written without fsync (which would force to disk the
    bytes of every shard of every epoch); it still appears under its name only when complete."""
    from bmclip.data.remote import fetch_shard

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    dest = tmp_path / "dl" / "copy.tar"
    n, attempts = fetch_shard(http.urls(shards)[0], dest)
    assert (n, attempts) == (os.path.getsize(shards[0]), 1) and dest.read_bytes() == Path(shards[0]).read_bytes()
    assert synced == [] and os.listdir(dest.parent) == ["copy.tar"]


def test_dataloader_worker_processes_fetch_their_own_shards(shards, http, tmp_path):
    cache = tmp_path / "cache"
    ld = loader(http.urls(shards), cache)
    first = collect(ld)  # the parent's cache exists when the workers fork
    dl = torch.utils.data.DataLoader(ld, batch_size=None, num_workers=2)
    keys = [k for b in dl for k in b["key"]]
    assert sorted(keys) == sorted(first) == [f"s{u:05d}" for u in range(30)]
    assert ld._cache.usable() and ld._cache.dir.is_dir()  # the workers left the parent's folder alone


def test_prefetch_fetches_the_next_shards_of_the_assignment(shards, http, tmp_path):
    cache = tmp_path / "cache"
    # one-sample batches, one batch queued: the producer stays inside shard 0 (6 samples) meanwhile
    ld = loader(http.urls(shards), cache, shuffle=False, shuffle_buffer=0, prefetch_shards=2, batch_size=1,
                prefetch=1)
    it = iter(ld)
    first = next(it)
    assert first["key"][0] == "s00000"
    deadline = time.monotonic() + 10
    want = {Path(p).name for p in shards[1:3]}
    while time.monotonic() < deadline:
        names = {p.name.split("-", 1)[1] for p in cached_files(cache)}
        if want <= names:
            break
        time.sleep(0.05)
    assert want <= names, f"shards 1 and 2 not prefetched while shard 0 is read: {names}"
    assert Path(shards[3]).name not in names  # only prefetch_shards ahead
    assert int(next(it)["key"][0][1:]) < 6  # still reading shard 0
    it.close()
    # without prefetching, nothing is downloaded before the loader needs it
    cache0 = tmp_path / "cache0"
    http.gets.clear()
    ld0 = loader(http.urls(shards), cache0, shuffle=False, shuffle_buffer=0, prefetch_shards=0, batch_size=1,
                 prefetch=1)
    it0 = iter(ld0)
    next(it0)
    time.sleep(0.5)
    assert set(http.gets) == {Path(shards[0]).name}
    it0.close()


def test_cache_bytes_bounds_prefetching(shards, http, tmp_path):
    cache = tmp_path / "cache"
    size = os.path.getsize(shards[0])
    ld = loader(http.urls(shards), cache, shuffle=False, shuffle_buffer=0, prefetch_shards=3, cache_bytes=2 * size)
    seen_max = 0
    keys = []
    for b in ld:
        keys += b["key"]
        seen_max = max(seen_max, cached_bytes(cache))
    assert keys == [f"s{u:05d}" for u in range(30)]
    # the open shard + one ahead fit in cache_bytes; three ahead (as prefetch_shards asks) never do
    assert seen_max <= 2 * size


def test_http_503_bursts_and_dropped_connection_recover(shards, http, tmp_path):
    names = [Path(p).name for p in shards]
    http.plan = {names[1]: ["503", "503"], names[3]: ["drop"]}
    ld = loader(http.urls(shards), tmp_path / "cache")
    keys = collect(ld)
    assert keys == local_keys(shards)  # complete, same order
    st = ld.stats
    assert st["skipped"] == {} and st["fetch_failures"] == 0
    assert st["fetch_retries"] == 3
    assert http.gets[names[1]] == 3 and http.gets[names[3]] == 2


def test_http_stalled_response_times_out_and_retries(shards, tmp_path):
    srv = FaultServer(Path(shards[0]).parent, stall_s=4.0)
    try:
        name = Path(shards[2]).name
        srv.plan = {name: ["stall"]}
        fast = dict(FAST, read_timeout_s=1.0, connect_timeout_s=1.0)
        t0 = time.monotonic()
        ld = loader(srv.urls(shards), tmp_path / "cache", fetch_options=fast)
        keys = collect(ld)
        assert keys == local_keys(shards)
        assert srv.gets[name] == 2 and ld.stats["fetch_retries"] == 1
        assert time.monotonic() - t0 < 15
    finally:
        srv.close()


def test_http_shard_that_always_fails_is_a_counted_skip(shards, http, tmp_path, caplog):
    names = [Path(p).name for p in shards]
    http.plan = {names[2]: ["fail"]}
    ld = loader(http.urls(shards), tmp_path / "cache")
    with caplog.at_level("WARNING", logger="bmclip.data.remote"):
        keys = collect(ld)
    lost = {f"s{u:05d}" for u in range(12, 18)}
    assert sorted(keys) == sorted(k for k in local_keys(shards) if k not in lost)
    st = ld.stats
    assert st["skipped"] == {"shard_fetch_failed": 1}
    assert st["samples_skipped"] == 0 and st["skipped_total"] == 1
    assert st["fetch_failures"] == 1 and st["tar_damaged_shards"] == 1
    assert http.gets[names[2]] == FAST["attempts"]  # the per-shard attempt limit
    (detail,) = st["skip_details"]
    assert names[2] in detail and "3 attempts" in detail and "503" in detail
    assert any(names[2] in r.getMessage() for r in caplog.records)


def test_every_shard_failing_ends_with_a_clear_error(shards, http, tmp_path):
    urls = [f"{http.base}/missing-{i}.tar" for i in range(3)]
    ld = loader(urls, tmp_path / "cache")
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"3 of 3 shard\(s\) could not be downloaded .*missing-"):
        collect(ld)
    assert time.monotonic() - t0 < 10
    assert ld.stats["fetch_failures"] == 3 and ld.stats["fetch_retries"] == 0  # 404 is not retried
    # resampled: a whole pass of failed downloads also ends, it does not resample forever
    ld = loader(urls, tmp_path / "cache", resampled=True)
    with pytest.raises(DataError, match="could not be downloaded"):
        collect(ld)


def test_no_download_retries_after_the_all_shards_failed_error(shards, tmp_path, caplog):
    """Once the loader has said that no shard could be downloaded, the downloads ahead (the next epoch's shards)
    stop: no retry line is logged after the error, and the cache folder is gone."""
    with socket.socket() as s:  # a port nobody listens on: every connection is refused (a transient error)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    urls = [f"http://127.0.0.1:{port}/shard-{i}.tar" for i in range(3)]
    cache = tmp_path / "cache"
    ld = loader(urls, cache, prefetch_shards=2)
    with caplog.at_level(logging.WARNING, logger="bmclip"), pytest.raises(DataError, match="could not be downloaded"):
        collect(ld)
    seen = len(caplog.records)
    assert any("retrying in" in r.getMessage() for r in caplog.records)  # the attempts did retry
    time.sleep(3 * FAST["backoff_max_s"] + 0.5)  # longer than any backoff between attempts
    assert [r.getMessage() for r in caplog.records[seen:]] == []
    assert not ld._cache.usable() and cached_files(cache) == []
    assert ld.stats["fetch_failures"] == 3  # the counts of the failed pass stay readable


@pytest.mark.parametrize("resampled", [False, True])
def test_http_resume_mid_epoch_on_a_throttled_link(shards, tmp_path, resampled):
    srv = FaultServer(Path(shards[0]).parent, rate=400_000)
    try:
        urls = srv.urls(shards)
        n_batches = 6

        def take(it, n):  # keys and a copy of the pixels (the ring buffer is reused)
            return [(b["key"], b["image"].clone()) for b in (next(it) for _ in range(n))]

        it = iter(loader(urls, tmp_path / "a", resampled=resampled))
        full = take(it, n_batches)
        it.close()
        for k in (1, 3):
            ld = loader(urls, tmp_path / "b", resampled=resampled)
            it = iter(ld)
            got = take(it, k)
            state = json.loads(json.dumps(ld.state_dict()))
            it.close()
            del it, ld
            ld2 = loader(urls, tmp_path / "c", resampled=resampled)
            ld2.load_state_dict(state)
            it2 = iter(ld2)
            got += take(it2, n_batches - k)
            it2.close()
            assert [g[0] for g in got] == [f[0] for f in full]
            assert all(torch.equal(g[1], f[1]) for g, f in zip(got, full))  # bitwise the same crops
            assert ld2.stats["fetch_wait_s"] > 0  # the first shard after a resume is waited for
    finally:
        srv.close()


_KILL_CHILD = textwrap.dedent("""
    import hashlib, json, sys
    from bmclip.data.loader import ShardLoader
    from bmclip.io import atomic_write_text
    urls, cache, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    ld = ShardLoader(urls, batch_size=4, image_size=16, seed=7, num_threads=1, shuffle_buffer=6,
                     cache_dir=cache, prefetch_shards=2, fetch_options={fast!r})
    keys, digests = [], []
    for b in ld:
        keys += b["key"]
        digests.append(hashlib.sha1(b["image"].numpy().tobytes()).hexdigest())
        atomic_write_text(json.dumps({{"keys": keys, "digests": digests, "state": ld.state_dict()}}), out)
    """)


def test_kill_during_download_leaves_only_a_temp_file_and_resume_is_exact(shards, tmp_path):
    srv = FaultServer(Path(shards[0]).parent, rate=40_000)
    try:
        urls = srv.urls(shards)
        cache, out = tmp_path / "cache", tmp_path / "progress.json"
        script = _KILL_CHILD.format(fast=FAST)
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        child = subprocess.Popen([sys.executable, "-c", script, json.dumps(urls), str(cache), str(out)], env=env)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # killed while it holds a batch and downloads a later shard
                with srv.lock:  # (in the first half of that download, so it cannot complete before the kill)
                    busy = [n for n, (sent, size) in srv.sending.items() if 0 < sent < size // 2]
                if out.exists() and busy and child.poll() is None:
                    break
                time.sleep(0.02)
            assert child.poll() is None, "the child ended before a download could be interrupted"
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
        (dead,) = list(cache.glob("bmclip-shards-*"))
        files = [p.name for p in dead.iterdir()]
        partial = [f for f in files if f.endswith(".tmp")]
        assert partial, f"no partial download in {files}"
        for f in partial:  # the shard being downloaded has no complete copy next to its temp file
            name = f[1:].rsplit(".", 2)[0]
            assert name not in files
        progress = json.loads(out.read_text())
        ld = loader(urls, cache)
        ld.load_state_dict(progress["state"])
        rest = [(b["key"], digest(b)) for b in ld]
        whole = [(b["key"], digest(b)) for b in ShardLoader(shards, batch_size=4, image_size=S, seed=7,
                                                             num_threads=1, shuffle_buffer=6)]
        assert progress["keys"] + [k for r in rest for k in r[0]] == [k for w in whole for k in w[0]]
        assert progress["digests"] + [r[1] for r in rest] == [w[1] for w in whole]  # bitwise the same batches
        assert not dead.exists()  # the dead process's folder was cleared by the next cache
    finally:
        srv.close()


# ---------------------------------------------------------------------------------------------------
def test_pipe_and_file_urls(shards, tmp_path):
    ref = local_keys(shards)
    assert collect(loader([f"pipe:cat {p}" for p in shards], tmp_path / "c1")) == ref
    assert collect(loader([f"file://{p}" for p in shards], tmp_path / "c2")) == ref
    # a command that fails (non-zero exit after some output) is retried, then skipped and counted
    bad = f"pipe:head -c 700 {shards[1]}; exit 3"
    ld = loader([f"pipe:cat {shards[0]}", bad, f"pipe:cat {shards[2]}"], tmp_path / "c3")
    keys = collect(ld)
    assert sorted(keys) == sorted([f"s{u:05d}" for u in range(6)] + [f"s{u:05d}" for u in range(12, 18)])
    st = ld.stats
    assert st["skipped"] == {"shard_fetch_failed": 1} and st["fetch_retries"] == FAST["attempts"] - 1
    assert "exited with status 3" in next(iter(st["skip_details"]))


def test_file_urls_are_read_in_place(shards, tmp_path):
    """file:// is a local path (bmclip.io.fs): memory-mapped where it is, never copied into the cache."""
    cache = tmp_path / "cache"
    ld = loader([Path(p).as_uri() for p in shards], cache)
    assert collect(ld) == local_keys(shards)
    assert ld._cache is None and ld.stats["shards_fetched"] == 0 and not cache.exists()
    with pytest.raises(DataError, match="not found"):
        loader([(tmp_path / "nope.tar").as_uri()], cache)


def test_construction_errors(shards, tmp_path):
    from bmclip.errors import ConfigError

    with pytest.raises(ConfigError, match="cache_bytes"):
        loader([f"pipe:cat {shards[0]}"], tmp_path, cache_bytes=-1)
    with pytest.raises(ConfigError, match="prefetch_shards"):
        loader([f"pipe:cat {shards[0]}"], tmp_path, prefetch_shards=1.5)
    with pytest.raises(ConfigError, match="attempts"):
        loader([f"pipe:cat {shards[0]}"], tmp_path, fetch_options={"attempts": 0})
    with pytest.raises(ConfigError, match="unknown protocol"):
        loader(["nosuchproto://x/y.tar"], tmp_path)
    with pytest.raises(TypeError, match="remote shards"):
        len(loader([f"pipe:cat {shards[0]}"], tmp_path))


# ---------------------------------------------------------------------------------------------------
# S3 API (moto's server) through s3fs
@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("s3fs", reason="s3:// shards need s3fs (the cloud extra)")
    pytest.importorskip("moto.server", reason="needs moto[server]")
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(monkeypatch):
    set_s3_env(monkeypatch)


def test_s3_epoch_resume_and_missing_object(s3_server, s3_env, shards, tmp_path):
    urls = _upload(s3_server, "bkt-a", shards)
    so = {"endpoint_url": s3_server}
    # a brace pattern over s3:// URLs expands like a local one
    pattern = "s3://bkt-a/train/shard-{000000..000004}.tar"
    ld = loader(pattern, tmp_path / "c", storage_options=so)
    assert ld.urls == urls
    assert collect(ld) == local_keys(shards)
    assert ld.stats["bytes_fetched"] == sum(os.path.getsize(p) for p in shards)
    # resume mid-epoch (with a shuffle buffer across shards) equals the uninterrupted run
    full = local_keys(shards)
    ld = loader(urls, tmp_path / "c", storage_options=so)
    it = iter(ld)
    got = next(it)["key"] + next(it)["key"]
    state = ld.state_dict()
    it.close()
    ld2 = loader(urls, tmp_path / "c", storage_options=so)
    ld2.load_state_dict(state)
    assert got + collect(ld2) == full
    # a missing object is a counted skip (not retried), the other shards complete
    ld = loader(urls[:2] + ["s3://bkt-a/train/nope.tar"], tmp_path / "c", storage_options=so)
    keys = collect(ld)
    assert sorted(keys) == [f"s{u:05d}" for u in range(12)]
    assert ld.stats["skipped"] == {"shard_fetch_failed": 1} and ld.stats["fetch_retries"] == 0


def test_s3_endpoint_from_the_environment(s3_server, s3_env, shards, tmp_path, monkeypatch):
    urls = _upload(s3_server, "bkt-env", shards[:2])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    # a distinct option keeps fsspec from reusing a filesystem made before the variable was set
    ld = loader(urls, tmp_path / "c", storage_options={"default_block_size": 1 << 20})
    assert sorted(collect(ld)) == [f"s{u:05d}" for u in range(12)]


# ---------------------------------------------------------------------------------------------------
def test_trainer_builds_the_loader_from_the_data_cache_keys(shards, http, tmp_path):
    import bmclip.train.trainer as T
    from bmclip.errors import ConfigError
    from bmclip.model.config import get_preset
    from bmclip.train.config import load_config
    from bmclip.train.distributed import DistInfo

    cache = tmp_path / "trainer-cache"
    pattern = f"{http.base}/shard-{{000000..000004}}.tar"
    cfg = load_config("tiny-cpu", [f"--data.train={pattern}", "--data.synthetic=false", "--data.batch_size=4",
                                   "--data.augment_backend=torch", f"--data.cache_dir={cache}",
                                   "--data.cache_bytes=1000000", "--data.prefetch_shards=1"])
    src = T._build_source(cfg, DistInfo(), get_preset("tiny"),
                          lambda texts: torch.ones(len(texts), 8, dtype=torch.long))
    ld = src.loader
    assert ld.urls == http.urls(shards) and ld.prefetch_shards == 1
    assert ld.cache_bytes == 1_000_000
    assert next(src)["image"].shape[0] == 4
    assert ld._cache.dir.parent == cache and ld._cache.prefetch_shards == 1
    src.close()
    for bad in ("--data.cache_bytes=-1", "--data.prefetch_shards=-2"):
        with pytest.raises(ConfigError, match=bad.split("=")[0][2:]):
            load_config("tiny-cpu", [bad])


def test_missing_fsspec_or_backend_names_the_extra(shards, tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("gcsfs") is None:  # gs:// without its backend
        with pytest.raises(ImportError, match=r"pip install 'bmclip\[cloud\]'"):
            loader(["gs://bucket/shard-000000.tar"], tmp_path)
    monkeypatch.setitem(sys.modules, "fsspec", None)  # fsspec itself not installed
    with pytest.raises(ImportError, match=r"need fsspec: pip install 'bmclip\[cloud\]'"):
        loader(["http://127.0.0.1:9/shard-000000.tar"], tmp_path)
    # pipe: and local shards need no fsspec; local shards in the list are read in place, never fetched
    ld = loader([f"pipe:cat {shards[0]}", shards[1], shards[2]], tmp_path / "c", shuffle=False)
    assert collect(ld) == [f"s{u:05d}" for u in range(18)]
    assert ld.stats["shards_fetched"] == 1 and ld.stats["fetch_failures"] == 0


def test_backoff_grows_exponentially_with_bounded_jitter():
    import random

    from bmclip.data.remote import FetchOptions

    opts = FetchOptions(backoff_s=0.5, backoff_max_s=6.0)
    rng = random.Random(0)
    for attempt, cap in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 6.0), (9, 6.0)):
        ds = [opts.delay(attempt, rng) for _ in range(200)]
        assert all(0.5 * cap <= d <= cap for d in ds)
        assert max(ds) - min(ds) > 0.3 * cap  # jittered, not a fixed delay


def test_training_run_reports_download_wait_and_bytes(shards, http, tmp_path, capsys):
    from bmclip.train.config import load_config
    from bmclip.train.trainer import train

    pattern = f"{http.base}/shard-{{000000..000004}}.tar"
    out = tmp_path / "run"
    cfg = load_config("tiny-cpu", [f"--data.train={pattern}", "--data.synthetic=false", "--data.batch_size=4",
                                   "--data.augment_backend=torch", f"--data.cache_dir={tmp_path / 'cache'}",
                                   "--data.tokenizer=", "--steps=2", "--log_every=1", "--progress=false",
                                   f"--out_dir={out}", "--ckpt_every=0", "--export_open_clip=false"])
    train(cfg)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r.get("kind") == "train"]
    assert train_recs and train_recs[-1]["data_bytes_fetched"] >= min(Path(p).stat().st_size for p in shards)
    assert train_recs[-1]["data_fetch_wait_s"] > 0 and train_recs[-1]["data_shards_fetch_failed"] == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[bmclip] step ")]
    assert len(lines) == 2 and all(" data wait " in ln and "(downloads " in ln for ln in lines)


def test_a_stopped_cache_logs_no_retry_and_the_stop_waits_for_one_being_logged(monkeypatch):
    """The exclusion behind the test above, without its timing: once the stop is set no retry warning is logged,
    and setting the stop waits for a warning already being written (so none lands after the loader's error)."""
    import threading

    from bmclip.data import remote as R

    stop = R._StopFlag()

    def cancelled():
        return stop.is_set()

    events = []
    entered = threading.Event()

    def slow_warning(msg, *args):
        entered.set()
        time.sleep(0.3)
        events.append("logged")

    monkeypatch.setattr(R._log, "warning", slow_warning)
    log = R._GatedLog(cancelled, stop.gate)
    t = threading.Thread(target=log.warning, args=("retrying",))
    t.start()
    assert entered.wait(5)
    stop.set()  # returns only after the warning in progress is written
    events.append("stopped")
    t.join()
    log.warning("retrying")  # after the stop: dropped
    assert events == ["logged", "stopped"]
