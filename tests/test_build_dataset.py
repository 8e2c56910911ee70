"""bmclip build-dataset: real articles, generated edge-case packages, determinism, slices, kill-and-resume."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bmclip.data.pmc import build_dataset, parse_jats
from bmclip.data.pmc.build import BuildOptions, merge_staging, split_of, stage
from bmclip.data.pmc.dedup import Deduplicator
from bmclip.data.pmc.media import ImageSkip, dhash64, process_image, resolve_graphics
from bmclip.errors import ConfigError, DataError

# ------------------------------------------------------------------------------------------ helpers


def _read_shards(out: Path) -> dict[str, dict]:
    """All samples of all shards: key -> {'jpg', 'json', 'txt', 'split', 'shard'}."""
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("*-*.tar")):
        split = shard.name.split("-")[0]
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                s = samples.setdefault(key, {"split": split, "shard": shard.name})
                s[ext] = tf.extractfile(m).read()
    return samples


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".idx")}


def _noise_image(seed: int, size=(320, 240), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth random field (upsampled noise) so that resizing keeps it recognisable for dHash
    small = rng.integers(0, 256, size=(size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(small, "RGB").resize(size, Image.Resampling.BICUBIC)
    return im.convert(mode)


def _encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, format=fmt, **kw)
    return b.getvalue()


def _article_xml(
    pmcid: str, figs: list[tuple[str, str, list[str]]], licence="http://creativecommons.org/licenses/by/4.0/"
):
    fx = "".join(
        f'<fig id="{fid}"><label>Figure {i + 1}</label><caption><p>{cap}</p></caption>'
        + "".join(f'<graphic xlink:href="{h}"/>' for h in hrefs)
        + "</fig>"
        for i, (fid, cap, hrefs) in enumerate(figs)
    )
    return (
        '<?xml version="1.0"?><!DOCTYPE article PUBLIC "-//NLM//DTD JATS" "JATS-archivearticle1.dtd">'
        '<article xmlns:xlink="http://www.w3.org/1999/xlink"><front><article-meta>'
        f'<article-id pub-id-type="pmc">{pmcid[3:]}</article-id>'
        f'<article-id pub-id-type="pmid">1{pmcid[3:]}</article-id>'
        f'<article-id pub-id-type="doi">10.5555/{pmcid}</article-id>'
        f'<permissions><license xlink:href="{licence}"/></permissions></article-meta></front>'
        f"<body>{fx}</body></article>"
    ).encode()


def _write_tar(path: Path, members: list[tuple[str, bytes]], gz: bool = True) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return path


def _package(root: Path, pmcid: str, n_figs: int = 2, seed: int = 0, **kw) -> Path:
    """A PMC OA-style package PMCxxx.tar.gz with n_figs JPEG figures (+ .gif thumbnails)."""
    figs, members = [], []
    for k in range(1, n_figs + 1):
        stem = f"{pmcid.lower()}-f{k}"
        figs.append((f"F{k}", f"Figure {k} of {pmcid}: a synthetic figure caption with enough words.", [stem]))
        im = _noise_image(seed * 100 + k, **kw)
        members.append((f"{pmcid}/{stem}.jpg", _encode(im, quality=95)))
        members.append((f"{pmcid}/{stem}.gif", _encode(im.resize((100, 75)), "GIF")))
    members.insert(0, (f"{pmcid}/{pmcid}.nxml", _article_xml(pmcid, figs)))
    return _write_tar(root / f"{pmcid}.tar.gz", members)


def _build(inputs, out, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    return build_dataset([str(i) for i in inputs], out, **kw)


# ------------------------------------------------------------------------------------------ real articles


@pytest.mark.slow
def test_real_folders_one_sample_per_resolvable_figure(pmc_samples, tmp_path):
    out = tmp_path / "out"
    stats = _build(
        [pmc_samples / "elife-32671", pmc_samples / "PMC10802347", pmc_samples / "pone.0056489"],
        out,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    samples = _read_shards(out)
    by_article: dict[str, list[str]] = {}
    for k, s in samples.items():
        by_article.setdefault(json.loads(s["json"])["article_id"], []).append(k)
    # elife-32671: 5 of 5; PMC10802347: 3 of 4 (f0001.jpg is missing, its .gif thumbnail is not used);
    # pone.0056489: 3 figure TIFFs (the t00x.tif table images are not figures)
    # elife-32671 has no PMCID/DOI/PMID of its own: its ID is the hash of its XML
    eid = "xml:" + hashlib.sha256((pmc_samples / "elife-32671" / "manuscript.xml").read_bytes()).hexdigest()[:16]
    assert sorted(by_article[eid]) == [f"{eid.replace(':', '_')}_fig{i}" for i in range(1, 6)]
    assert sorted(by_article["PMC10802347"]) == ["PMC10802347_F2", "PMC10802347_F3", "PMC10802347_F4"]
    assert len(by_article["doi:10.1371/journal.pone.0056489"]) == 3
    assert stats["pairs"] == {"train": 11, "val": 0, "test": 0}
    assert stats["skips"]["figure"] == {"thumbnail_only": 1}
    assert stats["figures"] == 12

    # sample content against independent readings of the sources
    art = parse_jats(pmc_samples / "PMC10802347" / "nihpp-2023.12.31.573776v1.nxml")
    s = samples["PMC10802347_F3"]
    assert s["txt"].decode() == art.figures[2].caption
    meta = json.loads(s["json"])
    assert meta["pmcid"] == "PMC10802347" and meta["pmid"] == "38260464"
    assert meta["figure_id"] == "F3" and meta["label"] == "Figure 3."
    assert meta["license"] == "https://creativecommons.org/licenses/by-nc-nd/4.0/"
    assert meta["file"] == "nihpp-2023.12.31.573776v1-f0003.jpg"
    src = Image.open(pmc_samples / "PMC10802347" / "nihpp-2023.12.31.573776v1-f0003.jpg")
    assert meta["original_size"] == list(src.size) == [720, 541]
    im = Image.open(io.BytesIO(s["jpg"]))
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (512, 385)  # 541*512/720 = 384.7
    ref = np.asarray(src.convert("RGB").resize((512, 385), Image.Resampling.BICUBIC), dtype=np.float64)
    assert np.abs(np.asarray(im, dtype=np.float64) - ref).mean() < 6.0  # same picture, JPEG noise only
    tif = json.loads(samples["10_1371_journal_pone_0056489_pone-0056489-g003"]["json"])
    assert tif["file"] == "pone.0056489.g003.tif" and tif["href"] == "info:doi/10.1371/journal.pone.0056489.g003"


def test_fixture_copies_in_ci(fixtures_dir, tmp_path):
    out = tmp_path / "o"
    stats = _build([fixtures_dir / "pmc"], out, val_fraction=0, test_fraction=0, shard_size=4)
    # elife-32671 (5) + pone.0056489 (3); the XML-only fixtures have no images
    assert stats["pairs"]["train"] == 8
    assert stats["skips"]["package"] == {"non_jats_xml": 1}
    assert stats["figures"] == stats["pairs_total"] + sum(stats["skips"]["figure"].values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert [sh["num_samples"] for sh in manifest["shards"]] == [4, 4]
    assert manifest["splits"]["train"]["pattern"] == "train-{000000..000001}.tar"
    for sh in manifest["shards"]:
        data = (out / sh["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sh["sha256"] and len(data) == sh["bytes"]
        _check_dali_index(out / sh["name"], out / sh["index"])
    assert (out / "stats.png").stat().st_size > 1000
    assert not (out / "_staging").exists()


def _check_dali_index(tar_path: Path, idx_path: Path) -> None:
    """The .idx matches the tar as read by tarfile: 'v1.2 N' then 'ext offset size name' groups."""
    lines = idx_path.read_text().splitlines()
    head = lines[0].split()
    assert head[0] == "v1.2" and int(head[1]) == len(lines) - 1
    data = tar_path.read_bytes()
    with tarfile.open(tar_path) as tf:
        members = {m.name: m for m in tf.getmembers()}
    seen = 0
    for line in lines[1:]:
        toks = line.split(" ")
        assert len(toks) == 12
        for i in range(0, 12, 4):
            ext, off, size, name = toks[i], int(toks[i + 1]), int(toks[i + 2]), toks[i + 3]
            m = members[name]
            assert name.endswith("." + ext) and m.offset_data == off and m.size == size
            assert m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == ""
            assert "." not in name[: -len(ext) - 1]
            seen += 1
            assert data[off : off + size] == tf_extract(tar_path, name)
    assert seen == len(members)


def tf_extract(tar_path: Path, name: str) -> bytes:
    with tarfile.open(tar_path) as tf:
        return tf.extractfile(name).read()


# ------------------------------------------------------------------------------------------ unit pieces


def test_resolve_graphics_rules():
    media = {
        n.lower(): n for n in ["a-f1.gif", "a-f1.JPG", "pone.0056489.g001.tif", "x.png", "x.jpg", "only.gif", "f2.tif"]
    }
    assert resolve_graphics(["a-f1"], media) == ["a-f1.JPG", "a-f1.gif"]
    assert resolve_graphics(["info:doi/10.1371/journal.pone.0056489.g001"], media) == ["pone.0056489.g001.tif"]
    assert resolve_graphics(["x.png"], media) == ["x.jpg", "x.png"]  # JPEG ranks first
    assert resolve_graphics(["dir/sub/only"], media) == ["only.gif"]
    assert resolve_graphics(["f2.gif", "f2.tif"], media) == ["f2.tif"]
    assert resolve_graphics(["missing"], media) == []


def test_process_image_modes_and_guards():
    # 16-bit greyscale TIFF is stretched to 8 bits, not clipped
    a = (np.arange(200 * 100, dtype=np.uint16).reshape(100, 200) * 3).astype(np.uint16)
    r = process_image(_encode(Image.fromarray(a), "TIFF"), max_side=100, min_side=10)
    im = Image.open(io.BytesIO(r.jpeg))
    assert im.size == (100, 50) and r.orig_size == (200, 100)
    px = np.asarray(im.convert("L"), dtype=np.float64)
    assert px.min() < 10 and px.max() > 245
    # transparent background -> white
    rgba = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    r = process_image(_encode(rgba, "PNG"), min_side=10)
    assert np.asarray(Image.open(io.BytesIO(r.jpeg))).min() > 250
    with pytest.raises(ImageSkip) as e:
        process_image(b"")
    assert e.value.reason == "empty_image"
    with pytest.raises(ImageSkip) as e:
        process_image(_encode(_noise_image(1))[:300])
    assert e.value.reason == "undecodable_image"
    with pytest.raises(ImageSkip) as e:
        process_image(b"not an image at all")
    assert e.value.reason == "undecodable_image"
    with pytest.raises(ImageSkip) as e:
        process_image(_encode(_noise_image(1, size=(80, 800))), max_aspect=5)
    assert e.value.reason == "extreme_aspect"
    with pytest.raises(ImageSkip) as e:
        process_image(_encode(_noise_image(1, size=(50, 40))), min_side=64)
    assert e.value.reason == "small_image"
    with pytest.raises(ImageSkip) as e:
        process_image(_png_bomb(100_000, 100_000))
    assert e.value.reason == "too_many_pixels"
    with pytest.raises(ImageSkip) as e:
        process_image(_png_bomb(12_000, 9_000))  # above our limit, below PIL's own 2x error
    assert e.value.reason == "too_many_pixels"


def _png_bomb(w: int, h: int) -> bytes:
    """A PNG header declaring w x h pixels with (almost) no data: decoding it would allocate w*h*3 bytes."""

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_dedup_banding_finds_every_pair_within_radius():
    rng = np.random.default_rng(0)
    base = [int(x) for x in rng.integers(0, 2**63, size=300, dtype=np.int64)]
    thumbs = [rng.integers(0, 256, 256, dtype=np.uint8).tobytes() for _ in base]
    d = Deduplicator(near_threshold=3, max_mad=2.5)
    for i, h in enumerate(base):
        assert d.check_and_add(f"{i:016x}", h, thumbs[i]) is None
    for i, h in enumerate(base[:100]):
        flips = rng.choice(64, size=i % 4, replace=False)
        h2 = h
        for b in flips:
            h2 ^= 1 << int(b)
        # same picture up to +-2 grey levels: verified near duplicate
        t2 = np.clip(np.frombuffer(thumbs[i], np.uint8).astype(int) + rng.integers(-2, 3, 256), 0, 255)
        assert d.check_and_add(f"{i + 1000:016x}", h2, t2.astype(np.uint8).tobytes()) == "duplicate_near"
    # a dHash collision whose thumbnail differs (e.g. two different bar charts) is not a duplicate
    other = rng.integers(0, 256, 256, dtype=np.uint8).tobytes()
    assert d.check_and_add("aaaa000000000000", base[7], other) is None
    # 4+ bits away from everything (checked by brute force) is new even with the same thumbnail
    far = base[0] ^ 0b1111
    if min((far ^ b).bit_count() for b in base) > 3:
        assert d.check_and_add("ffff000000000000", far, thumbs[0]) is None
    assert d.check_and_add(f"{5:016x}", 12345, other) == "duplicate_exact"
    off = Deduplicator(near_threshold=-1)
    assert off.check_and_add("01", 7, other) is None and off.check_and_add("02", 7, other) is None


def test_dhash_stable_under_reencoding():
    im = _noise_image(3, size=(400, 300))
    h1 = dhash64(im)
    h2 = dhash64(Image.open(io.BytesIO(_encode(im.resize((200, 150)), quality=60))))
    assert (h1 ^ h2).bit_count() <= 3


# ------------------------------------------------------------------------------------------ generated edge cases


def test_generated_edge_cases(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _package(src, "PMC100", n_figs=3, seed=1)
    # missing image: F2 has no file at all
    figs = [("F1", "A caption that is long enough.", ["pmc101-f1"]), ("F2", "Another long caption.", ["pmc101-f2"])]
    _write_tar(
        src / "PMC101.tar.gz",
        [
            ("PMC101/PMC101.nxml", _article_xml("PMC101", figs)),
            ("PMC101/pmc101-f1.jpg", _encode(_noise_image(11))),
        ],
    )
    # malformed XML
    _write_tar(src / "PMC102.tar.gz", [("PMC102/PMC102.nxml", b"<article><body><fig></article>")])
    # traversal / absolute member names refused (and the image they carry is not used)
    figs = [("F1", "Traversal caption long enough.", ["evil"]), ("F2", "Fine caption long enough.", ["ok"])]
    _write_tar(
        src / "PMC103.tar.gz",
        [
            ("PMC103/PMC103.nxml", _article_xml("PMC103", figs)),
            ("../../evil.jpg", _encode(_noise_image(31))),
            ("/etc/evil.jpg", _encode(_noise_image(32))),
            ("PMC103/ok.jpg", _encode(_noise_image(33))),
        ],
    )
    # truncated gzip
    good = _package(tmp_path, "PMC104", n_figs=2, seed=4)
    (src / "PMC104.tar.gz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    # zero-byte package; zero-byte image member; short caption; bomb
    (src / "PMC105.tar.gz").write_bytes(b"")
    figs = [
        ("F1", "Zero-byte image caption.", ["z"]),
        ("F2", "tiny", ["t"]),
        ("F3", "A decompression bomb figure.", ["bomb"]),
        ("F4", "", ["nocap"]),
    ]
    _write_tar(
        src / "PMC106.tar.gz",
        [
            ("PMC106/PMC106.nxml", _article_xml("PMC106", figs)),
            ("PMC106/z.jpg", b""),
            ("PMC106/t.jpg", _encode(_noise_image(61))),
            ("PMC106/bomb.png", _png_bomb(50_000, 50_000)),
            ("PMC106/nocap.jpg", _encode(_noise_image(62))),
        ],
    )
    # duplicates across articles: PMC107 repeats PMC100's F1 exactly and F2 re-encoded smaller (near dup)
    with tarfile.open(src / "PMC100.tar.gz") as tf:
        f1 = tf.extractfile("PMC100/pmc100-f1.jpg").read()
        f2 = Image.open(io.BytesIO(tf.extractfile("PMC100/pmc100-f2.jpg").read()))
    figs = [("F1", "Exact duplicate of another article.", ["d1"]), ("F2", "Near duplicate of another one.", ["d2"])]
    _write_tar(
        src / "PMC107.tar.gz",
        [
            ("PMC107/PMC107.nxml", _article_xml("PMC107", figs)),
            ("PMC107/d1.jpg", f1),
            ("PMC107/d2.jpg", _encode(f2.resize((300, 225)), quality=70)),
        ],
    )
    out = tmp_path / "out"
    stats = _build([src], out, val_fraction=0, test_fraction=0)
    samples = _read_shards(out)
    assert sorted(samples) == ["PMC100_F1", "PMC100_F2", "PMC100_F3", "PMC101_F1", "PMC103_F2"]
    sk = stats["skips"]
    assert sk["package"] == {"corrupt_package": 2, "unsafe_member": 2, "xml_error": 1}
    assert sk["figure"] == {
        "duplicate_exact": 1,
        "duplicate_near": 1,
        "empty_image": 1,
        "missing_image": 2,
        "no_caption": 1,
        "short_caption": 1,
        "too_many_pixels": 1,
    }
    assert stats["figures"] == stats["pairs_total"] + sum(sk["figure"].values())
    assert any("PMC102" in e and "malformed XML" in e for e in stats["first_errors"])
    assert stats["licenses"] == {"CC BY": 5}


def test_pmc_cloud_layout_versions_and_retraction(tmp_path):
    src = tmp_path / "cloud"
    for ver, seed in ((1, 1), (2, 2)):
        d = src / f"PMC555.{ver}"
        d.mkdir(parents=True)
        xml = _article_xml("PMC555", [("F1", f"Version {ver} caption, long enough.", ["media-g001.jpg"])], licence="")
        xml = xml.replace(b'<permissions><license xlink:href=""/></permissions>', b"")
        (d / f"PMC555.{ver}.xml").write_bytes(xml)
        (d / f"PMC555.{ver}.txt").write_text("plain text")
        (d / "media-g001.jpg").write_bytes(_encode(_noise_image(seed)))
        meta = {"pmcid": "PMC555", "version": ver, "license_code": "CC BY", "is_retracted": False,
                "xml_url": f"s3://pmc-oa-opendata/PMC555.{ver}/PMC555.{ver}.xml",
                "media_urls": [f"s3://pmc-oa-opendata/PMC555.{ver}/media-g001.jpg"]}  # fmt: skip
        (d / f"PMC555.{ver}.json").write_text(json.dumps(meta))
    d = src / "PMC777.1"
    d.mkdir()
    (d / "PMC777.1.xml").write_bytes(_article_xml("PMC777", [("F1", "Retracted figure caption.", ["g1.jpg"])]))
    (d / "PMC777.1.json").write_text(json.dumps({"pmcid": "PMC777", "version": 1, "is_retracted": True}))
    (d / "g1.jpg").write_bytes(_encode(_noise_image(9)))
    out = tmp_path / "out"
    stats = _build([src], out, val_fraction=0, test_fraction=0)
    samples = _read_shards(out)
    assert list(samples) == ["PMC555_F1"]
    assert samples["PMC555_F1"]["txt"] == b"Version 2 caption, long enough."
    assert json.loads(samples["PMC555_F1"]["json"])["license"] == "CC BY"  # from the cloud JSON
    assert stats["skips"]["package"] == {"superseded_version": 1}
    assert stats["skips"]["article"] == {"retracted": 1}
    assert stats["skips"]["figure"] == {"retracted": 1}
    # staged in 3 slices and merged: the same counts (each slice counts only its own passed-over dirs)
    opts = BuildOptions(val_fraction=0, test_fraction=0)
    for k in range(3):
        stage([src], tmp_path / f"s{k}", opts, num_slices=3, slice_index=k, num_workers=0, progress=False)
    merged = merge_staging([tmp_path / f"s{k}" for k in range(3)], tmp_path / "m", opts, progress=False)
    assert merged["skips"] == stats["skips"] and merged["pairs"] == stats["pairs"]
    assert _shard_bytes(tmp_path / "m") == _shard_bytes(out)


@pytest.mark.slow
def test_splits_by_article_and_duplicate_articles(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(40):
        _package(src, f"PMC{2000 + i}", n_figs=2, seed=i, size=(96, 80))
    # the same article again as an extracted folder: counted once
    folder = tmp_path / "again" / "PMC2000"
    folder.mkdir(parents=True)
    with tarfile.open(src / "PMC2000.tar.gz") as tf:
        for m in tf.getmembers():
            (folder / Path(m.name).name).write_bytes(tf.extractfile(m).read())
    out = tmp_path / "out"
    stats = _build([src, tmp_path / "again"], out, val_fraction=0.2, test_fraction=0.3, seed=7, min_side=32)
    samples = _read_shards(out)
    assert stats["skips"]["article"] == {"duplicate_article": 1}
    assert stats["skips"]["figure"] == {"duplicate_article": 2}
    assert len(samples) == 80
    per_article: dict[str, set] = {}
    for s in samples.values():
        m = json.loads(s["json"])
        per_article.setdefault(m["pmcid"], set()).add(s["split"])
        # drawn from the DOI (lower-cased), the identifier every copy of an article is most likely to carry
        assert s["split"] == split_of(f"doi:{m['doi'].lower()}", 7, 0.2, 0.3)
    assert all(len(v) == 1 for v in per_article.values())
    counts = {k: v for k, v in stats["articles_per_split"].items()}
    assert sum(counts.values()) == 40 and min(counts.values()) > 0  # 40 articles hit all three splits
    assert stats["pairs"] == {k: 2 * v for k, v in counts.items()}


@pytest.mark.slow
def test_determinism_workers_and_slices(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(12):
        _package(src, f"PMC{3000 + i}", n_figs=2, seed=100 + i, size=(200, 150))
    a, b = tmp_path / "a", tmp_path / "b"
    _build([src], a, num_workers=0, chunk_size=1, val_fraction=0.1, test_fraction=0.2, shard_size=5)
    _build([src], b, num_workers=2, chunk_size=5, val_fraction=0.1, test_fraction=0.2, shard_size=5)
    assert _shard_bytes(a) == _shard_bytes(b) and len(_shard_bytes(a)) >= 4
    # three slices staged separately (any order), then merged
    opts = BuildOptions(chunk_size=2, val_fraction=0.1, test_fraction=0.2, shard_size=5)
    for k in (2, 0, 1):
        stage([src], tmp_path / f"s{k}", opts, num_slices=3, slice_index=k, num_workers=0, progress=False)
    c = tmp_path / "c"
    merge_staging([tmp_path / "s1", tmp_path / "s0", tmp_path / "s2"], c, opts, progress=False)
    assert _shard_bytes(c) == _shard_bytes(a)
    # the stage-time plan protects a staging dir from being mixed with other options
    with pytest.raises(ConfigError, match="different run"):
        stage([src], tmp_path / "s0", BuildOptions(max_side=256), num_slices=3, progress=False)
    # merging an incomplete staging dir is refused
    (tmp_path / "s2" / "complete.json").unlink()
    with pytest.raises(DataError, match="not complete"):
        merge_staging([tmp_path / "s2"], tmp_path / "d", opts, progress=False)


@pytest.mark.slow
def test_cli_build_and_merge(tmp_path, capsys):
    from bmclip.cli import main

    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        _package(src, f"PMC{4000 + i}", n_figs=1, seed=200 + i)
    rc = main(["build-dataset", str(src), "--output", str(tmp_path / "o1"), "-j", "0", "--no-progress",
               "--val-fraction", "0", "--test-fraction", "0"])  # fmt: skip
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["pairs"]["train"] == 4
    for k in range(2):
        assert main(["build-dataset", str(src), "--staging", str(tmp_path / f"st{k}"), "--num-slices", "2",
                     "--slice", str(k), "-j", "0", "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    argv = ["build-dataset", "merge", str(tmp_path / "st0"), str(tmp_path / "st1"), "--output", str(tmp_path / "o2")]
    assert main([*argv, "--no-progress", "--val-fraction", "0", "--test-fraction", "0"]) == 0
    assert _shard_bytes(tmp_path / "o1") == _shard_bytes(tmp_path / "o2")
    assert main(["build-dataset", str(tmp_path / "nope"), "--output", str(tmp_path / "o3")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_and_resume_is_byte_identical(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(16):
        _package(src, f"PMC{5000 + i}", n_figs=3, seed=300 + i, size=(1200, 900))
    ref = tmp_path / "ref"
    _build([src], ref, chunk_size=1, shard_size=7, val_fraction=0.1, test_fraction=0.2)
    out = tmp_path / "out"
    code = (
        "import sys; from bmclip.data.pmc import build_dataset\n"
        f"build_dataset([{str(src)!r}], {str(out)!r}, num_workers=0, chunk_size=1, shard_size=7,"
        " val_fraction=0.1, test_fraction=0.2, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    chunks = out / "_staging" / "chunks"
    deadline = time.time() + 120
    while time.time() < deadline:
        if chunks.is_dir() and len([p for p in chunks.iterdir() if p.suffix == ".bin"]) >= 3:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "builder finished before it could be killed; make the input larger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len([p for p in chunks.iterdir() if p.suffix == ".bin"])
    assert 3 <= done_at_kill < 16
    assert not (out / "manifest.json").exists()
    stats = _build([src], out, chunk_size=1, shard_size=7, val_fraction=0.1, test_fraction=0.2)
    assert _shard_bytes(out) == _shard_bytes(ref)
    assert stats["pairs_total"] == 48
    assert (
        json.loads((out / "manifest.json").read_text())["shards"]
        == json.loads((ref / "manifest.json").read_text())["shards"]
    )
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == json.loads((ref / "sizes.json").read_text())
    assert sum(sizes.values()) == 48 and set(sizes) == {p.name for p in out.glob("*.tar")}
    shutil.rmtree(src)


def test_articleset_deep_nesting_and_internal_errors(tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    # a <pmc-articleset> folder holding two articles that share the folder's media
    a1 = _article_xml("PMC801", [("F1", "First article figure caption.", ["s1"])])
    a2 = _article_xml("PMC802", [("F1", "Second article figure caption.", ["s2"])])
    body = lambda x: x[x.index(b"<article ") :]  # noqa: E731
    d = src / "set"
    d.mkdir()
    (d / "articleset.xml").write_bytes(b"<pmc-articleset>" + body(a1) + body(a2) + b"</pmc-articleset>")
    (d / "s1.jpg").write_bytes(_encode(_noise_image(81)))
    (d / "s2.jpg").write_bytes(_encode(_noise_image(82)))
    # absurdly deep caption markup: refused as an XML error, not a crash
    deep = b"<article><body><fig id='x'><caption>" + b"<bold>" * 5000 + b"t" + b"</bold>" * 5000
    _write_tar(src / "PMC803.tar.gz", [("PMC803/PMC803.nxml", deep + b"</caption></fig></body></article>")])
    # a package whose processing raises something unexpected: counted, the build goes on
    _package(src, "PMC804", n_figs=1, seed=84)
    from bmclip.data.pmc import jats

    real = jats.parse_jats

    def flaky(data):
        if b"PMC804" in data[:2000]:
            raise RuntimeError("simulated bug")
        return real(data)

    monkeypatch.setattr(jats, "parse_jats", flaky)
    stats = _build([src], tmp_path / "out", val_fraction=0, test_fraction=0)
    assert sorted(_read_shards(tmp_path / "out")) == ["PMC801_F1", "PMC802_F1"]
    assert stats["skips"]["package"] == {"internal_error": 1, "xml_error": 1}
    assert any("simulated bug" in e for e in stats["first_errors"])


def _dies_on_chunk_3(args):
    from bmclip.data.pmc.stage import _chunk_task_impl

    if args[0] == 3:
        os._exit(1)  # what the OOM killer does to a worker
    return _chunk_task_impl(args)


@pytest.mark.slow
def test_dead_worker_is_an_error_and_rerun_resumes(tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        _package(src, f"PMC{6000 + i}", n_figs=1, seed=600 + i)
    ref = tmp_path / "ref"
    _build([src], ref, chunk_size=1)
    from bmclip.data.pmc import stage as stage_mod

    # the pool forks its workers, so they see the patched module attribute
    monkeypatch.setattr(stage_mod, "_chunk_task", _dies_on_chunk_3)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="worker process died.*rerun"):
        _build([src], out, chunk_size=1, num_workers=2)
    assert not (out / "_staging" / "chunks" / "chunk-000003.bin").exists()
    monkeypatch.undo()
    _build([src], out, chunk_size=1, num_workers=2)
    assert _shard_bytes(out) == _shard_bytes(ref)


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (read from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


_SLOW_CHUNKS_CLI = """
import sys, time
from bmclip.data.pmc import stage
real = stage._chunk_task_impl
def slow(args):  # forked workers see this: every chunk takes a while, so the signal lands mid-build
    time.sleep(0.4)
    return real(args)
