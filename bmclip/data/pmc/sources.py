"""Input readers: PMC OA package tarballs (streamed), extracted article folders, PMC Cloud article folders.

Three input layouts are recognised, in any mix, given as files or as directory trees holding many:

- **OA package tarball** ``PMC1234567.tar.gz`` (also ``.tgz``/``.tar``): read as a stream
  (``tarfile`` mode ``r|*``), never extracted. Only the XML (``.nxml``/``.xml``) and image members are
  kept in memory; members with unsafe names (absolute, ``..``, drive letters), links and devices are
  refused and counted; members above ``max_member_bytes`` are skipped and counted; a package whose
  uncompressed stream exceeds ``max_package_bytes`` (a gzip bomb) is refused as ``package_too_large``.
  A truncated gzip or tar stream makes the whole package a counted ``corrupt_package`` skip (all or nothing, so that the
  result never depends on where a file happens to be cut).
- **Extracted article folder**: a directory holding the article XML and its media files (what an
  untarred OA package, eLife/PLOS bundles, Europe PMC ``fulltext.xml`` folders look like). If any
  ``.nxml`` is present only those are read (OA packages carry other XML, e.g. supplementary data).
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

import hashlib
import json
import os
import re
import stat
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
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
    except (ConfigError, PackageError):
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
    """What the builder needs from a package: XML documents, media (by file name) and cloud metadata."""

    xml: list[tuple[str, bytes]]
    media: Mapping[str, bytes | str]  # file name (no directories) -> bytes (tar, remote folder) or path (folder)
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


def _read_tar_stream(f, path: str, max_member_bytes: int, max_package_bytes: int) -> PackageContent:
    """Read a package tarball from a binary stream, front to back (``tarfile`` mode ``r|*``)."""
    content = PackageContent(xml=[], media={})
    try:
        with tarfile.open(fileobj=f, mode="r|*") as tf:
            for m in tf:
                if m.offset_data + max(m.size, 0) > max_package_bytes:
                    # gzip bomb guard: a stream can only be skipped by decompressing through it
                    raise PackageError("package_too_large", f"{path}: more than {max_package_bytes} bytes uncompressed")
                safe = _safe_member_name(m.name)
                if safe is None or not (m.isfile() or m.isdir()):
                    # Links and devices are refused as well: a package never needs them.
                    content.skips["unsafe_member"] += 1
                    continue
                if m.isdir():
                    continue
                low = safe.lower()
                is_xml = low.endswith(XML_EXTS)
                if not (is_xml or low.endswith(IMAGE_EXTS)):
                    continue  # supplementary data, PDFs, videos: never read
                if m.size > max_member_bytes:
                    content.skips["member_too_large"] += 1
                    continue
                fm = tf.extractfile(m)
                data = fm.read() if fm is not None else b""
                if len(data) != m.size:
                    raise PackageError("corrupt_package", f"{path}: member {safe} truncated")
                if is_xml:
                    content.xml.append((safe, data))
                else:
                    content.media[PurePosixPath(safe).name] = data
    except (PackageError, _StreamReadError):
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as e:
        raise PackageError("corrupt_package", f"{path}: unreadable package: {type(e).__name__}: {e}") from e
    nxml = [x for x in content.xml if x[0].lower().endswith(".nxml")]
    if nxml:
        content.xml = nxml
    content.xml.sort(key=lambda x: x[0])
    return content


def _read_tar(path: str, max_member_bytes: int, max_package_bytes: int,
              storage_options: dict | None = None) -> PackageContent:
    if is_remote(path):

        def read_once() -> PackageContent:
            fs, p = filesystem(path, storage_options)
            # Streamed: fsspec fetches the object in blocks as tarfile reads on; nothing is written to disk.
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


def _folder_content(
    dir_name: str, kind: str, sizes: dict[str, int], read: Callable[[str], bytes], max_member_bytes: int
) -> PackageContent:
    """The XML and cloud metadata of a folder whose regular files have ``sizes`` (name -> bytes)."""
    content = PackageContent(xml=[], media={})
    names = sorted(sizes)
    if kind == "pmc_cloud":
        xml_names = [f"{dir_name}.xml"]
        if f"{dir_name}.json" in sizes:
            try:
                content.meta = json.loads(read(f"{dir_name}.json"))
            except (ValueError, OSError, PackageError):
                content.skips["bad_cloud_metadata"] += 1
    else:
        xml_names = [n for n in names if n.lower().endswith(".nxml")] or [
            n for n in names if n.lower().endswith(".xml")
        ]
    for n in xml_names:
        if n not in sizes:
            continue
        if sizes[n] > max_member_bytes:
            content.skips["member_too_large"] += 1
            continue
        content.xml.append((n, read(n)))
    return content


def _read_folder(path: str, kind: str, max_member_bytes: int) -> PackageContent:
    d = Path(path)
    sizes = {}
    for n in os.listdir(d):
        try:
            st = (d / n).stat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            sizes[n] = st.st_size

    def read(n: str) -> bytes:
        try:
            return (d / n).read_bytes()
        except OSError as e:
            raise PackageError("corrupt_package", f"{d / n}: cannot read: {e}") from e

    content = _folder_content(d.name, kind, sizes, read, max_member_bytes)
    content.media = {n: str(d / n) for n in sorted(sizes) if n.lower().endswith(IMAGE_EXTS)}
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

    content = _folder_content(location_name(url), kind, sizes, read, max_member_bytes)
    content.media = _RemoteMedia(
        fs, {n: files[n]["name"] for n in sorted(files) if n.lower().endswith(IMAGE_EXTS)}, url.rstrip("/")
    )
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
