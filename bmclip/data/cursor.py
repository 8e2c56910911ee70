"""The sample stream of one loader split as an explicit, copyable cursor: what an exact resume saves.

:class:`CursorState` is the whole position of one split (rank * workers + worker) in the data: epoch,
shard cursor, position in the shard, the shuffle buffer as (shard, sample index) references, the two
generators' states, the batch counter, the skip counters (:class:`Counters`) and the tallies of the
current pass (:class:`PassTally`). ``to_dict()`` / ``from_dict()`` convert it to and from the plain,
JSON-serialisable dict that ``ShardLoader.state_dict()`` hands out and checkpoints hold (state version 1;
the layout is unchanged since it was a dict, so old checkpoints load).

:class:`Cursor` walks a state forward: the epoch's shard plan (``bmclip.data.shards``), the seeded
shuffle buffer, and materialising a reference into a :class:`Sample` (zero-copy image bytes, caption,
json). Unusable samples are counted skips (``Counters.skipped`` by reason) and tallied for the
"no valid sample in a whole pass" diagnosis (:func:`no_valid_message`).

Sample members: the image is the first of ``bmclip.data.images.DECODED_EXTENSIONS`` present; a sample
whose only images have another of ``IMAGE_EXTENSIONS`` (e.g. ``.webp``) is skipped as
``unsupported_image_format``; one with no image at all as ``missing_image``. The caption is ``txt``
(UTF-8), and ``json`` is parsed when present.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from bmclip.data.images import DECODED_EXTENSIONS, IMAGE_EXTENSIONS
from bmclip.data.shards import shard_order, split_shards
from bmclip.errors import ConfigError, DataError, is_int

__all__ = ["Counters", "Cursor", "CursorState", "EmptySplitEpoch", "PassTally", "Sample", "SHARD_REASONS",
           "STATE_VERSION", "TEXT_EXTENSIONS", "mix", "no_valid_message"]

STATE_VERSION = 1
TEXT_EXTENSIONS = ("txt",)
# Skip reasons that count shards, not samples (kept in ``skipped`` for history; not in samples_skipped)
SHARD_REASONS = ("truncated_tar", "unreadable_shard", "shard_fetch_failed")
# distinct reason strings kept verbatim in skip_details / tar_errors (bounded so a bad shard can't grow them)
MAX_DETAILS = 200
_MASK64 = (1 << 64) - 1


def mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 chain): decorrelates (seed, epoch, split, batch)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def _rng_state(*values: int) -> dict[str, Any]:
    return np.random.Generator(np.random.PCG64(mix(*values))).bit_generator.state


def _generator(state: dict[str, Any]) -> np.random.Generator:
    g = np.random.Generator(np.random.PCG64())
    g.bit_generator.state = state
    return g


def _known(cls, d: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that are fields of dataclass ``cls`` (missing ones take their defaults)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class Counters:
    """Running counts since the loader was built (carried across epochs; see ``ShardLoader.stats``)."""

    samples: int = 0
    batches: int = 0
    shards_opened: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skip_details: dict[str, int] = field(default_factory=dict)
    tar_errors: list[str] = field(default_factory=list)
    bad_json: int = 0
    dropped_last: int = 0
    tar_damaged_shards: int = 0
    lost_tail_bytes: int = 0
    example_error: str | None = None

    def count(self, reason: str, detail: str) -> None:
        """One skip for ``reason``; ``detail`` is tallied verbatim while fewer than MAX_DETAILS are kept."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        det = self.skip_details
        if detail in det or len(det) < MAX_DETAILS:
            det[detail] = det.get(detail, 0) + 1

    def add(self, reason: str, n: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def copy(self) -> Counters:
        return Counters(**{**vars(self), "skipped": dict(self.skipped), "skip_details": dict(self.skip_details),
                           "tar_errors": list(self.tar_errors)})

    def to_dict(self) -> dict[str, Any]:
        return vars(self.copy())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Counters:
        return cls(**_known(cls, d)).copy()


@dataclass
class PassTally:
    """Tallies of the current pass over the data (reset each epoch), for the no-valid-sample diagnosis.

    With ``resampled`` there is no epoch: ``tried``/``reasons``/``example`` then describe the failures
    since the last valid sample. ``damage``: {kind: [shards, first detail]} of damaged shards.
    """

    good: int = 0
    tried: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    example: str | None = None
    tar_samples: int = 0
    shards_seen: int = 0
    damage: dict[str, list] = field(default_factory=dict)

    def copy(self) -> PassTally:
        return PassTally(**{**vars(self), "reasons": dict(self.reasons),
                            "damage": {k: list(v) for k, v in self.damage.items()}})

    def to_dict(self) -> dict[str, Any]:
        return vars(self.copy())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PassTally:
        return cls(**_known(cls, d)).copy()


@dataclass
class CursorState:
    """The position of one split after the last batch handed out (see the module docstring).

    The first six fields name the stream it belongs to; a state only resumes a loader with the same
    values (``ShardLoader.load_state_dict`` checks them). ``names_sha1`` (the shards' file names, not their
    location) lets a state resume the same shards moved elsewhere; states saved before it have "".
    """

    urls_sha1: str
    n_shards: int
    seed: int
    shuffle: bool
    resampled: bool
    shuffle_buffer: int
    split: int
    n_splits: int
    epoch: int
    shard_pos: int = 0  # shards of this epoch's plan started so far
    shard: int | None = None  # the shard being read (None: between shards)
    sample_pos: int = 0  # samples of this split taken from that shard
    buffer: list[tuple[int, int]] = field(default_factory=list)  # shuffle buffer (shard, index) refs
    rng: dict[str, Any] = field(default_factory=dict)  # PCG64 state: shuffle-buffer picks
    shard_rng: dict[str, Any] = field(default_factory=dict)  # PCG64 state: resampled shard draws
    batch: int = 0  # batches of this epoch handed out (seeds the crops)
    counters: Counters = field(default_factory=Counters)
    tally: PassTally = field(default_factory=PassTally)  # "pass" in the dict form
    names_sha1: str = ""  # shards.shard_names_digest of the URLs ("" in states saved before it existed)

    @classmethod
    def fresh(cls, *, urls_sha1: str, n_shards: int, seed: int, shuffle: bool, resampled: bool,
              shuffle_buffer: int, split: int, n_splits: int, epoch: int,
              counters: Counters | None = None, names_sha1: str = "") -> CursorState:
        """The start of ``epoch`` for ``split`` (generators seeded by (seed, epoch, split))."""
        return cls(urls_sha1=urls_sha1, n_shards=n_shards, seed=seed, shuffle=shuffle, resampled=resampled,
                   shuffle_buffer=shuffle_buffer, split=split, n_splits=n_splits, epoch=int(epoch),
                   rng=_rng_state(seed, epoch, split, 1), shard_rng=_rng_state(seed, epoch, split, 2),
                   counters=counters if counters is not None else Counters(), names_sha1=names_sha1)

    def restart(self, *, epoch: int | None = None, split: int | None = None,
                n_splits: int | None = None) -> CursorState:
        """The start of ``epoch`` (default: this one) for ``split`` (default: this one), counters carried."""
        return CursorState.fresh(
            urls_sha1=self.urls_sha1, n_shards=self.n_shards, seed=self.seed, shuffle=self.shuffle,
            resampled=self.resampled, shuffle_buffer=self.shuffle_buffer,
            split=self.split if split is None else split, n_splits=self.n_splits if n_splits is None else n_splits,
            epoch=self.epoch if epoch is None else epoch, counters=self.counters.copy(), names_sha1=self.names_sha1)

    def next_epoch(self) -> CursorState:
        return self.restart(epoch=self.epoch + 1)

    @property
    def untouched(self) -> bool:
        """At the start of an epoch with nothing read yet."""
        return self.shard is None and self.shard_pos == 0 and not self.buffer

    def copy(self) -> CursorState:
        return CursorState(**{**vars(self), "buffer": list(self.buffer), "rng": copy.deepcopy(self.rng),
                              "shard_rng": copy.deepcopy(self.shard_rng), "counters": self.counters.copy(),
                              "tally": self.tally.copy()})

    def to_dict(self) -> dict[str, Any]:
        """The plain dict of ``ShardLoader.state_dict()`` (JSON-serialisable, no sample bytes)."""
        d = vars(self.copy())
        d["counters"] = self.counters.to_dict()
        d["pass"] = self.tally.to_dict()
        del d["tally"]
        return {"version": STATE_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CursorState:
        """Parse a ``to_dict()`` (also one from before the pass tallies were saved); raises ConfigError."""
        if not isinstance(d, dict) or d.get("version") != STATE_VERSION:
            raise ConfigError(f"not a ShardLoader state (version {STATE_VERSION}): {type(d).__name__}")
        try:
            kw = _known(cls, d)
            kw["buffer"] = [(int(s), int(i)) for s, i in d["buffer"]]
            kw["counters"] = Counters.from_dict(d["counters"])
            # saved before the pass tallies existed: assume the epoch so far had valid samples
            kw["tally"] = PassTally.from_dict(d["pass"]) if "pass" in d else PassTally(good=1)
            kw["rng"], kw["shard_rng"] = copy.deepcopy(d["rng"]), copy.deepcopy(d["shard_rng"])
            st = cls(**kw)
            st._check()
            return st
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"damaged ShardLoader state ({type(e).__name__}: {e})") from e

    def _check(self) -> None:
        """ValueError naming the first field out of its type or range (a state edited by hand, or another
        program's): found here, not as an IndexError at the first batch after the resume."""
        def integer(name: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, name)
            if not is_int(v) or v < lo or (hi is not None and v > hi):
                raise ValueError(f"{name}={v!r} is not an integer in [{lo}, {'...' if hi is None else hi}]")

        for name in ("urls_sha1", "names_sha1"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} is not a string")
        for name in ("shuffle", "resampled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} is not true or false")
        if not is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} is not an integer")
        integer("n_shards", 1)
        integer("n_splits", 1)
        integer("split", 0, self.n_splits - 1)
        for name in ("shuffle_buffer", "epoch", "sample_pos", "batch"):
            integer(name, 0)
        integer("shard_pos", 0, self.n_shards if not self.resampled else None)
        if self.shard is not None:
            integer("shard", 0, self.n_shards - 1)
        bad = next(((s, i) for s, i in self.buffer if not 0 <= s < self.n_shards or i < 0), None)
        if bad is not None:
            raise ValueError(f"buffer reference {bad} is outside the {self.n_shards} shards")
        for name in ("rng", "shard_rng"):
            try:
                _generator(getattr(self, name))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{name} is not a PCG64 generator state ({e})") from None


