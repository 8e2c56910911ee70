"""Data: webdataset shard loading (C++ decoder) and the PMC dataset builder.

``ShardLoader`` is imported lazily so that ``bmclip.data.pmc`` (pure Python) works without the
compiled extension.
"""

from __future__ import annotations

__all__ = ["ShardLoader"]


def __getattr__(name: str):
    if name == "ShardLoader":
        from bmclip.data.loader import ShardLoader

        return ShardLoader
    raise AttributeError(f"module 'bmclip.data' has no attribute {name!r}")