stage._chunk_task = slow
from bmclip.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")
@pytest.mark.parametrize("sig, to_group", [
    ("SIGTERM", False),  # kill PID, a container runtime's stop: the main process only
    pytest.param("SIGINT", True, marks=pytest.mark.slow),  # Ctrl-C: the whole foreground group
    pytest.param("SIGKILL", False, marks=pytest.mark.slow),  # the OOM killer or kill -9 of the main process
])
def test_signalled_build_stops_at_once_leaves_no_worker_and_resumes(tmp_path, sig, to_group):
    """A build stopped by a signal ends within seconds with a line saying so, leaves no worker process
    behind (before: SIGTERM or SIGKILL to the main process orphaned the pool's workers, blocked forever on
    the task queue), and the rerun of the same command completes to the same shards as an uninterrupted build."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(12):
        _package(src, f"PMC{7000 + i}", n_figs=1, seed=700 + i)
    ref, out = tmp_path / "ref", tmp_path / "out"
    _build([src], ref, chunk_size=1)
    argv = ["build-dataset", str(src), "--output", str(out), "--workers", "2", "--chunk-size", "1"]
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as f:  # a file, not a pipe: orphaned workers would hold a pipe open
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_CHUNKS_CLI, *argv], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=f)
    workers: list[int] = []
    try:
        chunks = out / "_staging" / "chunks"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if chunks.is_dir() and any(p.suffix == ".bin" for p in chunks.iterdir()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "builder finished before it could be signalled"
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        signum = getattr(signal, sig)
        t0 = time.monotonic()
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        proc.wait(timeout=30)
        took = time.monotonic() - t0
        deadline = time.monotonic() + 10
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [w for w in workers if _running(w)]
        assert not left, f"worker processes outlived the build: {left}"
    finally:
        for pid in [proc.pid, *workers]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    err = log.read_text(errors="replace")
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + signum, err
        assert took < 5, took  # does not wait for the chunks in flight
        assert f"stopped by {sig}" in err or f"interrupted ({sig})" in err, err
        assert "rerun the same command to resume" in err, err
        assert "Traceback" not in err, err
        # stderr is a file here, as in a batch job's log: the progress is plain lines (no bar redrawn with \r),
        # the last of them saying how far the stage got
        assert "\r" not in err, err
        assert re.search(r"^\d\d:\d\d:\d\d stage _staging: \d+/12 pkg \(\d+%\), .*, stopped$", err, re.M), err
    assert not (out / "manifest.json").exists()
    assert len([p for p in chunks.iterdir() if p.suffix == ".bin"]) < 12
    from bmclip.cli import main

    assert main(argv) == 0
    assert _shard_bytes(out) == _shard_bytes(ref)


def test_sigterm_unwinds_only_where_the_default_handler_was():
    """The CLI's SIGTERM handler raises Terminated (a KeyboardInterrupt) and puts the default back after the
    command; a handler installed by an embedding program is left alone."""
    from bmclip.cli import _sigterm_unwinds
    from bmclip.errors import Terminated

    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(KeyboardInterrupt) as e, _sigterm_unwinds():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # not reached: the handler raises at the next bytecode
        assert isinstance(e.value, Terminated)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        seen = []
        signal.signal(signal.SIGTERM, lambda *a: seen.append(a[0]))
        with _sigterm_unwinds():
            os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_broken_best_file_falls_back_to_next_format(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    figs = [("F1", "Broken JPEG but a good TIFF of the same figure.", ["p-f1"]), ("F2", "Only broken.", ["p-f2"])]
    _write_tar(
        src / "PMC901.tar.gz",
        [
            ("PMC901/PMC901.nxml", _article_xml("PMC901", figs)),
            ("PMC901/p-f1.jpg", _encode(_noise_image(91))[:200]),
            ("PMC901/p-f1.tif", _encode(_noise_image(91), "TIFF")),
            ("PMC901/p-f2.jpg", b"\xff\xd8garbage"),
        ],
    )
    stats = _build([src], tmp_path / "out", val_fraction=0, test_fraction=0)
    samples = _read_shards(tmp_path / "out")
    assert list(samples) == ["PMC901_F1"]
    assert json.loads(samples["PMC901_F1"]["json"])["file"] == "p-f1.tif"
    assert stats["skips"]["figure"] == {"undecodable_image": 1}


def test_subcaptions_on_real_captions(fixtures_dir):
    from bmclip.data.pmc.subcaptions import split_subcaptions

    pmc = fixtures_dir / "pmc"
    a = parse_jats(pmc / "PMC13173394" / "PMC13173394.xml")
    r = split_subcaptions(a.figures[0].caption)
    assert r["style"] == "prefix"
    assert r["shared"] == (
        "Positive ion mode MS analysis of PEG 3000 (1 mg/mL) using no added salt or sodium salt concentrations "
        "of 100 mM."
    )
    assert [p["label"] for p in r["panels"]] == list("ABCDEFGH")
    # "(B)" and "(C)" inside panel D's text are back references, not new panels
    assert r["panels"][3]["text"] == (
        "Extracted ion chromatogram for the doubly sodiated PEG ion at m/z 1462.85 using the same data as "
        "Panel (B)/(C) with a data acquisition rate of 1 Hz."
    )
    p = parse_jats(pmc / "pone.0056489" / "pone.0056489.xml")
    r = split_subcaptions(p.figures[0].caption)
    assert r["style"] == "prefix" and [x["text"] for x in r["panels"]] == [
        "seed length",
        "seed weight of the eight sampled populations of Platycladus orientalis(mean ± S.E.).",
    ]
    r = split_subcaptions(p.figures[1].caption)  # "... alleles (A), Shannon's index (B), ... (D) in ..."
    assert r["style"] == "postfix"
    assert [x["text"] for x in r["panels"]][1:] == ["Shannon’s information index", "allele richness", "allele range"]
    assert r["shared"] == "in artificial populations of Platycladus orientalis(mean ± S.E.)."
    assert split_subcaptions(p.figures[2].caption) is None  # no panels
    r = split_subcaptions("Overview. (A, B) Two panels at once. (C–E) Three more.")
    assert [x["label"] for x in r["panels"]] == ["A-B", "C-E"]


def test_licence_codes_keys_and_slices(tmp_path):
    from bmclip.data.pmc.build import licence_code, sanitize_key
    from bmclip.data.pmc.sources import discover_packages, slice_of

    assert licence_code("http://creativecommons.org/licenses/by/2.0") == "CC BY"
    assert licence_code("https://creativecommons.org/licenses/by-nc-nd/4.0/") == "CC BY-NC-ND"
    assert licence_code("http://creativecommons.org/publicdomain/zero/1.0/") == "CC0"
    assert licence_code("http://creativecommons.org/publicdomain/mark/1.0/") == "public domain"
    assert licence_code("CC BY-NC") == "CC BY-NC"
    assert licence_code("This is an open-access article distributed under the terms of the Creative Commons "
                        "Attribution License, which permits unrestricted use") == "CC BY"  # fmt: skip
    assert licence_code(None) == "unknown" and licence_code("All rights reserved") == "other"
    assert sanitize_key("10.1371/journal.pone.0056489") == "10_1371_journal_pone_0056489"
    long = sanitize_key("x" * 200)
    assert len(long) == 80 and "." not in long and long != sanitize_key("x" * 201)
    # nested trees: every package found once, sorted, and slices partition them
    for i in range(9):
        sub = tmp_path / "tree" / f"{i % 3:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"PMC{i}.tar.gz").write_bytes(b"x")
    (tmp_path / "tree" / "00" / "PMC100").mkdir()
    (tmp_path / "tree" / "00" / "PMC100" / "a.nxml").write_bytes(b"<article/>")
    (tmp_path / "tree" / "imgs").mkdir()
    (tmp_path / "tree" / "imgs" / "x.jpg").write_bytes(b"x")
    pkgs, skips = discover_packages([tmp_path / "tree"])
    keys = [p.key for p in pkgs]
    assert keys == sorted(keys) and len(keys) == 10 and "tree/00/PMC100" in keys
    assert skips == {"no_xml": 1}
    parts = [{k for k in keys if slice_of(k, 4) == s} for s in range(4)]
    assert set().union(*parts) == set(keys) and sum(map(len, parts)) == len(keys)
    with pytest.raises(ConfigError, match="not a package"):
        discover_packages([tmp_path / "tree" / "imgs" / "x.jpg"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "name", "keys"),
    [
        # the CC BY PLOS fixture (in the repo: runs in CI): three figure TIFFs, identified by its DOI
        ("fixtures", "pone.0056489", [f"10_1371_journal_pone_0056489_pone-0056489-g00{i}" for i in (1, 2, 3)]),
        ("shared", "PMC10802347", ["PMC10802347_F2", "PMC10802347_F3", "PMC10802347_F4"]),
        # an eLife reviewed preprint with no PMCID, DOI or PMID in its metadata: identified by its XML's hash,
        # not by where it came from (a path-based ID split one article into two "different" ones)
        ("fixtures", "elife-32671", "manuscript.xml"),
    ],
)
def test_real_package_tarball_equals_folder_and_gzip_bomb(request, fixtures_dir, tmp_path, source, name, keys):
    # a real article as an OA package (<name>/<files> in a .tar.gz, streamed) and as the folder
    root = fixtures_dir / "pmc" if source == "fixtures" else request.getfixturevalue("pmc_samples")
    src = root / name
    if isinstance(keys, str):
        sha = hashlib.sha256((src / keys).read_bytes()).hexdigest()[:16]
        keys = [f"xml_{sha}_fig{i}" for i in range(1, 6)]
    members = [(f"{name}/{p.name}", p.read_bytes()) for p in sorted(src.iterdir())]
    tdir = tmp_path / "tar"
    tdir.mkdir()
    _write_tar(tdir / f"{name}.tar.gz", members)
    _build([tdir], tmp_path / "a", test_fraction=0, val_fraction=0)
    _build([src], tmp_path / "b", test_fraction=0, val_fraction=0)
    a, b = _read_shards(tmp_path / "a"), _read_shards(tmp_path / "b")
    assert sorted(a) == keys
    assert a == b  # same JPEG, caption and metadata bytes whichever way the package arrives
    # a member declaring more uncompressed bytes than allowed: refused before decompressing through it
    stats = _build([tdir], tmp_path / "c", max_package_bytes=sum(len(d) for _, d in members) // 2)
    assert stats["skips"]["package"] == {"package_too_large": 1} and stats["pairs_total"] == 0


# ------------------------------------------------------------------------------- fast paths (speed)


def _fit_size(w: int, h: int, max_side: int = 512) -> tuple[int, int]:
    s = min(1.0, max_side / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s))


@pytest.mark.parametrize(
    ("size", "mode", "kw", "dct"),
    [
        ((900, 600), "RGB", {"quality": 90}, 8),  # typical PMC figure: no DCT scaling
        ((480, 361), "RGB", {"quality": 95}, 8),  # already fits: identity "resize" (pass-through off)
        ((601, 787), "L", {"quality": 85}, 8),  # greyscale, odd sizes
        ((701, 1103), "L", {"quality": 85}, 4),  # 1103 // 512 = 2: DCT 1/2
        ((901, 677), "RGB", {"quality": 92, "subsampling": 0, "progressive": True}, 8),  # 4:4:4, progressive
        ((1500, 1401), "RGB", {"quality": 90}, 4),  # DCT 1/2
        ((2100, 1301), "RGB", {"quality": 90}, 2),  # DCT 1/4, scaled size not a multiple of 8
        ((4200, 803), "L", {"quality": 90}, 1),  # DCT 1/8
    ],
)
def test_native_fit_decode_bit_identical_to_pillow(size, mode, kw, dct, monkeypatch):
    from bmclip.data.pmc import media

    native = media._native_decoder()
    if native is None:
        pytest.skip("bmclip._C is not built with Decoder.decode_fit")
    data = _encode(_noise_image(size[0] + size[1], size=size, mode=mode), **kw)
    tw, th = _fit_size(*size)
    fast = np.asarray(media._decode_resize_jpeg(Image.open(io.BytesIO(data)), data, tw, th))
    monkeypatch.setattr(media, "_NATIVE", False)  # force the Pillow implementation
    assert media._native_decoder() is None
    im = Image.open(io.BytesIO(data))
    slow = np.asarray(media._decode_resize_jpeg(im, data, tw, th))
    assert fast.shape == slow.shape == (th, tw, 3) and fast.dtype == np.uint8
    assert np.array_equal(fast, slow)
    # the DCT scale is the smallest that keeps >= the target size (Pillow's draft rule)
    assert round(8 * im.size[0] / size[0]) == dct and im.size[0] >= tw and im.size[1] >= th
    # independent reference: full-size decode + Pillow's antialiased bilinear resize
    ref = Image.open(io.BytesIO(data)).convert("RGB").resize((tw, th), Image.Resampling.BILINEAR)
    diff = fast.astype(np.float64) - np.asarray(ref, dtype=np.float64)
    if dct == 8:
        assert not diff.any()
    else:
        assert 10 * np.log10(255.0**2 / (diff**2).mean()) > 35.0  # DCT-domain pre-shrink: tiny deviation


def test_native_fit_decode_errors():
    from bmclip.data.pmc import media

    native = media._native_decoder()
    if native is None:
        pytest.skip("bmclip._C is not built with Decoder.decode_fit")
    data = _encode(_noise_image(5, size=(800, 600)), quality=90)
    with pytest.raises(DataError, match="premature end"):
        native.decode_fit(data[: len(data) // 2], 512, 384)
    with pytest.raises(ValueError):
        native.decode_fit(data, 0, 384)
    # and through process_image: a truncated big JPEG is a counted undecodable image
    with pytest.raises(ImageSkip) as e:
        process_image(data[: len(data) // 2])
    assert e.value.reason == "undecodable_image"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


_TRANSCODE_CASES = [
    ((900, 600), "RGB", {"quality": 90}),  # 4:2:0, full-scale decode
    ((480, 361), "RGB", {"quality": 95}),  # identity size, odd height
    ((601, 787), "L", {"quality": 85}),  # greyscale
    ((901, 677), "RGB", {"quality": 92, "subsampling": 0, "progressive": True}),  # 4:4:4, progressive
    ((903, 641), "RGB", {"quality": 90, "subsampling": 1}),  # 4:2:2
    ((1500, 1401), "RGB", {"quality": 90}),  # DCT 1/2 (chroma decoded at its full DCT size)
    ((2100, 1301), "RGB", {"quality": 90, "subsampling": 0}),  # DCT 1/4, 4:4:4
    ((4200, 803), "L", {"quality": 90}),  # DCT 1/8, greyscale
    ((37, 1201), "RGB", {"quality": 90}),  # narrower than one MCU after the resize
    ((999, 1013), "RGB", {"quality": 90, "subsampling": 0}),  # odd output widths, 16-tap chroma filters
]


@pytest.mark.parametrize(("size", "mode", "kw"), _TRANSCODE_CASES)
def test_native_planar_transcode_matches_rgb_reference(size, mode, kw):
    """transcode_jpeg == full decode + RGB antialiased resize + JPEG, within JPEG's own loss; luma == Pillow's L."""
    from bmclip.data.pmc import media

    native = media._native_decoder()
    if native is None or not hasattr(native, "transcode_jpeg"):
        pytest.skip("bmclip._C is not built with Decoder.transcode_jpeg")
    data = _encode(_noise_image(size[0] * 7 + size[1], size=size, mode=mode), **kw)
    tw, th = _fit_size(*size)
    jpeg, luma = native.transcode_jpeg(data, tw, th, quality=90)
    out = Image.open(io.BytesIO(jpeg))
    assert out.format == "JPEG" and out.size == (tw, th) and out.mode == "RGB"
    assert out.layer[0][1:3] == (2, 2)  # stored as 4:2:0, like Pillow's encode at its defaults
    ref = Image.open(io.BytesIO(data)).convert("RGB").resize((tw, th), Image.Resampling.BILINEAR)
    # what the RGB route stores for the same source: the RGB decode_fit image (same DCT scale) as Pillow's
    # q90 4:2:0 JPEG
    fit = Image.fromarray(native.decode_fit(data, tw, th, interpolation="bilinear", dct_min_ratio=1.0))
    pil_px = np.asarray(Image.open(io.BytesIO(_encode(fit, quality=90, subsampling="4:2:0"))).convert("RGB"))
    ours_px = np.asarray(out.convert("RGB"))
    ref_px = np.asarray(ref)
    # within ~1.5 dB of the RGB route (chroma is resampled once, straight to 4:2:0, instead of resized at
    # full resolution and then box-averaged by the encoder); on real PMC figures the gap is 0.2-0.6 dB.
    # (These synthetic sources are colour noise, the worst case for any 4:2:0 encode: ~27 dB.)
    assert _psnr(ours_px, ref_px) > max(24.0, _psnr(pil_px, ref_px) - 2.0)
    assert luma.shape == (th, tw) and luma.dtype == np.uint8
    assert _psnr(luma, np.asarray(ref.convert("L"))) > 33.0
    if mode == "L":  # neutral chroma: the stored colour image is grey
        rgb = ours_px.astype(np.int16)
        assert np.abs(rgb[..., 0] - rgb[..., 1]).max() <= 2 and np.abs(rgb[..., 2] - rgb[..., 1]).max() <= 2
    # deterministic, and the AVX2 plane resampler equals the scalar one bit for bit
    assert native.transcode_jpeg(data, tw, th, quality=90)[0] == jpeg
    from bmclip import _C

    _C._set_simd(False)
    try:
        jpeg_scalar, luma_scalar = native.transcode_jpeg(data, tw, th, quality=90)
    finally:
        _C._set_simd(True)
    assert jpeg_scalar == jpeg and np.array_equal(luma_scalar, luma)


def test_native_planar_transcode_refusals_and_errors():
    from bmclip.data.pmc import media

    native = media._native_decoder()
    if native is None or not hasattr(native, "transcode_jpeg"):
        pytest.skip("bmclip._C is not built with Decoder.transcode_jpeg")
    data = _encode(_noise_image(5, size=(800, 600)), quality=90)
    with pytest.raises(DataError, match="premature end"):
        native.transcode_jpeg(data[: len(data) // 2], 512, 384)
    with pytest.raises(ValueError):
        native.transcode_jpeg(data, 0, 384)
    with pytest.raises(ValueError):
        native.transcode_jpeg(data, 512, 384, quality=0)
    # not for it (None): CMYK JPEG, PNG, garbage
    assert native.transcode_jpeg(_encode(_noise_image(6, size=(300, 200), mode="CMYK")), 150, 100) is None
    assert native.transcode_jpeg(_encode(_noise_image(6, size=(300, 200)), "PNG"), 150, 100) is None
    assert native.transcode_jpeg(b"not an image at all", 150, 100) is None
    # decompression-bomb guard from the header, before any pixel
    from bmclip import _C

    with pytest.raises(DataError, match="too large"):
        _C.Decoder(1, max_pixels=1000).transcode_jpeg(data, 80, 60)


def test_process_image_native_and_pillow_routes_agree(monkeypatch):
    """Both routes store the same size and equivalent pixels, and their fingerprints agree (dedup across builds)."""
    from bmclip.data.pmc import media
    from bmclip.data.pmc.dedup import thumb_mad

    if media._native_decoder() is None or not hasattr(media._native_decoder(), "transcode_jpeg"):
        pytest.skip("bmclip._C is not built with Decoder.transcode_jpeg")
    cases = [_encode(_noise_image(40 + i, size=sz, mode=m), quality=90) for i, (sz, m) in
             enumerate([((900, 600), "RGB"), ((1500, 1100), "RGB"), ((700, 900), "L")])]
    fast = [process_image(d) for d in cases]
    monkeypatch.setattr(media, "_NATIVE", False)
    slow = [process_image(d) for d in cases]
    for a, b in zip(fast, slow):
        assert a.size == b.size and a.orig_size == b.orig_size and not a.passthrough
        pa = np.asarray(Image.open(io.BytesIO(a.jpeg)).convert("RGB"))
        pb = np.asarray(Image.open(io.BytesIO(b.jpeg)).convert("RGB"))
        assert _psnr(pa, pb) > 33.0
        assert (a.dhash ^ b.dhash).bit_count() <= 3 and thumb_mad(a.thumb, b.thumb) < 2.5


def test_jpeg_passthrough_rules():
    from bmclip.data.pmc.dedup import thumb_mad

    # fits, RGB: stored byte-for-byte, fingerprints as if it had been re-encoded
    data = _encode(_noise_image(3, size=(400, 300)), quality=90)
    r = process_image(data)
    assert r.passthrough and r.jpeg == data and r.size == r.orig_size == (400, 300)
    assert r.sha == hashlib.sha256(data).hexdigest()[:16]
    r2 = process_image(data, passthrough=False)
    assert not r2.passthrough and r2.jpeg != data and r2.size == (400, 300)
    assert (r.dhash ^ r2.dhash).bit_count() <= 2 and thumb_mad(r.thumb, r2.thumb) < 1.0
    # greyscale stays a 1-channel JPEG
    g = _encode(_noise_image(4, size=(300, 200), mode="L"), quality=90)
    r = process_image(g)
    assert r.passthrough and Image.open(io.BytesIO(r.jpeg)).mode == "L"
    # CMYK is re-encoded as RGB
    c = _encode(_noise_image(5, size=(300, 200), mode="CMYK"), quality=90)
    r = process_image(c)
    assert not r.passthrough and Image.open(io.BytesIO(r.jpeg)).mode == "RGB"
    # too many bytes per pixel (q100 4:4:4 noise): re-encoded, much smaller
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    big = _encode(noisy, quality=100, subsampling=0)
    assert len(big) > 300 * 200
    r = process_image(big)
    assert not r.passthrough and len(r.jpeg) < len(big)
    # larger than max_side: never passed through
    r = process_image(data, max_side=256)
    assert not r.passthrough and r.size == (256, 192)
    # truncated small JPEG: still refused
    with pytest.raises(ImageSkip) as e:
        process_image(data[: len(data) * 2 // 3])
    assert e.value.reason == "undecodable_image"


@pytest.mark.slow
def test_passthrough_in_build_and_cli_flag(fixtures_dir, tmp_path, capsys):
    from bmclip.cli import main

    src = fixtures_dir / "pmc" / "elife-32671"  # five real figure JPEGs, <= 360 px: they fit max_side 512
    _build([src], tmp_path / "a", val_fraction=0, test_fraction=0)
    kept = _read_shards(tmp_path / "a")
    assert len(kept) == 5
    for s in kept.values():
        assert s["jpg"] == (src / json.loads(s["json"])["file"]).read_bytes()
    rc = main(["build-dataset", str(src), "--output", str(tmp_path / "b"), "-j", "0", "--no-progress",
               "--val-fraction", "0", "--test-fraction", "0", "--no-jpeg-passthrough"])  # fmt: skip
    assert rc == 0
    capsys.readouterr()
    again = _read_shards(tmp_path / "b")
    assert sorted(again) == sorted(kept)
    for k, s in again.items():
        meta = json.loads(s["json"])
        assert s["jpg"] != kept[k]["jpg"] and meta["size"] == meta["original_size"]
        ref = np.asarray(Image.open(src / meta["file"]).convert("RGB"), dtype=np.float64)
        assert np.abs(np.asarray(Image.open(io.BytesIO(s["jpg"])), dtype=np.float64) - ref).mean() < 3.0


def test_ustar_header_identical_to_tarfile():
    from bmclip.data.pmc.shard_writer import ustar_header

    for name in ["a.jpg", "PMC10802347_F3.json", "x" * 100, "é" * 40 + ".txt", "y" * 101 + "/z.jpg"]:
        for size in [0, 1, 511, 512, 123_456_789, 8**11 - 1]:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
            ti.type = tarfile.REGTYPE
            assert ustar_header(name, size) == ti.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8")


def test_cli_summary_warnings_and_exit_status(tmp_path, capsys):
    # The operator sees pairs per split and the top skip reasons on stderr; an empty split whose fraction is
    # > 0 is a warning; a build that wrote no pairs exits 1 (0 pairs is never a success).
    from bmclip.cli import main

    src = tmp_path / "in"
    src.mkdir()
    ids = [f"PMC{5000 + i}" for i in range(4)]
    for i, pmcid in enumerate(ids):
        _package(src, pmcid, n_figs=1, seed=300 + i)
    rc = main(["build-dataset", str(src), "--output", str(tmp_path / "ok"), "-j", "0", "--no-progress",
               "--val-fraction", "0.05", "--test-fraction", "0.05"])  # fmt: skip
    assert rc == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["pairs"]["train"] >= 1  # the JSON on stdout is unchanged
    per_split = {s: sum(split_of(a, 0, 0.05, 0.05) == s for a in ids) for s in ("train", "val", "test")}
    assert (f"build-dataset: pairs: 4 (train {per_split['train']}, val {per_split['val']}, "
            f"test {per_split['test']}) from 4 articles") in cap.err
    assert "build-dataset: nothing skipped" in cap.err
    for s in ("val", "test"):
        assert (f"warning: the {s} split is empty" in cap.err) == (per_split[s] == 0), cap.err
    assert per_split["val"] == 0 or per_split["test"] == 0  # the warning path really ran for these ids

    rc = main(["build-dataset", str(src), "--output", str(tmp_path / "none"), "-j", "0", "--no-progress",
               "--min-caption-chars", "100000"])  # fmt: skip
    assert rc == 1
    err = capsys.readouterr().err
    stats = json.loads((tmp_path / "none" / "stats.json").read_text())
    (reason, n), = [(r, n) for r, n in stats["skips"]["figure"].items() if n]
    assert f"top skip reasons: figure:{reason} {n}" in err and n == 4
    assert "warning: no figure-caption pairs were written" in err
    assert "error: no pairs written" in err


def _open_clip_get_dataset_size():
    """open_clip_train's own ``get_dataset_size`` (how ``open_clip_train.main`` finds the sample count when
    ``--train-num-samples`` is not given), and whether it takes a brace pattern.

    open_clip_train.data imports webdataset, braceexpand and pandas at module level; where those are not
    installed, the function is taken from the installed module's source as is, with its ``expand_urls``
    given a list of shard paths (what open_clip's ``expand_urls`` returns for a list)."""
    try:
        from open_clip_train.data import get_dataset_size

        return get_dataset_size, True
    except ImportError:
        pass
    import ast
    import importlib.util

    spec = importlib.util.find_spec("open_clip_train")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_train is not installed")
    src_path = Path(next(iter(spec.submodule_search_locations))) / "data.py"
    tree = ast.parse(src_path.read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_dataset_size"]
    ns = {"os": os, "json": json, "ast": ast, "expand_urls": lambda urls, weights=None: (list(urls), None)}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(src_path), "exec"), ns)
    return ns["get_dataset_size"], False


