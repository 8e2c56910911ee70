"""``ShardLoader``'s keyword options as one checked dataclass (shared by the façade and the producer)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from bmclip.data import remote
from bmclip.errors import ConfigError, check_int, is_int

__all__ = ["AUGMENTS", "LoaderOptions"]

AUGMENTS = ("random_resized_crop", "center")


# Output side length bound: far beyond any ViT input, small enough that one image's pixels are not the problem.
MAX_IMAGE_SIZE = 8192
# Batches decoded ahead (the queue between producer and consumer): a few hide decode jitter; beyond this
# they only hold memory (the ring holds prefetch + RING_EXTRA batches).
MAX_PREFETCH = 64
# Ring buffers besides the queued ones: the consumer's current batch, the one whose device copy may still
# run, and the one the producer fills (see bmclip.data.producer.make_ring).
RING_EXTRA = 3
# bmclip._C.Decoder's own limit on its thread pool (csrc/bindings.cpp).
MAX_THREADS = 256


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: no bound


def _pair(v: Any, name: str) -> tuple[float, float]:
    """(lo, hi) as two floats; ConfigError naming ``name`` for anything else (a single number, None, strings)."""
    try:
        lo, hi = v
        return float(lo), float(hi)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair of numbers (lo, hi), got {v!r}") from None


@dataclass
class LoaderOptions:
    """``ShardLoader``'s keyword options, checked (ConfigError) and normalised on construction.

    ``num_threads=None`` becomes the cores this process may use (at most ``MAX_THREADS``, the decoder's
    limit); ``shuffle=False`` turns the sample shuffle buffer off (the stream order is then the shard
    order). ``prefetch`` is at most ``MAX_PREFETCH``, and the ring of ``prefetch + RING_EXTRA`` decoded
    batches an iteration allocates must fit in physical memory.
    """

    batch_size: int
    image_size: int
    num_threads: int | None = None
    augment: str = "random_resized_crop"
    shuffle: bool = True
    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    resampled: bool = False
    shuffle_buffer: int = 1000
    drop_last: bool = False
    num_workers: int | None = None
    worker_id: int | None = None
    prefetch: int = 2
    pin_memory: bool = False
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    decode: bool = True
    # extra keyword arguments of bmclip._C.Decoder.decode_batch (e.g. interpolation, dct_min_ratio: the
    # speed/fidelity trade-off of DCT-domain downscaling); checked by the extension on first use
    decode_options: dict[str, Any] = field(default_factory=dict)
    # remote shards (bmclip.data.remote): the download cache's folder, byte limit and look-ahead, the
    # fsspec storage options (endpoint, credentials) and the retry/timeout policy
    cache_dir: str | os.PathLike | None = None
    cache_bytes: int = remote.DEFAULT_CACHE_BYTES
    prefetch_shards: int = remote.DEFAULT_PREFETCH_SHARDS
    storage_options: dict[str, Any] = field(default_factory=dict)
    fetch_options: remote.FetchOptions | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.batch_size = check_int(self.batch_size, "batch_size", 1)
        self.image_size = check_int(self.image_size, "image_size", 1, MAX_IMAGE_SIZE)
        self.world_size = check_int(self.world_size, "world_size", 1)
        self.prefetch = check_int(self.prefetch, "prefetch", 1, MAX_PREFETCH)
        self.decode = bool(self.decode)
        self._check_memory()
        if not is_int(self.rank) or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank must be in [0, world_size={self.world_size}), got {self.rank!r}")
        if not is_int(self.seed):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        self.epoch = check_int(self.epoch, "epoch", 0)
        if self.augment not in AUGMENTS:
            raise ConfigError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        if self.num_threads is None:  # the cores this process may use, within the decoder's limit
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            self.num_threads = min(cores or 1, MAX_THREADS)
        self.num_threads = check_int(self.num_threads, "num_threads", 1, MAX_THREADS)
        self.shuffle_buffer = check_int(self.shuffle_buffer, "shuffle_buffer", 0)
        if (self.num_workers is None) != (self.worker_id is None):
            raise ConfigError("num_workers and worker_id are given together (or neither)")
        if self.num_workers is not None:
            self.num_workers = check_int(self.num_workers, "num_workers", 1)
            if not is_int(self.worker_id) or not 0 <= self.worker_id < self.num_workers:
                raise ConfigError(f"worker_id must be in [0, num_workers={self.num_workers}), got {self.worker_id!r}")
            self.worker_id = int(self.worker_id)
        if self.pin_memory and not torch.cuda.is_available():
            raise ConfigError("pin_memory=True needs CUDA (torch.cuda.is_available() is False)")
        self.scale, self.ratio = _pair(self.scale, "scale"), _pair(self.ratio, "ratio")
        if not (0 < self.scale[0] <= self.scale[1] <= 1.0):
            raise ConfigError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale!r}")
        if not (0 < self.ratio[0] <= self.ratio[1] < math.inf):
            raise ConfigError(f"ratio must satisfy 0 < lo <= hi < inf, got {self.ratio!r}")
        self.decode_options = dict(self.decode_options or {})
        clash = {"augment", "seed", "scale", "ratio"} & set(self.decode_options)
        if clash:
            raise ConfigError(f"decode_options may not set {sorted(clash)}: they are ShardLoader arguments")
        self.seed, self.rank = int(self.seed), int(self.rank)
        for name in ("shuffle", "resampled", "drop_last", "pin_memory", "decode"):
            setattr(self, name, bool(getattr(self, name)))
        # shuffle=False means stream order: the buffer would reorder samples, so it is off
        self.shuffle_buffer = self.shuffle_buffer if self.shuffle else 0
        remote.ShardCache.check_args(self.cache_bytes, self.prefetch_shards)
        self.storage_options = dict(self.storage_options or {})
        self.fetch_options = remote.FetchOptions.coerce(self.fetch_options)

    @property
    def batch_bytes(self) -> int:
        """Bytes of one batch's decoded pixels (uint8 ``[N, S, S, 3]``)."""
        return self.batch_size * self.image_size ** 2 * 3

    @property
    def ring_slots(self) -> int:
        """Batch buffers one iteration holds: ``prefetch + RING_EXTRA`` (none with ``decode=False``)."""
        return self.prefetch + RING_EXTRA if self.decode else 0

    def _check_memory(self) -> None:
        """ConfigError when one batch, or the ring of batches an iteration allocates, exceeds physical memory."""
        mem = _physical_memory()
        what = f"batch_size={self.batch_size} at image_size={self.image_size}"
        if self.batch_bytes > mem:
            raise ConfigError(f"{what} is {self.batch_bytes / 2**30:.0f} GiB of pixels per batch, more than this "
                              f"machine's memory ({mem / 2**30:.0f} GiB)")
        ring = self.ring_slots * self.batch_bytes
        if ring > mem:
            raise ConfigError(f"{what} with prefetch={self.prefetch} needs a ring of {self.ring_slots} batch buffers "
                              f"(prefetch + {RING_EXTRA}) = {ring / 2**30:.1f} GiB of pixels, more than this "
                              f"machine's memory ({mem / 2**30:.1f} GiB); use a smaller batch_size, image_size "
                              "or prefetch")
