"""Webdataset shard writer: deterministic USTAR tar files with a DALI index beside each.

A shard's samples are stored in sorted key order, each sample's members sorted by extension (fixed mtime 0 /
uid 0 / empty owner names, ``KEY`` without dots): ``KEY.jpg``, ``KEY.json``, ``KEY.txt``. Equal input gives
byte-identical shards.

DALI index format (``tools/wds2idx.py``, version ``v1.2``): first line ``v1.2 <num_samples>``, then one line
per sample of ``<ext> <data offset> <size> <member name>`` groups separated by spaces.
"""

from __future__ import annotations

import hashlib
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from bmclip.io import atomic_write_bytes, atomic_writer

__all__ = ["ShardWriter", "ustar_header"]

SAMPLE_MEMBERS = ("jpg", "json", "txt")


def _make_ustar_template() -> bytes:
    h = bytearray(512)
    h[100:108] = b"0000644\0"  # mode
    h[108:116] = h[116:124] = b"0000000\0"  # uid, gid
    h[136:148] = b"00000000000\0"  # mtime
    h[148:156] = b" " * 8  # checksum placeholder
    h[156:157] = tarfile.REGTYPE
    h[257:265] = tarfile.POSIX_MAGIC  # b"ustar\x0000"
    # devmajor/devminor stay NUL for regular files, as tarfile writes them
    return bytes(h)


_USTAR_TEMPLATE = _make_ustar_template()


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header tarfile writes for a regular file (mode 644, mtime/uid/gid 0, no owner names).

    Built directly (byte-identical to ``TarInfo.tobuf(USTAR_FORMAT)``, tested) because tarfile's generic
    header code was a third of the merge's per-sample CPU time; names over 100 bytes (prefix/name split)
    and sizes over 8 GiB go through tarfile.
    """
    nb = name.encode("utf-8")
    if len(nb) > 100 or size >= 8**11:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
        ti.type = tarfile.REGTYPE
        return ti.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8")
    h = bytearray(_USTAR_TEMPLATE)
    h[: len(nb)] = nb
    h[124:136] = b"%011o\0" % size
    h[148:156] = b"%06o\0 " % sum(h)  # checksum over the header with its own field as 8 spaces
    return bytes(h)


class ShardWriter:
    """Writes ``{split}-NNNNNN.tar`` (+ ``.idx``) into ``out``, ``shard_size`` samples per shard.

    A shard's samples are the next ``shard_size`` added, stored in sorted key order: they are spooled to an
    anonymous temporary file as they arrive (memory holds only their keys and offsets) and streamed into the
    tar, sorted, when the shard is full or :meth:`close_shard` is called. The tar and then its index are
    written atomically (a killed writer leaves no partial shard under a final name). ``shards`` lists the
    finished shards: name, index name, split, sample count, bytes and sha256 of the tar. ``handoff``, when
    given, is called with each finished shard's record and the paths of its tar and index (a remote output
    uploads them and deletes the local files).
    """

    def __init__(self, out: Path, split: str, shard_size: int,
                 handoff: Callable[[dict, Path, Path], None] | None = None):
        self.out, self.split, self.shard_size = Path(out), split, shard_size
        self.handoff = handoff
        self.index = 0
        self.spool = None
        self.shards: list[dict] = []

    def _open(self) -> None:
        self.name = f"{self.split}-{self.index:06d}.tar"
        self.spool = tempfile.TemporaryFile(dir=self.out)  # on the output's filesystem; never outlives us
        self.spool_pos = 0
        self.entries: list[tuple[str, int, int, int, int]] = []  # key, spool offset, member sizes

    def add(self, key: str, jpg: bytes, js: bytes, txt: bytes) -> None:
        """Add one sample (its JPEG, JSON and caption bytes); a full shard is written out."""
        if self.spool is None:
            self._open()
        self.spool.write(jpg)
        self.spool.write(js)
        self.spool.write(txt)
        self.entries.append((key, self.spool_pos, len(jpg), len(js), len(txt)))
        self.spool_pos += len(jpg) + len(js) + len(txt)
        if len(self.entries) == self.shard_size:
            self.close_shard()

    def close_shard(self) -> None:
        """Write the open shard (if any samples were added since the last one) and its index."""
        if self.spool is None:
            return
        sha = hashlib.sha256()
        pos = 0
        idx_lines: list[str] = []
        with atomic_writer(self.out / self.name, "wb") as f:

            def write(b: bytes) -> None:
                nonlocal pos
                f.write(b)
                sha.update(b)
                pos += len(b)

            self.spool.flush()
            for key, off, *sizes in sorted(self.entries):
                self.spool.seek(off)
                parts = []
                for ext, size in zip(SAMPLE_MEMBERS, sizes):
                    data = self.spool.read(size)
                    write(ustar_header(f"{key}.{ext}", size))
                    parts.append(f"{ext} {pos} {size} {key}.{ext}")
                    write(data)
                    if size % 512:
                        write(b"\0" * (512 - size % 512))
                idx_lines.append(" ".join(parts))
            write(b"\0" * 1024)  # end-of-archive marker
        self.spool.close()
        self.spool = None
        idx_name = self.name[: -len(".tar")] + ".idx"
        count = len(self.entries)
        atomic_write_bytes((f"v1.2 {count}\n" + "\n".join(idx_lines) + "\n").encode(), self.out / idx_name)
        self._finished(
            {
                "name": self.name,
                "index": idx_name,
                "split": self.split,
                "num_samples": count,
                "bytes": pos,
                "sha256": sha.hexdigest(),
            }
        )
        self.entries = []
        self.index += 1

    def _finished(self, shard: dict) -> None:
        """Hand on a shard whose tar and index are in place under their final names."""
        self.shards.append(shard)
        if self.handoff is not None:
            self.handoff(shard, self.out / shard["name"], self.out / shard["index"])

    def pattern(self) -> str | None:
        """The brace pattern of this writer's shards (``train-{000000..000041}.tar``), None when there are none."""
        n = len(self.shards)
        if n == 0:
            return None
        return f"{self.split}-{{000000..{n - 1:06d}}}.tar"
