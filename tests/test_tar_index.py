"""bmclip._C.TarIndex against Python's tarfile + webdataset's grouping rule on generated shards."""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np
import pytest

_C = pytest.importorskip("bmclip._C", reason="C++ extension not built")

# webdataset.tariterators.base_plus_ext
_WDS_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def reference_samples(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """Group regular members of a tar (read by tarfile) into webdataset samples: list of (key, {ext: bytes})."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            if not m.isreg():
                continue
            mt = _WDS_RE.match(m.name)
            if mt is None:
                continue
            key, ext = mt.group(1), mt.group(2).lower()
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tf.extractfile(m).read()
    return out


def make_tar(members, fmt=tarfile.PAX_FORMAT, pax_headers=None) -> bytes:
    """members: list of (name, bytes) for regular files or (name, "dir"/"symlink"/"hardlink")."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=pax_headers or {}) as tf:
        for name, payload in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if payload == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif payload == "symlink":
                ti.type = tarfile.SYMTYPE
                ti.linkname = "target.jpg"
                tf.addfile(ti)
            elif payload == "hardlink":
                ti.type = tarfile.LNKTYPE
                ti.linkname = members[0][0]
                tf.addfile(ti)
            else:
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


def index_samples(idx) -> list[tuple[str, dict[str, bytes]]]:
    return [(k, {e: bytes(idx.read(o, s)) for e, (o, s) in d.items()}) for k, d in idx.samples()]


def write(tmp_path, data: bytes, name="shard.tar"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def rich_members(rng: np.random.Generator):
    long_dir = "d" * 60 + "/" + "e" * 60  # > 100 chars with the file name: GNU 'L' / pax path / ustar prefix
    members = []
    for i in range(6):
        key = f"{long_dir}/sample{i:03d}" if i % 2 else f"part/s{i:03d}"
        for ext in ("jpg", "txt", "json"):
            members.append((f"{key}.{ext}", rng.bytes(int(rng.integers(0, 1500)))))
    members += [
        ("dir.with.dots/", "dir"),
        ("dir.with.dots/a.b.seg.png", b"seg"),
        ("dir.with.dots/a.TXT", b"upper"),
        ("link.jpg", "symlink"),
        ("noext", b"skipped: no dot"),
        (".hidden", b"skipped: nothing before the dot"),
        ("empty.bin", b""),
        ("hl.jpg", "hardlink"),
        ("last.jpg", b"x" * 512),
    ]
    return members


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_matches_tarfile(tmp_path, fmt):
    rng = np.random.default_rng(0)
    data = make_tar(rich_members(rng), fmt)
    idx = _C.TarIndex(str(write(tmp_path, data)))
    ref = reference_samples(data)
    assert index_samples(idx) == ref
    assert len(idx) == len(ref)
    assert idx.keys() == [k for k, _ in ref]
    assert not idx.truncated and idx.errors == [] and idx.dropped == 0
    assert idx.skipped_members == 5  # dir, symlink, noext, .hidden, hardlink
    # multiple dots: key stops at the first dot of the basename, directories keep their dots
    assert ("dir.with.dots/a", {"b.seg.png": b"seg", "txt": b"upper"}) in ref
    assert idx.sample(-1) == idx.samples()[-1][1]
    with pytest.raises(IndexError):
        idx.sample(len(idx))


def test_pax_long_names_and_sizes(tmp_path):
    # Non-ASCII and > 255-char names force pax 'x' records even where ustar prefix could not split.
    name = "π/" + "x" * 300 + ".Caption.TXT"
    data = make_tar([(name, b"hello"), ("b.jpg", b"12")], tarfile.PAX_FORMAT)
    idx = _C.TarIndex(str(write(tmp_path, data)))
    assert idx.keys() == ["π/" + "x" * 300, "b"]
    assert index_samples(idx) == reference_samples(data)
    assert list(idx.sample(0)) == ["caption.txt"]


def test_global_pax_header_ignored(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}) as tf:
        for n in ("k.jpg", "k.txt"):
            ti = tarfile.TarInfo(n)
            ti.size = 3
            tf.addfile(ti, io.BytesIO(b"abc"))
    data = buf.getvalue()
    assert data[156:157] == b"g"
    idx = _C.TarIndex(str(write(tmp_path, data)))
    assert index_samples(idx) == [("k", {"jpg": b"abc", "txt": b"abc"})]


def test_read_is_zero_copy_readonly_and_bounds_checked(tmp_path):
    data = make_tar([("a.txt", b"payload")])
    idx = _C.TarIndex(str(write(tmp_path, data)))
    off, size = idx.sample(0)["txt"]
    view = idx.read(off, size)
    assert isinstance(view, np.ndarray) and view.dtype == np.uint8 and not view.flags.writeable
    assert view.tobytes() == b"payload"
    with pytest.raises(ValueError):
        view[0] = 1
    for bad in [(-1, 1), (0, len(data) + 1), (len(data), 1), (len(data) + 5, 0)]:
        with pytest.raises(ValueError):
            idx.read(*bad)
    assert idx.read(len(data), 0).size == 0
    del idx  # the view keeps the mapping alive
    assert view.tobytes() == b"payload"


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        _C.TarIndex(str(tmp_path / "nope.tar"))
    assert "nope.tar" in str(ei.value)
    with pytest.raises(IsADirectoryError):
        _C.TarIndex(str(tmp_path))


def test_empty_file(tmp_path):
    idx = _C.TarIndex(str(write(tmp_path, b"")))
    assert len(idx) == 0 and idx.truncated and idx.errors


def _layout(data: bytes):
    """Per sample: the data offset of its first member (end of its real header) and the archive end."""
    firsts, ends = [], []
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        keys = []
        for m in tf.getmembers():
            key = _WDS_RE.match(m.name).group(1)
            if not keys or keys[-1] != key:
                keys.append(key)
                firsts.append(m.offset_data)
            ends.append(m.offset_data + m.size)
    return firsts, -(-max(ends) // 512) * 512  # end of the last member's padded data


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_truncated_at_many_offsets(tmp_path, fmt):
    rng = np.random.default_rng(1)
    members = []
    for i in range(8):
        key = ("L" * 120 + f"/k{i}") if i % 3 == 0 else f"k{i}"
        for ext in ("jpg", "txt"):
            members.append((f"{key}.{ext}", rng.bytes(int(rng.integers(1, 900)))))
    data = make_tar(members, fmt)
    full = reference_samples(data)
    firsts, data_end = _layout(data)  # data_end: where the end-of-archive blocks start
    cuts = sorted(set(range(0, len(data), 97)) | {f - 1 for f in firsts} | set(firsts) | {data_end})
    p = tmp_path / "cut.tar"
    for cut in cuts:
        p.write_bytes(data[:cut])
        idx = _C.TarIndex(str(p))
        got = index_samples(idx)
        # Sample k is known complete once the header of sample k+1's first member is fully present.
        n_complete = sum(1 for f in firsts[1:] if f <= cut)
        if cut >= data_end + 512:  # first end-of-archive block present
            n_complete = len(full)
        assert got == full[:n_complete], cut
        clean = cut >= data_end + 512
        assert idx.truncated == (not clean), cut
        assert bool(idx.errors) == (not clean), cut
        if not clean:
            assert any("truncated" in e or "empty" in e for e in idx.errors), (cut, idx.errors)


def test_garbage(tmp_path):
    rng = np.random.default_rng(2)
    good = make_tar([("a.jpg", b"1" * 700), ("a.txt", b"t"), ("b.jpg", b"2"), ("b.txt", b"u")])
    # garbage replacing the header of sample b: a is complete (its last member ended) but we cannot
    # know b's members were all present
    hdr_b = good.index(b"b.jpg") // 512 * 512
    bad = bytearray(good)
    bad[hdr_b : hdr_b + 512] = rng.bytes(512)
    idx = _C.TarIndex(str(write(tmp_path, bytes(bad))))
    assert idx.truncated and any("checksum" in e for e in idx.errors)
    assert idx.keys() == [] and idx.dropped == 1  # 'a' could continue past the damage
    # random junk files never crash
    for n in (1, 511, 512, 513, 1024, 4096):
        idx = _C.TarIndex(str(write(tmp_path, rng.bytes(n), f"junk{n}.tar")))
        assert len(idx) == 0 and idx.truncated and idx.errors


def test_bad_size_field_and_huge_size(tmp_path):
    data = bytearray(make_tar([("a.jpg", b"abc"), ("b.jpg", b"def")], tarfile.GNU_FORMAT))
    hdr_b = data.index(b"b.jpg")
    # base-256 size far beyond the file, with a consistent checksum
    data[hdr_b + 124 : hdr_b + 136] = b"\x80" + b"\x00" * 3 + b"\x7f" + b"\xff" * 7
    data[hdr_b + 148 : hdr_b + 156] = b" " * 8
    chk = sum(data[hdr_b : hdr_b + 512])
    data[hdr_b + 148 : hdr_b + 156] = f"{chk:06o}\x00 ".encode()
    idx = _C.TarIndex(str(write(tmp_path, bytes(data))))
    assert idx.keys() == ["a"] and idx.truncated
    assert any("member needs" in e for e in idx.errors)


def test_duplicate_member_reported(tmp_path):
    data = make_tar([("a.jpg", b"first"), ("a.jpg", b"second"), ("a.txt", b"t")])
    idx = _C.TarIndex(str(write(tmp_path, data)))
    assert index_samples(idx) == [("a", {"jpg": b"first", "txt": b"t"})]
    assert any("duplicate" in e for e in idx.errors) and not idx.truncated


def test_member_table(tmp_path):
    data = make_tar([("a.jpg", b"1"), ("a.txt", b"22"), ("b.jpg", b"333")])
    idx = _C.TarIndex(str(write(tmp_path, data)))
    sid, off, size, exts = idx.member_table()
    assert sid.tolist() == [0, 0, 1] and size.tolist() == [1, 2, 3] and exts == ["jpg", "txt", "jpg"]
    assert [bytes(idx.read(o, s)) for o, s in zip(off, size)] == [b"1", b"22", b"333"]


def test_non_utf8_names_use_surrogateescape(tmp_path):
    # Raw (non-UTF-8) bytes in a GNU name: tarfile decodes them with surrogateescape; so do we.
    data = make_tar([("caf\udce9.JPG", b"x"), ("caf\udce9.jpg", b"dup")], tarfile.GNU_FORMAT)
    assert b"caf\xe9.JPG" in data
    idx = _C.TarIndex(str(write(tmp_path, data)))
    assert idx.keys() == ["caf\udce9"]
    assert idx.samples() == [("caf\udce9", {"jpg": idx.sample(0)["jpg"]})]
    assert any("duplicate" in e for e in idx.errors)
    assert idx.keys() == [k for k, _ in reference_samples(data)]


def test_damage_kind_and_lost_tail(tmp_path):
    """What stopped the parse, and what lies after it: nothing for a clean file, the bytes after the
    cut for a truncated one, and the samples a scan still finds after a bad header."""
    members = [(f"k{i:03d}.{ext}", bytes([i]) * 700) for i in range(6) for ext in ("jpg", "txt")]
    data = make_tar(members, fmt=tarfile.USTAR_FORMAT)
    cases = {"clean": data, "empty": b""}
    cases["truncated"] = data[: 512 * 9 + 100]  # inside k001.txt's data (members are 512 + 1024 bytes)
    bad = bytearray(data)
    bad[1536 * 4 : 1536 * 4 + 512] = b"\x01" * 512  # k002.jpg's header
    cases["bad_header"] = bytes(bad)
    expect = {  # damage, samples kept, dropped, lost_tail_bytes, lost_tail_samples
        "clean": ("", 6, 0, 0, 0),
        "empty": ("empty", 0, 0, 0, 0),
        "truncated": ("truncated", 1, 1, 512 * 9 + 100 - 1536 * 3, 0),
        # k001 is dropped (more of its members might have followed), k002 (its txt) .. k005 are the lost tail
        "bad_header": ("bad_header", 1, 1, len(data) - 1536 * 4, 4),
    }
    for name, blob in cases.items():
        p = tmp_path / f"{name}.tar"
        p.write_bytes(blob)
        idx = _C.TarIndex(str(p))
        got = (idx.damage, len(idx), idx.dropped, idx.lost_tail_bytes, idx.lost_tail_samples)
        assert got == expect[name], (name, got)
        assert idx.truncated == (name != "clean")


def test_a_shard_truncated_while_mapped_dies_saying_which_shard(tmp_path):
    """Rewriting a shard in place during a run (rsync --inplace, a rebuild under the same name) makes the next read
    of the mapping raise SIGBUS: the process used to die with no word; now stderr names the shard and the cause."""
    import signal
    import subprocess
    import sys
    import textwrap

    shard = write(tmp_path, make_tar([(f"k{i}.txt", b"x" * 5000) for i in range(8)]))
    code = textwrap.dedent(f"""
        import faulthandler, os
        from bmclip import _C
        faulthandler.disable()  # as outside pytest: only bmclip's handler
        idx = _C.TarIndex({str(shard)!r})
        off, size = idx.samples()[-1][1]["txt"]
        os.truncate({str(shard)!r}, 512)
        print(bytes(idx.read(off, size))[:1])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stderr[-2000:])
    assert f"bmclip: SIGBUS reading shard {shard}: the file was truncated or rewritten while it was being read" \
        in r.stderr, r.stderr
