"""The producer side of ``ShardLoader``: batch assembly + decode into a ring of buffers, on a thread.

:class:`BatchAssembler` takes samples from a :class:`bmclip.data.cursor.Cursor`, decodes their images
with ``bmclip._C.Decoder.decode_batch`` straight into a ring slot (or, with ``decode=False``, checks
their headers and hands out the encoded bytes), refills the batch from the stream when samples fail,
and has the captions tokenised in a second thread while the images decode.

:class:`Pipe` runs an assembler on a background thread for one iteration and hands ``(batch, state
after it)`` pairs to the consumer through a bounded queue of ``prefetch`` items; the ring holds
``prefetch + 3`` buffers (see :func:`make_ring`). Closing a pipe (or interpreter exit) stops its
producer between samples.

Where the pixels go (:func:`batch_slots`): in the consumer's own process, a ring of buffers reused in
turn, and ``batch["image"]`` is a tensor made with ``torch.from_numpy`` over the ring's memory, so it owns
no ring storage of its own: when it is moved to shared memory (``.share_memory_()``, or pickled by
``torch.multiprocessing``) torch copies it out and the ring keeps its memory, which the decoder writes
through a raw (numpy) view. Had the batch shared the ring's storage, the move would free the memory
under the decoder (heap corruption). Inside a DataLoader worker every batch is pickled to the main
process, which holds it for as long as it likes: there each batch is decoded straight into a new buffer
in shared memory (never reused, never copied again when sent).
"""

from __future__ import annotations

import atexit
import itertools
import math
import queue
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from bmclip.data.cursor import Cursor, CursorState, EmptySplitEpoch, Sample, mix
from bmclip.data.images import MAX_JPEG_SCANS, jpeg_scan_count
from bmclip.data.loader_options import LoaderOptions
from bmclip.data.text import BackgroundTokenizer

__all__ = ["BatchAssembler", "END", "Pipe", "Stopped", "batch_slots", "make_ring", "shared_slot"]

# Where one batch is decoded: (the tensor handed out as batch["image"], or None to hand out a
# torch.from_numpy view of the buffer; the buffer the decoder writes, a numpy array)
Slot = tuple[torch.Tensor | None, np.ndarray]

# bmclip._C.Decoder's default pixel limit (Pillow's decompression-bomb error threshold), when no decoder is at hand
DEFAULT_MAX_PIXELS = 178_956_970

# Queue item that ends an epoch: (END, (state at the start of the next epoch, the finished pass's tallies))
END = object()


class Stopped(Exception):
    """The consumer closed the pipe while the producer was assembling a batch."""


def make_ring(opts: LoaderOptions) -> list[Slot | None]:
    """``prefetch + 3`` uint8 ``[N, S, S, 3]`` buffers (pinned with ``pin_memory``), as (None, numpy view).

    The consumer holds 2 (the current batch and the one whose device copy may still run), the queue
    holds ``prefetch``, the producer fills 1: batch k's buffer is reused only once the consumer takes
    batch k+2. ``decode=False`` needs no buffers. The ring's tensors live as long as the numpy views
    (each view's base); a batch is handed out as ``torch.from_numpy`` of a view (see the module docstring).
    """
    if not opts.decode:
        return [None]
    shape = (opts.batch_size, opts.image_size, opts.image_size, 3)
    ring: list[Slot | None] = []
    for _ in range(opts.ring_slots):
        t = torch.empty(shape, dtype=torch.uint8)
        if opts.pin_memory:
            t = t.pin_memory()
        ring.append((None, t.numpy()))
    return ring


def shared_slot(opts: LoaderOptions) -> Slot:
    """A new uint8 ``[N, S, S, 3]`` buffer in shared memory, handed out as itself (sending it copies nothing)."""
    shape = (opts.batch_size, opts.image_size, opts.image_size, 3)
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is not None:  # allocated in shared memory (what default_collate does in workers)
        t = torch.empty(0, dtype=torch.uint8).set_(new_shared(math.prod(shape))).view(shape)
    else:
        t = torch.empty(shape, dtype=torch.uint8).share_memory_()
    return t, t.numpy()


