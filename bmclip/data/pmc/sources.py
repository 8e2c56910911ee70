"""Input readers: PMC OA package tarballs (streamed), extracted article folders, PMC Cloud article folders.

Three input layouts are recognised, in any mix, given as files or as directory trees holding many:

- **OA package tarball** ``PMC1234567.tar.gz`` (also ``.tgz``/``.tar``): read as a stream, never
  extracted: gzip (multi-member too), bzip2 and xz are decompressed by their own readers, the tar stream by
  ``tarfile`` mode ``r|``. Only the XML (``.nxml``/``.xml``) and image members are kept: in memory up to
  ``MEMORY_BUDGET_BYTES`` per package, the rest in an anonymous temporary file (gone when the package is
  done, or the process dies), so a package's memory does not grow with its content. Members with unsafe
  names (absolute, ``..``, drive letters), links and devices are refused and counted (``unsafe_member``;
  a ``./`` directory entry is not one); members above ``max_member_bytes`` are skipped and counted; two
  image members with one file name (in different folders, or differing only in case) are both left
  unused and counted (``duplicate_media_name``): a figure is never paired with a guess; a package whose
  uncompressed stream exceeds ``max_package_bytes`` (a gzip bomb) is refused as ``package_too_large``.
  A truncated or damaged gzip or tar stream makes the whole package a counted ``corrupt_package`` skip (all
  or nothing, so that the result never depends on where a file happens to be cut): a bad member header
  anywhere, an archive that ends without its end-of-archive block, a gzip CRC or length mismatch, bytes
  after the gzip data that are not another gzip member.
- **Extracted article folder**: a directory holding the article XML and its media files (what an
  untarred OA package, eLife/PLOS bundles, Europe PMC ``fulltext.xml`` folders look like). If any
  ``.nxml`` is present only those are read (OA packages carry other XML, e.g. supplementary data).
  A symbolic link whose target lies outside the folder is refused and counted (``unsafe_member``); files
  above ``max_member_bytes`` are skipped and counted as for tarball members.
- **PMC Cloud article folder** (the per-article layout of the PMC Cloud Service on AWS,
  ``s3://pmc-oa-opendata/PMC<id>.<version>/``): ``PMC<id>.<version>.xml`` (JATS),
  ``PMC<id>.<version>.json`` (metadata: ``pmcid``, ``version``, ``license_code``, ``is_retracted``,
  ``xml_url``, ``media_urls`` ...), ``PMC<id>.<version>.txt``/``.pdf`` and the media files under their
  original names. Only ``PMC<id>.<version>.xml`` is parsed; when several versions of one PMCID are
  given, only the highest version is used (the others are counted as ``superseded_version``); the
  JSON's ``license_code`` fills a missing licence and ``is_retracted: true`` skips the article.

Directories that hold none of these but contain packages deeper down are walked recursively (sorted).

Inputs may also be remote (:mod:`~bmclip.io.fs`): an object-store prefix (``s3://bucket/prefix/``,
``gs://...``; PMC's Open Access data set is an S3 bucket) is listed recursively and read as the same tree
would be on disk, giving the same package keys as a local copy of it; ``http(s)://`` inputs are single
package tarballs. A remote tarball is streamed through fsspec (never copied to disk); a remote folder's XML
is read and its images are fetched when a figure uses them. Remote operations are retried with exponential
backoff (``READ_ATTEMPTS``); one that still fails raises :class:`InputReadError`, which stops the stage
instead of being recorded as a skipped package (a rerun resumes).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import stat
import tarfile
import tempfile
import weakref
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TypeVar

from bmclip.data.images import IMAGE_EXTENSIONS
from bmclip.errors import ConfigError, DataError
from bmclip.io.fs import filesystem, is_remote, local_path, location_name
from bmclip.io.retry import RetryError, is_transient, retry

__all__ = [
    "InputReadError",
    "Package",
    "PackageContent",
    "PackageError",
    "discover_packages",
    "read_package",
    "slice_of",
]

T = TypeVar("T")

# Remote reads (listing, package streams, folder files) are retried with exponential backoff; one that
# still fails raises InputReadError, which stops the stage (finished chunks are kept, a rerun resumes):
# a network failure is never recorded as a skipped package.
READ_ATTEMPTS = 5
READ_BASE_DELAY = 1.0
READ_MAX_DELAY = 30.0

XML_EXTS = (".nxml", ".xml")
# package members taken as figure images (the builder re-encodes every one of them)
IMAGE_EXTS = tuple(f".{e}" for e in IMAGE_EXTENSIONS)
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_CLOUD_DIR = re.compile(r"^(PMC\d+)\.(\d+)$")

# A package's kept members (XML and images) stay in memory up to this many bytes in all; the rest go to an
# anonymous temporary file (in TMPDIR), read back when a figure uses them: a package's peak memory does not
# grow with its content (a 10 MB gzip of zeros named .jpg once made 9 GB of bytes objects).
MEMORY_BUDGET_BYTES = 64 << 20
_COPY_CHUNK = 1 << 20  # members going to the temporary file are copied in pieces of this size
_TAR_BUFSIZE = 1 << 16  # tarfile's stream reads: skipping a member reads through it in pieces of this size
# tarfile reads a pax extended header or a GNU long name whole: a bigger one is not a name or a date
_MAX_META_HEADER_BYTES = 1 << 20
_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
               tarfile.GNUTYPE_LONGLINK)


class InputReadError(DataError):
    """A remote input could not be read (after retries): the build stops rather than skip the package."""


def _transient(e: BaseException) -> bool:
    """Another attempt of a remote read may succeed (``io.retry.is_transient``; an unusable package is final)."""
    return is_transient(e, (PackageError,))


def _remote_call(fn: Callable[[], T], what: str) -> T:
    """``fn()`` (a remote operation), retried; a final failure raises InputReadError naming ``what``."""
    try:
        return retry(fn, attempts=READ_ATTEMPTS, base_delay=READ_BASE_DELAY, max_delay=READ_MAX_DELAY,
                     retry_on=_transient, what=what)
    except (ConfigError, PackageError, InputReadError):
        raise
    except RetryError as e:
        raise InputReadError(f"{e}; finished chunks are kept: rerun the same command to resume") from e
    except Exception as e:
        raise InputReadError(f"{what} failed: {type(e).__name__}: {e}") from e


class PackageError(Exception):
    """A whole package is unusable; ``reason`` is the counted skip reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Package:
    """One input unit: ``key`` (stable name used for ordering, slicing and resume), kind and path."""

    key: str
    kind: str  # "tar" | "folder" | "pmc_cloud"
    path: str


