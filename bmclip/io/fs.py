"""Where bmclip reads and writes: local paths, or remote URLs opened through fsspec.

The one place that knows what a location is and how to open a remote one; the training loader's shard
cache (``bmclip.data.remote``), the evaluation shard reader (``bmclip.data.tario``) and ``build-dataset``
(``bmclip.data.pmc``) all go through it.

- **Local**: a plain path, or a ``file://`` URL (``file:///abs/path``, or ``file://localhost/abs/path``).
  A ``file://`` URL is the local path it names and is read or written in place (the loader memory-maps it, the
  builder writes it atomically); :func:`local_path` turns it into a ``Path``.
- **Remote**: any other URL (``s3://``, ``gs://``, ``http(s)://``, any fsspec protocol, chained ones such as
  ``simplecache::s3://...`` included), and webdataset's ``pipe:CMD`` (a shell command whose standard output
  is the data; only shard readers run commands, :func:`filesystem` refuses them).

fsspec and its backends (s3fs, gcsfs) are the optional extra ``bmclip[cloud]``; a remote URL without them
is a :class:`CloudExtraMissing` error (both a ``ConfigError`` and an ``ImportError``) whose message says
``pip install 'bmclip[cloud]'``. Storage options (``endpoint_url``, ``anon``, ``key``/``secret``, ...) go to
the fsspec filesystem as keyword arguments; fsspec's own configuration also applies (environment variables
``FSSPEC_<PROTOCOL>_<OPTION>``), and s3fs honours the standard ``AWS_*`` variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL``). Storage options may hold secrets: nothing here records them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from bmclip.errors import ConfigError

__all__ = ["CLOUD_HINT", "CloudExtraMissing", "filesystem", "is_pipe", "is_remote", "local_path", "location_name",
           "parse_storage_options", "protocol"]

CLOUD_HINT = "pip install 'bmclip[cloud]'"


class CloudExtraMissing(ConfigError, ImportError):
    """A remote URL needs fsspec or one of its backends, which are not installed."""


def is_pipe(loc: str | os.PathLike) -> bool:
    """True for webdataset's ``pipe:CMD``."""
    return os.fspath(loc).startswith("pipe:")


def is_remote(loc: str | os.PathLike) -> bool:
    """True for a location that is not a local path: a URL other than ``file://``, or ``pipe:CMD``."""
    s = os.fspath(loc)
    return is_pipe(s) or ("://" in s and not s.startswith("file://"))


def protocol(url: str) -> str:
    """``"pipe"``, the URL's scheme (lower case; the innermost target of a chained URL), or ``"file"``."""
    if is_pipe(url):
        return "pipe"
    tail = url.split("::")[-1]
    return tail.split("://", 1)[0].lower() if "://" in tail else "file"


def local_path(loc: str | os.PathLike) -> Path:
    """The local path of a plain path or a ``file://`` URL (a ConfigError for a remote location)."""
    s = os.fspath(loc)
    if is_remote(s):
        raise ConfigError(f"{s}: a local path is needed here, not a remote URL")
    if s.startswith("file://"):
        u = urlparse(s)
        if u.netloc not in ("", "localhost"):
            raise ConfigError(f"{s}: file:// URLs must name a local path (file:///abs/path)")
        return Path(unquote(u.path))
    return Path(s)


def location_name(url: str) -> str:
    """The last non-empty path component of a URL (``s3://b/pmc/oa/`` -> ``oa``; ``s3://b/`` -> ``b``)."""
    tail = url.split("::")[-1].split("://", 1)[-1].split("?", 1)[0]
    parts = [p for p in tail.split("/") if p]
    return parts[-1] if parts else tail


def _with_timeouts(proto: str, storage_options: dict[str, Any], connect_timeout_s: float | None,
                   read_timeout_s: float | None) -> dict[str, Any]:
    """The storage options plus connect/read timeouts for the backends that take them (user values win)."""
    so = dict(storage_options)
    if connect_timeout_s is None and read_timeout_s is None:
        return so
    if proto in ("http", "https"):
        ck = dict(so.get("client_kwargs") or {})
        if "timeout" not in ck:
            import aiohttp  # fsspec's HTTP backend depends on it; imported only for http(s) URLs

            ck["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        so["client_kwargs"] = ck
    elif proto in ("s3", "s3a"):
        cfg = dict(so.get("config_kwargs") or {})
        if connect_timeout_s is not None:
            cfg.setdefault("connect_timeout", connect_timeout_s)
        if read_timeout_s is not None:
            cfg.setdefault("read_timeout", read_timeout_s)
        so["config_kwargs"] = cfg
    return so


def filesystem(url: str, storage_options: dict[str, Any] | None = None, *, connect_timeout_s: float | None = None,
               read_timeout_s: float | None = None):
    """``(fsspec filesystem, path inside it)`` of a URL.

    ``connect_timeout_s`` / ``read_timeout_s`` (when given) bound connecting and each wait for data on the
    backends that take such options (http(s): aiohttp's ``sock_connect``/``sock_read``; s3: botocore's
    ``connect_timeout``/``read_timeout``), unless ``storage_options`` already set them; chained URLs get the
    storage options as given. Raises :class:`CloudExtraMissing` when fsspec or the protocol's backend is not
    installed, ConfigError for ``pipe:``, an unknown protocol or storage options the backend refuses.
    """
    if is_pipe(url):
        raise ConfigError(f"{url}: a pipe: command is not a storage location")
    try:
        # fsspec and its backends are the optional extra bmclip[cloud], needed only for remote locations.
        import fsspec.core
    except ImportError as e:
        raise CloudExtraMissing(f"{url}: remote locations need fsspec: {CLOUD_HINT} ({e})") from None
    proto = protocol(url)
    so = dict(storage_options or {})
    if "::" not in url:
        so = _with_timeouts(proto, so, connect_timeout_s, read_timeout_s)
    try:
        return fsspec.core.url_to_fs(url, **so)
    except ImportError as e:
        raise CloudExtraMissing(f"{url}: {proto}:// needs an fsspec backend: {CLOUD_HINT} ({e})") from None
    except ValueError as e:
        if "protocol" in str(e).lower():
            raise ConfigError(f"{url}: unknown protocol {proto!r} ({e})") from None
        raise ConfigError(f"{url}: storage options for {proto}:// ({e})") from None
    except TypeError as e:
        raise ConfigError(f"{url}: storage options for {proto}:// ({e})") from None


def parse_storage_options(items: list[str] | None) -> dict:
    """``["KEY=VALUE", ...]`` -> dict; a VALUE that parses as JSON (``true``, ``3``, ``{"a": 1}``) is taken as
    that, anything else as a string."""
    out: dict = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"storage option {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out
