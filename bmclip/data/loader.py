"""``ShardLoader``: webdataset tar shards -> batches of uint8 images + captions, decoded by ``bmclip._C``.

Pipeline (one background producer thread per iteration, so batch n+1 is assembled and decoded while
the consumer trains on batch n; the C++ decoder releases the GIL for the whole batch):

1. **Shard order.** Each epoch the shard list is permuted by a generator seeded with (seed, epoch)
   (identity when ``shuffle=False``) and split between the ``world_size * num_workers`` *splits*
   (split = ``rank * num_workers + worker``; workers are DataLoader worker processes, detected with
   ``torch.utils.data.get_worker_info`` or given explicitly): split s reads ``order[s::n_splits]``.
   With fewer shards than splits, every split reads every shard and keeps the samples whose index in
   the shard is ``= s (mod n_splits)``. Either way each sample is read by exactly one split per epoch.
   Splits may get different sample counts (whole shards are dealt out); for DDP use equal-sized
   shards or ``resampled=True``.
2. **Resampled.** ``resampled=True`` draws shards with replacement forever (webdataset semantics),
   from a generator seeded by (seed, epoch, split); there is no epoch end and no ``len()``.
3. **Sample shuffle buffer.** A buffer of ``shuffle_buffer`` samples held as (shard, index)
   references into the memory-mapped shards (the raw bytes are read zero-copy only when the sample
   leaves the buffer); each output sample is a seeded random pick from the full buffer.
4. **Sample filtering.** Image member: the first of ``jpg``, ``jpeg``, ``png``; caption: ``txt``
   (UTF-8); ``json`` parsed when present. Missing/undecodable members are counted skips (``skipped``),
   and the batch is refilled from the stream so batches stay full. A whole pass that yields no valid
   sample (an epoch; with ``resampled``, every sample of every shard failed since the last valid one)
   raises ``DataError`` naming the cause (empty tar, bad tar header, undecodable images with an
   example reason, ...) instead of looping. Closing the iterator (or interpreter exit) stops the
   producer between samples.
5. **Decode.** ``bmclip._C.Decoder.decode_batch`` writes random-resized-crop (train) or
   resize+centre-crop (eval) pixels into a preallocated ``[N, S, S, 3]`` uint8 ring buffer (a torch
   tensor, pinned with ``pin_memory=True``, written through its numpy view) that becomes
   ``batch["image"]`` without a copy. The ring holds ``prefetch + 3`` batches, so batch k's buffer is
   reused only once the consumer takes batch k+2: an asynchronous host-to-device copy of batch k has
   the whole of step k+1 to finish. ``.clone()`` the images if you keep them longer.
   ``decode=False`` skips decoding and hands out ``batch["image_bytes"]`` (zero-copy uint8 views of
   the encoded images, header-checked) for a DALI pipeline (``bmclip.data.dali``) to decode.
6. **Text.** With ``tokenizer`` (a callable ``list[str] -> LongTensor [N, L]``), captions are
   tokenised in a second background thread while the images decode; ``batch["input_ids"]`` is ready
   when the batch is handed out, so the consumer never waits on tokenisation.

Remote shards (``s3://``, ``gs://``, ``http(s)://``, ``file://``, ``pipe:CMD``; ``bmclip.data.remote``):
each split downloads the next ``prefetch_shards`` shards of its order into a bounded local cache
(``cache_dir``, ``cache_bytes``) while the current one is decoded, and opens the local copy like a local
shard; a shard whose download fails within its retries is a counted ``shard_fetch_failed`` skip.

Resume: ``state_dict()`` describes the position *after the last batch handed to the consumer* (not
the prefetched ones): epoch, shard cursor, position in the shard, the shuffle buffer as (shard,
index) references and the generator states. ``load_state_dict`` on a new loader with the same urls,
seed, rank and world size continues with exactly the next sample. After an epoch is exhausted the
loader (and its state) moves on to the start of the next epoch; ``set_epoch`` overrides. With
DataLoader worker processes the state lives in the workers' copies and cannot be saved exactly: use
the loader directly (it is already multi-threaded) when exact resume is needed; and since the
workers' copies advance their epoch, not the main process's, call ``set_epoch(e)`` before each epoch.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from bmclip.data import remote
from bmclip.data.shards import expand_urls, shard_order, split_shards
from bmclip.data.text import BackgroundTokenizer
from bmclip.errors import ConfigError, DataError

__all__ = ["ShardLoader", "IMAGE_EXTS", "TEXT_EXTS"]

IMAGE_EXTS = ("jpg", "jpeg", "png")
TEXT_EXTS = ("txt",)
AUGMENTS = ("random_resized_crop", "center")
_STATE_VERSION = 1
_MASK64 = (1 << 64) - 1
# distinct reason strings kept verbatim in stats["skip_details"] (bounded so a bad shard can't grow it)
_MAX_DETAILS = 200


def _import_c():
    """The compiled extension (ImportError with build instructions when it is missing)."""
    from bmclip._ext import load_ext

    return load_ext()


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 chain): decorrelates (seed, epoch, split, batch)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def _rng(*values: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(_mix(*values)))


def _new_counters() -> dict[str, Any]:
    return {
        "samples": 0,
        "batches": 0,
        "shards_opened": 0,
        "skipped": {},
        "skip_details": {},
        "tar_errors": [],
        "bad_json": 0,
        "dropped_last": 0,
        "tar_damaged_shards": 0,
        "lost_tail_bytes": 0,
        "example_error": None,
    }


# Skip reasons that count shards, not samples (kept in ``skipped`` for history; not in samples_skipped)
_SHARD_REASONS = ("truncated_tar", "unreadable_shard", "shard_fetch_failed")


def _new_pass() -> dict[str, Any]:
    """Tallies of the current pass over the data (reset each epoch), for the no-valid-sample diagnosis."""
    return {"good": 0, "tried": 0, "reasons": {}, "example": None, "tar_samples": 0, "shards_seen": 0,
            "damage": {}}


class _Sample:
    __slots__ = ("ref", "key", "image", "text", "json")

    def __init__(self, ref, key, image, text, js):
        self.ref, self.key, self.image, self.text, self.json = ref, key, image, text, js


class _Stream:
    """The sample stream of one split as an explicit, copyable cursor (for exact resume)."""

    def __init__(self, loader: ShardLoader, split: int, n_splits: int, state: dict[str, Any]):
        self.L = loader
        self.split, self.n_splits = split, n_splits
        self.st = state
        self._index_cache: dict[int, Any] = {}
        self._samples_cache: dict[int, list] = {}
        self._epoch_plan: tuple[int, list[int], int, int] | None = None
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = state["rng"]
        self.shard_rng = np.random.Generator(np.random.PCG64())
        self.shard_rng.bit_generator.state = state["shard_rng"]
        state.setdefault("pass", _new_pass())
        # resampled: which samples of which shard failed since the last valid one (1 byte per sample);
        # when every sample of every shard has failed, a whole pass yielded nothing valid
        self._failed: dict[int, np.ndarray] = {}
        self._n_failed = 0
        self._sizes: dict[int, int] = {}
        self._seen: set[int] = set()  # shards already tallied in st["pass"]

    # -- shard access -------------------------------------------------------------------------
    def plan(self) -> tuple[list[int], int, int]:
        ep = self.st["epoch"]
        if self._epoch_plan is None or self._epoch_plan[0] != ep:
            order = shard_order(len(self.L.urls), self.L.seed, ep, self.L.shuffle)
            shards, mod, rem = split_shards(order, self.split, self.n_splits)
            self._epoch_plan = (ep, shards, mod, rem)
        return self._epoch_plan[1], self._epoch_plan[2], self._epoch_plan[3]

    def index(self, shard: int):
        idx = self._index_cache.get(shard)
        if idx is None:
            idx = self.L._open_index(shard, self.ahead() if self.L._remote else ())
            self._index_cache[shard] = idx
            self._samples_cache[shard] = idx.samples() if idx is not None else []
        return idx

    def ahead(self) -> list[int]:
        """The shards this split opens next, in order: those the buffer references but has not opened (after a
        resume), then the cursor's next ones (into the next epoch; resampled: the next draws)."""
        k = self.L.prefetch_shards
        out = [s for s in dict.fromkeys(r[0] for r in self.st["buffer"]) if s not in self._index_cache]
        if self.L.resampled:
            g = np.random.Generator(np.random.PCG64())
            g.bit_generator.state = self.shard_rng.bit_generator.state
            out += [int(g.integers(len(self.L.urls))) for _ in range(k)]
        else:
            out += self.plan()[0][self.st["shard_pos"]:][:k]
            if len(out) < k:
                order = shard_order(len(self.L.urls), self.L.seed, self.st["epoch"] + 1, self.L.shuffle)
                out += split_shards(order, self.split, self.n_splits)[0][:k]
        return out[:k]

    def _evict(self) -> None:
        live = {r[0] for r in self.st["buffer"]}
        if self.st["shard"] is not None:
            live.add(self.st["shard"])
        for s in [s for s in self._index_cache if s not in live]:
            del self._index_cache[s]
            del self._samples_cache[s]

    def _start_shard(self, shard: int) -> None:
        st = self.st
        st["shard"], st["sample_pos"] = shard, 0
        self._evict()
        idx = self.index(shard)
        c = st["counters"]
        url = self.L.urls[shard]
        if idx is None:
            failed = self.L._cache.failure(shard) if self.L._cache is not None else None
            if failed:  # a remote shard whose download failed within its attempts (logged by the cache)
                _count(c, "shard_fetch_failed", f"{url}: {failed}")
                self._note_shard(shard, "fetch_failed", 0, f"{url}: {failed}")
            else:
                _count(c, "unreadable_shard", f"unreadable shard {url}")
                self._note_shard(shard, "unreadable", 0, f"cannot open {url}")
            c["tar_damaged_shards"] += 1
            self._sizes[shard] = 0
            return
        c["shards_opened"] += 1
        n = len(self._samples_cache[shard])
        damage = str(getattr(idx, "damage", "truncated" if idx.truncated else ""))
        self._note_shard(shard, damage, n, f"{url}: {list(idx.errors)[0]}" if idx.errors else url)
        mod, rem = (1, 0) if self.L.resampled else self.plan()[1:]
        self._sizes[shard] = (n - rem + mod - 1) // mod if n > rem else 0
        if idx.truncated or idx.errors:
            if idx.truncated:
                _count(c, "truncated_tar", f"truncated tar {url}")
                c["tar_damaged_shards"] += 1
                c["lost_tail_bytes"] += int(getattr(idx, "lost_tail_bytes", 0))
            dropped = int(getattr(idx, "dropped", 0))
            if dropped:  # samples the indexer could not keep (damaged at or inside them)
                c["skipped"]["damaged_tar_sample"] = c["skipped"].get("damaged_tar_sample", 0) + dropped
            lost = int(getattr(idx, "lost_tail_samples", 0))
            if lost:  # complete samples after a bad header: never read, since parsing stops there
                c["skipped"]["tar_lost_tail"] = c["skipped"].get("tar_lost_tail", 0) + lost
            if len(c["tar_errors"]) < _MAX_DETAILS:
                c["tar_errors"].extend(f"{url}: {e}" for e in list(idx.errors)[:8])

    # -- pass bookkeeping ----------------------------------------------------------------------
    def _note_shard(self, shard: int, damage: str, n: int, detail: str) -> None:
        if shard in self._seen:
            return
        self._seen.add(shard)
        p = self.st["pass"]
        p["shards_seen"] += 1
        p["tar_samples"] += n
        if damage:
            d = p["damage"].setdefault(damage, [0, detail])
            d[0] += 1

    def note_good(self) -> None:
        p = self.st["pass"]
        p["good"] += 1
        if self.L.resampled and p["tried"]:  # resampled: the tallies describe the failures since the last valid one
            p["tried"], p["reasons"], p["example"] = 0, {}, None
        if self._n_failed:
            self._failed.clear()
            self._n_failed = 0

    def note_failed(self, ref: tuple[int, int], reason: str, detail: str) -> None:
        p = self.st["pass"]
        p["tried"] += 1
        p["reasons"][reason] = p["reasons"].get(reason, 0) + 1
        if p["example"] is None:
            p["example"] = detail
        c = self.st["counters"]
        if c.get("example_error") is None:
            c["example_error"] = detail
        if self.L.resampled:
            shard, i = ref
            arr = self._failed.get(shard)
            if arr is None:
                arr = self._failed[shard] = np.zeros(max(self._sizes.get(shard, 0), i + 1), dtype=bool)
            elif i >= len(arr):
                arr = self._failed[shard] = np.concatenate([arr, np.zeros(i + 1 - len(arr), dtype=bool)])
            if not arr[i]:
                arr[i] = True
                self._n_failed += 1

    def check_resampled_pass(self) -> None:
        """Resampled: raise once every sample of every shard has failed since the last valid sample."""
        if len(self._sizes) < len(self.L.urls):
            return
        if self._n_failed >= sum(self._sizes.values()):
            raise DataError(_no_valid_message(self.L, self.st, resampled=True, distinct=self._n_failed))

    # -- the stream ---------------------------------------------------------------------------
    def next_ref(self) -> tuple[int, int] | None:
        """The next (shard, sample index) of this split in stream order, or None at epoch end."""
        st = self.st
        empty_draws = 0
        mod, rem = (1, 0) if self.L.resampled else self.plan()[1:]
        while True:
            if st["shard"] is None:
                if self.L.resampled:
                    shard = int(self.shard_rng.integers(len(self.L.urls)))
                else:
                    shards, _, _ = self.plan()
                    if st["shard_pos"] >= len(shards):
                        return None
                    shard = shards[st["shard_pos"]]
                st["shard_pos"] += 1
                self._start_shard(shard)
            shard = st["shard"]
            samples = self._samples_cache.get(shard)
            if samples is None:  # resumed inside a shard: open it again
                self.index(shard)
                samples = self._samples_cache[shard]
            n = len(samples)
            i = st["sample_pos"] * mod + rem
            if i < n:
                st["sample_pos"] += 1
                return shard, i
            st["shard"] = None
            if self.L.resampled:
                empty_draws += 1
                # every shard opened and none had a sample left to try: no pass can yield anything
                if empty_draws % (len(self.L.urls) + 1) == 0:
                    self.check_resampled_pass()

    def next_sample_ref(self) -> tuple[int, int] | None:
        """Next reference after the shuffle buffer (seeded pick from a full buffer)."""
        size = self.L.shuffle_buffer
        buf = self.st["buffer"]
        if size <= 1:
            return self.next_ref()
        while len(buf) < size:
            r = self.next_ref()
            if r is None:
                break
            buf.append(r)
        if not buf:
            return None
        k = int(self.rng.integers(len(buf)))
        buf[k], buf[-1] = buf[-1], buf[k]
        return buf.pop()

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the cursor with the generators' current states (taken per batch, not per pick)."""
        self.st["rng"] = self.rng.bit_generator.state
        self.st["shard_rng"] = self.shard_rng.bit_generator.state
        return _copy_state(self.st)

    def read(self, ref: tuple[int, int]) -> _Sample | None:
        """Materialise a reference: zero-copy image bytes + caption; None (counted) when unusable."""
        shard, i = ref
        idx = self.index(shard)
        c = self.st["counters"]
        if idx is None:  # the shard could not be reopened for a buffered reference (resume after it vanished)
            _count(c, "unreadable_shard", f"unreadable shard {self.L.urls[shard]}")
            self.note_failed(ref, "unreadable_shard", f"cannot open {self.L.urls[shard]}")
            return None
        key, members = self._samples_cache[shard][i]

        def skip(reason: str, detail: str) -> None:
            _count(c, reason, detail)
            self.note_failed(ref, reason, detail)

        # (offset, size) tuples are never falsy, so `or` picks the first member present (IMAGE_EXTS order)
        img = members.get("jpg") or members.get("jpeg") or members.get("png")
        if img is None:
            skip("missing_image", f"no jpg/jpeg/png member: {key}")
            return None
        txt = members.get("txt")  # TEXT_EXTS
        if txt is None:
            skip("missing_caption", f"no txt member: {key}")
            return None
        try:
            text = bytes(idx.read(*txt)).decode("utf-8").strip()
        except UnicodeDecodeError:
            skip("bad_caption_encoding", f"caption is not UTF-8: {key}")
            return None
        if not text:
            skip("empty_caption", f"empty caption: {key}")
            return None
        js = None
        if "json" in members:
            try:
                js = json.loads(bytes(idx.read(*members["json"])))
                if not isinstance(js, dict):
                    raise ValueError("not an object")
            except (ValueError, UnicodeDecodeError):
                c["bad_json"] += 1
                js = {}
        return _Sample(ref, key, idx.read(*img), text, js)