@dataclass(slots=True)
class Sample:
    ref: tuple[int, int]
    key: str
    image: Any  # zero-copy uint8 view of the encoded image
    text: str
    json: dict | None


def _image_member(members: dict[str, tuple[int, int]]) -> tuple[int, int] | None:
    for ext in DECODED_EXTENSIONS:  # in preference order
        m = members.get(ext)
        if m is not None:
            return m
    return None


_UNDECODED = tuple(e for e in IMAGE_EXTENSIONS if e not in DECODED_EXTENSIONS)


class Cursor:
    """Walks a :class:`CursorState` forward through the samples of its split.

    ``open_index(shard, ahead)`` returns the shard's ``bmclip._C.TarIndex`` or None when it cannot be opened
    (a counted skip); ``ahead`` lists the ``prefetch_shards`` shards this split opens next (for a download
    cache; empty when ``prefetch_shards`` is 0). ``fetch_failure(shard)`` says why a shard that could not be
    opened failed to download (None: it was not a download failure). The state is the cursor's own (mutated
    in place); :meth:`snapshot` copies it.
    """

    def __init__(self, state: CursorState, urls: Sequence[str], open_index: Callable[[int, Sequence[int]], Any],
                 *, prefetch_shards: int = 0, fetch_failure: Callable[[int], str | None] | None = None):
        self.st = state
        self.urls = urls
        self._open_index = open_index
        self.prefetch_shards = prefetch_shards
        self._fetch_failure = fetch_failure
        self._index_cache: dict[int, Any] = {}
        self._samples_cache: dict[int, list] = {}
        self._epoch_plan: tuple[int, list[int], int, int] | None = None
        self.rng = _generator(state.rng)
        self.shard_rng = _generator(state.shard_rng)
        # resampled: which samples of which shard failed since the last valid one (1 byte per sample);
        # when every sample of every shard has failed, a whole pass yielded nothing valid
        self._failed: dict[int, np.ndarray] = {}
        self._n_failed = 0
        self._sizes: dict[int, int] = {}
        self._seen: set[int] = set()  # shards already tallied in st.tally

    # -- shard access -------------------------------------------------------------------------
    def plan(self) -> tuple[list[int], int, int]:
        """This epoch's shards for the split, and the (mod, rem) sample filter within each shard."""
        st = self.st
        if self._epoch_plan is None or self._epoch_plan[0] != st.epoch:
            order = shard_order(st.n_shards, st.seed, st.epoch, st.shuffle)
            shards, mod, rem = split_shards(order, st.split, st.n_splits)
            self._epoch_plan = (st.epoch, shards, mod, rem)
        return self._epoch_plan[1], self._epoch_plan[2], self._epoch_plan[3]

    def _filter(self) -> tuple[int, int]:
        return (1, 0) if self.st.resampled else self.plan()[1:]

    def index(self, shard: int):
        idx = self._index_cache.get(shard)
        if idx is None:
            idx = self._open_index(shard, self.ahead() if self.prefetch_shards else ())
            self._index_cache[shard] = idx
            self._samples_cache[shard] = idx.samples() if idx is not None else []
        return idx

    def ahead(self) -> list[int]:
        """The ``prefetch_shards`` shards this split opens next, in order: those the shuffle buffer references but
        has not opened (after a resume), then the plan's next ones (into the next epoch; resampled: the next
        draws of a copy of the shard generator, which is left untouched)."""
        k, st = self.prefetch_shards, self.st
        out = [s for s in dict.fromkeys(r[0] for r in st.buffer) if s not in self._index_cache]
        if st.resampled:
            g = _generator(self.shard_rng.bit_generator.state)
            out += [int(g.integers(len(self.urls))) for _ in range(k)]
        else:
            out += self.plan()[0][st.shard_pos:][:k]
            if len(out) < k:
                order = shard_order(st.n_shards, st.seed, st.epoch + 1, st.shuffle)
                out += split_shards(order, st.split, st.n_splits)[0][:k]
        return out[:k]

    def _evict(self) -> None:
        live = {r[0] for r in self.st.buffer}
        if self.st.shard is not None:
            live.add(self.st.shard)
        for s in [s for s in self._index_cache if s not in live]:
            del self._index_cache[s]
            del self._samples_cache[s]

    def _start_shard(self, shard: int) -> None:
        st = self.st
        st.shard, st.sample_pos = shard, 0
        self._evict()
        idx = self.index(shard)
        c = st.counters
        url = self.urls[shard]
        if idx is None:
            failed = self._fetch_failure(shard) if self._fetch_failure is not None else None
            if failed:  # a remote shard whose download failed within its attempts (logged by the cache)
                c.count("shard_fetch_failed", f"{url}: {failed}")
                self._note_shard(shard, "fetch_failed", 0, f"{url}: {failed}")
            else:
                c.count("unreadable_shard", f"unreadable shard {url}")
                self._note_shard(shard, "unreadable", 0, f"cannot open {url}")
            c.tar_damaged_shards += 1
            self._sizes[shard] = 0
            return
        c.shards_opened += 1
        n = len(self._samples_cache[shard])
        damage = str(getattr(idx, "damage", "truncated" if idx.truncated else ""))
        self._note_shard(shard, damage, n, f"{url}: {list(idx.errors)[0]}" if idx.errors else url)
        mod, rem = self._filter()
        self._sizes[shard] = (n - rem + mod - 1) // mod if n > rem else 0
        if idx.truncated or idx.errors:
            if idx.truncated:
                c.count("truncated_tar", f"truncated tar {url}")
                c.tar_damaged_shards += 1
                c.lost_tail_bytes += int(getattr(idx, "lost_tail_bytes", 0))
            dropped = int(getattr(idx, "dropped", 0))
            if dropped:  # samples the indexer could not keep (damaged at or inside them)
                c.add("damaged_tar_sample", dropped)
            lost = int(getattr(idx, "lost_tail_samples", 0))
            if lost:  # complete samples after a bad header: never read, since parsing stops there
                c.add("tar_lost_tail", lost)
            if len(c.tar_errors) < MAX_DETAILS:
                c.tar_errors.extend(f"{url}: {e}" for e in list(idx.errors)[:8])

    # -- pass bookkeeping ----------------------------------------------------------------------
    def _note_shard(self, shard: int, damage: str, n: int, detail: str) -> None:
        if shard in self._seen:
            return
        self._seen.add(shard)
        p = self.st.tally
        p.shards_seen += 1
        p.tar_samples += n
        if damage:
            d = p.damage.setdefault(damage, [0, detail])
            d[0] += 1

    def note_good(self) -> None:
        p = self.st.tally
        p.good += 1
        if self.st.resampled and p.tried:  # resampled: the tallies describe the failures since the last valid one
            p.tried, p.reasons, p.example = 0, {}, None
        if self._n_failed:
            self._failed.clear()
            self._n_failed = 0

    def note_failed(self, ref: tuple[int, int], reason: str, detail: str) -> None:
        p = self.st.tally
        p.tried += 1
        p.reasons[reason] = p.reasons.get(reason, 0) + 1
        if p.example is None:
            p.example = detail
        c = self.st.counters
        if c.example_error is None:
            c.example_error = detail
        if self.st.resampled:
            shard, i = ref
            arr = self._failed.get(shard)
            if arr is None:
                arr = self._failed[shard] = np.zeros(max(self._sizes.get(shard, 0), i + 1), dtype=bool)
            elif i >= len(arr):
                arr = self._failed[shard] = np.concatenate([arr, np.zeros(i + 1 - len(arr), dtype=bool)])
            if not arr[i]:
                arr[i] = True
                self._n_failed += 1

    def skip(self, ref: tuple[int, int], reason: str, detail: str) -> None:
        """A counted skip of the sample ``ref``."""
        self.st.counters.count(reason, detail)
        self.note_failed(ref, reason, detail)

    def check_resampled_pass(self) -> None:
        """Resampled: raise once every sample of every shard has failed since the last valid sample."""
        if len(self._sizes) < len(self.urls):
            return
        if self._n_failed >= sum(self._sizes.values()):
            raise DataError(no_valid_message(self.urls, self.st, resampled=True, distinct=self._n_failed))

    def check_empty_pass(self) -> None:
        """End of an epoch without a single valid sample: raise DataError naming the cause.

        With several splits (ranks x workers) the message names this split's shards of the epoch, and the error is
        :class:`EmptySplitEpoch`: other splits may still have data, and (when the shards are shuffled per epoch)
        this split may get other shards in the next one. A split that tried no sample while its shards hold some
        (more splits than samples) just ends.
        """
        st, p = self.st, self.st.tally
        if p.tried > 0 or p.tar_samples == 0:
            if st.n_splits == 1:
                raise DataError(no_valid_message(self.urls, st, resampled=False))
            mine = [self.urls[i] for i in self.plan()[0]]
            raise EmptySplitEpoch(no_valid_message(mine, st, resampled=False),
                                  reassigned=st.shuffle and st.n_shards >= st.n_splits)

    # -- the stream ---------------------------------------------------------------------------
    def next_ref(self) -> tuple[int, int] | None:
        """The next (shard, sample index) of this split in stream order, or None at epoch end."""
        st = self.st
        empty_draws = 0
        mod, rem = self._filter()
        while True:
            if st.shard is None:
                if st.resampled:
                    shard = int(self.shard_rng.integers(len(self.urls)))
                else:
                    shards, _, _ = self.plan()
                    if st.shard_pos >= len(shards):
                        return None
                    shard = shards[st.shard_pos]
                st.shard_pos += 1
                self._start_shard(shard)
            shard = st.shard
            samples = self._samples_cache.get(shard)
            if samples is None:  # resumed inside a shard: open it again
                self.index(shard)
                samples = self._samples_cache[shard]
            i = st.sample_pos * mod + rem
            if i < len(samples):
                st.sample_pos += 1
                return shard, i
            st.shard = None
            if st.resampled:
                empty_draws += 1
                # every shard opened and none had a sample left to try: no pass can yield anything
                if empty_draws % (len(self.urls) + 1) == 0:
                    self.check_resampled_pass()

    def next_sample_ref(self) -> tuple[int, int] | None:
        """Next reference after the shuffle buffer (seeded pick from a full buffer)."""
        size = self.st.shuffle_buffer
        buf = self.st.buffer
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

    def snapshot(self) -> CursorState:
        """A deep copy of the cursor with the generators' current states (taken per batch, not per pick)."""
        self.st.rng = self.rng.bit_generator.state
        self.st.shard_rng = self.shard_rng.bit_generator.state
        return self.st.copy()

    def read(self, ref: tuple[int, int]) -> Sample | None:
        """Materialise a reference: zero-copy image bytes + caption; None (counted) when unusable."""
        shard, i = ref
        idx = self.index(shard)
        if idx is None:  # the shard could not be reopened for a buffered reference (resume after it vanished)
            self.st.counters.count("unreadable_shard", f"unreadable shard {self.urls[shard]}")
            self.note_failed(ref, "unreadable_shard", f"cannot open {self.urls[shard]}")
            return None
        key, members = self._samples_cache[shard][i]
        img = _image_member(members)
        if img is None:
            other = [e for e in _UNDECODED if e in members]
            if other:
                self.skip(ref, "unsupported_image_format",
                          f"{other[0]} image, the loader decodes {'/'.join(DECODED_EXTENSIONS)}: {key}")
            else:
                self.skip(ref, "missing_image", f"no image member ({'/'.join(IMAGE_EXTENSIONS)}): {key}")
            return None
        txt = members.get(TEXT_EXTENSIONS[0])
        if txt is None:
            self.skip(ref, "missing_caption", f"no txt member: {key}")
            return None
        try:
            text = bytes(idx.read(*txt)).decode("utf-8").strip()
        except UnicodeDecodeError:
            self.skip(ref, "bad_caption_encoding", f"caption is not UTF-8: {key}")
            return None
        if not text:
            self.skip(ref, "empty_caption", f"empty caption: {key}")
            return None
        js = None
        if "json" in members:
            try:
                js = json.loads(bytes(idx.read(*members["json"])))
                if not isinstance(js, dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError):  # malformed, not UTF-8, or nested beyond the parser's depth
                self.st.counters.bad_json += 1
                js = {}
        return Sample(ref, key, idx.read(*img), text, js)


