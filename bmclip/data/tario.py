"""A streaming reader of webdataset tar shards in Python: members grouped into samples, read front to back.

The C++ ``ShardLoader`` indexes shards itself (``bmclip._C.TarIndex``); this module is the reader for Python
code that wants the member bytes of a shard (evaluation, which decodes with PIL and pydicom). It follows the
same rules as the C++ index:

- POSIX ustar headers plus the GNU (``L`` long names, base-256 sizes) and pax (``x`` per-file ``path`` and
  ``size`` records, ``g`` global records ignored) extensions;
- webdataset's member naming: key = folder prefix + basename up to its first dot, extension = the rest,
  lower-cased; consecutive members with the same key are one sample; a repeated extension within a sample
  keeps the first copy; a regular member whose name has no ``<key>.<ext>`` split belongs to no sample;
- a sample is complete when a header with another key or the end-of-archive marker (a zero block) follows
  it; the sample open at damage is dropped, since its members may continue past the damage.

Damage is a clear error or a counted skip, never a hang or a silent loss: the reader reads forward only,
every read is bounded by the bytes the stream still has, and it stops at the first problem. A file that is
not a tar at all (empty, or no valid first header) always raises ``DataError``. Later damage (a header whose
checksum or size field is wrong, a member or header cut off, no end-of-archive marker) raises ``DataError``
as well, unless the caller passes a ``skipped`` list: then each problem is appended to it as
``(where, reason)`` with a reason that starts with one of ``TAR_PROBLEMS``, and reading goes on with the
next shard. After a bad header the rest of the stream is scanned for headers that still look valid, and
the samples they name are reported as ``tar_lost_tail``, as the C++ loader counts them.

Opening a shard URL as a byte stream is ``open_shard_stream``, the only place that knows how: a local path
or ``file://`` URL is opened as a file; a remote URL (``s3://``, ``gs://``, ``http(s)://``, any fsspec
protocol; ``pipe:CMD``) is streamed through ``bmclip.data.remote.open_stream`` (``bmclip.io.fs``'s fsspec
layer, the training loader's timeouts and retries: a dropped or stalled read reconnects and continues where
it stopped). A remote shard that still cannot be read within its attempts is, with a ``skipped`` list, a
counted ``shard_fetch_failed`` problem (the samples it gave before stay; the one open at the failure is a
``damaged_tar_sample``), else a ``DataError``. It never hangs: every connect and every wait for data has a
timeout.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import IO, Any

from bmclip.data import remote
from bmclip.errors import DataError
from bmclip.io.fs import is_remote, local_path

__all__ = ["BLOCK", "TAR_PROBLEMS", "ShardUnavailable", "iter_samples", "iter_shard_samples", "open_shard_stream",
           "split_key"]

BLOCK = 512
_CHUNK = 1 << 20  # read size when skipping or reading large members

# Reason prefixes of the problems recorded in ``skipped`` (the names the C++ loader counts them under).
TAR_PROBLEMS = ("truncated", "bad_header", "damaged_tar_sample", "tar_lost_tail", "duplicate_member",
                "unnamed_member", "shard_fetch_failed")

_META_TYPES = (b"L", b"K", b"x", b"g", b"X")
_REGULAR_TYPES = (b"0", b"\0", b"7")
_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, directories, devices, fifos


class ShardUnavailable(DataError):
    """A remote shard that could not be opened within its attempts (``reason``: why)."""

    def __init__(self, url: str, reason: str):
        self.url, self.reason = url, reason
        super().__init__(f"cannot read shard {url}: {reason}")


def open_shard_stream(url: str, *, storage_options: dict[str, Any] | None = None,
                      fetch_options: remote.FetchOptions | dict[str, Any] | None = None) -> IO[bytes]:
    """The shard at ``url`` as a readable binary stream (see the module notes for remote URLs).

    DataError if a local shard cannot be opened, :class:`ShardUnavailable` (a DataError) if a remote one
    cannot be opened within its attempts; ImportError naming ``bmclip[cloud]`` when the fsspec backend is
    missing. ``storage_options`` go to fsspec, ``fetch_options`` are ``bmclip.data.remote.FetchOptions``.
    """
    if is_remote(url):
        try:
            return remote.open_stream(url, fetch_options=fetch_options, storage_options=storage_options)
        except remote.ShardFetchError as e:
            raise ShardUnavailable(url, str(e)) from e
    try:
        return open(local_path(url), "rb")
    except OSError as e:
        raise DataError(f"cannot open shard {url}: {e.strerror or e}") from e


def split_key(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a member name by webdataset's rule, or None when it has no such split."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0 or dot == slash + 1:
        return None
    return name[:dot], name[dot + 1 :].lower()


# ---------------------------------------------------------------- header fields


def _number(field: bytes) -> int | None:
    """A numeric header field: octal text (space/NUL padded) or GNU base-256; None when malformed."""
    if field[0] & 0x80:
        if field[0] == 0xFF:  # negative base-256: never a valid size
            return None
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.strip(b" \0")
    if not text:
        return 0
    if not all(0x30 <= c <= 0x37 for c in text):
        return None
    return int(text, 8)


def _checksum_ok(h: bytes) -> bool:
    stored = _number(h[148:156])
    if stored is None:
        return False
    body = h[:148] + b" " * 8 + h[156:]
    if stored == sum(body):  # tarfile also accepts the historic signed byte sum
        return True
    return stored == sum(c - 256 if c > 127 else c for c in body)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str] | None:
    """The ``path`` and ``size`` records of a pax header block (``LEN key=value\\n``); None when malformed."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        sp = data.find(b" ", pos)
        if sp < 0 or not data[pos:sp].isdigit():
            return None
        end = pos + int(data[pos:sp])
        if end > len(data) or end <= sp + 1 or data[end - 1] != 0x0A:
            return None
        key, eq, value = data[sp + 1 : end - 1].partition(b"=")
        if not eq:
            return None
        if key in (b"path", b"size"):
            out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos = end
    if "size" in out and not (out["size"].isdigit() and len(out["size"]) <= 19):
        return None
    return out