def _count(counters: dict[str, Any], reason: str, detail: str) -> None:
    sk = counters["skipped"]
    sk[reason] = sk.get(reason, 0) + 1
    det = counters["skip_details"]
    if detail in det or len(det) < _MAX_DETAILS:
        det[detail] = det.get(detail, 0) + 1


def _no_valid_message(loader: ShardLoader, st: dict[str, Any], *, resampled: bool, distinct: int = 0) -> str:
    """Why a whole pass over the data gave no valid sample, with the counts (one cause per message)."""
    p = st.get("pass") or _new_pass()
    n_urls = len(loader.urls)
    where = f"{n_urls} shard{'s' if n_urls != 1 else ''} ({loader.urls[0]}{', ...' if n_urls > 1 else ''})"
    what = "a whole pass over the data (resampled)" if resampled else "a whole epoch"
    if st.get("n_splits", 1) > 1 and not resampled:
        what += f" of split {st['split']}/{st['n_splits']}"
    if p["tried"] == 0 and p["tar_samples"] == 0:
        kinds = p["damage"]
        seen = p["shards_seen"]
        if set(kinds) == {"empty"} and kinds["empty"][0] == seen:
            return f"no samples: {where}: every shard is an empty tar file (0 bytes)"
        if "bad_header" in kinds:
            n, err = kinds["bad_header"]
            return f"no samples: bad tar header in {n} of {seen} shard(s) of {where} ({err}); is it a tar file?"
        if set(kinds) == {"unreadable"}:
            return f"no samples: {where}: no shard could be opened ({kinds['unreadable'][1]})"
        if "fetch_failed" in kinds and set(kinds) <= {"fetch_failed", "unreadable"}:
            n, err = kinds["fetch_failed"]
            return f"no samples: {where}: {n} of {seen} shard(s) could not be downloaded ({err})"
        if "truncated" in kinds:
            return (f"no samples: {where}: the tar data ends before the first complete sample "
                    f"({kinds['truncated'][1]})")
        if "empty" in kinds:
            return (f"no samples: {where}: {kinds['empty'][0]} of {seen} shard(s) are empty tar files, "
                    "the rest hold none")
        return (f"no samples: {where} hold no webdataset members (files named <key>.<ext>, e.g. "
                "0001.jpg + 0001.txt)")
    if p["tried"] == 0:
        return f"no samples in {what} over {where}"
    reasons = p["reasons"]
    total = distinct or p["tried"]
    tries = f" ({p['tried']} tries)" if distinct and p["tried"] != distinct else ""
    listed = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    if set(reasons) == {"corrupt_image"}:
        head = f"all {total} images in {what}{tries} are undecodable"
    else:
        head = f"all {total} samples in {what}{tries} were skipped ({listed})"
    return f"no valid sample: {head} in {where}; e.g. {p['example']}"