def batch_slots(opts: LoaderOptions, *, fresh_shared: bool) -> Iterator[Slot | None]:
    """The slot of each batch in turn: the ring (:func:`make_ring`, allocated now) or, with
    ``fresh_shared`` (DataLoader workers), a new :func:`shared_slot` per batch, allocated when it is decoded."""
    if not opts.decode:
        return itertools.repeat(None)
    if fresh_shared:
        return (shared_slot(opts) for _ in itertools.count())
    return itertools.cycle(make_ring(opts))


class BatchAssembler:
    """Assembles one batch at a time from a cursor (see :meth:`produce`).

    ``decoder``: a ``bmclip._C.Decoder``; ``image_info``: the extension's header parser (used with
    ``decode=False``; None skips the check); ``tokenizer``: captions -> ``input_ids`` off-thread.
    """

    def __init__(self, opts: LoaderOptions, decoder, image_info, tokenizer: BackgroundTokenizer | None):
        self.o = opts
        self.decoder = decoder
        self.image_info = image_info
        self.tok = tokenizer

    def _header_check(self, buf) -> str | None:
        """decode=False: reject what the C++ decoder would refuse before a DALI pipeline gets it (None = looks
        decodable): an unidentified header, more pixels than the decoder's limit, more than MAX_JPEG_SCANS
        scans, a JPEG cut before its end-of-image marker, a PNG without its IEND chunk. DALI fails a whole
        batch on each of these (its good samples lost too); here only the one sample is a counted skip. Not
        caught without decoding: damaged entropy-coded data that still ends in its marker, which DALI decodes
        (partly grey) where the C++ decoder refuses it."""
        if self.image_info is None:
            return None
        try:
            w, h, fmt = self.image_info(buf)[:3]
        except Exception as e:  # the parser's message is the skip reason
            return f"{type(e).__name__}: {e}"
        if not (w > 0 and h > 0):
            return f"image header gives size {w}x{h}"
        limit = getattr(self.decoder, "max_pixels", None) or DEFAULT_MAX_PIXELS
        if w * h > limit:
            return f"image too large: {w}x{h} pixels > limit {limit}"
        data = bytes(buf)
        if fmt == "jpeg":
            scans = jpeg_scan_count(data)
            if scans > MAX_JPEG_SCANS:
                return f"more than {MAX_JPEG_SCANS} progressive scans"
            if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):  # entropy-coded data cannot hold FFD9
                return "jpeg: premature end of data (no end-of-image marker after the last scan)"
        elif fmt == "png" and data.rfind(b"IEND") < data.rfind(b"IDAT"):
            return "png: premature end of data (no IEND chunk after the image data)"
        return None

    def _tokenize(self, texts: list[str]) -> Future | None:
        return self.tok.submit(texts) if self.tok is not None else None

    def produce(self, cursor: Cursor, slot: Slot | None,
                stop: threading.Event | None = None) -> tuple[dict[str, Any], CursorState] | None:
        """Assemble and decode one batch into ring ``slot``; (batch dict, state after it) or None at end.

        Raises DataError when a whole pass over the data (the epoch, or with ``resampled`` every sample
        of every shard) gives no valid sample, and :class:`Stopped` as soon as ``stop`` is set.
        """
        o = self.o
        out_t, out = slot if slot is not None else (None, None)
        st = cursor.st
        bs = o.batch_size
        got: list[Sample] = []
        first_tok: tuple[Future, np.ndarray] | None = None
        attempt = 0
        exhausted = False
        while len(got) < bs and not exhausted:
            if stop is not None and stop.is_set():
                raise Stopped
            cand: list[Sample] = []
            while len(got) + len(cand) < bs:
                ref = cursor.next_sample_ref()
                if ref is None:
                    exhausted = True
                    break
                s = cursor.read(ref)
                if s is not None:
                    cand.append(s)
                elif o.resampled:
                    cursor.check_resampled_pass()
                if stop is not None and stop.is_set():
                    raise Stopped
            if not cand:
                break
            # the captions of the first attempt are tokenised while it decodes; a refilled batch is
            # tokenised once at the end (so failed attempts hold no tokenised tensors)
            fut = self._tokenize([s.text for s in cand]) if attempt == 0 else None
            if o.decode:
                lo = len(got)
                dst = out[lo : lo + len(cand)]
                seed = mix(o.seed, st.epoch, st.split, st.batch, attempt)
                reasons = self.decoder.decode_batch(
                    [s.image for s in cand], dst, augment=o.augment, seed=seed, scale=o.scale,
                    ratio=o.ratio, **o.decode_options,
                )
            else:
                reasons = [self._header_check(s.image) for s in cand]
            ok = np.array([r is None for r in reasons], dtype=bool)
            for s, r in zip(cand, reasons):
                if r is not None:  # detail = the decoder's reason, so distinct details stay few
                    st.counters.count("corrupt_image", str(r))
                    cursor.note_failed(s.ref, "corrupt_image", f"{s.key}: {r}")
                else:
                    cursor.note_good()
            if o.decode and not ok.all():
                # keep the decoded rows contiguous: move the good ones down over the failed slots
                dst[: int(ok.sum())] = dst[ok]
            got.extend(s for s, k in zip(cand, ok) if k)
            if fut is not None:
                first_tok = (fut, ok)
            if o.resampled and not ok.any():
                cursor.check_resampled_pass()
            attempt += 1
        n = len(got)
        if n == 0 and exhausted and st.tally.good == 0:
            cursor.check_empty_pass()
        if n == 0 or (o.drop_last and n < bs):
            st.counters.dropped_last += n
            return None
        st.counters.samples += n
        st.counters.batches += 1
        st.batch += 1
        batch: dict[str, Any] = {"text": [s.text for s in got], "key": [s.key for s in got]}
        if o.decode:  # a worker's shared buffer as itself; a ring slot as a tensor of its own over the ring's memory
            batch["image"] = out_t[:n] if out_t is not None else torch.from_numpy(out[:n])
        else:  # zero-copy read-only views into the mapped shard (they keep the mapping alive)
            batch["image_bytes"] = [s.image for s in got]
        if any(s.json is not None for s in got):
            batch["json"] = [s.json if s.json is not None else {} for s in got]
        if first_tok is not None and attempt == 1:
            fut, ok = first_tok
            t = fut.result()  # shape-checked by BackgroundTokenizer
            batch["input_ids"] = t if ok.all() else t[torch.from_numpy(ok)]
        elif self.tok is not None:
            # refilled batch (rare): tokenise the final captions in one call, so a tokenizer that pads
            # to the longest caption of its call still gives one consistent [N, L]
            if first_tok is not None:
                first_tok[0].result()
            batch["input_ids"] = self.tok.submit(batch["text"]).result()
        return batch, cursor.snapshot()


