"""Corpus-wide duplicate detection: exact (same re-encoded JPEG) and near (dHash candidates, thumbnail decides).

Near duplicates:

1. **candidates**: every kept image whose 64-bit dHash (:func:`~bmclip.data.pmc.media.dhash64`, exact 9x8 area
   means) is within Hamming distance ``threshold`` (default 7). The dHash only has to bring a copy to the
   thumbnail check: on the 48 real figures of the sample data, 622 copies (rescaled 0.35-1.5x, JPEG q50-95,
   PNG, TIFF, WebP, greyscale) and the 48 figures through the other decode route are at most 4 bits from their
   original (5 on the 360 px test fixtures), so the radius leaves 2-3 bits of margin; different figures are 8+
   bits apart.
2. **verified**: the 16x16 box-averaged greyscale thumbnails differ by at most ``max_mad`` grey levels (mean
   absolute difference, 0-255 scale; default 2.0). This decides: those copies stay within 1.93 levels but one
   (a 0.35x copy of a 600x213 figure, 210x75 px: 2.19), and the closest different figures of the sample data,
   two pathway diagrams drawn on one template, are 2.28 apart (2.23 between copies of them).

Candidate search, multi-index hashing (Norouzi et al., 2012): the 64 bits are cut into ``m`` bands; two hashes
within ``r`` bits differ in at most ``r // m`` bits on at least one band (pigeonhole), so probing, in each
band's table, every value within ``r // m`` bits of the query's band finds every kept hash within ``r``: none
is missed. A bucket keeps its images' hashes side by side, so its candidates are compared in one vectorized pass
and cost ~100x less than a probe (a dict lookup): :func:`_layout` picks ``m`` for the least work with ~16M kept
images. ``r`` = 7 -> 4 bands of 16 bits, 1-bit probes: 68 lookups per image, and ~15k candidates when 15M images
are kept (uniform hashes); ``r`` = 3 -> 4 bands, exact (4 lookups); ``r`` = 8 -> 3 bands of 21-22 bits,
2-bit probes (718 lookups, ~5x slower). Measured in one process (random hashes): 0.09 ms per image with 1M
kept, 0.11 ms with 4M, 0.14 ms with 15M (0.16 / 0.54 ms at 4M / 15M when only 30% of the bits are set, which
skews the buckets; the index of staging format 3, radius 3 with 16-bit bands compared one by one in Python,
took 0.25 ms and 1.4 ms at 4M).

Memory per kept image: its thumbnail (256 bytes, in one flat buffer), its hash and id in each band's bucket
(4 x 12 bytes) and its exact-duplicate set entry: ~0.4 KB measured, ~6 GB for 15M images.
"""

from __future__ import annotations

from array import array
from itertools import combinations
from math import comb

import numpy as np

__all__ = ["Deduplicator", "hamming64", "thumb_mad"]

THUMB_BYTES = 256
_PLAN_KEPT = 1 << 24  # the band layout is chosen for about this many kept images

if hasattr(np, "bitwise_count"):  # numpy >= 2.0

    def _popcount(x: np.ndarray) -> np.ndarray:
        return np.bitwise_count(x)

else:  # pragma: no cover - numpy 1.x
    _POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(x: np.ndarray) -> np.ndarray:
        return _POP8[x.view(np.uint8)].reshape(-1, 8).sum(axis=1, dtype=np.int64)


def hamming64(a: int, b: int) -> int:
    """Number of differing bits of two 64-bit ints."""
    return (a ^ b).bit_count()


def thumb_mad(a: bytes, b: bytes) -> float:
    """Mean absolute difference of two equal-size 8-bit thumbnails (float, grey levels)."""
    x = np.frombuffer(a, dtype=np.uint8).astype(np.int16)
    y = np.frombuffer(b, dtype=np.uint8).astype(np.int16)
    return float(np.abs(x - y).mean())


