"""bmclip.io.fs: what a location is (local, file://, remote, pipe:), the one URL -> fsspec filesystem, and the
one backoff schedule (bmclip.io.retry) that the shard loader and the dataset builder share."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from bmclip.errors import ConfigError
from bmclip.io.fs import CLOUD_HINT, CloudExtraMissing, filesystem, is_remote, local_path, protocol
from bmclip.io.retry import backoff_delay, backoff_delays


def test_file_urls_are_local_paths_everywhere(tmp_path):
    p = tmp_path / "a b" / "shard-000000.tar"
    assert not is_remote(p.as_uri()) and not is_remote(str(p)) and not is_remote(p)
    assert local_path(p.as_uri()) == p and local_path(str(p)) == p
    assert local_path("file://localhost/x/y.tar") == Path("/x/y.tar")
    with pytest.raises(ConfigError, match="local path"):
        local_path("file://otherhost/x.tar")
    for url in ("s3://b/k.tar", "gs://b/k.tar", "https://h/k.tar", "simplecache::s3://b/k", "pipe:cat x.tar"):
        assert is_remote(url)
        with pytest.raises(ConfigError, match="not a remote URL"):
            local_path(url)
    assert [protocol(u) for u in ("S3://b/k", "pipe:cat x", "/x/y", "simplecache::gs://b/k")] == \
        ["s3", "pipe", "file", "gs"]


def test_filesystem_errors_name_the_cause(monkeypatch):
    pytest.importorskip("fsspec")
    fs, path = filesystem("memory://bucket/x.tar")
    assert path == "/bucket/x.tar" and "memory" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    with pytest.raises(ConfigError, match="unknown protocol 'nosuchproto'"):
        filesystem("nosuchproto://x/y")
    with pytest.raises(ConfigError, match="pipe: command"):
        filesystem("pipe:cat x")
    monkeypatch.setitem(sys.modules, "fsspec", None)
    monkeypatch.setitem(sys.modules, "fsspec.core", None)
    with pytest.raises(CloudExtraMissing) as ei:
        filesystem("s3://b/k")
    # one error for every caller: the builder catches ConfigError (exit status 2), the loader ImportError
    assert isinstance(ei.value, ConfigError) and isinstance(ei.value, ImportError)
    assert CLOUD_HINT in str(ei.value)


def test_timeouts_reach_the_backend_options():
    pytest.importorskip("fsspec")
    pytest.importorskip("aiohttp")
    fs, _ = filesystem("http://127.0.0.1:9/x.tar", connect_timeout_s=2.0, read_timeout_s=3.0)
    t = fs.client_kwargs["timeout"]
    assert (t.sock_connect, t.sock_read, t.total) == (2.0, 3.0, None)
    # a timeout the user set wins
    fs, _ = filesystem("http://127.0.0.1:9/y.tar", {"client_kwargs": {"timeout": None}}, connect_timeout_s=2.0)
    assert fs.client_kwargs["timeout"] is None


def test_one_backoff_schedule():
    from bmclip.data.remote import FetchOptions

    assert backoff_delays(6, 0.5, 6.0) == [backoff_delay(k, 0.5, 6.0, jitter=False) for k in range(1, 6)] \
        == [0.5, 1.0, 2.0, 4.0, 6.0]
    opts = FetchOptions(backoff_s=0.5, backoff_max_s=6.0)
    for k in range(1, 8):  # the loader's download backoff is the same schedule with the same jitter draw
        assert opts.delay(k, random.Random(k)) == backoff_delay(k, 0.5, 6.0, random.Random(k))