@pytest.mark.slow
def test_shards_sorted_by_key_and_open_clip_reads_sizes_json(tmp_path):
    # open_clip_train counts samples from sizes.json beside the shards (no --train-num-samples needed), and
    # each shard's samples are in sorted key order: PMC6000's figures F1..F11 arrive in document order
    # (F1, F2, ..., F10, F11) and the packages in file-name order, which is not the PMCIDs' order.
    src = tmp_path / "in"
    src.mkdir()
    _package(src, "PMC6000", n_figs=11, seed=400, size=(200, 150)).rename(src / "b.tar.gz")
    _package(src, "PMC5999", n_figs=3, seed=401, size=(200, 150)).rename(src / "c.tar.gz")
    _package(src, "PMC6001", n_figs=3, seed=402, size=(200, 150)).rename(src / "a.tar.gz")
    out = tmp_path / "o"
    stats = _build([src], out, shard_size=8, val_fraction=0.3, test_fraction=0.3, seed=1)
    assert stats["pairs_total"] == 17
    shard_keys: dict[str, list[str]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tf:
            names = [m.name for m in tf.getmembers()]
        keys = [n.split(".", 1)[0] for n in names[::3]]
        assert names == [f"{k}.{e}" for k in keys for e in ("jpg", "json", "txt")]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        shard_keys[shard.name] = keys
        _check_dali_index(shard, shard.with_suffix(".idx"))
    all_keys = [k for ks in shard_keys.values() for k in ks]
    assert "PMC6000_F10" in all_keys and len(all_keys) == 17
    # the F1..F11 article fills at least one whole shard, where document order != key order
    assert any(len(ks) == 8 and ks[0].startswith("PMC6000") and ks[-1].startswith("PMC6000")
               for ks in shard_keys.values())  # fmt: skip
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {name: len(ks) for name, ks in shard_keys.items()}
    manifest = json.loads((out / "manifest.json").read_text())
    get_dataset_size, takes_pattern = _open_clip_get_dataset_size()
    for split in ("train", "val", "test"):
        info = manifest["splits"][split]
        if not info["num_samples"]:
            continue
        names = sorted(n for n in shard_keys if n.startswith(split + "-"))
        shards = str(out / info["pattern"]) if takes_pattern else [str(out / n) for n in names]
        assert get_dataset_size(shards) == (stats["pairs"][split], len(names))
    assert sum(bool(manifest["splits"][s]["num_samples"]) for s in ("train", "val", "test")) >= 2
    # a smaller rebuild into the same folder: sizes.json lists exactly the shards that are there
    stats2 = _build([src], out, shard_size=100, val_fraction=0, test_fraction=0)
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 17} == {
        p.name: stats2["pairs"]["train"] for p in out.glob("*.tar")
    }


