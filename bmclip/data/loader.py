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
4. **Sample filtering.** Image member: the first of ``bmclip.data.images.DECODED_EXTENSIONS``
   (``jpg``, ``jpeg``, ``png``); a sample whose only image is another recognised format
   (``IMAGE_EXTENSIONS``, e.g. ``webp``) is an ``unsupported_image_format`` skip; caption: ``txt``
   (UTF-8); ``json`` parsed when present. Missing/undecodable members are counted skips (``skipped``),
   and the batch is refilled from the stream so batches stay full. A whole pass that yields no valid
   sample (an epoch; with ``resampled``, every sample of every shard failed since the last valid one)
   raises ``DataError`` naming the cause (empty tar, bad tar header, undecodable images with an
   example reason, ...) instead of looping. With several splits (ranks x DataLoader workers) one split's
   empty epoch raises ``bmclip.data.cursor.EmptySplitEpoch`` (a DataError naming that split's shards; other
   splits may have data) after moving the loader's position to the next epoch. Closing the iterator (or
   interpreter exit) stops the producer between samples. A loader runs one iteration at a time:
   ``iter(loader)`` (and ``set_epoch``, ``load_state_dict``) stops the running one, which continues from
   its last batch handed out, and the older iterator's ``next`` then raises RuntimeError saying it was
   superseded.
