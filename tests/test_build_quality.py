"""bmclip build-dataset data quality: near-duplicate copies of real figures, one article given by two sources
(with and without a PMCID), retracted articles whatever copy sorts first, formula images inside captions."""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bmclip.data.pmc import build_dataset
from bmclip.data.pmc.build import BuildOptions, merge_staging, split_of, stage
from bmclip.data.pmc.dedup import Deduplicator, thumb_mad
from bmclip.data.pmc.media import dhash64, process_image
from bmclip.errors import ConfigError

# ------------------------------------------------------------------------------------------ helpers


def _noise_image(seed: int, size=(240, 180)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize(size, Image.Resampling.BICUBIC)


def _encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, format=fmt, **kw)
    return b.getvalue()


def _scaled(im: Image.Image, f: float) -> Image.Image:
    return im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.LANCZOS)


def _rgb(im: Image.Image) -> Image.Image:
    return im if im.mode in ("RGB", "L") else im.convert("RGB")


def _article(figs: list[tuple[str, str, str]], *, pmcid=None, doi=None, pmid=None) -> bytes:
    """A JATS article: figs are (id, caption markup, graphic href)."""
    given = (("pmc", pmcid), ("pmid", pmid), ("doi", doi))
    ids = "".join(f'<article-id pub-id-type="{t}">{v}</article-id>' for t, v in given if v)
    body = "".join(
        f'<fig id="{fid}"><label>Figure {i + 1}</label><caption>{cap}</caption><graphic xlink:href="{href}"/></fig>'
        for i, (fid, cap, href) in enumerate(figs)
    )
    return (
        '<?xml version="1.0"?><article xmlns:xlink="http://www.w3.org/1999/xlink" '
        'xmlns:mml="http://www.w3.org/1998/Math/MathML"><front><article-meta>'
        f'{ids}<permissions><license xlink:href="http://creativecommons.org/licenses/by/4.0/"/></permissions>'
        f"</article-meta></front><body><sec>{body}</sec></body></article>"
    ).encode()


def _folder(d: Path, xml_name: str, xml: bytes, media: dict[str, bytes]) -> Path:
    d.mkdir(parents=True)
    (d / xml_name).write_bytes(xml)
    for name, data in media.items():
        (d / name).write_bytes(data)
    return d


