"""Shard patterns (brace expansion) and the per-(seed, epoch) shard split: pure Python, no extension."""

from __future__ import annotations

from pathlib import Path

import pytest

from bmclip.data.shards import braceexpand, expand_urls, shard_order, split_shards
from bmclip.errors import ConfigError


def test_braceexpand():
    assert braceexpand("a-{000..003}.tar") == [f"a-{i:03d}.tar" for i in range(4)]
    assert braceexpand("a{1..3}") == ["a1", "a2", "a3"]
    assert braceexpand("a{3..1}") == ["a3", "a2", "a1"]
    assert braceexpand("x{0..10..5}") == ["x0", "x5", "x10"]
    assert braceexpand("{train,val}-{0..1}") == ["train-0", "train-1", "val-0", "val-1"]
    assert braceexpand("p{a,b{1,2}}q") == ["paq", "pb1q", "pb2q"]
    assert braceexpand("{a..c}") == ["a", "b", "c"]
    assert braceexpand("plain.tar") == ["plain.tar"]
    assert braceexpand("d/{08..11}") == ["d/08", "d/09", "d/10", "d/11"]
    assert expand_urls("a{0..1}::b{2..3}") == ["a0", "a1", "b2", "b3"]
    assert expand_urls(["a{0..1}", Path("c")]) == ["a0", "a1", "c"]
    for bad in ("a{1..3", "a}1{", "a{x}", "a{}", "{1..3..0}"):
        with pytest.raises(ConfigError):
            braceexpand(bad)
    with pytest.raises(ConfigError):
        expand_urls([])


def test_split_shards_partition():
    for n_shards in (1, 2, 5, 7):
        order = shard_order(n_shards, seed=3, epoch=1, shuffle=True)
        assert sorted(order) == list(range(n_shards))
        for n_splits in (1, 2, 3, 6):
            seen = []
            for s in range(n_splits):
                shards, mod, rem = split_shards(order, s, n_splits)
                seen += [(sh, i) for sh in shards for i in range(20) if i % mod == rem]
            assert sorted(seen) == [(sh, i) for sh in range(n_shards) for i in range(20)]
    assert shard_order(5, 0, 0, shuffle=False) == [0, 1, 2, 3, 4]
    assert shard_order(50, 0, 0, True) != shard_order(50, 0, 1, True)
    assert shard_order(50, 0, 1, True) == shard_order(50, 0, 1, True)


def test_expand_urls_globs_local_paths_sorted(tmp_path):
    for name in ["b-1.tar", "a-2.tar", "a-1.tar", "c.txt"]:
        (tmp_path / name).write_bytes(b"")
    got = expand_urls(f"{tmp_path}/a-*.tar::{tmp_path}/{{b,a}}-?.tar")
    a1, a2, b1 = (f"{tmp_path}/{n}" for n in ["a-1.tar", "a-2.tar", "b-1.tar"])
    assert got == [a1, a2, b1, a1, a2]
    with pytest.raises(ConfigError, match="no shards match"):
        expand_urls(f"{tmp_path}/z-*.tar")
    # URLs are passed through: globbing them is the remote filesystem's business.
    assert expand_urls("s3://bucket/x-*.tar") == ["s3://bucket/x-*.tar"]


def test_shard_names_digest_ignores_the_location_only():
    from bmclip.data.shards import shard_names_digest, urls_digest

    local = ["/data/pmc/train-000000.tar", "/data/pmc/train-000001.tar"]
    same = [["/scratch/job-81/train-000000.tar", "/scratch/job-81/train-000001.tar"],
            ["s3://bucket/pmc/train-000000.tar", "https://host/pmc/train-000001.tar?X-Amz-Signature=abc"],
            ["file:///mnt/x/train-000000.tar", "train-000001.tar"]]
    for other in same:
        assert shard_names_digest(other) == shard_names_digest(local), other
        assert urls_digest(other) != urls_digest(local)
    for other in (local[::-1], local[:1], ["/data/pmc/val-000000.tar", local[1]]):
        assert shard_names_digest(other) != shard_names_digest(local), other
    # a pipe: command has no location apart from its text
    assert shard_names_digest(["pipe:cat /a/x.tar"]) != shard_names_digest(["pipe:cat /b/x.tar"])


def test_shards_moved_and_the_trainers_data_train_check_agree():
    from bmclip.data.shards import shard_names_digest, shards_moved, urls_digest
    from bmclip.train.trainer import _same_shards_moved

    here = ["/data/train-000000.tar", "/data/train-000001.tar"]
    saved = {"urls_sha1": urls_digest(here), "names_sha1": shard_names_digest(here)}
    moved = ["s3://bucket/pmc/train-000000.tar", "s3://bucket/pmc/train-000001.tar"]
    assert shards_moved(saved["urls_sha1"], saved["names_sha1"], moved)
    assert not shards_moved(saved["urls_sha1"], saved["names_sha1"], here)  # not moved: the same URLs
    assert not shards_moved(saved["urls_sha1"], saved["names_sha1"], moved[::-1])  # another order
    assert not shards_moved(saved["urls_sha1"], "", moved)  # a state from before names were recorded

    def ckpt(state):
        return {"rank_state": {"loader": {"loader": state}}}

    assert _same_shards_moved(ckpt(saved), "s3://bucket/pmc/train-{000000..000001}.tar")
    assert _same_shards_moved(ckpt(saved), "/data/train-000000.tar::/data/train-000001.tar")  # respelled
    assert not _same_shards_moved(ckpt(saved), "/data/train-{000000..000002}.tar")
    assert not _same_shards_moved(ckpt(saved), "/data/train-{000001..000000}.tar")  # not a valid range
    assert not _same_shards_moved(ckpt("not a dict"), "/data/train-000000.tar")


def test_a_pattern_naming_more_shards_than_any_data_set_is_refused_before_its_list_is_built():
    """{000000000..999999999} built a billion-item list (5 GB after 17 s, then MemoryError or the OOM killer)."""
    from bmclip.data.shards import MAX_SHARD_URLS

    for pattern in ("x{000000000..999999999}.tar", "x{0..99999}-{0..99999}.tar", "{a,b}{0..9999999}.tar"):
        with pytest.raises(ConfigError, match="more than the 10,000,000"):
            expand_urls(pattern)
    assert MAX_SHARD_URLS == 10_000_000
    assert len(expand_urls("x{0..99}-{0..999}.tar")) == 100_000  # big, but plausible
    assert expand_urls([b"/data/caf\xe9-{0..1}.tar"]) == ["/data/caf\udce9-0.tar", "/data/caf\udce9-1.tar"]