class EmptySplitEpoch(DataError):
    """One split's (rank x worker's) epoch gave no valid sample; other splits may have data. The loader's state has
    moved on to the next epoch, so a new iteration continues there. ``reassigned``: the next epoch may give this
    split other shards (they are shuffled per epoch and split whole), so trying it can help."""

    def __init__(self, msg: str, *, reassigned: bool):
        super().__init__(msg)
        self.reassigned = reassigned


def no_valid_message(urls: Sequence[str], st: CursorState, *, resampled: bool, distinct: int = 0) -> str:
    """Why a whole pass over the data gave no valid sample, with the counts (one cause per message). ``urls``: the
    shards the pass read (a split's own shards of the epoch when there are several splits)."""
    p = st.tally
    n_urls = len(urls)
    where = f"{n_urls} shard{'s' if n_urls != 1 else ''} ({urls[0]}{', ...' if n_urls > 1 else ''})"
    what = "a whole pass over the data (resampled)" if resampled else "a whole epoch"
    lead = "no samples: "
    if st.n_splits > 1 and not resampled:
        what += f" of split {st.split}/{st.n_splits}"
        where = f"its {where}"
        lead = f"no samples in split {st.split}/{st.n_splits} (epoch {st.epoch}): "
    if p.tried == 0 and p.tar_samples == 0:
        kinds = p.damage
        seen = p.shards_seen
        if set(kinds) == {"empty"} and kinds["empty"][0] == seen:
            return f"{lead}{where}: every shard is an empty tar file (0 bytes)"
        if "bad_header" in kinds:
            n, err = kinds["bad_header"]
            return f"{lead}bad tar header in {n} of {seen} shard(s) of {where} ({err}); is it a tar file?"
        if set(kinds) == {"unreadable"}:
            return f"{lead}{where}: no shard could be opened ({kinds['unreadable'][1]})"
        if "fetch_failed" in kinds and set(kinds) <= {"fetch_failed", "unreadable"}:
            n, err = kinds["fetch_failed"]
            return f"{lead}{where}: {n} of {seen} shard(s) could not be downloaded ({err})"
        if "truncated" in kinds:
            return (f"{lead}{where}: the tar data ends before the first complete sample "
                    f"({kinds['truncated'][1]})")
        if "empty" in kinds:
            return (f"{lead}{where}: {kinds['empty'][0]} of {seen} shard(s) are empty tar files, "
                    "the rest hold none")
        return (f"{lead}{where} hold no webdataset members (files named <key>.<ext>, e.g. "
                "0001.jpg + 0001.txt)")
    if p.tried == 0:
        return f"no samples in {what} over {where}"
    reasons = p.reasons
    total = distinct or p.tried
    tries = f" ({p.tried} tries)" if distinct and p.tried != distinct else ""
    listed = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    if set(reasons) == {"corrupt_image"}:
        head = f"all {total} images in {what}{tries} are undecodable"
    elif set(reasons) == {"unsupported_image_format"}:
        head = (f"all {total} images in {what}{tries} are in formats the loader does not decode "
                f"(it decodes {'/'.join(DECODED_EXTENSIONS)}; re-encode them, e.g. with bmclip build-dataset)")
    else:
        head = f"all {total} samples in {what}{tries} were skipped ({listed})"
    return f"no valid sample: {head} in {where}; e.g. {p.example}"
