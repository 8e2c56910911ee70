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


@pytest.mark.parametrize("bad, match", [
    ({"attempts": True}, r"fetch attempts must be an integer >= 1, got True"),  # was accepted as 1 try
    ({"attempts": 2.0}, r"fetch attempts must be an integer >= 1"),
    ({"chunk_bytes": 0}, r"fetch chunk_bytes must be an integer >= 1, got 0"),
    ({"backoff_s": "1"}, r"fetch backoff_s must be a finite number >= 0, got '1'"),  # was a TypeError
    ({"backoff_max_s": float("inf")}, r"fetch backoff_max_s must be a finite number >= 0, got inf"),
    ({"read_timeout_s": 0}, r"fetch read_timeout_s must be a finite number > 0, got 0"),
    ({"connect_timeout_s": float("nan")}, r"fetch connect_timeout_s must be a finite number > 0, got nan"),
    ({"connect_timeout_s": True}, r"fetch connect_timeout_s must be a finite number > 0, got True"),  # was 1 s
])
def test_fetch_options_refuse_what_is_not_a_value(bad, match):
    from bmclip.data.remote import FetchOptions

    with pytest.raises(ConfigError, match=match):
        FetchOptions.coerce(bad)
    ok = FetchOptions(backoff_s=0, read_timeout_s=2)  # integers are numbers; the fields hold floats
    assert ok.backoff_s == 0.0 and isinstance(ok.read_timeout_s, float)


def test_one_transient_policy_for_every_remote_caller():
    """Downloads, build inputs and uploads all retry on io.retry.is_transient: the same error gets the same
    answer everywhere (they had three classifiers that disagreed on HTTP statuses, credentials and ImportError)."""
    import errno

    from bmclip.data.pmc import sources
    from bmclip.data.remote import _transient as download_transient
    from bmclip.errors import ConfigError
    from bmclip.io.retry import is_transient

    class HTTPish(OSError):
        def __init__(self, status):
            super().__init__(f"status {status}")
            self.status = status

    NoCredentialsError = type("NoCredentialsError", (Exception,), {})  # botocore's, by name
    transient = [ConnectionResetError(), TimeoutError(), OSError(errno.EIO, "I/O error"), HTTPish(503),
                 HTTPish(500), OSError("incomplete read: 10 of 20 bytes")]
    permanent = [FileNotFoundError("s3://b/x"), PermissionError(), HTTPish(403), HTTPish(404),
                 ModuleNotFoundError("s3fs"), ConfigError("bad"), NoCredentialsError(), TypeError("bug")]
    for e in transient:
        assert is_transient(e) and download_transient(e) and sources._transient(e), e
    for e in permanent:
        assert not is_transient(e) and not download_transient(e) and not sources._transient(e), e
    assert not sources._transient(sources.PackageError("damaged", "x"))