class _ReadFailed(Exception):
    """A remote shard's read failed within its attempts (``args[0]``: why)."""


class _Reader:
    """Forward-only reads from a byte stream with the current offset; short reads mean end of stream."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.pos = 0

    def _read(self, n: int) -> bytes:
        try:
            return self.f.read(n)
        except remote.ShardFetchError as e:
            raise _ReadFailed(str(e)) from e

    def read(self, n: int) -> bytes:
        parts, left = [], n
        while left > 0:
            b = self._read(min(left, _CHUNK))
            if not b:
                break
            parts.append(b)
            left -= len(b)
        data = b"".join(parts)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> int:
        """Read and drop up to ``n`` bytes; returns how many there were."""
        done = 0
        while done < n:
            b = self._read(min(n - done, _CHUNK))
            if not b:
                break
            done += len(b)
        self.pos += done
        return done


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _count_tail_samples(r: _Reader, open_key: str | None) -> int:
    """Samples named by the headers that still look valid in the rest of the stream (block-aligned scan)."""
    n, last = 0, open_key
    while True:
        h = r.read(BLOCK)
        if len(h) < BLOCK:
            return n
        if h.count(0) == BLOCK or not _checksum_ok(h):
            continue
        size = _number(h[124:136])
        if size is None:
            continue
        if h[156:157] in _REGULAR_TYPES:
            kx = split_key(_text(h[:100]))
            if kx is not None and kx[0] != last:
                n, last = n + 1, kx[0]
        r.skip(_padded(size))


# ---------------------------------------------------------------- samples


def iter_samples(url: str, skipped: list | None = None, stream: IO[bytes] | None = None, *,
                 storage_options: dict[str, Any] | None = None,
                 fetch_options: remote.FetchOptions | dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard in order: ``{"__key__": key, "__url__": url, <ext>: bytes, ...}``.

    ``stream`` is read instead of opening ``url`` when given (it is not closed); otherwise
    ``open_shard_stream(url, storage_options=..., fetch_options=...)`` opens it. See the module notes for
    what happens at damage or a failed remote read and what ``skipped`` receives.
    """
    if stream is None:
        try:
            f = open_shard_stream(url, storage_options=storage_options, fetch_options=fetch_options)
        except ShardUnavailable as e:
            if skipped is None:
                raise
            skipped.append((url, f"shard_fetch_failed: {e.reason}"))
            return
        with f:
            yield from iter_samples(url, skipped, f)
        return
    r = _Reader(stream)
    open_key: list[str | None] = [None]
    try:
        yield from _samples(url, r, skipped, open_key)
    except _ReadFailed as e:
        if skipped is None:
            raise DataError(f"cannot read shard {url}: {e}") from e
        skipped.append((url, f"shard_fetch_failed: {e} (at byte {r.pos})"))
        if open_key[0] is not None:
            skipped.append((open_key[0], f"damaged_tar_sample: dropped, the read of {url} failed in it"))