def test_open_clip_train_get_wds_dataset_trains_on_bmclip_shards_without_num_samples(tmp_path):
    """open_clip_train's own training loader (``get_wds_dataset``, train split, no ``--train-num-samples``) on a
    bmclip build: it finds the sample count in sizes.json and yields every training pair once per epoch."""
    ocd = pytest.importorskip("open_clip_train.data", reason="open_clip_train needs webdataset, braceexpand, pandas")
    from types import SimpleNamespace

    src = tmp_path / "in"
    src.mkdir()
    _package(src, "PMC7000", n_figs=5, seed=410, size=(120, 90))
    _package(src, "PMC7001", n_figs=4, seed=411, size=(120, 90))
    out = tmp_path / "o"
    stats = _build([src], out, shard_size=3, val_fraction=0, test_fraction=0, seed=1)
    n = stats["pairs"]["train"]
    assert n == 9
    pattern = str(out / json.loads((out / "manifest.json").read_text())["splits"]["train"]["pattern"])
    args = SimpleNamespace(train_data=pattern, train_num_samples=None, train_data_upsampling_factors=None,
                           val_data=None, val_num_samples=None, seed=0, workers=0, batch_size=3, world_size=1)

    def preprocess(img):  # PIL image -> (3, 32, 32) float tensor, as any open_clip preprocess returns
        return torch.from_numpy(np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.float32)).permute(2, 0, 1)

    def tokenizer(text):  # open_clip tokenizers take a list of texts -> (n, context) ids
        return torch.tensor([[len(t) for t in ([text] if isinstance(text, str) else text)]])

    info = ocd.get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    loader = info.dataloader
    assert loader.num_samples == n and loader.num_batches == 3
    seen = 0
    for images, texts in loader:
        assert images.shape[1:] == (3, 32, 32) and len(texts) == len(images)
        seen += len(images)
    assert seen == n


