"""Where the builder reads and writes: local paths, or remote URLs opened through fsspec.

A location is *remote* when it is a URL (``s3://bucket/prefix/``, ``gs://...``, ``https://host/file.tar.gz``,
or any other fsspec protocol, chained ones included); ``file://`` URLs are local paths. fsspec and its
backends (s3fs, gcsfs) are the optional extra ``bmclip[cloud]``; without them a remote location is a
ConfigError that says so. Storage options (``endpoint_url``, ``anon``, ``key``/``secret``, ...) go to the
fsspec filesystem as keyword arguments; s3fs also honours the standard ``AWS_*`` environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``). Storage options may hold secrets: nothing here records them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from bmclip.errors import ConfigError

__all__ = ["CLOUD_HINT", "filesystem", "is_remote", "local_path", "location_name", "parse_storage_options"]

CLOUD_HINT = "pip install bmclip[cloud]"


def is_remote(loc: str | os.PathLike) -> bool:
    """True for a URL other than ``file://`` (a local path)."""
    s = os.fspath(loc)
    return "://" in s and not s.startswith("file://")


def local_path(loc: str | os.PathLike) -> Path:
    """The local path of a plain path or a ``file://`` URL (a ConfigError for any other URL)."""
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


def filesystem(url: str, storage_options: dict | None = None):
    """``(fsspec filesystem, path inside it)`` of a remote URL; a ConfigError naming the extra when missing."""
    try:
        # fsspec and its backends are the optional extra bmclip[cloud], needed only for remote locations.
        import fsspec.core
    except ImportError as e:
        raise ConfigError(f"{url}: remote locations need fsspec ({CLOUD_HINT})") from e
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as e:
        proto = url.split("://", 1)[0]
        raise ConfigError(f"{url}: no fsspec backend for {proto}:// installed ({CLOUD_HINT}): {e}") from e
    except ValueError as e:  # unknown protocol
        raise ConfigError(f"{url}: {e}") from e


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