def _samples(url: str, r: _Reader, skipped: list | None, open_key: list[str | None]) -> Iterator[dict[str, Any]]:
    """The samples of ``iter_samples``; ``open_key[0]`` is the key of the sample being read (None between)."""
    cur: dict[str, Any] | None = None
    long_name: str | None = None
    pax: dict[str, str] = {}

    def damaged(kind: str, msg: str, tail_from_here: bool = False) -> None:
        open_key[0] = None  # reported here; a failed read of the tail must not report it again
        if skipped is None:
            raise DataError(f"corrupt shard {url}: {msg}")
        skipped.append((url, f"{kind}: {msg}"))
        if cur is not None:
            skipped.append((cur["__key__"], f"damaged_tar_sample: dropped, its members may continue past the "
                                            f"damage in {url}"))
        if tail_from_here:
            at = r.pos - BLOCK
            lost = _count_tail_samples(r, cur["__key__"] if cur is not None else None)
            if lost:
                skipped.append((url, f"tar_lost_tail: {lost} sample(s) after the damage at byte {at} not read"))

    while True:
        at = r.pos
        h = r.read(BLOCK)
        if not h:
            if at == 0:
                raise DataError(f"cannot open shard {url}: empty tar file (0 bytes)")
            damaged("truncated", f"no end-of-archive marker after {at} bytes (truncated?)")
            return
        if len(h) < BLOCK:
            if at == 0:
                raise DataError(f"cannot open shard {url}: not a tar file ({len(h)} bytes, less than one header)")
            damaged("truncated", f"partial header at byte {at} (truncated?)")
            return
        if h.count(0) == BLOCK:  # end-of-archive marker (tarfile also stops at the first zero block)
            open_key[0] = None
            if cur is not None:
                yield cur
            return
        if at == 0 and not _checksum_ok(h):
            raise DataError(f"cannot open shard {url}: bad tar header, not a tar file")
        if not _checksum_ok(h):
            damaged("bad_header", f"bad header checksum at byte {at}", tail_from_here=True)
            return
        size = _number(h[124:136])
        if size is None:
            damaged("bad_header", f"bad size field at byte {at}", tail_from_here=True)
            return
        kind = h[156:157]
        if kind in _META_TYPES:
            data = r.read(size)
            if len(data) < size:
                damaged("truncated", f"header at byte {at} needs {size} bytes, {len(data)} left")
                return
            r.skip(_padded(size) - size)
            if kind == b"L":
                long_name = _text(data)
            elif kind in (b"x", b"X"):
                rec = _pax_records(data)
                if rec is None:
                    damaged("bad_header", f"bad pax header at byte {at}", tail_from_here=True)
                    return
                pax.update(rec)
            continue  # 'K' (long link name) and 'g' (global records) do not name members
        if "size" in pax:
            size = int(pax["size"])
        if "path" in pax:
            name = pax["path"]
        elif long_name is not None:
            name = long_name
        else:
            name = _text(h[:100])
            if h[257:263] == b"ustar\0" and h[345:500].strip(b"\0"):  # POSIX ustar prefix + name
                name = _text(h[345:500]) + "/" + name
        long_name, pax = None, {}
        if kind in _NO_DATA_TYPES:
            continue
        regular = kind in _REGULAR_TYPES and not (kind == b"\0" and name.endswith("/"))
        kx = split_key(name) if regular else None
        if kx is not None and (cur is None or kx[0] != cur["__key__"]):
            if cur is not None:
                yield cur  # a complete header with another key: the open sample is complete
            cur = {"__key__": kx[0], "__url__": url}
            open_key[0] = kx[0]
        data = r.read(size)
        if len(data) < size:
            damaged("truncated", f"member {name!r} at byte {at} needs {size} bytes, {len(data)} left")
            return
        r.skip(_padded(size) - size)
        if kx is None:
            if regular and skipped is not None:
                skipped.append((name, f"unnamed_member: {name!r} in {url} has no <key>.<ext> name"))
            continue
        if kx[1] in cur:
            if skipped is None:
                raise DataError(f"shard {url}: duplicate member {name!r} at byte {at}")
            skipped.append((cur["__key__"], f"duplicate_member: {name!r} at byte {at} in {url}, first copy kept"))
            continue
        cur[kx[1]] = data


def iter_shard_samples(urls: Iterable[str], skipped: list | None = None, *,
                       storage_options: dict[str, Any] | None = None,
                       fetch_options: remote.FetchOptions | dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of several shards in order (see ``iter_samples``)."""
    for url in urls:
        yield from iter_samples(url, skipped, storage_options=storage_options, fetch_options=fetch_options)
