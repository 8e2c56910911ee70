"""Batch sources for the trainer: webdataset shards through ``ShardLoader``, or synthetic pairs in memory.

``SyntheticSource`` and ``ShardSource`` yield ``{"image": uint8 (B,S,S,3), "input_ids": int64 (B,L)}`` for
THIS rank; ``DaliShardSource`` (``data.augment_backend=dali``) yields ``{"images": float32 (B,3,S,S)
normalised, on the DALI device, "input_ids"}``. All expose ``state_dict()/load_state_dict()`` so a resumed
run continues at exactly the next batch.

Synthetic pairs are learnable: sample i has three attributes (top colour, bottom colour, stripe
position; 8 values each, from a seeded RNG); the image draws them (plus per-sample noise) and the caption
is ``[CLS] a b c [SEP]`` with one token per attribute value. Every rank walks the same seeded permutation
of the global batch and keeps only its rows, so an N-rank run sees exactly the global batch a 1-process
run sees (what the DDP-equivalence test needs).

The uint8 batches become the model's input through :func:`bmclip.data.normalize.normalize_images`.
"""

from __future__ import annotations

import queue
import sys
import threading
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import torch

from bmclip.data.cursor import SHARD_REASONS, EmptySplitEpoch
from bmclip.data.dali import random_resized_crop_windows
from bmclip.errors import DataError

__all__ = ["DaliShardSource", "MAX_EMPTY_EPOCHS", "ShardSource", "SyntheticSource", "synthetic_eval_batches",
           "synthetic_eval_set"]

# Epochs in a row that may hold no batch for this rank before the training source gives up (ShardSource)
MAX_EMPTY_EPOCHS = 8

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


def _zero_stats() -> dict:
    return {"samples_read": 0, "samples_skipped": 0, "skipped_by_reason": {}, "tar_errors": 0,
            "example_error": None}


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
        epoch, pos = self.epoch, self.pos
        if pos + self.global_batch > self.size:  # drop the last partial batch, start a new epoch
            epoch, pos = epoch + 1, 0
        idx = self._perm(epoch)[pos:pos + self.global_batch]
        mine = idx[self.rank * self.local:(self.rank + 1) * self.local]
        batch = {"image": torch.from_numpy(synthetic_images(self.attrs, mine, self.image_size, self.seed)),
                 "input_ids": synthetic_input_ids(self.attrs, mine, self.context_length)}
        # the position moves only once the batch exists: a stop signal raised while it is built (the trainer
        # interrupts the wait for data) leaves the state at this batch, so a resume does not skip it
        self.epoch, self.pos = epoch, pos + self.global_batch
        return batch

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "epoch": self.epoch, "pos": self.pos, "seed": self.seed, "size": self.size}

    def data_stats(self) -> dict:
        """Same keys as ShardSource.data_stats(); synthetic pairs are never skipped (all zeros)."""
        return _zero_stats()

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != "synthetic" or sd.get("seed") != self.seed or sd.get("size") != self.size:
            raise DataError(f"loader state does not match this synthetic source: {sd}")
        self.epoch, self.pos = int(sd["epoch"]), int(sd["pos"])


def synthetic_eval_set(n: int, image_size: int, context_length: int, seed: int) -> dict:
    """A fixed held-out synthetic set: {"image": uint8 (n,S,S,3), "input_ids": (n,L)}."""
    image, ids = _synthetic_pairs(synthetic_attributes(n, seed), np.arange(n), image_size, context_length, seed)
    return {"image": image, "input_ids": ids}


