"""bmclip build-dataset's package readers on hostile inputs: a package's memory stays bounded whatever it holds,
two images of one file name are never paired by guess, a damaged tar stream is refused whole (never read in
part), skipping a gzip bomb runs at decompression speed, folder links out of the package are refused, and a
``tar -C dir .`` package reports no unsafe member."""

from __future__ import annotations

import gc
import gzip
import io
import os
import tarfile
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bmclip.data.pmc import build_dataset
from bmclip.data.pmc import sources as sources_mod
from bmclip.data.pmc.sources import Package, PackageError, read_package

NO_SPLITS = {"val_fraction": 0, "test_fraction": 0}

# ------------------------------------------------------------------------------------------ helpers


def _jpeg(seed: int, size=(200, 150), quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
    b = io.BytesIO()
    Image.fromarray(small, "RGB").resize(size, Image.Resampling.BICUBIC).save(b, format="JPEG", quality=quality)
    return b.getvalue()


def _xml(pmcid: str, figs: list[tuple[str, str]]) -> bytes:
    """A JATS article whose figures are (fig id, graphic href), each with a caption naming the figure."""
    fx = "".join(
        f'<fig id="{fid}"><label>Figure {i + 1}</label><caption><p>Caption of figure {fid} of {pmcid}, long '
        f'enough to be kept.</p></caption><graphic xlink:href="{href}"/></fig>'
        for i, (fid, href) in enumerate(figs)
    )
    return (
        '<?xml version="1.0"?><article xmlns:xlink="http://www.w3.org/1999/xlink"><front><article-meta>'
        f'<article-id pub-id-type="pmc">{pmcid[3:]}</article-id>'
        '<permissions><license xlink:href="http://creativecommons.org/licenses/by/4.0/"/></permissions>'
        f"</article-meta></front><body>{fx}</body></article>"
    ).encode()


def _tar(members: list[tuple[str, bytes | None]]) -> bytes:
    """An uncompressed tar (what Python and GNU tar write: two zero blocks, padded to a 10 KiB record);
    a member whose data is None is a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _offsets(raw: bytes) -> dict[str, int]:
    """Member name -> offset of its header block."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return {m.name: m.offset for m in tf.getmembers()}


def _read(path: Path, **kw):
    return read_package(Package(path.name, "tar" if path.is_file() else "folder", str(path)), **kw)


def _samples(out: Path) -> dict[str, bytes]:
    """Sample key -> its stored JPEG."""
    got = {}
    for shard in sorted(out.glob("*-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    got[m.name[: -len(".jpg")]] = tf.extractfile(m).read()
    return got


def _build(inp: Path, out: Path, **kw) -> dict:
    return build_dataset([str(inp)], out, num_workers=0, progress=False, **NO_SPLITS, **kw)


# ------------------------------------------------------------------------------------------ 1. bounded memory


def test_a_package_keeps_no_more_than_the_memory_budget_of_its_members_in_memory(tmp_path, monkeypatch):
    """24 MiB of image members (a gzip of zeros: a few KB) before the XML: what the package holds beyond the
    budget goes to a temporary file, and still reads back exactly; the read's peak memory stays a few MiB (it
    was all of it: a 9.5 MB package, 9 GB). Kept in memory or in the file, a package builds the same shards,
    and the file leaves nothing behind."""
    monkeypatch.setattr(sources_mod, "MEMORY_BUDGET_BYTES", 256 << 10, raising=False)
    fig = _jpeg(1)
    members = [(f"P/zeros{i}.jpg", bytes(1 << 20)) for i in range(24)]
    members += [("P/f1.jpg", fig), ("P/P100.nxml", _xml("PMC100", [("F1", "f1")]))]  # the XML comes last
    path = tmp_path / "P100.tar.gz"
    path.write_bytes(gzip.compress(_tar(members), compresslevel=1))
    gc.collect()
    tracemalloc.start()
    try:
        content = _read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"reading a package of 24 MiB of members took {peak / 2**20:.1f} MiB"
    assert content.media["f1.jpg"] == fig and content.media["zeros23.jpg"] == bytes(1 << 20)
    assert [name for name, _ in content.xml] == ["P/P100.nxml"]
    del content

    figs = [(f"F{k}", f"f{k}") for k in (1, 2, 3)]
    members = [(f"P/f{k}.jpg", _jpeg(k, (300 + 40 * k, 200), quality=95)) for k in (1, 2, 3)]
    src = tmp_path / "in"
    src.mkdir()
    (src / "P1.tar.gz").write_bytes(gzip.compress(_tar(members + [("P/P1.nxml", _xml("PMC1", figs))])))
    monkeypatch.setattr(sources_mod, "MEMORY_BUDGET_BYTES", 64 << 20)
    _build(src, tmp_path / "memory")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(sources_mod, "MEMORY_BUDGET_BYTES", 0)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr("tempfile.tempdir", None)
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    _build(src, tmp_path / "spilled")
    gc.collect()
    shards = sorted(p.name for p in (tmp_path / "memory").iterdir() if p.suffix in (".tar", ".idx"))
    assert shards and all(
        (tmp_path / "memory" / n).read_bytes() == (tmp_path / "spilled" / n).read_bytes() for n in shards
    )
    assert sorted(_samples(tmp_path / "spilled")) == ["PMC1_F1", "PMC1_F2", "PMC1_F3"]
    assert list(tmp.iterdir()) == []
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) <= fds


def test_a_folder_image_above_max_member_bytes_is_a_counted_skip_like_a_tar_member(tmp_path):
    d = tmp_path / "in" / "PMC7"
    d.mkdir(parents=True)
    small, big = _jpeg(1), _jpeg(2, (900, 700), quality=98)
    assert len(big) > 4 * len(small)
    (d / "PMC7.nxml").write_bytes(_xml("PMC7", [("F1", "small"), ("F2", "big")]))
    (d / "small.jpg").write_bytes(small)
    (d / "big.jpg").write_bytes(big)  # (the probe's case: a sparse 12 GB .jpg, read whole -> MemoryError)
    stats = _build(tmp_path / "in", tmp_path / "out", max_member_bytes=len(big) - 1)
    assert sorted(_samples(tmp_path / "out")) == ["PMC7_F1"]
    assert stats["skips"]["package"] == {"member_too_large": 1}
    assert stats["skips"]["figure"] == {"missing_image": 1}


# ------------------------------------------------------------------------------------------ 2. duplicate names


def test_image_members_sharing_a_file_name_are_counted_and_never_paired_by_guess(tmp_path):
    """PMC1/f1.jpg and PMC1/sub/f1.jpg (and F3.JPG / f3.jpg, as media are looked up case-insensitively): which
    one a graphic means is unknown, so neither is used; it used to be whichever came last."""
    a, b, c, d, e = (_jpeg(k) for k in range(10, 15))
    figs = [("F1", "f1"), ("F2", "f2"), ("F3", "f3")]
    members = [
        ("PMC1/PMC1.nxml", _xml("PMC1", figs)),
        ("PMC1/f1.jpg", a),
        ("PMC1/f2.jpg", b),
        ("PMC1/sub/f1.jpg", c),
        ("PMC1/F3.JPG", d),
        ("PMC1/f3.jpg", e),
    ]
    src = tmp_path / "in"
    src.mkdir()
    (src / "PMC1.tar.gz").write_bytes(gzip.compress(_tar(members)))
    stats = _build(src, tmp_path / "out")
    assert _samples(tmp_path / "out") == {"PMC1_F2": b}
    assert stats["skips"]["package"] == {"duplicate_media_name": 4}
    assert stats["skips"]["figure"] == {"missing_image": 2}


# ------------------------------------------------------------------------------------------ 3. all or nothing


def _three_member_tar() -> bytes:
    return _tar([("P/P1.nxml", _xml("PMC1", [("F1", "a")])), ("P/a.jpg", _jpeg(1)), ("P/b.jpg", _jpeg(2))])


def _cut_at_last_header(raw: bytes) -> bytes:
    return raw[: _offsets(raw)["P/b.jpg"]]  # a 512-byte boundary: no end-of-archive block


def _flip_header_byte(raw: bytes) -> bytes:
    b = bytearray(raw)
    b[_offsets(raw)["P/b.jpg"] + 5] ^= 0x20  # the second image's header no longer matches its checksum
    return bytes(b)


def _size_lie_small(raw: bytes) -> bytes:
    """The first image's header says 2 KiB less (checksum fixed): a piece of its data is read as a header."""
    b = bytearray(raw)
    off = _offsets(raw)["P/a.jpg"]
    size = int(b[off + 124 : off + 135], 8)
    b[off + 124 : off + 136] = b"%011o\0" % (size - 2048)
    b[off + 148 : off + 156] = b" " * 8
    b[off + 148 : off + 156] = b"%06o\0 " % sum(b[off : off + 512])
    return bytes(b)


@pytest.mark.parametrize(
    ("damage", "gz"),
    [(_cut_at_last_header, False), (_cut_at_last_header, True), (_flip_header_byte, True), (_size_lie_small, True)],
    ids=["cut_at_boundary.tar", "cut_at_boundary.tar.gz", "bad_header_mid", "size_lie_small"],
)
def test_a_tar_damaged_after_its_first_member_is_a_corrupt_package_not_read_in_part(tmp_path, damage, gz):
    raw = damage(_three_member_tar())
    path = tmp_path / ("p.tar.gz" if gz else "p.tar")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(PackageError) as e:
        _read(path)
    assert e.value.reason == "corrupt_package"


def test_a_multi_member_gzip_is_read_whole_and_complete_archives_are_accepted(tmp_path):
    raw = _three_member_tar()
    cut = _offsets(raw)["P/a.jpg"]
    names = {"a.jpg", "b.jpg"}
    multi = tmp_path / "multi.tar.gz"  # two gzip members split inside the archive (GNU tar lists all members)
    multi.write_bytes(gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]))
    assert set(_read(multi).media) == names
    end = max(_offsets(raw).values()) + 512 + 512 * ((len(_jpeg(2)) + 511) // 512)
    assert raw[end : end + 1024] == bytes(1024)
    for name, data in [
        ("lone_zero_block.tar", raw[: end + 512]),  # GNU tar: "A lone zero block", and lists every member
        ("zero_padded_gzip.tar.gz", gzip.compress(raw) + bytes(100)),
        ("plain.tar", raw),
    ]:
        (tmp_path / name).write_bytes(data)
        assert set(_read(tmp_path / name).media) == names, name


# ------------------------------------------------------------------------------------------ 4. gzip bomb speed


def test_skipping_a_compressible_member_runs_at_decompression_speed(tmp_path):
    """A 128 MiB member of zeros (a 130 KB gzip) that is not an image is read through, not kept: ~0.1 s (it took
    ~7 s, tarfile's gzip stream copying its buffer over and over: a 10 GiB bomb ran for minutes). Zeros after the
    end-of-archive block count toward max_package_bytes too."""
    size = 128 << 20
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    ti = tarfile.TarInfo("P/zeros.bin")
    ti.size = size
    zero = bytes(8 << 20)
    parts = [co.compress(ti.tobuf(format=tarfile.GNU_FORMAT))]
    parts += [co.compress(zero) for _ in range(size // len(zero))]
    parts += [co.compress(_tar([("P/a.jpg", _jpeg(1))])), co.flush()]
    path = tmp_path / "bomb.tar.gz"
    path.write_bytes(b"".join(parts))
    t = time.monotonic()
    content = _read(path)
    assert time.monotonic() - t < 2.0
    assert list(content.media) == ["a.jpg"]
    padded = tmp_path / "padded.tar.gz"  # a complete archive followed by 2 MiB of zeros
    padded.write_bytes(gzip.compress(_tar([("P/a.jpg", _jpeg(1))]) + bytes(2 << 20), compresslevel=1))
    with pytest.raises(PackageError) as e:
        _read(padded, max_package_bytes=1 << 20)
    assert e.value.reason == "package_too_large"


# ------------------------------------------------------------------------------------------ 5. folder links


def test_a_folder_link_out_of_the_package_is_refused_and_counted(tmp_path):
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(_jpeg(20))
    d = tmp_path / "in" / "PMC5"
    d.mkdir(parents=True)
    (d / "PMC5.nxml").write_bytes(_xml("PMC5", [("F1", "out"), ("F2", "in"), ("F3", "passwd")]))
    inside = _jpeg(21)
    (d / "real.jpg").write_bytes(inside)
    os.symlink(outside, d / "out.jpg")
    os.symlink("real.jpg", d / "in.jpg")  # a link within the package is fine
    os.symlink("/etc/passwd", d / "passwd.jpg")
    stats = _build(tmp_path / "in", tmp_path / "out")
    assert _samples(tmp_path / "out") == {"PMC5_F2": inside}
    assert stats["skips"]["package"] == {"unsafe_member": 2}
    assert stats["skips"]["figure"] == {"missing_image": 2}


# ------------------------------------------------------------------------------------------ 6. ./ entry


def test_the_dot_directory_of_a_tar_made_with_dash_C_dir_dot_is_not_an_unsafe_member(tmp_path):
    members = [(".", None), ("./P1.nxml", _xml("PMC1", [("F1", "a")])), ("./a.jpg", _jpeg(1)), ("./", None)]
    path = tmp_path / "P1.tar.gz"
    path.write_bytes(gzip.compress(_tar(members)))
    content = _read(path)
    assert dict(content.skips) == {} and list(content.media) == ["a.jpg"]
    path.write_bytes(gzip.compress(_tar([("./P1.nxml", _xml("PMC1", [])), ("../evil.jpg", _jpeg(2))])))
    assert dict(_read(path).skips) == {"unsafe_member": 1}  # a member that climbs out still is one


def test_a_jpeg_of_more_than_500_scans_is_refused_whichever_route_decodes_it(monkeypatch):
    """The native transcode refused it, but Pillow (no extension, or a JPEG it does not transcode) spent
    ~95 s on one such 2 MB file."""
    from bmclip.data.pmc import media

    b = io.BytesIO()
    Image.fromarray(np.full((100, 120, 3), 128, np.uint8)).save(b, "JPEG", progressive=True)
    d = b.getvalue()
    last = d.rindex(b"\xff\xda")
    bomb = d[:last] + d[last:-2] * 600 + d[-2:]
    for native in (True, False):
        if not native:
            monkeypatch.setattr(media, "_NATIVE", False)  # as without the extension: Pillow decodes
        with pytest.raises(media.ImageSkip, match="more than 500 progressive scans") as e:
            media.process_image(bomb, min_side=1)
        assert e.value.reason == "undecodable_image"
    assert media.process_image(d, min_side=1).size == (120, 100)