@pytest.mark.slow
def test_interrupted_merge_leaves_no_stale_sample_counts(tmp_path, monkeypatch):
    # A merge that dies while writing shards must not leave an earlier build's sizes.json / manifest.json
    # describing the folder (open_clip would train on the wrong sample count); rerunning completes it.
    from bmclip.data.pmc.shard_writer import ShardWriter

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _package(src, f"PMC{6100 + i}", n_figs=2, seed=500 + i, size=(200, 150))
    out = tmp_path / "o"
    _build([src], out, shard_size=2, val_fraction=0, test_fraction=0, keep_staging=True)
    assert json.loads((out / "sizes.json").read_text()) == {f"train-00000{i}.tar": 2 for i in range(3)}

    def boom(self):
        raise OSError("disk full")

    monkeypatch.setattr(ShardWriter, "close_shard", boom)
    with pytest.raises(OSError, match="disk full"):
        merge_staging([out / "_staging"], out, BuildOptions(shard_size=4, val_fraction=0, test_fraction=0),
                      progress=False)  # fmt: skip
    assert not (out / "sizes.json").exists() and not (out / "manifest.json").exists()
    monkeypatch.undo()
    # what a merge killed inside a write leaves: temporary files beside the targets (never under a final name)
    (out / ".train-000001.tar.k3j2x9.tmp").write_bytes(b"half a shard")
    (out / ".stats.json.tmp-4242").write_bytes(b"{")
    merge_staging([out / "_staging"], out, BuildOptions(shard_size=4, val_fraction=0, test_fraction=0),
                  progress=False)  # fmt: skip
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 4, "train-000001.tar": 2}
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert not [p for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_stage_rerun_replaces_partial_chunks(tmp_path):
    # A stage killed while writing a chunk leaves a temporary file and no chunk-N.bin: the rerun removes the
    # temporary file, redoes only that chunk (same bytes) and reports the others as resumed.
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        _package(src, f"PMC{6200 + i}", n_figs=1, seed=520 + i, size=(200, 150))
    staging = tmp_path / "st"
    opts = BuildOptions(chunk_size=1)
    first = stage([src], staging, opts, num_workers=0, progress=False)
    assert first["chunks"] == 4 and first["chunks_resumed"] == 0 and first["samples_staged_now"] == 4
    chunks = staging / "chunks"
    before = {p.name: p.read_bytes() for p in chunks.iterdir()}
    assert sorted(before) == [f"chunk-{i:06d}.bin" for i in range(4)]
    (chunks / "chunk-000002.bin").unlink()
    (chunks / ".chunk-000002.bin.a8f3k1.tmp").write_bytes(before["chunk-000002.bin"][:100])
    (chunks / ".chunk-000003.bin.tmp-31337").write_bytes(b"BMCHUNK1")
    again = stage([src], staging, opts, num_workers=0, progress=False)
    assert again["chunks_resumed"] == 3 and again["samples_staged_now"] == 1
    assert {p.name: p.read_bytes() for p in chunks.iterdir()} == before


def test_builder_runs_without_torch_and_cxx_extension(fixtures_dir, tmp_path):
    # The builder (and its workers) is pure Python: with torch and bmclip._C unimportable a build still
    # writes every pair, counts caption tokens with bmclip's tokenizer and resizes with Pillow.
    out = tmp_path / "o"
    code = (
        "import json, sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['bmclip._C'] = None\n"
        "from bmclip.data.pmc import build_dataset, media\n"
        f"s = build_dataset([{str(fixtures_dir / 'pmc')!r}], {str(out)!r}, num_workers=0, val_fraction=0,"
        " test_fraction=0, progress=False)\n"
        "print(json.dumps({'pairs': s['pairs'], 'tokenizer': s['caption_tokens']['tokenizer'],"
        " 'native': media._native_decoder() is not None}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["native"] is False
    assert got["pairs"] == {"train": 8, "val": 0, "test": 0}  # as test_fixture_copies_in_ci, in process
    assert got["tokenizer"].startswith("bmclip.tokenizer.get_tokenizer() WordPiece")
    assert len(_read_shards(out)) == 8


def test_a_staging_dir_in_use_by_another_build_is_refused_and_freed_when_it_dies(tmp_path):
    """Two builds in one staging dir would delete each other's files (a starting stage removes the temporary
    files of chunks being written; a finished merge removes the dir). The second is refused in one line naming
    the first; once the first is gone (killed: the kernel drops its flock) the same command runs."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _package(src, f"PMC{7100 + i}", n_figs=1, seed=710 + i)
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from bmclip.data.pmc.staging import StagingDir\n"
        f"st = StagingDir({str(out / '_staging')!r}); st.lock(); print('ready', flush=True); time.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(ConfigError, match=rf"staging dir .*_staging is in use by another build \(pid "
                                              rf"{holder.pid} on [^)]+\)"):
            _build([src], out)
        with pytest.raises(ConfigError, match="in use by another build"):
            merge_staging([out / "_staging"], tmp_path / "merged", BuildOptions(), progress=False)
    finally:
        holder.kill()
        holder.wait()
    stats = _build([src], out)
    assert stats["pairs_total"] == 3


def test_two_merges_into_one_output_folder_are_refused_and_leave_no_lock_file(tmp_path):
    """Merges of different staging dirs into one output folder (their staging locks never meet) would overwrite
    each other's shards: the second is refused in one line naming the first; once the first is gone the same
    merge runs, and the published folder holds no lock file afterwards."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        _package(src, f"PMC{7150 + i}", n_figs=1, seed=715 + i)
    stage([str(src)], tmp_path / "st", BuildOptions(), num_workers=0, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom pathlib import Path\n"
        "from bmclip.data.pmc.staging import BuildLock\n"
        f"BuildLock(Path({str(out / '.build.lock')!r}), 'x', 'y', remove=True).acquire()\n"
        "print('ready', flush=True); time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(ConfigError, match=rf"output folder {re.escape(str(out))} is in use by another build "
                                              rf"\(pid {holder.pid} on [^)]+\): .*overwrite each other's shards"):
            merge_staging([tmp_path / "st"], out, BuildOptions(), progress=False)
        assert not list(out.glob("*.tar"))
    finally:
        holder.kill()
        holder.wait()
    stats = merge_staging([tmp_path / "st"], out, BuildOptions(), progress=False)
    assert stats["pairs_total"] == 2
    assert not (out / ".build.lock").exists()


def test_a_removed_lock_file_is_not_held_by_two(tmp_path, monkeypatch):
    """BuildLock(remove=True) deletes its file on release. A taker that opened the old file just before would
    flock an unlinked inode and think it held the lock beside the next taker: it sees the inode is gone and
    takes the file there now, so the next taker is refused."""
    from bmclip.data.pmc import staging

    path = tmp_path / ".build.lock"
    first = staging.BuildLock(path, "folder", "harm", remove=True)
    first.acquire()
    real_flock = staging.fcntl.flock
    calls = []

    def flock_after_release(fd, op):  # the first holder releases between the taker's open() and its flock()
        calls.append(fd)
        if len(calls) == 1:
            first.release()
        return real_flock(fd, op)

    monkeypatch.setattr(staging.fcntl, "flock", flock_after_release)
    second = staging.BuildLock(path, "folder", "harm", remove=True)
    second.acquire()
    monkeypatch.setattr(staging.fcntl, "flock", real_flock)
    assert len(calls) == 2  # the stale inode, then the file there now
    with pytest.raises(ConfigError, match=r"folder is in use by another build \(pid \d+ on [^)]+\): .*; harm$"):
        staging.BuildLock(path, "folder", "harm").acquire()
    second.release()
    assert not path.exists()


def test_two_merges_of_one_remote_output_on_a_machine_are_refused(tmp_path, monkeypatch):
    """A merge of remote staging dirs into a remote output writes its shards in TMPDIR/bmclip-merge-<hash> and
    clears that folder first: a second merge of the same output there would delete the first one's shards, so it
    is refused; another output's merge is not."""
    from types import SimpleNamespace

    from bmclip.data.pmc.merge import _upload_folder

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    remote_staging = [SimpleNamespace(remote=True)]
    folder, lock = _upload_folder(remote_staging, "s3://b/pmc/")
    (folder / "shard-000000.tar").write_bytes(b"in progress")
    with pytest.raises(ConfigError, match=r"output s3://b/pmc \(merge folder .*bmclip-merge-[0-9a-f]{16}\) is in "
                                          r"use by another build"):
        _upload_folder(remote_staging, "s3://b/pmc")
    assert (folder / "shard-000000.tar").read_bytes() == b"in progress"
    other, other_lock = _upload_folder(remote_staging, "s3://b/other/")
    other_lock.release()
    lock.release()
    again, lock = _upload_folder(remote_staging, "s3://b/pmc/")  # released: a rerun takes it and clears it
    assert again == folder and not list(folder.iterdir())
    lock.release()


def test_negative_workers_is_an_error_not_a_silent_serial_build(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _package(src, "PMC7200", n_figs=1, seed=720)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="workers must be an integer >= 0"):
            stage([src], tmp_path / "st", BuildOptions(), num_workers=bad, progress=False)


@pytest.mark.parametrize("args, message", [
    (["--near-dup-threshold", "-2"], "near_dup_threshold must be in [-1, 31]"),
    (["--near-dup-max-mad", "-1"], "near_dup_max_mad must be >= 0"),
    (["--min-caption-chars", "-1"], "min_caption_chars must be >= 0"),
    (["--num-slices", "0"], "--num-slices must be >= 1 and --slice in [0, num-slices)"),
    (["--slice", "3"], "--num-slices must be >= 1 and --slice in [0, num-slices)"),  # without --num-slices: ignored
])
def test_build_options_that_were_accepted_and_ignored_are_errors(tmp_path, capsys, args, message):
    from bmclip.cli import main

    src = tmp_path / "in"
    src.mkdir()
    _package(src, "PMC7300", n_figs=1, seed=730)
    assert main(["build-dataset", str(src), "--output", str(tmp_path / "o"), "-j", "0", "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bmclip build-dataset: error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()
