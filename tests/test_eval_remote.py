"""Evaluation over remote shards: ``bmclip eval retrieval`` and ``iter_shard_pairs`` reading shards served by
Python's HTTP server (with injected faults), by an S3 API on loopback (moto) and by ``pipe:`` commands.

The reference for every remote run is the same evaluation over the same shards as local files: same
samples in the same order, equal embeddings and metrics; a shard that cannot be read is a counted skip.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fsspec", reason="remote shards need the cloud extra (fsspec)")
pytest.importorskip("aiohttp", reason="fsspec's HTTP backend needs aiohttp")

from _servers import FaultServer, moto_server, set_s3_env, upload_to_s3  # noqa: E402
from test_eval_cli import _ext_loads, _shards  # noqa: E402

from bmclip.cli import main  # noqa: E402
from bmclip.errors import DataError  # noqa: E402
from bmclip.eval.batching import iter_shard_pairs  # noqa: E402

FAST = {"attempts": 3, "backoff_s": 0.05, "backoff_max_s": 0.2, "connect_timeout_s": 5.0, "read_timeout_s": 5.0}
PATTERN = "shard-{000000..000002}.tar"


@pytest.fixture
def store(tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    _shards(folder)  # 24 pairs in 3 shards (10, 10, 4)
    return folder


@pytest.fixture
def http(store):
    srv = FaultServer(store)
    yield srv
    srv.close()


def run_retrieval(shards: str, out: Path, reader: str = "python", *extra: str) -> dict:
    import torch

    torch.manual_seed(0)  # the tiny preset's random init: the same model for every run
    rc = main(["eval", "retrieval", "tiny", "--shards", shards, "--out", str(out), "--batch-size", "8",
               "--block", "5", "--reader", reader, "--device", "cpu", *extra])
    assert rc == 0
    res = json.loads((out / "retrieval.json").read_text())
    res["_emb"] = [np.load(out / "embeddings" / f"{k}_emb.npy") for k in ("image", "text")]
    return res


def assert_same(remote: dict, local: dict) -> None:
    metrics = [k for k in local if "R@" in k or "median_rank" in k or k == "n"]
    assert {k: remote[k] for k in metrics} == {k: local[k] for k in metrics}
    for a, b in zip(remote["_emb"], local["_emb"]):
        np.testing.assert_array_equal(a, b)
    assert remote["skipped"]["count"] == local["skipped"]["count"] == 0


@pytest.mark.parametrize("reader", ["python", "loader"])
def test_eval_retrieval_over_http_equals_local(store, http, tmp_path, reader):
    if reader == "loader" and not _ext_loads():
        pytest.skip("bmclip._C not built")
    local = run_retrieval(str(store / PATTERN), tmp_path / "local", reader)
    remote = run_retrieval(f"{http.base}/{PATTERN}", tmp_path / "remote", reader)
    assert local["n"] == 24
    assert_same(remote, local)
    assert http.gets == {f"shard-{i:06d}.tar": 1 for i in range(3)}  # each shard read once, over the network


def test_eval_retrieval_over_s3_equals_local(store, tmp_path, monkeypatch):
    pytest.importorskip("s3fs", reason="s3:// shards need s3fs (the cloud extra)")
    pytest.importorskip("moto.server", reason="needs moto[server]")
    set_s3_env(monkeypatch)
    local = run_retrieval(str(store / PATTERN), tmp_path / "local")
    with moto_server() as endpoint:
        upload_to_s3(endpoint, "eval-bkt", sorted(store.glob("*.tar")), prefix="test")
        remote = run_retrieval(f"s3://eval-bkt/test/{PATTERN}", tmp_path / "remote", "python",
                               "--storage-option", f"endpoint_url={endpoint}")
    assert_same(remote, local)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_pipe_and_file_urls_equal_local(store):
    local = keys_of(iter_shard_pairs(str(store / PATTERN), 16, batch_size=8))
    shards = sorted(store.glob("*.tar"))
    assert keys_of(iter_shard_pairs([f"pipe:cat {p}" for p in shards], 16, batch_size=8)) == local
    assert keys_of(iter_shard_pairs([p.as_uri() for p in shards], 16, batch_size=8)) == local


def test_faults_recover_and_a_failing_shard_is_a_counted_skip(store, http):
    local = keys_of(iter_shard_pairs(str(store / PATTERN), 16, batch_size=8))
    urls = f"{http.base}/{PATTERN}"
    # a 503 burst, a connection dropped mid-shard (reconnect, continue where it stopped) and a stall past the
    # read timeout: every sample, in order, nothing skipped
    names = [f"shard-{i:06d}.tar" for i in range(3)]
    http.plan = {names[0]: ["503", "503"], names[1]: ["drop"], names[2]: ["stall"]}
    http.stall_s = 3.0
    skipped: list = []
    t0 = time.monotonic()
    got = keys_of(iter_shard_pairs(urls, 16, batch_size=8, skipped=skipped,
                                   fetch_options=dict(FAST, read_timeout_s=1.0)))
    assert got == local and skipped == []
    assert http.gets == {names[0]: 3, names[1]: 2, names[2]: 2}
    assert time.monotonic() - t0 < 20
    # a shard that always fails: its samples are lost, counted once with the reason; the others complete
    http.plan, http.gets = {names[1]: ["fail"]}, {}
    skipped = []
    got = keys_of(iter_shard_pairs(urls, 16, batch_size=8, skipped=skipped, fetch_options=FAST))
    assert got == local[:10] + local[20:]
    ((where, reason),) = skipped
    assert where.endswith(names[1]) and reason.startswith("shard_fetch_failed:")
    assert "3 attempts" in reason and "503" in reason
    assert http.gets[names[1]] == FAST["attempts"]  # the per-shard attempt limit
    # a read that fails mid-shard on every attempt: the samples read before stay, the open one is counted
    http.plan, http.gets = {names[0]: ["drop"] * 5}, {}
    skipped = []
    got = keys_of(iter_shard_pairs(urls, 16, batch_size=8, skipped=skipped, fetch_options=FAST))
    lost = [k for k in local[:10] if k not in got]
    assert lost and got == [k for k in local if k not in lost] and lost == local[10 - len(lost):10]
    assert http.gets[names[0]] == FAST["attempts"]
    reasons = [r.split(":", 1)[0] for _, r in skipped]
    assert reasons.count("shard_fetch_failed") == 1 and set(reasons) <= {"shard_fetch_failed", "damaged_tar_sample"}
    # the CLI's skip summary counts them by reason (the python reader)
    from bmclip.cli.eval import _skips_summary

    assert _skips_summary(skipped)["by_reason"]["shard_fetch_failed"] == 1


def test_every_shard_failing_ends_with_a_clear_error(http):
    urls = [f"{http.base}/missing-{i}.tar" for i in range(2)]
    skipped: list = []
    with pytest.raises(DataError, match=r"no samples in 2 shard\(s\).*shard_fetch_failed: .*1 attempt.*FileNotFound"):
        list(iter_shard_pairs(urls, 16, skipped=skipped, fetch_options=FAST))
    assert len(skipped) == 2 and all("after 1 attempt:" in r for _, r in skipped)  # 404 is not retried
    with pytest.raises(DataError, match="missing-0.tar"):  # without a skip list: an error at once
        list(iter_shard_pairs(urls, 16, fetch_options=FAST))


def test_zeroshot_dataset_spec_may_be_a_remote_shard_pattern(tmp_path):
    import io
    import tarfile

    from PIL import Image

    from bmclip.eval.datasets import open_dataset

    folder = tmp_path / "cls"
    folder.mkdir()
    for s in range(2):
        with tarfile.open(folder / f"part-{s}.tar", "w") as tf:
            for i in range(3):
                buf = io.BytesIO()
                Image.new("RGB", (20, 20), (40 * i, 80 * s, 9)).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", str((i + s) % 2).encode())):
                    ti = tarfile.TarInfo(f"s{s}i{i}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    srv = FaultServer(folder)
    try:
        remote = open_dataset(f"{srv.base}/part-{{0..1}}.tar")
        local = open_dataset(str(folder / "part-{0..1}.tar"))
        assert len(remote) == len(local) == 6 and remote.skipped == []
        assert remote.labels().tolist() == local.labels().tolist()
        assert [remote.name_of(i) for i in range(6)] == [local.name_of(i) for i in range(6)]
        assert np.array_equal(np.asarray(remote[4][0]), np.asarray(local[4][0]))
    finally:
        srv.close()