def _widths(m: int) -> list[int]:
    return [64 // m + (1 if i < 64 % m else 0) for i in range(m)]


def _layout(r: int) -> tuple[int, int]:
    """(bands, probe radius per band) for Hamming radius ``r``: the least expected work per lookup with
    ~_PLAN_KEPT kept hashes spread uniformly, a probe (a table lookup) costing as much as ~100 candidates (a
    candidate's hash is copied with its bucket and compared in one vectorized pass)."""
    best = None
    for m in range(1, min(r + 1, 64) + 1):
        p = r // m
        cost = sum(sum(comb(w, k) for k in range(p + 1)) * (1 + _PLAN_KEPT / 2.0**w / 100) for w in _widths(m))
        if best is None or cost < best[0]:
            best = (cost, m, p)
    return best[1], best[2]


def _flip_masks(width: int, p: int) -> list[int]:
    """Every ``width``-bit value with at most ``p`` bits set (0 first)."""
    out = [0]
    for k in range(1, p + 1):
        for bits in combinations(range(width), k):
            v = 0
            for b in bits:
                v |= 1 << b
            out.append(v)
    return out


class Deduplicator:
    """First-seen-wins duplicate filter over (sha, dhash, thumb); ``near_threshold < 0`` disables near.

    An image is a near duplicate when a kept image has a dHash within ``near_threshold`` bits **and** a
    thumbnail within ``max_mad`` grey levels (both, so the thumbnail decides among the candidates).
    """

    def __init__(self, near_threshold: int = 7, max_mad: float = 2.0):
        if near_threshold > 31:
            raise ValueError("near_threshold must be <= 31")
        self.near_threshold = near_threshold
        self.max_mad = max_mad
        self._exact: set[int] = set()
        self._bands: list[tuple[int, int, list[int]]] = []  # (shift, mask, probe xor masks)
        if near_threshold >= 0:
            m, p = _layout(near_threshold)
            start = 0
            for w in _widths(m):
                self._bands.append((start, (1 << w) - 1, _flip_masks(w, p)))
                start += w
        # per band: band value -> (dHashes, ids) of the kept images with that value
        self._index: list[dict[int, tuple[array, array]]] = [{} for _ in self._bands]
        self._kept = 0
        self._thumbs = bytearray()  # the kept images' thumbnails, THUMB_BYTES each, by id

    def __len__(self) -> int:
        """Number of images kept in the near-duplicate index."""
        return self._kept

    def candidates(self, dhash: int) -> list[int]:
        """Ids (insertion order) of the kept images whose dHash is within ``near_threshold`` bits of ``dhash``."""
        hashes, ids = array("Q"), array("I")
        for (shift, mask, flips), table in zip(self._bands, self._index):
            key = (dhash >> shift) & mask
            for bh, bi in filter(None, map(table.get, [key ^ f for f in flips])):
                hashes.extend(bh)  # the bucket's hashes lie together: no random reads per candidate
                ids.extend(bi)
        if not ids:
            return []
        dist = _popcount(np.frombuffer(hashes, dtype=np.uint64) ^ np.uint64(dhash))
        return np.unique(np.frombuffer(ids, dtype=np.uint32)[dist <= self.near_threshold]).tolist()

    def check_and_add(self, sha_hex: str, dhash: int, thumb: bytes) -> str | None:
        """None if the image is new (and remember it), else 'duplicate_exact' / 'duplicate_near'."""
        sha = int(sha_hex[:16], 16)
        if sha in self._exact:
            return "duplicate_exact"
        if self._bands:
            if len(thumb) != THUMB_BYTES:
                raise ValueError(f"thumbnail must have {THUMB_BYTES} bytes, got {len(thumb)}")
            t = self._thumbs
            for i in self.candidates(dhash):
                if thumb_mad(thumb, t[i * THUMB_BYTES : (i + 1) * THUMB_BYTES]) <= self.max_mad:
                    return "duplicate_near"
            n = self._kept
            self._kept += 1
            t += thumb
            for (shift, mask, _), table in zip(self._bands, self._index):
                k = (dhash >> shift) & mask
                bucket = table.get(k)
                if bucket is None:
                    table[k] = (array("Q", (dhash,)), array("I", (n,)))
                else:
                    bucket[0].append(dhash)
                    bucket[1].append(n)
        self._exact.add(sha)
        return None