@dataclass
class PackageContent:
    """What the builder needs from a package: XML documents, media (by file name) and cloud metadata.

    ``xml`` is a sequence of (name, bytes) and ``media`` a mapping file name -> bytes whose bytes may be read
    (from a temporary file, or the folder) only when asked for: keep the object no longer than the package.
    """

    xml: Sequence[tuple[str, bytes]]
    media: Mapping[str, bytes | str]  # file name (no directories) -> bytes (a path is accepted too)
    meta: dict | None = None
    skips: Counter = field(default_factory=Counter)


def _is_tar_name(name: str) -> bool:
    n = name.lower()
    return any(n.endswith(s) for s in TAR_SUFFIXES)


def _is_tar(p: Path) -> bool:
    return _is_tar_name(p.name)


def _is_cloud_dir(name: str, filenames: list[str]) -> bool:
    return _CLOUD_DIR.match(name) is not None and f"{name}.xml" in filenames


def _has_xml(names: list[str]) -> bool:
    return any(n.lower().endswith(XML_EXTS) for n in names)


def _local_walk(root: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk of ``root`` as (relative dir, dirnames, filenames); the caller may prune ``dirnames``."""
    for dirpath, dirnames, filenames in os.walk(root):
        yield Path(dirpath).relative_to(root).as_posix(), dirnames, filenames


def _listing_walk(files: list[str]) -> Iterator[tuple[str, list[str], list[str]]]:
    """What os.walk gives, top-down, for a flat listing of relative file paths (an object-store prefix)."""
    dirs: dict[str, tuple[set[str], list[str]]] = {".": (set(), [])}
    for rel in files:
        parts = rel.split("/")
        parent = "."
        for part in parts[:-1]:
            here = part if parent == "." else f"{parent}/{part}"
            dirs[parent][0].add(part)
            dirs.setdefault(here, (set(), []))
            parent = here
        dirs[parent][1].append(parts[-1])
    todo = ["."]
    while todo:
        rel = todo.pop()
        sub, names = dirs[rel]
        dirnames = sorted(sub)
        yield rel, dirnames, names
        todo.extend(reversed([d if rel == "." else f"{rel}/{d}" for d in dirnames]))


def _walk_packages(
    base: str, root_name: str, walk: Iterator[tuple[str, list[str], list[str]]], join, found: list[Package],
    skips: Counter, passed: list[tuple[str, str]],
) -> None:
    """Find the packages of one input tree (keys start with ``base``; ``root_name`` is the tree's own folder
    name); ``join(rel_dir, name)`` gives the path or URL of a folder (name "") or file."""
    for rel, dirnames, filenames in walk:
        dirnames.sort()
        key_dir = base if rel == "." else f"{base}/{rel}"
        name = root_name if rel == "." else rel.rsplit("/", 1)[-1]
        dir_path = join(rel, "")
        if _is_cloud_dir(name, filenames):
            found.append(Package(key_dir, "pmc_cloud", dir_path))
            dirnames[:] = []
            continue
        if _has_xml(filenames):
            found.append(Package(key_dir, "folder", dir_path))
            dirnames[:] = []
            continue
        if any(f.lower().endswith(IMAGE_EXTS) for f in filenames):
            skips["no_xml"] += 1
            passed.append(("no_xml", key_dir))
        for f in sorted(filenames):
            if _is_tar_name(f):
                found.append(Package(f"{key_dir}/{f}", "tar", join(rel, f)))


def _discover_remote(url: str, storage_options: dict | None, found: list[Package], skips: Counter,
                     passed: list[tuple[str, str]]) -> None:
    """List an object-store prefix (or take one package URL) and find its packages."""
    fs, root = filesystem(url, storage_options)
    base = location_name(url)
    protocol = url.split("://", 1)[0]
    if protocol in ("http", "https"):
        # An HTTP server cannot be listed: http(s) inputs are single package files.
        if not _is_tar_name(root.split("?", 1)[0]):
            raise ConfigError(f"input {url}: http(s) inputs must be package tarballs (.tar.gz/.tgz/.tar)")
        if not _remote_call(lambda: fs.exists(root), f"checking {url}"):
            raise ConfigError(f"input {url} does not exist")
        found.append(Package(base, "tar", url))
        return
    root = root.rstrip("/")
    prefix = url.rstrip("/")  # packages are opened by URL (with any fsspec chain) in the workers
    listing = _remote_call(lambda: fs.find(root, detail=True), f"listing {url}")
    files = sorted(
        name[len(root) + 1 :]
        for name, info in listing.items()
        if info.get("type") != "directory" and name.startswith(root + "/") and not name.endswith("/")
    )
    if not files:
        if _is_tar_name(root) and _remote_call(lambda: fs.isfile(root), f"checking {url}"):
            found.append(Package(base, "tar", url))
            return
        raise ConfigError(f"input {url} does not exist (no objects under it)")

    def join(rel: str, name: str) -> str:
        return "/".join([prefix] + ([rel] if rel != "." else []) + ([name] if name else []))

    _walk_packages(base, base, _listing_walk(files), join, found, skips, passed)


def discover_packages(
    inputs: list[str | os.PathLike],
    passed_over: list[tuple[str, str]] | None = None,
    storage_options: dict | None = None,
) -> tuple[list[Package], Counter]:
    """All packages under the inputs, sorted by key, and counts of what was passed over (Counter).

    An input is a local path (or ``file://`` URL), or a remote URL (:mod:`~bmclip.io.fs`):
    an object-store prefix (``s3://bucket/prefix/``, ``gs://...``), listed recursively and read like a local
    directory tree (a package's key is the same as for a local copy of the prefix), or a single package file
    (``https://host/PMC1234567.tar.gz`` too). ``storage_options`` go to fsspec. ``passed_over``, when given,
    receives ``(reason, key)`` for each skipped entry (so that slices can count only their own).
    """
    found: list[Package] = []
    skips: Counter = Counter()
    passed = passed_over if passed_over is not None else []
    for inp in inputs:
        if is_remote(inp):
            _discover_remote(os.fspath(inp), storage_options, found, skips, passed)
            continue
        root = local_path(inp)
        if not root.exists():
            raise ConfigError(f"input {root} does not exist")
        base = root.resolve().name or str(root)
        if root.is_file():
            if not _is_tar(root):
                raise ConfigError(f"input {root}: not a package tarball (.tar.gz/.tgz/.tar) or a directory")
            found.append(Package(base, "tar", str(root)))
            continue

        def join(rel: str, name: str, root=root) -> str:
            d = root if rel == "." else root / rel
            return str(d / name) if name else str(d)

        _walk_packages(base, root.name, _local_walk(root), join, found, skips, passed)
    keys = Counter(p.key for p in found)
    dup = [k for k, n in keys.items() if n > 1]
    if dup:
        raise ConfigError(f"two inputs give the same package name {dup[0]!r}; pass distinct directories")
    # PMC Cloud: keep the newest version of each PMCID.
    newest: dict[str, tuple[int, str]] = {}
    for p in found:
        if p.kind == "pmc_cloud":
            m = _CLOUD_DIR.match(_last_part(p.path))
            pmcid, ver = m.group(1), int(m.group(2))
            if pmcid not in newest or ver > newest[pmcid][0]:
                newest[pmcid] = (ver, p.key)
    kept = []
    for p in found:
        if p.kind == "pmc_cloud":
            pmcid = _CLOUD_DIR.match(_last_part(p.path)).group(1)
            if newest[pmcid][1] != p.key:
                skips["superseded_version"] += 1
                passed.append(("superseded_version", p.key))
                continue
        kept.append(p)
    kept.sort(key=lambda p: p.key)
    return kept, skips


def _last_part(path: str) -> str:
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def slice_of(key: str, num_slices: int) -> int:
    """Deterministic slice index in [0, num_slices) of a package key (sha256 based)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % num_slices


def _safe_member_name(name: str) -> str | None:
    """The member's path with '.' parts removed, or None when it is absolute or climbs out ('..')."""
    if not name or "\x00" in name:
        return None
    n = name.replace("\\", "/")
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n):
        return None
    parts = [x for x in PurePosixPath(n).parts if x not in (".", "")]
    if not parts or any(x == ".." for x in parts):
        return None
    return "/".join(parts)


def _is_dot_dir(name: str) -> bool:
    """A ``.`` / ``./`` member name: the archive's own top directory (``tar -C dir .``), not an unsafe name."""
    n = name.replace("\\", "/")
    return bool(n) and not n.startswith("/") and all(x in ("", ".") for x in n.split("/"))


class _StreamReadError(Exception):
    """The byte stream under a remote tarball failed (a network error, not a format error)."""


class _TaggedStream:
    """A remote file's ``read`` with its failures told apart from tarfile's format errors (retried, not skipped)."""

    def __init__(self, raw):
        self.raw = raw

    def read(self, n: int = -1) -> bytes:
        try:
            return self.raw.read(n)
        except Exception as e:
            raise _StreamReadError(f"{type(e).__name__}: {e}") from e


class _Spool:
    """Package members kept for the builder: in memory up to MEMORY_BUDGET_BYTES in all, the rest in an
    anonymous temporary file (no name on disk; closed, and so gone, with this object or its process)."""

    def __init__(self, what: str):
        self.what = what
        self.in_memory = 0
        self._mem: dict[int, bytes] = {}
        self._disk: dict[int, tuple[int, int]] = {}  # key -> (offset, size) in the temporary file
        self._file = None
        self._end = 0
        self._keys = 0

    def _io_error(self, e: OSError) -> InputReadError:
        # Not the package's fault (a full disk): the stage stops, and a rerun resumes.
        return InputReadError(
            f"{self.what}: cannot keep its members in a temporary file in {tempfile.gettempdir()}: "
            f"{type(e).__name__}: {e} (free space there or set TMPDIR; rerun the same command to resume)"
        )

    def add(self, read: Callable[[int], bytes], size: int) -> int | None:
        """Keep the ``size`` bytes that ``read(n)`` gives; their key, or None when the reads end short."""
        key = self._keys
        self._keys += 1
        if self.in_memory + size <= MEMORY_BUDGET_BYTES:
            data = read(size) if size else b""
            if len(data) != size:
                return None
            self._mem[key] = data
            self.in_memory += size
            return key
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="bmclip-package-")
                weakref.finalize(self, self._file.close)
            fd = self._file.fileno()
        except OSError as e:
            raise self._io_error(e) from e
        start, left = self._end, size
        while left:
            chunk = read(min(left, _COPY_CHUNK))
            if not chunk:
                return None
            left -= len(chunk)
            view = memoryview(chunk)
            try:
                while view:
                    n = os.pwrite(fd, view, self._end)
                    self._end += n
                    view = view[n:]
            except OSError as e:
                raise self._io_error(e) from e
        self._disk[key] = (start, size)
        return key

    def get(self, key: int) -> bytes:
        data = self._mem.get(key)
        if data is not None:
            return data
        off, size = self._disk[key]
        parts, got = [], 0
        try:
            while got < size:
                b = os.pread(self._file.fileno(), min(size - got, 1 << 30), off + got)
                if not b:
                    raise OSError(f"temporary file ends at {off + got} bytes, expected {off + size}")
                parts.append(b)
                got += len(b)
        except OSError as e:
            raise self._io_error(e) from e
        return b"".join(parts)

    def drop(self, key: int) -> None:
        data = self._mem.pop(key, None)
        if data is not None:
            self.in_memory -= len(data)
        self._disk.pop(key, None)


class _SpooledXml(Sequence):
    """(name, bytes) of a package's XML documents, the bytes read from the spool when asked for."""

    def __init__(self, spool: _Spool, items: list[tuple[str, int]]):
        self._spool, self._items = spool, items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        name, key = self._items[i]
        return name, self._spool.get(key)


class _SpooledMedia(Mapping):
    """A package's image members by file name, the bytes read from the spool when asked for."""

    def __init__(self, spool: _Spool, keys: dict[str, int]):
        self._spool, self._keys = spool, keys

    def __getitem__(self, name: str) -> bytes:
        return self._spool.get(self._keys[name])

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _drop_ambiguous(names: list[str], skips: Counter) -> list[str]:
    """``names`` less those that another one equals, or equals but for case (media are looked up
    case-insensitively), each left out counted as ``duplicate_media_name``."""
    n_lower = Counter(n.lower() for n in names)
    kept = [n for n in names if n_lower[n.lower()] == 1]
    if len(kept) != len(names):
        skips["duplicate_media_name"] += len(names) - len(kept)
    return kept


class _CorruptTar(Exception):
    """The tar stream is damaged (a bad header, or an end where a header should be)."""


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile's header reader without its leniency: in stream mode tarfile takes a damaged header after the
    first, or the data ending where a header should be, for the end of the archive, and returns what it read
    so far. Here only a zero block (the end-of-archive marker) ends the archive; the rest is _CorruptTar."""

    @classmethod
    def fromtarfile(cls, tf):
        offset = tf.fileobj.tell()
        buf = tf.fileobj.read(tarfile.BLOCKSIZE)
        if len(buf) != tarfile.BLOCKSIZE:
            raise _CorruptTar(f"the archive ends at byte {offset + len(buf)} without its end-of-archive block")
        if buf.count(0) == tarfile.BLOCKSIZE:
            tf.bmclip_end_seen = True
            raise tarfile.EOFHeaderError("end of file header")
        try:
            obj = cls.frombuf(buf, tf.encoding, tf.errors)
        except tarfile.HeaderError as e:
            raise _CorruptTar(f"bad member header at byte {offset}: {e}") from None
        obj.offset = offset
        if obj.type in _META_TYPES and obj.size > _MAX_META_HEADER_BYTES:
            raise _CorruptTar(f"a {obj.size}-byte extended header at byte {offset}")
        return obj._proc_member(tf)


class _Prefixed:
    """``read`` of a stream whose first bytes were already taken (``head``)."""

    def __init__(self, head: bytes, raw):
        self.head, self.raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                out, self.head = self.head + self.raw.read(), b""
                return out
            out, self.head = self.head[:n], self.head[n:]
            return out
        return self.raw.read(n)


def _decompressed(f):
    """The uncompressed bytes of a package stream: gzip (every member of a multi-member file, checked
    against its CRC), bzip2 or xz by their magic bytes, else the stream itself (a plain tar)."""
    head = b""
    while len(head) < 6:
        b = f.read(6 - len(head))
        if not b:
            break
        head += b
    src = _Prefixed(head, f)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=src, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(src)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(src)
    return src


class _Limited:
    """``read`` of the uncompressed stream that refuses a package beyond max_package_bytes (a gzip bomb)."""

    def __init__(self, raw, limit: int, path: str):
        self.raw, self.limit, self.path, self.total = raw, limit, path, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.total += len(data)
        if self.total > self.limit:
            raise PackageError("package_too_large", f"{self.path}: more than {self.limit} bytes uncompressed")
        return data


def _read_tar_stream(f, path: str, max_member_bytes: int, max_package_bytes: int) -> PackageContent:
    """Read a package tarball from a binary stream, front to back (``tarfile`` mode ``r|``), all or nothing."""
    skips: Counter = Counter()
    spool = _Spool(path)
    xml: list[tuple[str, int]] = []
    images: list[tuple[str, int]] = []  # (file name, spool key) of every image member
    try:
        stream = _Limited(_decompressed(f), max_package_bytes, path)
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_StrictTarInfo, bufsize=_TAR_BUFSIZE) as tf:
            for m in tf:
                tf.members.clear()  # a stream needs no index of the members read (it grew with their number)
                if m.size < 0:
                    raise PackageError("corrupt_package", f"{path}: member {m.name!r} has a negative size")
                if m.offset_data + m.size > max_package_bytes:
                    # gzip bomb guard: a stream can only be skipped by decompressing through it
                    raise PackageError("package_too_large", f"{path}: more than {max_package_bytes} bytes uncompressed")
                if m.isdir() and _is_dot_dir(m.name):
                    continue  # the top directory of a `tar -C dir .` archive
                safe = _safe_member_name(m.name)
                if safe is None or not (m.isfile() or m.isdir()):
                    # Links and devices are refused as well: a package never needs them.
                    skips["unsafe_member"] += 1
                    continue
                if m.isdir():
                    continue
                low = safe.lower()
                is_xml = low.endswith(XML_EXTS)
                if not (is_xml or low.endswith(IMAGE_EXTS)):
                    continue  # supplementary data, PDFs, videos: never read
                if m.size > max_member_bytes:
                    skips["member_too_large"] += 1
                    continue
                fm = tf.extractfile(m)
                key = spool.add(fm.read if fm is not None else (lambda n: b""), m.size)
                if key is None:
                    raise PackageError("corrupt_package", f"{path}: member {safe} truncated")
                if is_xml:
                    xml.append((safe, key))
                else:
                    images.append((PurePosixPath(safe).name, key))
            if not getattr(tf, "bmclip_end_seen", False):
                raise _CorruptTar("the archive ends without its end-of-archive block")
        # Read on to the end of the file: the gzip layer checks its CRC and length, and refuses bytes after
        # its data that are not another gzip member (what follows the tar's end-of-archive block is not used).
        while stream.read(_COPY_CHUNK):
            pass
    except (PackageError, _StreamReadError, InputReadError):
        raise
    except _CorruptTar as e:
        raise PackageError("corrupt_package", f"{path}: unreadable package: {e}") from e
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError) as e:
        raise PackageError("corrupt_package", f"{path}: unreadable package: {type(e).__name__}: {e}") from e
    nxml = [x for x in xml if x[0].lower().endswith(".nxml")]
    if nxml:
        for name, key in xml:
            if not name.lower().endswith(".nxml"):
                spool.drop(key)  # supplementary XML of a package that has its article's .nxml
        xml = nxml
    xml.sort(key=lambda x: x[0])
    # which of two members sharing a file name a graphic means is unknown: neither is used (as in folders)
    usable = set(_drop_ambiguous([name for name, _ in images], skips))
    media = {}
    for name, key in images:
        if name in usable:
            media[name] = key
        else:
            spool.drop(key)
    return PackageContent(xml=_SpooledXml(spool, xml), media=_SpooledMedia(spool, media), skips=skips)


def _read_tar(path: str, max_member_bytes: int, max_package_bytes: int,
              storage_options: dict | None = None) -> PackageContent:
    if is_remote(path):

        def read_once() -> PackageContent:
            fs, p = filesystem(path, storage_options)
            # Streamed: fsspec fetches the object in blocks as tarfile reads on; the tarball is not copied to disk
            # (kept members beyond MEMORY_BUDGET_BYTES go to a temporary file, as for a local one).
            # Over HTTP as one sequential response (block_size 0), which needs no Range support.
            http = path.split("::")[-1].startswith(("http://", "https://"))
            with fs.open(p, "rb", **({"block_size": 0} if http else {})) as raw:
                if getattr(raw, "size", None) == 0:
                    raise PackageError("corrupt_package", f"{path}: zero-byte file")
                return _read_tar_stream(_TaggedStream(raw), path, max_member_bytes, max_package_bytes)

        return _remote_call(read_once, f"reading {path}")
    try:
        if os.path.getsize(path) == 0:
            raise PackageError("corrupt_package", f"{path}: zero-byte file")
        with open(path, "rb") as f:
            return _read_tar_stream(f, path, max_member_bytes, max_package_bytes)
    except OSError as e:
        raise PackageError("corrupt_package", f"{path}: unreadable package: {type(e).__name__}: {e}") from e


class _RemoteMedia(Mapping):
    """A remote folder's image files by name, each fetched (with retries) only when a figure asks for it."""

    def __init__(self, fs, paths: dict[str, str], url: str):
        self.fs, self.paths, self.url = fs, paths, url

    def __getitem__(self, name: str) -> bytes:
        path = self.paths[name]
        return _remote_call(lambda: self.fs.cat_file(path), f"reading {self.url}/{name}")

    def __iter__(self):
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


class _FolderMedia(Mapping):
    """A local folder's image files by name (name -> real path), each read, at most ``limit`` bytes, when a
    figure asks for it."""

    def __init__(self, paths: dict[str, str], limit: int):
        self.paths, self.limit = paths, limit

    def __getitem__(self, name: str) -> bytes:
        from bmclip.data.pmc.media import ImageSkip  # (PIL and numpy are not needed to find packages)

        path = self.paths[name]
        try:
            with open(path, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise ImageSkip("undecodable_image", f"{path}: not a regular file")
                data = f.read(self.limit + 1)
        except OSError as e:
            raise ImageSkip("undecodable_image", f"cannot read {path}: {e}") from e
        if len(data) > self.limit:  # it grew after the folder was listed
            raise ImageSkip("member_too_large", f"{path}: more than {self.limit} bytes")
        return data

    def __iter__(self):
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def _folder_content(
    dir_name: str, kind: str, sizes: dict[str, int], read: Callable[[str], bytes], max_member_bytes: int,
    keep: Callable[[str], int | None], spool: _Spool,
) -> PackageContent:
    """The XML and cloud metadata of a folder whose regular files have ``sizes`` (name -> bytes); ``keep(name)``
    puts a file's bytes in ``spool`` (its key; None when it ended short of its listed size)."""
    content = PackageContent(xml=[], media={})
    names = sorted(sizes)
    if kind == "pmc_cloud":
        xml_names = [f"{dir_name}.xml"]
        if f"{dir_name}.json" in sizes:
            if sizes[f"{dir_name}.json"] > max_member_bytes:
                content.skips["member_too_large"] += 1
            else:
                try:
                    content.meta = json.loads(read(f"{dir_name}.json"))
                except (ValueError, OSError, PackageError):
                    content.skips["bad_cloud_metadata"] += 1
    else:
        xml_names = [n for n in names if n.lower().endswith(".nxml")] or [
            n for n in names if n.lower().endswith(".xml")
        ]
    xml = []
    for n in xml_names:
        if n not in sizes:
            continue
        if sizes[n] > max_member_bytes:
            content.skips["member_too_large"] += 1
            continue
        key = keep(n)
        if key is None:
            raise PackageError("corrupt_package", f"{dir_name}/{n}: shorter than its listed {sizes[n]} bytes")
        xml.append((n, key))
    content.xml = _SpooledXml(spool, xml)
    return content


def _media_names(sizes: dict[str, int], max_member_bytes: int, skips: Counter) -> list[str]:
    """A folder's image files that can be used (sorted): those above max_member_bytes, and names that differ
    only in case, are counted and left out."""
    images = [n for n in sorted(sizes) if n.lower().endswith(IMAGE_EXTS)]
    small = [n for n in images if sizes[n] <= max_member_bytes]
    if len(small) != len(images):
        skips["member_too_large"] += len(images) - len(small)
    return _drop_ambiguous(small, skips)


def _inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def _read_folder(path: str, kind: str, max_member_bytes: int) -> PackageContent:
    d = Path(path)
    root = os.path.realpath(d)
    sizes: dict[str, int] = {}
    real: dict[str, str] = {}  # name -> the file to open (a link's target, inside the folder)
    unsafe = 0
    for n in os.listdir(d):
        p = os.path.join(d, n)
        try:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                p = os.path.realpath(p)
                if not _inside(p, root):
                    unsafe += 1  # a link out of the package (to /etc/passwd, another article's figure)
                    continue
                st = os.stat(p)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            sizes[n] = st.st_size
            real[n] = p

    def read(n: str) -> bytes:
        try:
            with open(real[n], "rb") as f:
                return f.read(max_member_bytes + 1)
        except OSError as e:
            raise PackageError("corrupt_package", f"{d / n}: cannot read: {e}") from e

    spool = _Spool(str(d))

    def keep(n: str) -> int | None:
        try:
            with open(real[n], "rb") as f:
                return spool.add(f.read, sizes[n])
        except OSError as e:
            raise PackageError("corrupt_package", f"{d / n}: cannot read: {e}") from e

    content = _folder_content(d.name, kind, sizes, read, max_member_bytes, keep, spool)
    if unsafe:
        content.skips["unsafe_member"] += unsafe
    names = _media_names(sizes, max_member_bytes, content.skips)
    content.media = _FolderMedia({n: real[n] for n in names}, max_member_bytes)
    return content


def _read_remote_folder(url: str, kind: str, max_member_bytes: int, storage_options: dict | None) -> PackageContent:
    fs, p = filesystem(url, storage_options)
    p = p.rstrip("/")
    listing = _remote_call(lambda: fs.ls(p, detail=True), f"listing {url}")
    files = {
        info["name"].rstrip("/").rsplit("/", 1)[-1]: info
        for info in listing
        if info.get("type") == "file" and not info["name"].endswith("/")
    }
    sizes = {n: int(info.get("size") or 0) for n, info in files.items()}

    def read(n: str) -> bytes:
        return _remote_call(lambda: fs.cat_file(files[n]["name"]), f"reading {url}/{n}")

    spool = _Spool(url)

    def keep(n: str) -> int | None:
        data = read(n)
        return spool.add(io.BytesIO(data).read, len(data))

    content = _folder_content(location_name(url), kind, sizes, read, max_member_bytes, keep, spool)
    names = _media_names(sizes, max_member_bytes, content.skips)
    content.media = _RemoteMedia(fs, {n: files[n]["name"] for n in names}, url.rstrip("/"))
    return content


def read_package(
    pkg: Package,
    max_member_bytes: int = 256 << 20,
    max_package_bytes: int = 16 << 30,
    storage_options: dict | None = None,
) -> PackageContent:
    """Read one package's XML and media (raises PackageError with a reason when it is unusable).

    Remote packages (a URL path) are read through fsspec with ``storage_options``: a tarball is streamed, a
    folder's XML is read and its images are fetched when a figure uses them. A remote read that still fails
    after retries raises InputReadError.
    """
    if pkg.kind == "tar":
        return _read_tar(pkg.path, max_member_bytes, max_package_bytes, storage_options)
    if is_remote(pkg.path):
        return _read_remote_folder(pkg.path, pkg.kind, max_member_bytes, storage_options)
    return _read_folder(pkg.path, pkg.kind, max_member_bytes)