def synthetic_eval_batches(n: int, batch_size: int, image_size: int, context_length: int,
                           seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The pairs of ``synthetic_eval_set(n, ...)`` as (image, input_ids) batches of ``batch_size``, each generated
    when it is asked for (n images are never held at once)."""
    attrs = synthetic_attributes(n, seed)
    for i in range(0, n, batch_size):
        yield _synthetic_pairs(attrs, np.arange(i, min(i + batch_size, n)), image_size, context_length, seed)


def _synthetic_pairs(attrs, idx: np.ndarray, image_size: int, context_length: int,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(synthetic_images(attrs, idx, image_size, seed)), synthetic_input_ids(attrs, idx,
                                                                                                 context_length)


class ShardSource:
    """Endless iteration over ``ShardLoader`` epochs (or resampled shards) for this rank."""

    def __init__(self, loader):
        self.loader = loader
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        # The loader itself raises DataError naming the cause when a whole pass gives no valid sample
        # (empty tar, bad tar header, every image undecodable); an epoch that ends without a batch
        # although it had valid samples means the batch is larger than the data. With several ranks, shards
        # shuffled per epoch give a rank other shards each epoch, so one rank's epoch may hold no batch (its
        # shards that epoch are empty, damaged or small) while later ones do: up to MAX_EMPTY_EPOCHS such
        # epochs in a row move on to the next one, each said on stderr; without reshuffling one is final.
        limit = MAX_EMPTY_EPOCHS if self._reassigned() else 2
        for tries in range(1, limit + 1):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                # End of an epoch: the loader's state already points at the next epoch's start.
                self._it = None
                continue
            except EmptySplitEpoch as e:  # the loader's position moved to the next epoch
                self._it = None
                if not e.reassigned or tries == limit:
                    raise DataError(f"{e}{self._rank_advice(tries)}") from None
                print(f"[bmclip] rank {self.loader.rank}: {e}; going on with the next epoch", file=sys.stderr,
                      flush=True)
                continue
            if "input_ids" not in batch:
                raise DataError("the shard loader was built without a tokenizer (no input_ids)")
            return batch
        raise DataError(self._no_batch_message())

    def _reassigned(self) -> bool:
        """Whether the next epoch may give this rank other shards (several splits, shuffled whole shards)."""
        ld = self.loader
        n_splits = ld._split()[1]
        return bool(ld.shuffle) and not ld.resampled and n_splits > 1 and len(ld.urls) >= n_splits

    def _rank_advice(self, epochs: int) -> str:
        ld = self.loader
        if int(getattr(ld, "world_size", 1)) == 1:
            return ""
        row = f" ({epochs} epochs in a row)" if epochs > 1 else ""
        return (f"; rank {ld.rank} of {ld.world_size} got no valid sample from its shards{row}: each rank needs "
                "shards with valid samples of its own every epoch (drop the empty or damaged shards, use shards of "
                "equal size, or --data.resampled=true)")

    def _no_batch_message(self) -> str:
        ld = self.loader
        last = getattr(ld, "last_pass", None) or {}
        good = int(last.get("good", 0))
        world = int(getattr(ld, "world_size", 1))
        per = "" if world == 1 else f" on rank {ld.rank} (of {world})"
        if good > 0:
            rank_part = f" ({ld.batch_size} per rank)" if world > 1 else ""
            return (f"the training data has only {good} valid sample{'s' if good != 1 else ''} per epoch{per}, "
                    f"fewer than the batch size {ld.batch_size * world}{rank_part}; use a smaller "
                    f"--data.batch_size (at most {good * world}) or more data")
        st = ld.stats
        return (f"the training data yielded no batch in a whole epoch{per}: {len(ld.urls)} shard(s), "
                f"{st['samples_skipped']} samples skipped ({st['skipped']}); with several ranks or workers, "
                "each needs shards of its own (or use --data.resampled=true)")

    def data_stats(self) -> dict:
        """Data counters for the trainer's logs, up to the last batch handed out.

        ``samples_read``: samples taken from the shards (valid + skipped); ``samples_skipped``: those
        skipped (so the skip rate is ``samples_skipped / samples_read``); ``skipped_by_reason``:
        {reason: n} over sample reasons (see ``ShardLoader.stats``); ``tar_errors``: shard reads that
        hit tar damage or could not open; ``example_error``: the first skip as "key: reason" (None if
        none). Also ``lost_tail_bytes`` (bytes of damaged shards after the damage point), and for remote
        shards ``fetch_wait_s`` (seconds the loader waited for shard downloads), ``bytes_fetched`` and
        ``shards_fetch_failed`` (downloads that failed within their attempts; zeros for local shards).
        """
        st = self.loader.stats
        by_reason = {k: int(v) for k, v in st["skipped"].items() if k not in SHARD_REASONS}
        skipped = sum(by_reason.values())
        return {"samples_read": int(st["samples"]) + int(st["dropped_last"]) + skipped, "samples_skipped": skipped,
                "skipped_by_reason": by_reason, "tar_errors": int(st["tar_damaged_shards"]),
                "example_error": st["example_error"], "lost_tail_bytes": int(st["lost_tail_bytes"]),
                "fetch_wait_s": float(st.get("fetch_wait_s", 0.0)), "bytes_fetched": int(st.get("bytes_fetched", 0)),
                "shards_fetch_failed": int(st["skipped"].get("shard_fetch_failed", 0))}

    def close(self) -> None:
        """Stop the loader's background producer (a later ``next`` starts it again where it was)."""
        self._it = None
        self.loader._stop_active()

    def state_dict(self) -> dict:
        return {"kind": "shards", "loader": self.loader.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != "shards":
            raise DataError(f"loader state was saved from a different data source ({sd.get('kind')})")
        self._it = None
        self.loader.load_state_dict(sd["loader"])


class DaliShardSource(ShardSource):
    """``ShardLoader(decode=False)`` raw bytes -> DALI decode + augment -> normalised float batches.

    Reproducible pixels: DALI's own generator is not used. Each batch's crop windows are drawn on the host
    (:func:`bmclip.data.dali.random_resized_crop_windows`, from the images' header sizes) by a generator
    seeded with ``(seed, rank, n)``, ``n`` = loader batches this source has drawn, and ``n`` is part of
    ``state_dict``; so a resumed run gets bitwise the same sample order AND the same crop windows. (The
    decoded pixels are then DALI's: the same on one machine; nvJPEG on the GPU and libjpeg on the CPU
    differ by IDCT rounding, and neither equals the C++ loader's pixels.)

    Bad images: the loader already skips what fails its header check. An image that passes it but
    fails to decode makes DALI raise for the whole batch; that batch is skipped (counted in
    ``bad_batches`` / ``bad_samples``, last reason in ``last_error``), the pipeline is rebuilt (DALI
    invalidates a pipeline after an operator error) and the next batch is drawn, so every step still gets
    a full batch. ``max_bad_in_row`` failed batches in a row raise DataError (the shards are broken).

    ``prefetch=k > 0`` runs the DALI step for the next ``k`` batches in a background thread while the
    caller trains on the current one (DALI releases the GIL while it decodes). The batches, the counters
    and ``state_dict`` are exactly those of ``prefetch=0``: each prefetched batch carries the state after
    it, which becomes the source's state only when the batch is handed out. Call :meth:`close` when done.
    """

    def __init__(self, loader, make_augment: Callable[[], object], *, seed: int, rank: int = 0,
                 augment: str = "random_resized_crop", scale: tuple[float, float] = (0.9, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), max_bad_in_row: int = 20, prefetch: int = 0,
                 aug=None):
        if loader.decode:
            raise DataError("DaliShardSource needs a ShardLoader built with decode=False (raw image bytes)")
        if prefetch < 0:
            raise DataError(f"prefetch must be >= 0, got {prefetch}")
        super().__init__(loader)
        self._make_augment = make_augment
        self.aug = aug if aug is not None else make_augment()  # ``aug``: one the caller built already
        self.seed, self.rank, self.augment = int(seed), int(rank), augment
        self.scale, self.ratio = scale, ratio
        self.max_bad_in_row = int(max_bad_in_row)
        self.prefetch = int(prefetch)
        # producer-side counters (ahead of the consumer when prefetching)
        self._p = {"drawn": 0, "bad_batches": 0, "bad_samples": 0, "last_error": ""}
        # consumer-side view: the counters after the last batch handed out
        self.drawn = 0  # loader batches drawn (including skipped ones): the crop generator's counter
        self.bad_batches = 0
        self.bad_samples = 0
        self.last_error = ""
        self._handed_loader_state: dict | None = None  # None: the loader's live state is the handed-out one
        self._thread = None
        self._queue = None
        self._stop = None

    def _windows(self, images: list, n: int) -> np.ndarray | None:
        if self.augment != "random_resized_crop":
            return None
        # the compiled extension, imported on use so that this module imports without it; a header-only
        # probe (the loader ran it already, so it parses)
        from bmclip._C import image_info

        sizes = [image_info(b)[:2] for b in images]
        rng = np.random.default_rng([self.seed, 29, self.rank, n])
        return random_resized_crop_windows(sizes, rng, self.scale, self.ratio)

    def _produce(self, snapshot: bool) -> tuple[dict, dict]:
        """Next good batch and the producer state after it (loader state included when ``snapshot``)."""
        p = self._p
        for _ in range(self.max_bad_in_row):
            batch = ShardSource.__next__(self)
            n = p["drawn"]
            p["drawn"] += 1
            images = batch["image_bytes"]
            try:
                out = self.aug(images, windows=self._windows(images, n))
            except RuntimeError as e:  # DALI reports an undecodable image as RuntimeError for the batch
                p["bad_batches"] += 1
                p["bad_samples"] += len(images)
                p["last_error"] = _dali_reason(e)
                # DALI: "Current pipeline object is no longer valid" after an operator error -> rebuild
                self.aug = None
                self.aug = self._make_augment()
                continue
            snap = dict(p)
            if snapshot:
                snap["loader"] = self.loader.state_dict()
            return {"images": out, "input_ids": batch["input_ids"]}, snap
        raise DataError(f"{self.max_bad_in_row} batches in a row failed to decode in DALI (last error: "
                        f"{p['last_error']}); validate the shards (bmclip build-dataset checks every image)")

    @staticmethod
    def _run_producer(ref, q, stop) -> None:
        # Holds the source only through a weak reference between batches, so a source dropped without
        # close() is collected and its __del__ stops this thread.
        while not stop.is_set():
            src = ref()
            if src is None:
                return
            try:
                item = src._produce(snapshot=True)
            except BaseException as e:  # handed to the consumer, which raises it
                item = e
            del src
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __next__(self) -> dict:
        if self.prefetch == 0:
            batch, snap = self._produce(snapshot=False)
        else:
            if self._thread is None:
                self._queue, self._stop = queue.Queue(maxsize=self.prefetch), threading.Event()
                self._thread = threading.Thread(target=DaliShardSource._run_producer,
                                                args=(weakref.ref(self), self._queue, self._stop),
                                                name="bmclip-dali", daemon=True)
                self._thread.start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._thread.join()
                self._thread = None
                raise item
            batch, snap = item
            self._handed_loader_state = snap["loader"]
        self.drawn, self.bad_batches = snap["drawn"], snap["bad_batches"]
        self.bad_samples, self.last_error = snap["bad_samples"], snap["last_error"]
        return batch

    def close(self) -> None:
        """Stop the prefetch thread (batches it prepared ahead are dropped; the state stays the handed-out one)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = self._queue = self._stop = None
        # the loader ran ahead: put it back where the consumer is, so a later __next__ continues from there
        if self._handed_loader_state is not None:
            ShardSource.load_state_dict(self, {"kind": "shards", "loader": self._handed_loader_state})
        self._p = {"drawn": self.drawn, "bad_batches": self.bad_batches, "bad_samples": self.bad_samples,
                   "last_error": self.last_error}

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def data_stats(self) -> dict:
        """``ShardSource.data_stats`` plus the batches and samples DALI failed to decode (``bad_batches``,
        ``bad_samples``, and ``skipped_by_reason["dali_decode_error"]``; the loader's counters run up to
        ``prefetch`` batches ahead while prefetching)."""
        d = ShardSource.data_stats(self)
        d["bad_batches"], d["bad_samples"] = int(self.bad_batches), int(self.bad_samples)
        if self.bad_samples:
            d["skipped_by_reason"]["dali_decode_error"] = int(self.bad_samples)
            d["samples_skipped"] += int(self.bad_samples)
            if d["example_error"] is None:
                d["example_error"] = self.last_error or None
        return d

    def state_dict(self) -> dict:
        # while prefetching, the loader is ahead of the consumer: the state is the one after the last
        # batch handed out (a running thread implies one was: __next__ starts it and waits for a batch)
        loader = self._handed_loader_state if self._thread is not None else self.loader.state_dict()
        return {"kind": "shards", "loader": loader,
                "augment": {"backend": "dali", "drawn": self.drawn, "bad_batches": self.bad_batches,
                            "bad_samples": self.bad_samples}}

    def load_state_dict(self, sd: dict) -> None:
        self.close()
        super().load_state_dict(sd)
        # a checkpoint of the torch path resumes here with exact sample order (crop counter from 0)
        aug = sd.get("augment") or {}
        self.drawn = int(aug.get("drawn", 0))
        self.bad_batches = int(aug.get("bad_batches", 0))
        self.bad_samples = int(aug.get("bad_samples", 0))
        self.last_error = ""
        self._handed_loader_state = None
        self._p = {"drawn": self.drawn, "bad_batches": self.bad_batches, "bad_samples": self.bad_samples,
                   "last_error": ""}


def _dali_reason(e: Exception) -> str:
    """The informative line of a DALI error (what follows "encountered:"), else its first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if "encountered:" in lines:
        rest = lines[lines.index("encountered:") + 1:]
        if rest:
            return rest[0][:300]
    return lines[0][:300] if lines else type(e).__name__

