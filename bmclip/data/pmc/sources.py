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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from bmclip.data.images import IMAGE_EXTENSIONS
from bmclip.errors import ConfigError

__all__ = ["Package", "PackageContent", "PackageError", "discover_packages", "read_package", "slice_of"]

XML_EXTS = (".nxml", ".xml")
# package members taken as figure images (the builder re-encodes every one of them)
IMAGE_EXTS = tuple(f".{e}" for e in IMAGE_EXTENSIONS)
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_CLOUD_DIR = re.compile(r"^(PMC\d+)\.(\d+)$")


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
    media: dict[str, bytes | str]  # file name (no directories) -> bytes (tar) or path (folder)
    meta: dict | None = None
    skips: Counter = field(default_factory=Counter)


def _is_tar(p: Path) -> bool:
    n = p.name.lower()
    return any(n.endswith(s) for s in TAR_SUFFIXES)


def _cloud_xml(d: Path) -> Path | None:
    m = _CLOUD_DIR.match(d.name)
    if m and (d / f"{d.name}.xml").is_file():
        return d / f"{d.name}.xml"
    return None


def _has_xml(names: list[str]) -> bool:
    return any(n.lower().endswith(XML_EXTS) for n in names)


def discover_packages(
    inputs: list[str | os.PathLike], passed_over: list[tuple[str, str]] | None = None
) -> tuple[list[Package], Counter]:
    """All packages under the inputs, sorted by key, and counts of what was passed over (Counter).

    ``passed_over``, when given, receives ``(reason, key)`` for each of those (so that slices can
    count only their own).
    """
    found: list[Package] = []
    skips: Counter = Counter()
    passed = passed_over if passed_over is not None else []
    for inp in inputs:
        root = Path(inp)
        if not root.exists():
            raise ConfigError(f"input {root} does not exist")
        base = root.resolve().name or str(root)
        if root.is_file():
            if not _is_tar(root):
                raise ConfigError(f"input {root}: not a package tarball (.tar.gz/.tgz/.tar) or a directory")
            found.append(Package(base, "tar", str(root)))
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            d = Path(dirpath)
            rel = d.relative_to(root).as_posix()
            key_dir = base if rel == "." else f"{base}/{rel}"
            if _cloud_xml(d) is not None:
                found.append(Package(key_dir, "pmc_cloud", str(d)))
                dirnames[:] = []
                continue
            if _has_xml(filenames):
                found.append(Package(key_dir, "folder", str(d)))
                dirnames[:] = []
                continue
            if any(f.lower().endswith(IMAGE_EXTS) for f in filenames):
                skips["no_xml"] += 1
                passed.append(("no_xml", key_dir))
            for f in sorted(filenames):
                if _is_tar(d / f):
                    found.append(Package(f"{key_dir}/{f}", "tar", str(d / f)))
    keys = Counter(p.key for p in found)
    dup = [k for k, n in keys.items() if n > 1]
    if dup:
        raise ConfigError(f"two inputs give the same package name {dup[0]!r}; pass distinct directories")
    # PMC Cloud: keep the newest version of each PMCID.
    newest: dict[str, tuple[int, str]] = {}
    for p in found:
        if p.kind == "pmc_cloud":
            m = _CLOUD_DIR.match(Path(p.path).name)
            pmcid, ver = m.group(1), int(m.group(2))
            if pmcid not in newest or ver > newest[pmcid][0]:
                newest[pmcid] = (ver, p.key)
    kept = []
    for p in found:
        if p.kind == "pmc_cloud":
            pmcid = _CLOUD_DIR.match(Path(p.path).name).group(1)
            if newest[pmcid][1] != p.key:
                skips["superseded_version"] += 1
                passed.append(("superseded_version", p.key))
                continue
        kept.append(p)
    kept.sort(key=lambda p: p.key)
    return kept, skips


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


def _read_tar(path: str, max_member_bytes: int, max_package_bytes: int) -> PackageContent:
    content = PackageContent(xml=[], media={})
    try:
        if os.path.getsize(path) == 0:
            raise PackageError("corrupt_package", f"{path}: zero-byte file")
        with tarfile.open(path, mode="r|*") as tf:
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
                f = tf.extractfile(m)
                data = f.read() if f is not None else b""
                if len(data) != m.size:
                    raise PackageError("corrupt_package", f"{path}: member {safe} truncated")
                if is_xml:
                    content.xml.append((safe, data))
                else:
                    content.media[PurePosixPath(safe).name] = data
    except PackageError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as e:
        raise PackageError("corrupt_package", f"{path}: unreadable package: {type(e).__name__}: {e}") from e
    nxml = [x for x in content.xml if x[0].lower().endswith(".nxml")]
    if nxml:
        content.xml = nxml
    content.xml.sort(key=lambda x: x[0])
    return content


def _read_folder(path: str, kind: str, max_member_bytes: int) -> PackageContent:
    d = Path(path)
    content = PackageContent(xml=[], media={})
    names = sorted(os.listdir(d))
    if kind == "pmc_cloud":
        xml_names = [f"{d.name}.xml"]
        meta_p = d / f"{d.name}.json"
        if meta_p.is_file():
            try:
                content.meta = json.loads(meta_p.read_bytes())
            except (ValueError, OSError):
                content.skips["bad_cloud_metadata"] += 1
    else:
        xml_names = [n for n in names if n.lower().endswith(".nxml")] or [
            n for n in names if n.lower().endswith(".xml")
        ]
    for n in xml_names:
        p = d / n
        if not p.is_file():
            continue
        if p.stat().st_size > max_member_bytes:
            content.skips["member_too_large"] += 1
            continue
        try:
            content.xml.append((n, p.read_bytes()))
        except OSError as e:
            raise PackageError("corrupt_package", f"{p}: cannot read: {e}") from e
    for n in names:
        if n.lower().endswith(IMAGE_EXTS):
            p = d / n
            if p.is_file():
                content.media[n] = str(p)
    return content


def read_package(pkg: Package, max_member_bytes: int = 256 << 20, max_package_bytes: int = 16 << 30) -> PackageContent:
    """Read one package's XML and media (raises PackageError with a reason when it is unusable)."""
    if pkg.kind == "tar":
        return _read_tar(pkg.path, max_member_bytes, max_package_bytes)
    return _read_folder(pkg.path, pkg.kind, max_member_bytes)