def _tarball(path: Path, members: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    return path


def _build(inputs, out, **kw) -> dict:
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    return build_dataset([str(i) for i in inputs], out, **kw)


def _samples(out: Path) -> dict[str, dict]:
    """key -> {'split', 'json' (parsed), 'jpg', 'txt'} of every sample in the shards."""
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("*-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                s = samples.setdefault(key, {"split": shard.name.split("-")[0]})
                data = tf.extractfile(m).read()
                s[ext] = json.loads(data) if ext == "json" else data
    return samples


def _accounted(stats: dict) -> None:
    """Every figure is one sample or one counted reason."""
    assert stats["figures"] == stats["pairs_total"] + sum(stats["skips"]["figure"].values())


# ------------------------------------------------------------------------------------------ near duplicates

# Real figures (CC BY, downscaled derivatives; tests/fixtures/pmc/ATTRIBUTION.md) and the copies a second source
# may hold of them.
_REAL_FIGURES = [
    *(f"pmc/elife-32671/fig{i}.jpg" for i in range(1, 6)),
    *(f"pmc/pone.0056489/pone.0056489.g00{i}.tif" for i in range(1, 4)),
]
_COPIES = {
    "jpeg q75": lambda im: _encode(_rgb(im), quality=75),
    "0.6x q60": lambda im: _encode(_rgb(_scaled(im, 0.6)), quality=60),
    "0.5x q85": lambda im: _encode(_rgb(_scaled(im, 0.5)), quality=85),
    "0.6x png": lambda im: _encode(_scaled(im, 0.6), "PNG"),
    "1.5x q90": lambda im: _encode(_rgb(_scaled(im, 1.5)), quality=90),
}


@pytest.mark.slow
def test_rescaled_and_reencoded_copies_of_real_figures_are_near_duplicates(fixtures_dir):
    # With the builder's default options every copy is removed and no two different figures are merged. The
    # old dHash (integer pre-reduction by min(size)//32, bilinear 9x8, radius 3) missed 11 of these 40 copies.
    opts = BuildOptions()
    originals, copies = [], []
    for name in _REAL_FIGURES:
        im = Image.open(fixtures_dir / name)
        im.load()
        originals.append((name, process_image(_encode(_rgb(im), "PNG"))))
        copies += [(name, how, process_image(make(im))) for how, make in _COPIES.items()]
    d = Deduplicator(opts.near_dup_threshold, opts.near_dup_max_mad)
    for name, p in originals:
        assert d.check_and_add(p.sha, p.dhash, p.thumb) is None, f"{name} taken for a copy of another figure"
    missed = [
        (name, how, (p.dhash ^ o.dhash).bit_count(), round(thumb_mad(p.thumb, o.thumb), 2))
        for (name, how, p), o in zip(copies, (o for _, o in originals for _ in _COPIES))
        if d.check_and_add(p.sha, p.dhash, p.thumb) is None
    ]
    assert missed == []
    # and each copy is near its own figure only (a copy is never within both limits of another figure)
    for name, how, p in copies:
        near = [
            n
            for n, o in originals
            if (p.dhash ^ o.dhash).bit_count() <= opts.near_dup_threshold
            and thumb_mad(p.thumb, o.thumb) <= opts.near_dup_max_mad
        ]
        assert near == [name], (name, how, near)


def _flat_chart(seed: int, size=(420, 300)) -> Image.Image:
    """A bar chart on a white background: the mostly flat kind of figure an unstable dHash moves most on."""
    rng = np.random.default_rng(seed)
    w, h = size
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    d.line((40, 10, 40, h - 30), fill="black", width=2)
    d.line((40, h - 30, w - 10, h - 30), fill="black", width=2)
    for i, v in enumerate(rng.uniform(0.2, 0.9, 5)):
        x0 = 55 + i * (w - 70) // 5
        colour = (60, 90, int(rng.integers(90, 230)))
        d.rectangle((x0, h - 30 - v * (h - 60), x0 + (w - 70) // 5 - 15, h - 30), fill=colour)
    return im


@pytest.mark.parametrize("factor", [2, 3])
def test_dhash_is_the_same_for_a_pixel_replicated_enlargement(fixtures_dir, factor):
    # The dHash compares exact area means of a 9x8 grid: an image enlarged by repeating each pixel has the same
    # means, so the same hash, whatever its size (the old one pre-reduced by min(size)//32 and resampled
    # bilinearly: it depended on the size, and moved up to 11 bits between copies of real figures).
    ims = [_flat_chart(s) for s in range(3)] + [_noise_image(5, (250, 170)).convert("L")]
    ims.append(Image.open(fixtures_dir / "pmc/pone.0056489/pone.0056489.g003.tif").convert("L"))
    for im in ims:
        big = im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
        assert dhash64(big) == dhash64(im)


def test_near_index_finds_exactly_the_hashes_within_the_radius():
    # Multi-index hashing with probes: every kept image within the radius is a candidate (none missed), none
    # beyond it, for radii whose layouts differ (exact bands, 1- and 2-bit probes).
    rng = random.Random(0)
    kept = [rng.getrandbits(64) for _ in range(400)]
    queries = []
    for i in range(300):
        h = kept[i % len(kept)]
        for b in rng.sample(range(64), rng.randrange(0, 12)):
            h ^= 1 << b
        queries.append(h)
    queries += [rng.getrandbits(64) for _ in range(50)]
    thumb = bytes(256)
    for radius in (0, 2, 3, 5, 7, 8):
        d = Deduplicator(radius, 2.0)
        for i, h in enumerate(kept):
            assert d.check_and_add(f"{i:016x}", h, bytes([i % 251]) * 256) is None  # random hashes: all kept
        assert len(d) == len(kept)
        for q in queries:
            want = [i for i, h in enumerate(kept) if (h ^ q).bit_count() <= radius]
            assert d.candidates(q) == want, radius
    # the thumbnail decides among the candidates
    d = Deduplicator(7, 2.0)
    base = np.full(256, 128, dtype=np.uint8)
    assert d.check_and_add("01", kept[0], base.tobytes()) is None
    assert d.check_and_add("02", kept[0] ^ 0b1111111, (base + 2).tobytes()) == "duplicate_near"  # 7 bits, 2.0
    assert d.check_and_add("03", kept[0] ^ 0b1111111, (base + 3).tobytes()) is None  # 7 bits, 3.0 levels
    assert d.check_and_add("04", kept[0] ^ 0b11111111, base.tobytes()) is None  # 8 bits: not a candidate
    assert d.check_and_add("01", 0, thumb) == "duplicate_exact"


@pytest.mark.slow
def test_rescaled_copies_in_another_article_are_removed_in_a_build(fixtures_dir, tmp_path):
    # End to end: a second article holding rescaled / re-encoded copies of the first one's real figures adds no
    # sample (each copy is counted as duplicate_near), and the first article's figures are all kept.
    src = tmp_path / "in"
    figs, media, copy_figs, copy_media = [], {}, [], {}
    picks = [
        ("pmc/elife-32671/fig2.jpg", "0.6x q60"),
        ("pmc/elife-32671/fig3.jpg", "1.5x q90"),
        ("pmc/pone.0056489/pone.0056489.g002.tif", "jpeg q75"),
        ("pmc/elife-32671/fig4.jpg", "1.5x q90"),
    ]
    for k, (name, how) in enumerate(picks):
        im = Image.open(fixtures_dir / name)
        im.load()
        figs.append((f"F{k}", f"<p>The original figure number {k} of the first article.</p>", f"orig{k}"))
        media[f"orig{k}.png"] = _encode(_rgb(im), "PNG")
        copy_figs.append((f"F{k}", f"<p>A copy ({how}) of figure {k}, in another article.</p>", f"copy{k}"))
        copy_media[f"copy{k}.jpg"] = _COPIES[how](im)
    _folder(src / "a", "a.nxml", _article(figs, pmcid="PMC4000001"), media)
    _folder(src / "b", "b.nxml", _article(copy_figs, pmcid="PMC4000002"), copy_media)
    stats = _build([src], tmp_path / "out", val_fraction=0, test_fraction=0)
    assert sorted(s["json"]["pmcid"] for s in _samples(tmp_path / "out").values()) == ["PMC4000001"] * 4
    assert stats["skips"]["figure"] == {"duplicate_near": 4}
    _accounted(stats)


# ------------------------------------------------------------------------------------------ one article, two sources

_PMCID, _DOI, _PMID = "PMC7000002", "10.1371/journal.pone.0100002", "30002"


def _two_sources(root: Path, *, pmc_name="a_pmc", other_name="b_publisher", seeds=(1, 2)) -> tuple[Path, Path]:
    """The same article as its PMC package (PMCID, DOI, PMID) and as the publisher's own JATS (the DOI only,
    spelt otherwise); their images differ (no image dedup can stand in for the article-level one)."""
    figs = [(f"F{k}", f"<p>Figure {k} of the article given twice, with its caption.</p>", f"f{k}") for k in (1, 2)]
    pmc = _folder(
        root / pmc_name / _PMCID,
        "article.nxml",
        _article(figs, pmcid=_PMCID, doi=_DOI, pmid=_PMID),
        {f"f{k}.jpg": _encode(_noise_image(seeds[0] * 10 + k)) for k in (1, 2)},
    )
    other = _folder(
        root / other_name / "0100002",
        "0100002.xml",
        _article(figs, doi="https://doi.org/" + _DOI.upper()),
        {f"f{k}.jpg": _encode(_noise_image(seeds[1] * 10 + k)) for k in (1, 2)},
    )
    return pmc, other


@pytest.mark.slow
def test_an_article_with_and_without_a_pmcid_is_one_article_in_one_split(tmp_path):
    # The PMCID and the DOI draw different splits here: the old builder took the PMC copy's ID (PMCID) and the
    # publisher copy's (DOI) for two articles, and wrote the same captions into train and test.
    assert split_of(_PMCID, 0, 0.0, 0.5) != split_of(f"doi:{_DOI}", 0, 0.0, 0.5)
    expected = split_of(f"doi:{_DOI}", 0, 0.0, 0.5)
    for order in (("a_pmc", "b_publisher"), ("b_pmc", "a_publisher")):  # either copy sorts first
        root = tmp_path / "-".join(order)
        _two_sources(root / "in", pmc_name=order[0], other_name=order[1])
        stats = _build([root / "in"], root / "out", val_fraction=0.0, test_fraction=0.5)
        samples = _samples(root / "out")
        assert len(samples) == 2 and len({s["txt"] for s in samples.values()}) == 2
        assert {s["split"] for s in samples.values()} == {expected}
        assert stats["skips"]["article"] == {"duplicate_article": 1}
        assert stats["skips"]["figure"] == {"duplicate_article": 2}
        _accounted(stats)
    # each copy alone: the same split (a build from either source agrees)
    pmc, other = _two_sources(tmp_path / "alone")
    for copy in (pmc, other):
        _build([copy], tmp_path / f"out-{copy.parent.name}", val_fraction=0.0, test_fraction=0.5)
        assert {s["split"] for s in _samples(tmp_path / f"out-{copy.parent.name}").values()} == {expected}


def test_a_copy_sharing_only_its_pmid_is_the_same_article(tmp_path):
    figs = [("F1", "<p>A figure of the article, with a long enough caption.</p>", "f1")]
    _folder(
        tmp_path / "in" / "a",
        "a.nxml",
        _article(figs, pmcid=_PMCID, doi=_DOI, pmid=_PMID),
        {"f1.jpg": _encode(_noise_image(1))},
    )
    _folder(tmp_path / "in" / "b", "b.nxml", _article(figs, pmid="0" + _PMID), {"f1.jpg": _encode(_noise_image(2))})
    _folder(tmp_path / "in" / "c", "c.nxml", _article(figs, pmcid="PMC7000003"), {"f1.jpg": _encode(_noise_image(3))})
    stats = _build([tmp_path / "in"], tmp_path / "out", val_fraction=0, test_fraction=0)
    assert sorted(str(s["json"]["pmcid"]) for s in _samples(tmp_path / "out").values()) == [_PMCID, "PMC7000003"]
    assert stats["skips"]["article"] == {"duplicate_article": 1}
    _accounted(stats)


# ------------------------------------------------------------------------------------------ retraction


def _retracted_copies(root: Path, n_figs: int = 2) -> tuple[Path, Path]:
    """One article as a legacy OA package tarball (input ``a_oa``, sorts first) and as a PMC Cloud folder whose
    metadata says it is retracted (input ``b_cloud``)."""
    figs = [(f"F{k}", f"<p>Figure {k} of an article that was retracted.</p>", f"f{k}") for k in range(n_figs)]
    xml = _article(figs, pmcid="PMC5800000", doi="10.7554/eLife.32671")
    images = {f"f{k}.jpg": _encode(_noise_image(40 + k)) for k in range(n_figs)}
    oa = root / "a_oa"
    members = {"PMC5800000/a.nxml": xml, **{f"PMC5800000/{k}": v for k, v in images.items()}}
    _tarball(oa / "5e" / "PMC5800000.tar.gz", members)
    cloud = root / "b_cloud"
    d = _folder(cloud / "PMC5800000.2", "PMC5800000.2.xml", xml, images)
    (d / "PMC5800000.2.json").write_text(json.dumps({"pmcid": "PMC5800000", "version": 2, "is_retracted": True}))
    return oa, cloud


@pytest.mark.slow
def test_a_retracted_article_is_skipped_whichever_copy_sorts_first(tmp_path):
    oa, cloud = _retracted_copies(tmp_path / "in")
    expected = {"figure": {"retracted": 4}, "article": {"retracted": 2}, "package": {}}
    stats = _build([oa, cloud], tmp_path / "out")
    assert stats["pairs_total"] == 0 and _samples(tmp_path / "out") == {}
    assert stats["skips"] == expected  # each copy counted once, as retracted (never also duplicate_article)
    _accounted(stats)
    # staged apart (the retracted copy in another staging dir than the one kept first) and merged: the same
    opts = BuildOptions()
    stage([oa], tmp_path / "s0", opts, num_workers=0, progress=False)
    stage([cloud], tmp_path / "s1", opts, num_workers=0, progress=False)
    merged = merge_staging([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m", opts, progress=False)
    assert merged["pairs_total"] == 0 and merged["skips"] == expected
    # a stage killed after the retracted copy's chunk and resumed still lists it
    st = tmp_path / "s2"
    stage([oa, cloud], st, BuildOptions(chunk_size=1), num_workers=0, progress=False)
    assert json.loads((st / "complete.json").read_text())["retracted"] == ["PMC5800000", "doi:10.7554/elife.32671"]
    (st / "complete.json").unlink()
    (st / "chunks" / "chunk-000000.bin").unlink()  # the OA copy's chunk: redone, the Cloud copy's is kept
    stage([oa, cloud], st, BuildOptions(chunk_size=1), num_workers=0, progress=False)
    merged = merge_staging([st], tmp_path / "m2", BuildOptions(chunk_size=1), progress=False)
    assert merged["pairs_total"] == 0 and merged["skips"] == expected


def test_an_articleset_repeating_a_retracted_article_counts_every_copy_as_retracted(tmp_path):
    oa, cloud = _retracted_copies(tmp_path / "in", n_figs=1)
    xml = (oa.parent / "b_cloud" / "PMC5800000.2" / "PMC5800000.2.xml").read_bytes()
    art = xml[xml.index(b"<article ") : xml.index(b"</article>") + len(b"</article>")]
    _folder(
        tmp_path / "in" / "a_set" / "set",
        "set.xml",
        b'<?xml version="1.0"?><pmc-articleset>' + art + art + b"</pmc-articleset>",
        {"f0.jpg": _encode(_noise_image(77))},
    )
    stats = _build([tmp_path / "in" / "a_set", cloud], tmp_path / "out")
    assert stats["pairs_total"] == 0
    assert stats["skips"]["article"] == {"retracted": 3} and stats["skips"]["figure"] == {"retracted": 3}
    _accounted(stats)


def test_staging_dirs_of_different_builder_versions_are_not_merged(tmp_path):
    src = _folder(
        tmp_path / "in" / "a",
        "a.nxml",
        _article([("F1", "<p>A caption long enough.</p>", "f1")], pmcid="PMC1"),
        {"f1.jpg": _encode(_noise_image(1))},
    )
    for k in (0, 1):
        stage([src], tmp_path / f"s{k}", BuildOptions(), num_workers=0, progress=False)
    plan = json.loads((tmp_path / "s1" / "plan.json").read_text())
    (tmp_path / "s1" / "plan.json").write_text(json.dumps({**plan, "version": plan["version"] - 1}))
    with pytest.raises(ConfigError, match="different builder versions"):
        merge_staging([tmp_path / "s0", tmp_path / "s1"], tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------ formula images


def test_a_formula_image_in_the_caption_is_not_the_figure_image(tmp_path):
    # PLOS puts display formulas in as <disp-formula><graphic/></disp-formula>; inside a caption such an image
    # came first in document order and was stored as the figure.
    fig = _encode(_noise_image(9, (320, 240)))
    eq = Image.new("L", (420, 90), 255)  # big enough to pass every image filter, and a JPEG like the figure
    ImageDraw.Draw(eq).text((10, 30), "y = a + b log(DBH)", fill=0)
    cap = (
        '<p>Fits of <disp-formula><graphic xlink:href="info:doi/10.1371/journal.pone.0056489.e001"/>'
        '<label>(1)</label></disp-formula> and <inline-formula><inline-graphic xlink:href="i1"/></inline-formula>'
        " to the data.</p>"
    )
    _folder(
        tmp_path / "in" / "p",
        "p.xml",
        _article([("g001", cap, "info:doi/10.1371/journal.pone.0056489.g001")], doi="10.1371/journal.pone.0056489"),
        {"pone.0056489.e001.jpg": _encode(eq), "pone.0056489.g001.jpg": fig},
    )
    stats = _build([tmp_path / "in"], tmp_path / "out")
    (sample,) = _samples(tmp_path / "out").values()
    assert sample["json"]["file"] == "pone.0056489.g001.jpg"
    assert sample["json"]["href"] == "info:doi/10.1371/journal.pone.0056489.g001"
    assert sample["jpg"] == fig  # passed through as it is
    _accounted(stats)
