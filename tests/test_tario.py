"""bmclip.data.tario (the streaming Python shard reader) against Python's tarfile with webdataset's grouping
rule, and against the C++ shard index (bmclip._C.TarIndex) on cut and damaged shards."""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np
import pytest
from test_tar_index import make_tar

from bmclip.data import tario
from bmclip.errors import DataError

try:
    from bmclip import _C
except ImportError:  # pragma: no cover - extension not built
    _C = None

# webdataset.tariterators.base_plus_ext
_WDS_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def reference_samples(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """Regular members of a tar (read by tarfile) grouped into webdataset samples: list of (key, {ext: bytes})."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            mt = _WDS_RE.match(m.name) if m.isreg() else None
            if mt is None:
                continue
            key, ext = mt.group(1), mt.group(2).lower()
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1].setdefault(ext, tf.extractfile(m).read())
    return out


def read(tmp_path, data: bytes, skipped=None, name="s.tar"):
    p = tmp_path / name
    p.write_bytes(data)
    return [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
            for s in tario.iter_samples(str(p), skipped)]


class Trickle(io.RawIOBase):
    """A non-seekable stream returning at most 7 bytes per read, like a pipe or a slow socket."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def readable(self):
        return True

    def read(self, n=-1):
        n = 7 if n < 0 else min(n, 7)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


def rich_members(rng: np.random.Generator):
    long_dir = "d" * 60 + "/" + "e" * 60  # > 100 chars: GNU 'L', pax path or ustar prefix, by format
    members = []
    for i in range(6):
        key = f"{long_dir}/sample{i:03d}" if i % 2 else f"part/s{i:03d}"
        for ext in ("jpg", "txt", "json"):
            members.append((f"{key}.{ext}", rng.bytes(int(rng.integers(0, 1500)))))
    members += [("dir.with.dots/", "dir"), ("dir.with.dots/a.b.seg.png", b"seg"), ("dir.with.dots/a.TXT", b"up"),
                ("link.jpg", "symlink"), ("empty.bin", b""), ("last.jpg", b"x" * 512)]
    return members


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_matches_tarfile(tmp_path, fmt):
    data = make_tar(rich_members(np.random.default_rng(0)), fmt)
    skipped: list = []
    got = read(tmp_path, data, skipped)
    assert got == reference_samples(data) and skipped == []
    assert ("dir.with.dots/a", {"b.seg.png": b"seg", "txt": b"up"}) in got
    # the same samples from a stream that hands out 7 bytes per read and cannot seek
    trickled = [s["__key__"] for s in tario.iter_samples("pipe", stream=Trickle(data))]
    assert trickled == [k for k, _ in got]


def test_pax_non_ascii_long_names_and_global_header(tmp_path):
    name = "π/" + "x" * 300 + ".Caption.TXT"
    data = make_tar([(name, b"hello"), ("b.jpg", b"12")], tarfile.PAX_FORMAT, pax_headers={"comment": "x"})
    assert data[156:157] == b"g"
    assert read(tmp_path, data) == [("π/" + "x" * 300, {"caption.txt": b"hello"}), ("b", {"jpg": b"12"})]


def test_unnamed_and_duplicate_members_are_counted(tmp_path):
    data = make_tar([("a.jpg", b"first"), ("a.jpg", b"second"), ("noext", b"?"), ("a.txt", b"t")])
    skipped: list = []
    assert read(tmp_path, data, skipped) == [("a", {"jpg": b"first", "txt": b"t"})]
    assert [r.split(":")[0] for _, r in skipped] == ["duplicate_member", "unnamed_member"]
    with pytest.raises(DataError, match="duplicate member 'a.jpg'"):
        read(tmp_path, data)


def test_not_a_tar(tmp_path):
    with pytest.raises(DataError, match="empty tar file"):
        read(tmp_path, b"", [])
    with pytest.raises(DataError, match="bad tar header, not a tar file"):
        read(tmp_path, np.random.default_rng(0).bytes(4096), [])
    with pytest.raises(DataError, match="cannot open shard"):
        list(tario.iter_samples(str(tmp_path / "missing.tar")))
    for n in (1, 511, 513):  # shorter than a header, or one junk header: never a hang, never a crash
        with pytest.raises(DataError):
            read(tmp_path, np.random.default_rng(n).bytes(n), [])


def _layout(data: bytes):
    """Where each sample's first member header ends (its data starts) and where the end-of-archive blocks start."""
    firsts, last_key, ends = [], None, []
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            key = _WDS_RE.match(m.name).group(1)
            if key != last_key:
                firsts.append(m.offset_data)
                last_key = key
            ends.append(m.offset_data + m.size)
    return firsts, -(-max(ends) // 512) * 512


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_truncated_at_many_offsets(tmp_path, fmt):
    """A shard cut anywhere: the complete samples before the cut, the cut reported, the same samples as the
    C++ index; without a skip list, a DataError."""
    rng = np.random.default_rng(1)
    members = [(f"{'L' * 120 + '/' if i % 3 == 0 else ''}k{i}.{ext}", rng.bytes(int(rng.integers(1, 900))))
               for i in range(8) for ext in ("jpg", "txt")]
    data = make_tar(members, fmt)
    full = reference_samples(data)
    firsts, data_end = _layout(data)
    cuts = sorted(set(range(512, len(data), 97)) | set(firsts[1:]) | {f - 1 for f in firsts[1:]} | {data_end})
    for cut in cuts:
        blob = data[:cut]
        skipped: list = []
        got = read(tmp_path, blob, skipped)
        clean = cut >= data_end + 512  # the first end-of-archive block is there
        n_complete = len(full) if clean else sum(1 for f in firsts[1:] if f <= cut)
        assert got == full[:n_complete], cut
        assert any(r.startswith("truncated") for _, r in skipped) == (not clean), (cut, skipped)
        if not clean:
            with pytest.raises(DataError, match="corrupt shard"):
                read(tmp_path, blob)
        if _C is not None:
            assert [k for k, _ in got] == _C.TarIndex(str(tmp_path / "s.tar")).keys(), cut
    with pytest.raises(DataError, match="not a tar file"):  # less than one header is no tar at all
        read(tmp_path, data[:97], [])


def test_bad_header_counts_the_lost_tail_like_the_loader(tmp_path):
    members = [(f"k{i:03d}.{ext}", bytes([i]) * 700) for i in range(6) for ext in ("jpg", "txt")]
    data = bytearray(make_tar(members, fmt=tarfile.USTAR_FORMAT))
    data[1536 * 4 : 1536 * 4 + 512] = b"\x01" * 512  # k002.jpg's header (members are 512 + 1024 bytes)
    skipped: list = []
    got = read(tmp_path, bytes(data), skipped)
    # k000 is complete; k001 is dropped (its members might continue past the damage); k002 (its txt) .. k005
    # are named by headers after the damage: 4 samples lost.
    assert [k for k, _ in got] == ["k000"]
    reasons = [r for _, r in skipped]
    assert reasons[0].startswith("bad_header: bad header checksum at byte 6144")
    assert skipped[1][0] == "k001" and reasons[1].startswith("damaged_tar_sample")
    assert reasons[2] == "tar_lost_tail: 4 sample(s) after the damage at byte 6144 not read"
    if _C is not None:
        idx = _C.TarIndex(str(tmp_path / "s.tar"))
        assert (idx.keys(), idx.dropped, idx.lost_tail_samples) == (["k000"], 1, 4)


def test_huge_size_field_is_a_truncation_not_a_hang(tmp_path):
    data = bytearray(make_tar([("a.jpg", b"abc"), ("b.jpg", b"def")], tarfile.GNU_FORMAT))
    h = data.index(b"b.jpg")
    data[h + 124 : h + 136] = b"\x80" + b"\x00" * 3 + b"\x7f" + b"\xff" * 7  # base-256, ~2**59 bytes
    data[h + 148 : h + 156] = b" " * 8
    data[h + 148 : h + 156] = f"{sum(data[h : h + 512]):06o}\x00 ".encode()
    skipped: list = []
    assert [k for k, _ in read(tmp_path, bytes(data), skipped)] == ["a"]
    assert skipped[0][1].startswith("truncated: member 'b.jpg'")


def test_split_key():
    assert tario.split_key("a/b.c/x.Y.JPG") == ("a/b.c/x", "y.jpg")
    assert tario.split_key("noext") is None and tario.split_key("d/.hidden") is None
