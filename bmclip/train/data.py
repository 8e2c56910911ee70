"""Batch sources for the trainer: webdataset shards through ``ShardLoader``, or synthetic pairs in memory.

Both yield ``{"image": uint8 (B,S,S,3), "input_ids": int64 (B,L)}`` for THIS rank and expose
``state_dict()/load_state_dict()`` so a resumed run continues at exactly the next batch.

Synthetic pairs are learnable: sample i has three attributes (top colour, bottom colour, stripe
position; 8 values each, from a seeded RNG); the image draws them (plus per-sample noise) and the caption
is ``[CLS] a b c [SEP]`` with one token per attribute value. Every rank walks the same seeded permutation
of the global batch and keeps only its rows, so an N-rank run sees exactly the global batch a 1-process
run sees (what the DDP-equivalence test needs).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from bmclip.errors import DataError

_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [250, 250, 250]], dtype=np.float32)
N_VALUES = 8
CLS_ID, SEP_ID = 2, 3


def synthetic_attributes(n: int, seed: int) -> np.ndarray:
    """(n, 3) int attributes of the synthetic pairs for ``seed``."""
    return np.random.default_rng([seed, 7]).integers(0, N_VALUES, size=(n, 3))


def synthetic_images(attrs: np.ndarray, indices: np.ndarray, image_size: int, seed: int) -> np.ndarray:
    """uint8 (B,S,S,3) images drawing the attributes of ``indices`` (noise seeded per sample index)."""
    s = image_size
    out = np.empty((len(indices), s, s, 3), dtype=np.uint8)
    stripe_w = max(1, s // N_VALUES)
    for j, i in enumerate(indices):
        a, b, c = attrs[i]
        img = np.empty((s, s, 3), dtype=np.float32)
        img[: s // 2] = _PALETTE[a]
        img[s // 2:] = _PALETTE[b]
        img[:, c * stripe_w:(c + 1) * stripe_w] = 0.0
        noise = np.random.default_rng([seed, 11, int(i)]).normal(0.0, 20.0, size=(s, s, 3))
        out[j] = np.clip(img + noise, 0, 255).astype(np.uint8)
    return out


def synthetic_input_ids(attrs: np.ndarray, indices: np.ndarray, context_length: int) -> torch.Tensor:
    """int64 (B, L) token ids ``[CLS] 10+a 20+b 30+c [SEP] 0...`` for the attributes of ``indices``."""
    ids = torch.zeros(len(indices), context_length, dtype=torch.long)
    a = torch.from_numpy(attrs[indices].astype(np.int64))
    ids[:, 0] = CLS_ID
    ids[:, 1:4] = a + torch.tensor([10, 20, 30])
    ids[:, 4] = SEP_ID
    return ids


class SyntheticSource:
    """Seeded epochs over ``size`` synthetic pairs; yields this rank's share of each global batch."""

    def __init__(self, *, size: int, global_batch: int, image_size: int, context_length: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if size < global_batch:
            raise DataError(f"synthetic_size {size} is smaller than the global batch {global_batch}")
        if global_batch % world_size:
            raise DataError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.size, self.global_batch = size, global_batch
        self.image_size, self.context_length, self.seed = image_size, context_length, seed
        self.rank, self.world_size = rank, world_size
        self.local = global_batch // world_size
        self.attrs = synthetic_attributes(size, seed)
        self.epoch, self.pos = 0, 0

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 13, epoch]).permutation(self.size)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.pos + self.global_batch > self.size:  # drop the last partial batch, start a new epoch
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self._perm(self.epoch)[self.pos:self.pos + self.global_batch]
        self.pos += self.global_batch
        mine = idx[self.rank * self.local:(self.rank + 1) * self.local]
        return {"image": torch.from_numpy(synthetic_images(self.attrs, mine, self.image_size, self.seed)),
                "input_ids": synthetic_input_ids(self.attrs, mine, self.context_length)}

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "epoch": self.epoch, "pos": self.pos, "seed": self.seed, "size": self.size}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != "synthetic" or sd.get("seed") != self.seed or sd.get("size") != self.size:
            raise DataError(f"loader state does not match this synthetic source: {sd}")
        self.epoch, self.pos = int(sd["epoch"]), int(sd["pos"])


def synthetic_eval_set(n: int, image_size: int, context_length: int, seed: int) -> dict:
    """A fixed held-out synthetic set: {"image": uint8 (n,S,S,3), "input_ids": (n,L)}."""
    attrs = synthetic_attributes(n, seed)
    idx = np.arange(n)
    return {"image": torch.from_numpy(synthetic_images(attrs, idx, image_size, seed)),
            "input_ids": synthetic_input_ids(attrs, idx, context_length)}


class ShardSource:
    """Endless iteration over ``ShardLoader`` epochs (or resampled shards) for this rank."""

    def __init__(self, loader):
        self.loader = loader
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                # End of an epoch: the loader's state already points at the next epoch's start.
                self._it = None
                continue
            if "input_ids" not in batch:
                raise DataError("the shard loader was built without a tokenizer (no input_ids)")
            return batch
        raise DataError("the training shards yielded no batch in a whole epoch (all samples skipped?)")

    def state_dict(self) -> dict:
        return {"kind": "shards", "loader": self.loader.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != "shards":
            raise DataError(f"loader state was saved from a different data source ({sd.get('kind')})")
        self._it = None
        self.loader.load_state_dict(sd["loader"])


def normalize_images(images_u8: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B,H,W,3) -> normalised float (B,3,H,W) on ``device`` (uint8 is moved first: 4x less traffic)."""
    x = images_u8.to(device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32)
    mean, std = _mean_std(str(device))
    return ((x - mean) / std).to(dtype).contiguous()


@functools.lru_cache(maxsize=8)
def _mean_std(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device: building them every step would be a synchronous host->device copy per batch.
    from bmclip.model import IMAGE_MEAN, IMAGE_STD

    mean = torch.tensor(IMAGE_MEAN, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGE_STD, device=device).view(1, 3, 1, 1) * 255.0
    return mean, std