# Producers still running when the interpreter exits (e.g. after Ctrl-C) are stopped and joined by an
# atexit handler: a daemon thread left inside the C++ decoder would be ended by the finalizing
# interpreter (pthread_exit) when it takes the GIL back, which aborts the process.
_LIVE_PIPES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_pipes() -> None:
    for pipe in list(_LIVE_PIPES):
        pipe.close(timeout=30)


class Pipe:
    """Producer thread + bounded queue for one iteration; holds no reference to the iterator.

    Queue items: ``(batch, state after it)``; at the end of an epoch ``(END, (state at the start of the
    next epoch, the pass tallies as a dict))``; on an error ``(exception, counters up to it or None)``.
    """

    def __init__(self, assembler: BatchAssembler, cursor: Cursor, slots: Iterator[Slot | None], prefetch: int):
        self.assembler, self.cursor, self.slots = assembler, cursor, slots
        self.q: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        # why the loader stopped this pipe for a newer one (its iterator then says so instead of ending quietly)
        self.superseded_by: str | None = None
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
        try:
            while not self.stop.is_set():
                batch = self.assembler.produce(self.cursor, next(self.slots), self.stop)
                if batch is None:
                    snap = self.cursor.snapshot()
                    self._put((END, (snap.next_epoch(), snap.tally.to_dict())))
                    return
                if not self._put(batch):
                    return
        except Stopped:
            return
        except EmptySplitEpoch as e:  # this split's epoch had no valid sample: the position moves to the next one
            snap = self.cursor.snapshot()
            e.next_state, e.tally = snap.next_epoch(), snap.tally.to_dict()
            self._put((e, snap.counters.copy()))
        except BaseException as e:  # surfaced in the consumer thread, never lost
            try:  # the skips that led to it, for stats()
                counters = self.cursor.st.counters.copy()
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
