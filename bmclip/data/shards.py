"""Shard lists: brace expansion of shard patterns and the per-(seed, epoch, rank, worker) shard split.

Pattern syntax is the one webdataset users write (bash brace expansion), plus globs on local paths:

- ``pmc-{000000..000099}.tar``: numeric range, inclusive; zero-padded to the widest endpoint when
  either endpoint has a leading zero (bash rule); an optional step ``{0..10..2}``;
- ``{a..e}``: single-letter range;
- ``{train,val}-{0..3}.tar``: alternatives, nested and combined freely (cartesian product, left to
  right, so the order is the order a reader expects);
- several patterns in one string separated by ``::`` (webdataset's convention), or a list of them;
- ``shards/pmc-*.tar``: after brace expansion, a local path holding ``*``, ``?`` or ``[`` is a glob, sorted;
  a glob that matches nothing is an error.

Braces that do not form a valid group (unbalanced, ``{x}`` with neither ``,`` nor ``..``) are an error,
not a literal, so that a typo never silently names a single non-existent shard.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

import numpy as np

from bmclip.errors import ConfigError, DataError
from bmclip.io.fs import is_remote, local_path

__all__ = ["check_local_shards", "expand_urls", "braceexpand", "split_shards", "shard_order", "shard_names_digest",
           "urls_digest"]

_NUM_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
_ALPHA_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?$")


def _find_group(pattern: str, start: int) -> tuple[int, int] | None:
    """Index of the first top-level '{' at/after start and of its matching '}', or None."""
    open_at = pattern.find("{", start)
    if open_at < 0:
        if "}" in pattern[start:]:
            raise ConfigError(f"unbalanced '}}' in shard pattern {pattern!r}")
        return None
    if "}" in pattern[start:open_at]:
        raise ConfigError(f"unbalanced '}}' in shard pattern {pattern!r}")
    depth = 0
    for i in range(open_at, len(pattern)):
        c = pattern[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return open_at, i
    raise ConfigError(f"unbalanced '{{' in shard pattern {pattern!r}")


def _split_top_level_commas(body: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in body:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def _range_items(body: str, pattern: str) -> list[str] | None:
    m = _NUM_RANGE.match(body)
    if m:
        a_s, b_s, step_s = m.groups()
        a, b = int(a_s), int(b_s)
        step = abs(int(step_s)) if step_s else 1
        if step == 0:
            raise ConfigError(f"zero step in range {{{body}}} of shard pattern {pattern!r}")
        # bash pads to the widest endpoint when either endpoint is written with a leading zero
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (a_s, b_s))
        width = max(len(a_s), len(b_s)) if padded else 0
        seq = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
        _check_count(len(seq), pattern)
        return [(f"{v:0{width}d}" if width else str(v)) for v in seq]
    m = _ALPHA_RANGE.match(body)
    if m:
        a, b, step_s = m.groups()
        step = abs(int(step_s)) if step_s else 1
        if step == 0:
            raise ConfigError(f"zero step in range {{{body}}} of shard pattern {pattern!r}")
        lo, hi = ord(a), ord(b)
        seq = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
        return [chr(v) for v in seq]
    return None


# More shard URLs than any data set has (LAION-5B is ~500k shards of 10k samples): a pattern naming more is a typo
# ({0..999999999}), refused before its list (tens of GB) is built.
MAX_SHARD_URLS = 10_000_000


def _check_count(n: int, pattern: str) -> None:
    if n > MAX_SHARD_URLS:
        raise ConfigError(f"shard pattern {pattern!r} names {n:,} shards, more than the {MAX_SHARD_URLS:,} "
                          "bmclip takes (a typo in a brace range?)")


def braceexpand(pattern: str) -> list[str]:
    """Expand one brace pattern (no ``::``) into the list of strings it names, in order."""
    group = _find_group(pattern, 0)
    if group is None:
        return [pattern]
    lo, hi = group
    head, body, tail = pattern[:lo], pattern[lo + 1 : hi], pattern[hi + 1 :]
    items = _range_items(body, pattern)
    if items is None:
        alts = _split_top_level_commas(body)
        if len(alts) < 2:
            raise ConfigError(
                f"brace group {{{body}}} in shard pattern {pattern!r} is neither a range (a..b) "
                "nor a list of alternatives (a,b)"
            )
        items = [x for alt in alts for x in braceexpand(alt)]
    tails = braceexpand(tail)
    _check_count(len(items) * len(tails), pattern)
    return [head + item + t for item in items for t in tails]


def _is_url(s: str) -> bool:
    return "://" in s or s.startswith("pipe:")


def _glob(path: str) -> list[str]:
    if _is_url(path) or not any(ch in path for ch in "*?["):
        return [path]
    hits = sorted(glob.glob(path))
    if not hits:
        raise ConfigError(f"no shards match {path!r}")
    return hits


def expand_urls(urls: str | Sequence[str] | Iterable[str]) -> list[str]:
    """Shard paths from a brace pattern, a ``::``-joined string of patterns, or a list of either."""
    if isinstance(urls, (str, bytes)) or hasattr(urls, "__fspath__"):
        urls = [urls]
    out: list[str] = []
    for u in urls:
        if hasattr(u, "__fspath__"):
            u = str(u)
        if isinstance(u, bytes):
            u = os.fsdecode(u)
        if not isinstance(u, str):
            raise ConfigError(f"shard url must be a str or path, got {type(u).__name__}")
        for part in u.split("::"):
            if part:
                out.extend(x for b in braceexpand(part) for x in _glob(b))
                _check_count(len(out), part)
    if not out:
        raise ConfigError("no shards: the url list / pattern expands to nothing")
    return out


def urls_digest(urls: Sequence[str]) -> str:
    """SHA-1 of the exact shard URLs in order: what a loader state was saved for."""
    return hashlib.sha1("\n".join(urls).encode()).hexdigest()


def _shard_name(url: str) -> str:
    """The file name of a shard URL or path (``s3://b/p/train-000001.tar?x=1`` -> ``train-000001.tar``); a
    ``pipe:`` command has no location apart from its name, so it is its own name."""
    if url.startswith("pipe:"):
        return url
    path = urlsplit(url).path if "://" in url else url
    return path.rstrip("/").rsplit("/", 1)[-1]


def shard_names_digest(urls: Sequence[str]) -> str:
    """SHA-1 of the shards' file names in order, not where they are: the same shards copied to another place
    (node-local scratch, another mount, an object store) have the same digest."""
    return hashlib.sha1("\n".join(_shard_name(u) for u in urls).encode()).hexdigest()


def shards_moved(urls_sha1: str, names_sha1: str, urls: Sequence[str]) -> bool:
    """A loader state saved for ``urls_sha1`` / ``names_sha1`` (its ``urls_digest`` and ``shard_names_digest``)
    names the shards ``urls`` name, moved: other URLs, the same file names in the same order (an empty
    ``names_sha1``, from a state saved before names were recorded, never matches). ``ShardLoader`` resumes such a
    state; the trainer accepts a changed ``data.train`` for it."""
    return bool(names_sha1) and urls_sha1 != urls_digest(urls) and names_sha1 == shard_names_digest(urls)


def shard_order(n_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard indices in the order of one epoch: a permutation seeded by (seed, epoch) when shuffling."""
    if not shuffle:
        return list(range(n_shards))
    rng = np.random.Generator(np.random.PCG64([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0x5A4D]))
    return [int(i) for i in rng.permutation(n_shards)]


def split_shards(order: Sequence[int], split: int, n_splits: int) -> tuple[list[int], int, int]:
    """This split's shards and sample-level modulo (shards, sample_mod, sample_rem) for one epoch.

    With at least as many shards as splits (ranks x workers), split s gets ``order[s::n_splits]``
    and every sample of those shards (sample_mod=1). With fewer shards than splits, every split reads
    every shard but keeps only the samples whose index within the shard is ``= s (mod n_splits)``, so
    the splits still partition the samples exactly (each shard's index space is split, not the list).
    """
    if not 0 <= split < n_splits:
        raise ConfigError(f"split {split} out of range for {n_splits} splits (rank/worker numbering)")
    if len(order) >= n_splits:
        return list(order[split::n_splits]), 1, 0
    return list(order), n_splits, split


def check_local_shards(urls: Sequence[str], example_name: str = "train") -> None:
    """DataError naming the local shards of ``urls`` that are folders or do not exist (one stat per shard, no file
    opened; remote shards are fetched when read, not looked up). ``example_name``: the file-name stem of the
    example pattern suggested for a folder."""
    local = [u for u in urls if not is_remote(u)]
    folders = [u for u in local if os.path.isdir(local_path(u))]
    if folders:
        raise DataError(f"shard {folders[0]} is a folder, not a .tar shard (pass the shards inside it, e.g. "
                        f"{folders[0].rstrip('/')}/{example_name}-{{000000..000009}}.tar)")
    missing = [u for u in local if not os.path.isfile(local_path(u))]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} of {len(urls)} shard(s) not found: {', '.join(missing[:3])}{more}")