5. **Decode.** ``bmclip._C.Decoder.decode_batch`` writes random-resized-crop (train) or
   resize+centre-crop (eval) pixels into a preallocated ``[N, S, S, 3]`` uint8 ring buffer (a torch
   tensor, pinned with ``pin_memory=True``, written through its numpy view) that becomes
   ``batch["image"]`` without a copy. The ring holds ``prefetch + 3`` batches, so batch k's buffer is
   reused only once the consumer takes batch k+2: an asynchronous host-to-device copy of batch k has
   the whole of step k+1 to finish. ``.clone()`` the images if you keep them longer. Moving a batch to
   shared memory (``.share_memory_()``, or sending it through ``torch.multiprocessing``) copies it out of
   the ring, and the copy stays valid; a ``torch.multiprocessing.Queue`` pickles in a background thread,
   so send a clone, or make sure it is sent before taking batch k+2. Inside a DataLoader worker
   process each batch is instead decoded into a new buffer in shared memory, never reused: the main
   process may keep DataLoader batches as long as it likes (``pin_memory`` is then the DataLoader's).
   ``decode=False`` skips decoding and hands out ``batch["image_bytes"]`` (zero-copy uint8 views of
   the encoded images, header-checked) for a DALI pipeline (``bmclip.data.dali``) to decode.
6. **Text.** With ``tokenizer`` (a callable ``list[str] -> LongTensor [N, L]``), captions are
   tokenised in a second background thread while the images decode; ``batch["input_ids"]`` is ready
   when the batch is handed out, so the consumer never waits on tokenisation.

Modules: the cursor and its state (``bmclip.data.cursor``: steps 1-4), the producer thread, ring and
batch assembly (``bmclip.data.producer``: steps 5-6), and this façade (options, splits, state, length).

Remote shards (``s3://``, ``gs://``, ``http(s)://``, ``pipe:CMD``; ``bmclip.data.remote``; a ``file://`` URL is
the local path it names, read in place like any local shard):
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

import os
import queue
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bmclip._ext import load_ext
from bmclip.data import remote
from bmclip.data.cursor import SHARD_REASONS, Counters, Cursor, CursorState, EmptySplitEpoch
from bmclip.data.loader_options import LoaderOptions
from bmclip.data.producer import END, BatchAssembler, Pipe, batch_slots
from bmclip.data.shards import (
    check_local_shards,
    expand_urls,
    shard_names_digest,
    shard_order,
    shards_moved,
    split_shards,
    urls_digest,
)
from bmclip.data.text import BackgroundTokenizer
from bmclip.errors import ConfigError, DataError, check_int
from bmclip.io.fs import local_path

__all__ = ["LoaderOptions", "ShardLoader"]

class ShardLoader(torch.utils.data.IterableDataset):
    """Batches ``{"image": uint8 [N,S,S,3], "text", "key", ["json"], ["input_ids"]}`` from tar shards.

    The options (see :class:`LoaderOptions`) are also attributes (``ld.batch_size``, ``ld.scale``, ...),
    fixed at construction; ``ld.epoch`` is the epoch the next iteration reads.
    """

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
        self._check_shards()
        o = self.options = LoaderOptions(
            batch_size=batch_size, image_size=image_size, num_threads=num_threads, augment=augment, shuffle=shuffle,
            seed=seed, epoch=epoch, rank=rank, world_size=world_size, resampled=resampled,
            shuffle_buffer=shuffle_buffer, drop_last=drop_last, num_workers=num_workers, worker_id=worker_id,
            prefetch=prefetch, pin_memory=pin_memory, scale=scale, ratio=ratio, decode=decode,
            decode_options=decode_options or {}, cache_dir=cache_dir, cache_bytes=cache_bytes,
            prefetch_shards=prefetch_shards, storage_options=storage_options or {}, fetch_options=fetch_options)
        # every option is also a plain attribute (ld.batch_size, ld.scale, ld.epoch, ...), as LoaderOptions holds it
        vars(self).update(vars(o))
        self._check_repeats()
        self.tokenizer = tokenizer
        self._tok = BackgroundTokenizer(tokenizer) if tokenizer is not None else None
        self._urls_digest = urls_digest(self.urls)
        self._names_digest = shard_names_digest(self.urls)
        self.moved_from_other_location = False  # set by load_state_dict
        # remote shards (URLs, pipe:) are downloaded ahead into a bounded cache, made on first use per split
        self._remote = any(remote.is_remote(u) for u in self.urls)
        if self._remote:
            remote.check_remote_urls(self.urls, self.storage_options, self.fetch_options)
        self._cache: remote.ShardCache | None = None
        self._decoder = None
        # tallies of the last finished epoch: valid samples ("good"), failed ones, reasons
        self.last_pass: dict[str, Any] | None = None
        self._active: Pipe | None = None
        self._state: CursorState = self._fresh_state(self.epoch)

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
        return d

    # -- shards ----------------------------------------------------------------------------------
    def _check_shards(self) -> None:
        """DataError naming the shards that do not exist (checked once, when the loader is built)."""
        check_local_shards(self.urls)

    def _check_repeats(self) -> None:
        """ConfigError naming a shard listed twice (local: the same file by any path; remote: the same URL).

        An epoch reads each listed shard once, so a repeat would hand out its samples twice per epoch. With
        ``resampled=True`` shards are drawn with replacement and a repeat only weights the draw: allowed.
        """
        if self.resampled:
            return
        seen: dict[str, str] = {}
        for u in self.urls:
            key = u if remote.is_remote(u) else os.path.realpath(local_path(u))
            if key in seen:
                what = (f"shard {u!r} is listed twice" if seen[key] == u else
                        f"shards {seen[key]!r} and {u!r} are the same file ({key})")
                raise ConfigError(f"{what}: each epoch would read its samples twice; list each shard once "
                                  "(repeats only weight the draw, with resampled=True)")
            seen[key] = u

    def _open_index(self, shard: int, ahead: Sequence[int] = ()):
        """The tar index of shard ``shard`` (``bmclip._C.TarIndex``, memory-mapped), None if it cannot open.

        A remote shard is opened from its local copy in the split's download cache, which also starts
        fetching the shards listed in ``ahead``.
        """
        if not remote.is_remote(self.urls[shard]):
            try:
                return load_ext().TarIndex(str(local_path(self.urls[shard])))
            except OSError:
                return None
        if self._cache is None or not self._cache.usable():  # first remote shard, or a forked worker
            split, n_splits = self._split()
            try:
                self._cache = remote.ShardCache(
                    self.urls, name=f"{split}of{n_splits}", cache_dir=self.cache_dir, cache_bytes=self.cache_bytes,
                    prefetch_shards=self.prefetch_shards, fetch_options=self.fetch_options,
                    storage_options=self.storage_options)
            except OSError as e:
                raise ConfigError(f"cache_dir: cannot make the remote shard cache ({e})") from e
        try:
            return self._cache.open(shard, ahead, load_ext().TarIndex)
        except OSError:
            return None

    def _fetch_failure(self, shard: int) -> str | None:
        return self._cache.failure(shard) if self._cache is not None else None

    # -- splits ----------------------------------------------------------------------------------
    def _split(self) -> tuple[int, int]:
        if self.num_workers is not None:
            nw, wid = self.num_workers, self.worker_id
        else:
            info = torch.utils.data.get_worker_info()
            nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * nw + wid, self.world_size * nw

    def _split_for_state(self) -> tuple[int, int]:
        if self.num_workers is None and torch.utils.data.get_worker_info() is None:
            return self.rank, self.world_size
        return self._split()

    # -- state -----------------------------------------------------------------------------------
    def _fresh_state(self, epoch: int, counters: Counters | None = None) -> CursorState:
        split, n_splits = self._split_for_state()
        return CursorState.fresh(urls_sha1=self._urls_digest, n_shards=len(self.urls), seed=self.seed,
                                 shuffle=self.shuffle, resampled=self.resampled, shuffle_buffer=self.shuffle_buffer,
                                 split=split, n_splits=n_splits, epoch=epoch, counters=counters,
                                 names_sha1=self._names_digest)

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out (JSON-serialisable; no sample bytes)."""
        return self._state.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from ``state_dict``) at exactly the next sample.

        The shard list must be the same: the same URLs, or the same file names in the same order at another
        location (shards copied to node-local scratch, to another mount or to an object store). Then
        :attr:`moved_from_other_location` is True, and the state saved from here on names the new URLs.
        """
        st = CursorState.from_dict(state)
        moved = shards_moved(st.urls_sha1, st.names_sha1, self.urls) and st.n_shards == len(self.urls)
        for k, mine in (("urls_sha1", self._urls_digest), ("seed", self.seed), ("shuffle", self.shuffle),
                        ("resampled", self.resampled), ("shuffle_buffer", self.shuffle_buffer)):
            theirs = getattr(st, k)
            if theirs != mine and not (k == "urls_sha1" and moved):
                what = "shard list" if k == "urls_sha1" else k
                raise ConfigError(
                    f"ShardLoader state was saved with a different {what} ({theirs!r} != {mine!r}); "
                    "an exact resume needs the same value"
                    + (" (the same shard file names in the same order at another location also resume)"
                       if k == "urls_sha1" else "")
                )
        if moved:
            st.urls_sha1 = self._urls_digest
        st.names_sha1 = self._names_digest
        self.moved_from_other_location = moved
        self._stop_active("loader.load_state_dict()")
        self._state = st
        self.epoch = st.epoch

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch`` (reshuffles shards and samples)."""
        epoch = check_int(epoch, "epoch", 0)
        self._stop_active("loader.set_epoch()")
        self.epoch = epoch
        self._state = self._fresh_state(self.epoch, self._state.counters)

    @property
    def stats(self) -> dict[str, Any]:
        """Counters up to the last batch handed out.

        ``samples`` (handed out in batches), ``batches``, ``shards_opened``, ``skipped`` {reason: n}
        (sample reasons: missing_image, unsupported_image_format (only images the decoder does not read,
        e.g. webp), missing_caption, bad_caption_encoding, empty_caption, corrupt_image (decoder reason in
        ``skip_details``), damaged_tar_sample (the sample open where a tar is damaged), tar_lost_tail
        (complete samples after a bad tar header, never read); shard reasons: truncated_tar,
        unreadable_shard), ``skipped_total`` (all of ``skipped``), ``samples_skipped`` (the sample
        reasons only), ``tar_errors`` (messages), ``tar_damaged_shards`` (shard reads that hit damage
        or could not open), ``lost_tail_bytes`` (bytes after the damage point of damaged shards),
        ``example_error`` (the first skip, "key: reason"), ``bad_json``, ``dropped_last``. Remote shards:
        ``shard_fetch_failed`` (shard reason: downloads that failed within their attempts), and since the
        loader was made: ``fetch_wait_s`` (time spent waiting for shard downloads), ``bytes_fetched``,
        ``shards_fetched``, ``fetch_retries``, ``fetch_failures`` (zeros for local shards).
        """
        c = self._state.counters.to_dict()
        fetched = self._cache.stats() if self._cache is not None else {}
        for k in ("fetch_wait_s", "bytes_fetched", "shards_fetched", "fetch_retries", "fetch_failures"):
            c[k] = fetched.get(k, 0.0 if k == "fetch_wait_s" else 0)
        c["skipped_total"] = sum(c["skipped"].values())
        c["samples_skipped"] = sum(v for k, v in c["skipped"].items() if k not in SHARD_REASONS)
        return c

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason (missing_image, missing_caption, corrupt_image, truncated_tar, ...)."""
        return dict(self._state.counters.skipped)

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
    def _stop_active(self, by: str = "the loader stopping its producer") -> None:
        """Stop the running iteration, if any; its iterator's ``next`` then raises RuntimeError naming ``by``."""
        pipe, self._active = self._active, None
        if pipe is not None:
            pipe.superseded_by = by
            pipe.close()

    def __iter__(self):
        self._stop_active("a newer iter(loader)")
        split, n_splits = self._split()
        st = self._state
        if (st.split, st.n_splits) != (split, n_splits):
            if not st.untouched:
                raise ConfigError(
                    f"ShardLoader state belongs to split {st.split}/{st.n_splits} (rank*workers+worker "
                    f"of world_size*workers), this loader is split {split}/{n_splits}: resume each rank "
                    "from its own state with the same world size"
                )
            # untouched start-of-epoch state: just bind it to this split (e.g. inside a worker)
            st = st.restart(split=split, n_splits=n_splits)
        ext = load_ext()
        if self._decoder is None:
            self._decoder = ext.Decoder(self.num_threads)
        image_info = getattr(self._decoder, "image_info", None) or getattr(ext, "image_info", None)
        assembler = BatchAssembler(self.options, self._decoder, image_info, self._tok)
        cursor = Cursor(st.copy(), self.urls, self._open_index, prefetch_shards=self.prefetch_shards if self._remote
                        else 0, fetch_failure=self._fetch_failure)
        # in a DataLoader worker every batch is pickled to the main process, which keeps it as long as it
        # likes: a new shared-memory buffer per batch there, the reused ring here (see bmclip.data.producer)
        in_worker = torch.utils.data.get_worker_info() is not None
        pipe = Pipe(assembler, cursor, batch_slots(self.options, fresh_shared=in_worker), self.prefetch)
        self._active = pipe
        return _LoaderIter(self, pipe)


class _LoaderIter:
    """The consumer end of one iteration: takes batches from the pipe and commits their state."""

    def __init__(self, loader: ShardLoader, pipe: Pipe):
        self.L, self.pipe = loader, pipe

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self.pipe is None:  # ended, or closed
            raise StopIteration
        if self.L._active is not self.pipe:
            # a loader runs one iteration at a time: ending this one quietly would lose data without a word
            # (e.g. zip(iter(ld), iter(ld)) gave [])
            raise RuntimeError(f"this ShardLoader iterator was superseded by {self.pipe.superseded_by}: a loader "
                               "runs one iteration at a time (a newer one continues after the last batch handed "
                               "out); take batches from the newest iterator")
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
        if batch is END:
            state, self.L.last_pass = state
            self.L._state = state
            self.L.epoch = state.epoch
            self._finish()
            raise StopIteration
        if isinstance(batch, BaseException):
            if isinstance(batch, EmptySplitEpoch) and getattr(batch, "next_state", None) is not None:
                # this split's epoch held no valid sample: the position moves on to the next epoch (as at an epoch
                # end), so a new iteration continues there
                self.L._state, self.L.last_pass = batch.next_state, batch.tally
                self.L.epoch = batch.next_state.epoch
            elif state is not None:  # counters of the failed pass (the position stays after the last batch)
                self.L._state.counters = state
            self._finish()
            if isinstance(batch, DataError) and self.L._cache is not None:
                # the pass ended for want of data (e.g. no shard could be downloaded): stop the downloads ahead,
                # whose retries would go on logging after the error; a new iteration starts a new cache
                self.L._cache.close()
            raise batch
        self.L._state = state
        return batch

    def _finish(self) -> None:
        self.L._active = None
        self.pipe.close()
        self.pipe = None

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