def _copy_state(st: dict[str, Any]) -> dict[str, Any]:
    out = dict(st)
    out["buffer"] = list(st["buffer"])  # refs are immutable (shard, index) tuples
    c = dict(st["counters"])
    c["skipped"] = dict(c["skipped"])
    c["skip_details"] = dict(c["skip_details"])
    c["tar_errors"] = list(c["tar_errors"])
    out["counters"] = c
    if "pass" in st:
        out["pass"] = json.loads(json.dumps(st["pass"]))
    out["rng"] = json.loads(json.dumps(st["rng"]))
    out["shard_rng"] = json.loads(json.dumps(st["shard_rng"]))
    return out


_END = object()


class _Stopped(Exception):
    """The consumer closed the pipe while the producer was assembling a batch."""


# Producers still running when the interpreter exits (e.g. after Ctrl-C) are stopped and joined by an
# atexit handler: a daemon thread left inside the C++ decoder would be ended by the finalizing
# interpreter (pthread_exit) when it takes the GIL back, which aborts the process.
_LIVE_PIPES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_pipes() -> None:
    for pipe in list(_LIVE_PIPES):
        pipe.close(timeout=30)


class _Pipe:
    """Producer thread + bounded queue for one iteration; holds no reference to the iterator."""

    def __init__(self, loader: ShardLoader, stream: _Stream, split: int):
        self.L, self.stream, self.split = loader, stream, split
        self.q: queue.Queue = queue.Queue(maxsize=loader.prefetch)
        self.stop = threading.Event()
        self.ring = loader._make_ring()
        self.thread = threading.Thread(target=self._run, name="ShardLoader-producer", daemon=True)
        _LIVE_PIPES.add(self)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        slot = 0
        try:
            while not self.stop.is_set():
                batch = self.L._produce(self.stream, self.split, self.ring[slot], self.stop)
                if batch is None:
                    snap = self.stream.snapshot()
                    self._put((_END, (self.L._end_of_epoch_state(snap), snap["pass"])))
                    return
                if not self._put(batch):
                    return
                slot = (slot + 1) % len(self.ring)
        except _Stopped:
            return
        except BaseException as e:  # surfaced in the consumer thread, never lost
            try:  # the skips that led to it, for stats()
                counters = _copy_state(self.stream.st)["counters"]
            except Exception:
                counters = None
            self._put((e, counters))

    def close(self, timeout: float = 60) -> None:
        """Stop the producer (it checks between samples and after each decode call) and join it."""
        self.stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=timeout)
        _LIVE_PIPES.discard(self)


class _LoaderIter:
    def __init__(self, loader: ShardLoader, pipe: _Pipe):
        self.L, self.pipe = loader, pipe

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self.pipe is None or self.L._active is not self.pipe:
            raise StopIteration
        while True:
            try:
                batch, state = self.pipe.q.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.pipe.thread.is_alive() and self.pipe.q.empty():
                    # cannot happen by design (the producer always reports its end or its error); a
                    # clear error beats waiting forever if it ever does
                    self.close()
                    raise DataError("ShardLoader producer thread ended without a result") from None
        if batch is _END:
            state, self.L.last_pass = state
            self.L._commit(state)
            self.L.epoch = state["epoch"]
            self.L._active = None
            self.pipe.close()
            self.pipe = None
            raise StopIteration
        if isinstance(batch, BaseException):
            if state is not None:  # counters of the failed pass (the position stays after the last batch)
                self.L._state["counters"] = state
            self.L._active = None
            self.pipe.close()
            self.pipe = None
            raise batch
        self.L._commit(state)
        return batch

    def close(self) -> None:
        if self.pipe is not None:
            if self.L._active is self.pipe:
                self.L._active = None
            self.pipe.close()
            self.pipe = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class ShardLoader(torch.utils.data.IterableDataset):
    """Batches ``{"image": uint8 [N,S,S,3], "text", "key", ["json"], ["input_ids"]}`` from tar shards."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        batch_size: int,
        image_size: int,
        num_threads: int | None = None,
        augment: str = "random_resized_crop",
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        drop_last: bool = False,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        num_workers: int | None = None,
        worker_id: int | None = None,
        prefetch: int = 2,
        pin_memory: bool = False,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        decode: bool = True,
        decode_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_bytes: int = remote.DEFAULT_CACHE_BYTES,
        prefetch_shards: int = remote.DEFAULT_PREFETCH_SHARDS,
        storage_options: dict[str, Any] | None = None,
        fetch_options: remote.FetchOptions | dict[str, Any] | None = None,
    ):
        super().__init__()
        self.urls = expand_urls(urls)
        missing = [u for u in self.urls if not remote.is_remote(u) and not os.path.isfile(u)]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise DataError(f"{len(missing)} shard(s) not found: {', '.join(missing[:3])}{more}")
        for name, v, lo in (("batch_size", batch_size, 1), ("image_size", image_size, 1),
                            ("world_size", world_size, 1), ("prefetch", prefetch, 1)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if augment not in AUGMENTS:
            raise ConfigError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        if num_threads is None:
            num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ConfigError(f"num_threads must be an integer >= 1, got {num_threads!r}")
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer must be an integer >= 0, got {shuffle_buffer!r}")
        if (num_workers is None) != (worker_id is None):
            raise ConfigError("num_workers and worker_id are given together (or neither)")
        if num_workers is not None and not 0 <= worker_id < num_workers:
            raise ConfigError(f"worker_id must be in [0, num_workers={num_workers}), got {worker_id!r}")
        if pin_memory and not torch.cuda.is_available():
            raise ConfigError("pin_memory=True needs CUDA (torch.cuda.is_available() is False)")
        if not (0 < scale[0] <= scale[1] <= 1.0):
            raise ConfigError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale!r}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ConfigError(f"ratio must satisfy 0 < lo <= hi, got {ratio!r}")
        self.batch_size, self.image_size = int(batch_size), int(image_size)
        self.num_threads, self.augment = num_threads, augment
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), int(epoch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.resampled, self.drop_last = bool(resampled), bool(drop_last)
        # shuffle=False means stream order: the buffer would reorder samples, so it is off
        self.shuffle_buffer = int(shuffle_buffer) if self.shuffle else 0
        self.tokenizer = tokenizer
        self._tok = BackgroundTokenizer(tokenizer) if tokenizer is not None else None
        self.num_workers, self.worker_id = num_workers, worker_id
        self.prefetch, self.pin_memory = int(prefetch), bool(pin_memory)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.decode = bool(decode)
        # extra keyword arguments of bmclip._C.Decoder.decode_batch (e.g. interpolation, dct_min_ratio:
        # the speed/fidelity trade-off of DCT-domain downscaling); checked by the extension on first use
        self.decode_options = dict(decode_options or {})
        clash = {"augment", "seed", "scale", "ratio"} & set(self.decode_options)
        if clash:
            raise ConfigError(f"decode_options may not set {sorted(clash)}: they are ShardLoader arguments")
        self._urls_digest = hashlib.sha1("\n".join(self.urls).encode()).hexdigest()
        # remote shards (URLs, pipe:) are downloaded ahead into a bounded cache (bmclip.data.remote)
        self._remote = any(remote.is_remote(u) for u in self.urls)
        self.prefetch_shards = prefetch_shards
        self._cache_args = dict(cache_dir=cache_dir, cache_bytes=cache_bytes, prefetch_shards=prefetch_shards,
                                fetch_options=remote.FetchOptions.coerce(fetch_options),
                                storage_options=dict(storage_options or {}))
        remote.ShardCache.check_args(cache_bytes, prefetch_shards)
        if self._remote:
            remote.check_remote_urls(self.urls, storage_options, self._cache_args["fetch_options"])
        self._cache: remote.ShardCache | None = None
        self._decoder = None
        # tallies of the last finished epoch: valid samples ("good"), failed ones, reasons
        self.last_pass: dict[str, Any] | None = None
        self._active: _Pipe | None = None
        self._lock = threading.Lock()
        self._state: dict[str, Any] = self._fresh_state(self.epoch, _new_counters())

    def __repr__(self) -> str:
        return (f"ShardLoader({len(self.urls)} shards, batch_size={self.batch_size}, image_size={self.image_size}, "
                f"augment={self.augment!r}, epoch={self.epoch}, rank={self.rank}/{self.world_size}, "
                f"resampled={self.resampled}, threads={self.num_threads})")

    # -- pickling (DataLoader workers): threads and the C++ decoder are recreated lazily -----------
    def __getstate__(self):
        d = dict(self.__dict__)
        d["_decoder"] = None
        d["_cache"] = None
        d["_active"] = None
        d["_lock"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    # -- splits ----------------------------------------------------------------------------------
    def _split(self) -> tuple[int, int]:
        if self.num_workers is not None:
            nw, wid = self.num_workers, self.worker_id
        else:
            info = torch.utils.data.get_worker_info()
            nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * nw + wid, self.world_size * nw

    # -- state -----------------------------------------------------------------------------------
    def _fresh_state(self, epoch: int, counters: dict[str, Any]) -> dict[str, Any]:
        split, n_splits = self._split_for_state()
        return {
            "version": _STATE_VERSION,
            "urls_sha1": self._urls_digest,
            "n_shards": len(self.urls),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "resampled": self.resampled,
            "shuffle_buffer": self.shuffle_buffer,
            "split": split,
            "n_splits": n_splits,
            "epoch": int(epoch),
            "shard_pos": 0,
            "shard": None,
            "sample_pos": 0,
            "buffer": [],
            "rng": _rng(self.seed, epoch, split, 1).bit_generator.state,
            "shard_rng": _rng(self.seed, epoch, split, 2).bit_generator.state,
            "batch": 0,
            "counters": counters,
            "pass": _new_pass(),
        }

    def _split_for_state(self) -> tuple[int, int]:
        if self.num_workers is None and torch.utils.data.get_worker_info() is None:
            return self.rank, self.world_size
        return self._split()

    def _end_of_epoch_state(self, st: dict[str, Any]) -> dict[str, Any]:
        nxt = self._fresh_state(st["epoch"] + 1, st["counters"])
        nxt["split"], nxt["n_splits"] = st["split"], st["n_splits"]
        nxt["rng"] = _rng(self.seed, st["epoch"] + 1, st["split"], 1).bit_generator.state
        nxt["shard_rng"] = _rng(self.seed, st["epoch"] + 1, st["split"], 2).bit_generator.state
        return _copy_state(nxt)

    def _commit(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out (JSON-serialisable; no sample bytes)."""
        return _copy_state(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from ``state_dict``) at exactly the next sample."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ConfigError(f"not a ShardLoader state (version {_STATE_VERSION}): {type(state).__name__}")
        checks = {
            "urls_sha1": self._urls_digest,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "resampled": self.resampled,
            "shuffle_buffer": self.shuffle_buffer,
        }
        for k, mine in checks.items():
            if state.get(k) != mine:
                what = "shard list" if k == "urls_sha1" else k
                raise ConfigError(
                    f"ShardLoader state was saved with a different {what} ({state.get(k)!r} != {mine!r}); "
                    "an exact resume needs the same value"
                )
        self._stop_active()
        st = _copy_state(state)
        if "pass" not in st:  # saved before the pass tallies existed: assume the epoch so far had valid samples
            st["pass"] = {**_new_pass(), "good": 1}
        st["buffer"] = [tuple(r) for r in st["buffer"]]
        self._state = st
        self.epoch = int(st["epoch"])

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch`` (reshuffles shards and samples)."""
        self._stop_active()
        self.epoch = int(epoch)
        self._state = self._fresh_state(self.epoch, self._state["counters"])

    @property
    def stats(self) -> dict[str, Any]:
        """Counters up to the last batch handed out.

        ``samples`` (handed out in batches), ``batches``, ``shards_opened``, ``skipped`` {reason: n}
        (sample reasons: missing_image, missing_caption, bad_caption_encoding, empty_caption,
        corrupt_image (decoder reason in ``skip_details``), damaged_tar_sample (the sample open where a
        tar is damaged), tar_lost_tail (complete samples after a bad tar header, never read); shard
        reasons: truncated_tar, unreadable_shard), ``skipped_total`` (all of ``skipped``),
        ``samples_skipped`` (the sample reasons only), ``tar_errors`` (messages), ``tar_damaged_shards``
        (shard reads that hit damage or could not open), ``lost_tail_bytes`` (bytes after the damage
        point of damaged shards), ``example_error`` (the first skip, "key: reason"), ``bad_json``,
        ``dropped_last``. Remote shards: ``shard_fetch_failed`` (shard reason: downloads that failed within
        their attempts), and since the loader was made: ``fetch_wait_s`` (time spent waiting for shard
        downloads), ``bytes_fetched``, ``shards_fetched``, ``fetch_retries``, ``fetch_failures`` (zeros
        for local shards).
        """
        c = _copy_state(self._state)["counters"]
        for k, v in _new_counters().items():
            c.setdefault(k, v)
        fetched = self._cache.stats() if self._cache is not None else {}
        for k in ("fetch_wait_s", "bytes_fetched", "shards_fetched", "fetch_retries", "fetch_failures"):
            c[k] = fetched.get(k, 0.0 if k == "fetch_wait_s" else 0)
        c["skipped_total"] = sum(c["skipped"].values())
        c["samples_skipped"] = sum(v for k, v in c["skipped"].items() if k not in _SHARD_REASONS)
        return c

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason (missing_image, missing_caption, corrupt_image, truncated_tar, ...)."""
        return dict(self._state["counters"]["skipped"])

    # -- length ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch for this rank, assuming no sample is skipped (skips only ever shorten it).

        Counted for the worker split in effect (explicit ``num_workers``/``worker_id``, or the DataLoader
        worker this runs in); called in the main process of a DataLoader with worker processes, it counts
        one worker, while each worker ends on its own partial batch (up to ``num_workers - 1`` more).
        """
        if self.resampled:
            raise TypeError("a resampled ShardLoader is infinite and has no len()")
        if self._remote:
            raise TypeError("len() of a ShardLoader over remote shards would download every shard to count "
                            "its samples")
        if self.num_workers is not None:
            workers = [(self.rank * self.num_workers + self.worker_id, self.world_size * self.num_workers)]
        else:
            info = torch.utils.data.get_worker_info()
            nw = info.num_workers if info is not None else 1
            workers = [(self.rank * nw + w, self.world_size * nw) for w in range(nw)]
        order = shard_order(len(self.urls), self.seed, self.epoch, self.shuffle)
        total = 0
        for split, n_splits in workers:
            shards, mod, rem = split_shards(order, split, n_splits)
            n = 0
            for s in shards:
                idx = self._open_index(s)
                k = len(idx) if idx is not None else 0
                n += (k - rem + mod - 1) // mod if k > rem else 0
            total += n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return total

    # -- iteration -------------------------------------------------------------------------------
    def _open_index(self, shard: int, ahead: Sequence[int] = ()):
        if not remote.is_remote(self.urls[shard]):
            try:
                return _import_c().TarIndex(self.urls[shard])
            except OSError:
                return None
        if self._cache is None or not self._cache.usable():  # first remote shard, or a forked worker
            split, n_splits = self._split()
            try:
                self._cache = remote.ShardCache(self.urls, name=f"{split}of{n_splits}", **self._cache_args)
            except OSError as e:
                raise ConfigError(f"cache_dir: cannot make the remote shard cache ({e})") from e
        try:
            return self._cache.open(shard, ahead, _import_c().TarIndex)
        except OSError:
            return None

    def _make_ring(self) -> list[tuple[torch.Tensor, np.ndarray] | None]:
        if not self.decode:
            return [None]
        shape = (self.batch_size, self.image_size, self.image_size, 3)
        ring = []
        # consumer holds 2 (the current batch and the one whose device copy may still run), the queue
        # holds `prefetch`, the producer fills 1
        for _ in range(self.prefetch + 3):
            t = torch.empty(shape, dtype=torch.uint8)
            if self.pin_memory:
                t = t.pin_memory()
            ring.append((t, t.numpy()))
        return ring

    def _stop_active(self) -> None:
        pipe, self._active = self._active, None
        if pipe is not None:
            pipe.close()

    def __iter__(self):
        self._stop_active()
        split, n_splits = self._split()
        st = self._state
        if st["split"] != split or st["n_splits"] != n_splits:
            if st["shard"] is None and st["shard_pos"] == 0 and not st["buffer"]:
                # untouched start-of-epoch state: just bind it to this split (e.g. inside a worker)
                st = self._fresh_state(st["epoch"], st["counters"])
                st["split"], st["n_splits"] = split, n_splits
                st["rng"] = _rng(self.seed, st["epoch"], split, 1).bit_generator.state
                st["shard_rng"] = _rng(self.seed, st["epoch"], split, 2).bit_generator.state
            else:
                raise ConfigError(
                    f"ShardLoader state belongs to split {st['split']}/{st['n_splits']} (rank*workers+worker "
                    f"of world_size*workers), this loader is split {split}/{n_splits}: resume each rank "
                    "from its own state with the same world size"
                )
        if self._decoder is None:
            self._decoder = _import_c().Decoder(self.num_threads)
        stream = _Stream(self, split, n_splits, _copy_state(st))
        stream.st["buffer"] = [tuple(r) for r in stream.st["buffer"]]
        pipe = _Pipe(self, stream, split)
        self._active = pipe
        return _LoaderIter(self, pipe)

    def _header_check(self, buf) -> str | None:
        """decode=False: reject what the C++ header parser cannot identify (None = looks decodable)."""
        info = getattr(self._decoder, "image_info", None) or getattr(_import_c(), "image_info", None)
        if info is None:
            return None
        try:
            w, h = info(buf)[:2]
        except Exception as e:  # the parser's message is the skip reason
            return f"{type(e).__name__}: {e}"
        return None if w > 0 and h > 0 else f"image header gives size {w}x{h}"


    def _tokenize(self, texts: list[str]) -> Future | None:
        return self._tok.submit(texts) if self._tok is not None else None

    def _produce(self, stream: _Stream, split: int, slot: tuple[torch.Tensor, np.ndarray] | None,
                 stop: threading.Event | None = None):
        """Assemble and decode one batch into the ring ``slot``; (batch dict, state after it) or None at end.

        Raises DataError when a whole pass over the data (the epoch, or with ``resampled`` every sample
        of every shard) gives no valid sample, and ``_Stopped`` as soon as ``stop`` is set.
        """
        out_t, out = slot if slot is not None else (None, None)
        st = stream.st
        bs = self.batch_size
        got: list[_Sample] = []
        first_tok: tuple[Future, np.ndarray] | None = None
        attempt = 0
        exhausted = False
        while len(got) < bs and not exhausted:
            if stop is not None and stop.is_set():
                raise _Stopped
            cand: list[_Sample] = []
            while len(got) + len(cand) < bs:
                ref = stream.next_sample_ref()
                if ref is None:
                    exhausted = True
                    break
                s = stream.read(ref)
                if s is not None:
                    cand.append(s)
                elif self.resampled:
                    stream.check_resampled_pass()
                if stop is not None and stop.is_set():
                    raise _Stopped
            if not cand:
                break
            # the captions of the first attempt are tokenised while it decodes; a refilled batch is
            # tokenised once at the end (so failed attempts hold no tokenised tensors)
            fut = self._tokenize([s.text for s in cand]) if attempt == 0 else None
            if self.decode:
                lo = len(got)
                dst = out[lo : lo + len(cand)]
                seed = _mix(self.seed, st["epoch"], split, st["batch"], attempt)
                reasons = self._decoder.decode_batch(
                    [s.image for s in cand], dst, augment=self.augment, seed=seed, scale=self.scale,
                    ratio=self.ratio, **self.decode_options,
                )
            else:
                reasons = [self._header_check(s.image) for s in cand]
            ok = np.array([r is None for r in reasons], dtype=bool)
            for s, r in zip(cand, reasons):
                if r is not None:  # detail = the decoder's reason, so distinct details stay few
                    _count(st["counters"], "corrupt_image", str(r))
                    stream.note_failed(s.ref, "corrupt_image", f"{s.key}: {r}")
                else:
                    stream.note_good()
            if self.decode and not ok.all():
                # keep the decoded rows contiguous: move the good ones down over the failed slots
                dst[: int(ok.sum())] = dst[ok]
            got.extend(s for s, k in zip(cand, ok) if k)
            if fut is not None:
                first_tok = (fut, ok)
            if self.resampled and not ok.any():
                stream.check_resampled_pass()
            attempt += 1
        n = len(got)
        if n == 0 and exhausted and st["pass"]["good"] == 0:
            self._check_empty_pass(stream)
        if n == 0 or (self.drop_last and n < bs):
            st["counters"]["dropped_last"] += n
            return None
        c = st["counters"]
        c["samples"] += n
        c["batches"] += 1
        st["batch"] += 1
        batch: dict[str, Any] = {"text": [s.text for s in got], "key": [s.key for s in got]}
        if self.decode:
            batch["image"] = out_t[:n]
        else:  # zero-copy read-only views into the mapped shard (they keep the mapping alive)
            batch["image_bytes"] = [s.image for s in got]
        if any(s.json is not None for s in got):
            batch["json"] = [s.json if s.json is not None else {} for s in got]
        if first_tok is not None and attempt == 1:
            fut, ok = first_tok
            t = fut.result()  # shape-checked by BackgroundTokenizer
            batch["input_ids"] = t if ok.all() else t[torch.from_numpy(ok)]
        elif self._tok is not None:
            # refilled batch (rare): tokenise the final captions in one call, so a tokenizer that pads
            # to the longest caption of its call still gives one consistent [N, L]
            if first_tok is not None:
                first_tok[0].result()
            batch["input_ids"] = self._tok.submit(batch["text"]).result()
        return batch, stream.snapshot()

    def _check_empty_pass(self, stream: _Stream) -> None:
        """End of an epoch without a single valid sample: raise DataError naming the cause.

        A split that tried no sample while its shards hold some (more splits than samples) just ends.
        """
        p = stream.st["pass"]
        if p["tried"] > 0 or p["tar_samples"] == 0:
            raise DataError(_no_valid_message(self, stream.st, resampled=False))

