"""bmclip build-dataset on hostile packages: huge captions, odd PMC Cloud metadata, non-UTF-8 file names, keys that
collide, many figures on one image, entity declarations in UTF-16, an output among the inputs."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_build_dataset import _write_tar  # the same gzip'd tar writer

from bmclip.data.pmc import build_dataset, parse_jats
from bmclip.data.pmc import stage as stage_mod
from bmclip.data.pmc.build import BuildOptions, merge_staging, stage
from bmclip.errors import ConfigError, DataError

NO_SPLITS = {"val_fraction": 0, "test_fraction": 0}

# ------------------------------------------------------------------------------------------ helpers


def _jpeg(seed: int, size=(160, 120)) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
    b = io.BytesIO()
    Image.fromarray(small, "RGB").resize(size, Image.Resampling.BICUBIC).save(b, format="JPEG", quality=90)
    return b.getvalue()


def _xml(figs: list[tuple[str, str, str]], pmcid: str | None = "PMC100", doi: str | None = None,
         licence: str | None = "http://creativecommons.org/licenses/by/4.0/", prolog: str = "") -> str:
    """A JATS article; ``figs``: (fig id, caption, graphic href)."""
    ids = (f'<article-id pub-id-type="pmc">{pmcid[3:]}</article-id>' if pmcid else "") + (
        f'<article-id pub-id-type="doi">{doi}</article-id>' if doi else "")
    perms = f'<permissions><license xlink:href="{licence}"/></permissions>' if licence else ""
    body = "".join(f'<fig id="{i}"><caption><p>{c}</p></caption><graphic xlink:href="{h}"/></fig>' for i, c, h in figs)
    return (f'{prolog}<article xmlns:xlink="http://www.w3.org/1999/xlink"><front><article-meta>{ids}{perms}'
            f"</article-meta></front><body>{body}</body></article>")


def _package(path: Path, xml: str | bytes, images: dict[str, bytes]) -> Path:
    xml_b = xml.encode() if isinstance(xml, str) else xml
    _write_tar(path, [("p/article.nxml", xml_b), *((f"p/{n}", d) for n, d in images.items())])
    return path


def _build(inputs, out, **kw):
    kw = {"num_workers": 0, "progress": False, **NO_SPLITS, **kw}
    return build_dataset([str(i) for i in inputs], out, **kw)


def _members(out: Path) -> list[str]:
    """Member names of every shard (repeats kept)."""
    names = []
    for shard in sorted(out.glob("*-*.tar")):
        with tarfile.open(shard) as tf:
            names.extend(m.name for m in tf.getmembers())
    return names


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".idx")}


def _rewrite_chunk(path: Path, edit) -> None:
    """Decode a staging chunk, let ``edit(records)`` change it, encode it again (as an older version could have)."""
    records, blob = stage_mod._decode_chunk(path.read_bytes(), str(path))
    for r in records:
        for s in r["samples"]:
            s["_jpeg"] = blob[s.pop("offset") :][: s.pop("length")]
    edit(records)
    path.write_bytes(stage_mod._encode_chunk(0, records))


# ------------------------------------------------------------------------------------------ 1. huge captions


def test_caption_over_max_caption_chars_is_a_counted_skip_before_it_is_tokenized(tmp_path, monkeypatch):
    # A 200 MB caption aborted the build in the tokenizer (and with -j 2 killed a worker on every rerun); one
    # that got through was stored whole. Now it is skipped (and counted) before the tokenizer sees it.
    src = tmp_path / "in"
    src.mkdir()
    huge = "word " * 400_000  # 2 MB
    real_long = "A long multi-panel legend. " * 450  # ~12k characters: real PMC legends stay far below the default
    xml = _xml([("F1", huge, "g1"), ("F2", "An ordinary caption of a figure.", "g2"), ("F3", real_long, "g3")])
    _package(src / "PMC100.tar.gz", xml, {"g1.jpg": _jpeg(1), "g2.jpg": _jpeg(2), "g3.jpg": _jpeg(3)})
    seen: list[int] = []
    monkeypatch.setattr(stage_mod, "_WORKER_TOKENS", ("spy", lambda s: seen.append(len(s)) or 1))

    stats = _build([src], tmp_path / "out", max_caption_chars=20_000)
    assert stats["skips"]["figure"] == {"caption_too_long": 1}
    assert sorted(_samples(tmp_path / "out")) == ["PMC100_F2", "PMC100_F3"]
    assert max(seen) <= 20_000  # the tokenizer never got the huge caption
    assert stats["options"]["max_caption_chars"] == 20_000

    # the default keeps a long real legend; the CLI exposes the option like --min-caption-chars
    from bmclip.cli import main

    assert main(["build-dataset", str(src), "--output", str(tmp_path / "cli"), "-j", "0", "--no-progress",
                 "--val-fraction", "0", "--test-fraction", "0", "--max-caption-chars", "5000"]) == 0  # fmt: skip
    cli_stats = json.loads((tmp_path / "cli" / "stats.json").read_text())
    assert cli_stats["skips"]["figure"] == {"caption_too_long": 2}
    assert sorted(_samples(tmp_path / "cli")) == ["PMC100_F2"]
    assert main(["build-dataset", str(src), "--output", str(tmp_path / "bad"), "--max-caption-chars", "0"]) == 2
    default = _build([src], tmp_path / "default")
    assert default["skips"]["figure"] == {"caption_too_long": 1}
    assert _samples(tmp_path / "default")["PMC100_F3"]["txt"].decode() == real_long.strip()


def test_whitespace_of_a_huge_caption_is_collapsed_in_bounded_memory():
    # re.sub over a caption of many short words held one object per piece: a 200 MB caption took 4 GB in the
    # JATS parser, before any caption limit could look at it (20x the document here). Now it is ~3.5x.
    cap = "ab  " * 500_000  # 2 MB, 500k whitespace runs
    doc = _xml([("F1", f"\n {cap} \t", "g1")]).encode()
    tracemalloc.start()
    try:
        art = parse_jats(doc)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert art.figures[0].caption == " ".join(["ab"] * 500_000)
    assert peak < 8 * len(doc), f"{peak / 1e6:.1f} MB peak for a {len(doc) / 1e6:.1f} MB document"


def test_staging_dir_of_the_previous_version_resumes_and_merges(tmp_path):
    # A plan.json written before max_caption_chars existed has no such option: it must resume (and merge with a
    # new staging dir) under the default, and still be refused under another value.
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _package(src / f"PMC{200 + i}.tar.gz", _xml([("F1", f"Caption of figure {i}.", "g1")], pmcid=f"PMC{200 + i}"),
                 {"g1.jpg": _jpeg(10 + i)})
    opts = BuildOptions(chunk_size=1, **NO_SPLITS)
    ref = _build([src], tmp_path / "ref", chunk_size=1)
    st = tmp_path / "st"
    stage([src], st, opts, num_workers=0, progress=False)
    plan = json.loads((st / "plan.json").read_text())
    del plan["options"]["max_caption_chars"]  # as the previous version wrote it
    (st / "plan.json").write_text(json.dumps(plan, indent=1, sort_keys=True))
    (st / "complete.json").unlink()  # killed after two of its three chunks
    (st / "chunks" / "chunk-000002.bin").unlink()
    summary = stage([src], st, opts, num_workers=0, progress=False)
    assert summary["chunks_resumed"] == 2
    stats = merge_staging([st], tmp_path / "out", opts, progress=False)
    assert stats["pairs"] == ref["pairs"]
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "ref")
    with pytest.raises(ConfigError, match="differs in: options"):
        stage([src], st, BuildOptions(chunk_size=1, max_caption_chars=100, **NO_SPLITS), num_workers=0,
              progress=False)
    # an old slice merges with a slice staged now (same default options)
    one = tmp_path / "one"
    stage([src / "PMC200.tar.gz"], one, opts, num_workers=0, progress=False)
    merged = merge_staging([st, one], tmp_path / "two", BuildOptions(dedup=False, **NO_SPLITS), progress=False)
    assert merged["skips"]["article"] == {"duplicate_article": 1}


# ------------------------------------------------------------------------------------------ 2. cloud metadata


def _cloud(root: Path, meta) -> Path:
    d = root / "PMC300.1"
    d.mkdir(parents=True)
    (d / "PMC300.1.xml").write_text(_xml([("F1", "A caption from the cloud.", "g1")], pmcid="PMC300", licence=None))
    (d / "PMC300.1.json").write_text(json.dumps(meta))
    (d / "g1.jpg").write_bytes(_jpeg(30))
    return root


@pytest.mark.parametrize("meta", [{"license_code": 5}, {"license_code": {"a": 1}}, ["x"]],
                         ids=["int", "dict", "list_root"])
def test_cloud_metadata_of_the_wrong_type_is_counted_not_a_crash(tmp_path, meta):
    # A number or object as license_code crashed every merge (AttributeError in licence_code), and the bad value
    # sat in the staging chunk so that reruns crashed too; a list as the JSON root was an internal_error.
    src = _cloud(tmp_path / "in", meta)
    stats = _build([src], tmp_path / "out")
    assert stats["pairs_total"] == 1
    assert stats["skips"]["package"] == {"bad_cloud_metadata": 1}
    assert stats["licenses"] == {"unknown": 1}
    assert json.loads(_samples(tmp_path / "out")["PMC300_F1"]["json"])["license"] is None


def test_merge_of_a_staged_non_string_licence_does_not_crash(tmp_path):
    # A staging dir staged by the previous version holds the number as the sample's licence: the merge takes it.
    src = _cloud(tmp_path / "in", {"license_code": "CC BY"})
    st = tmp_path / "st"
    opts = BuildOptions(**NO_SPLITS)
    stage([src], st, opts, num_workers=0, progress=False)

    def licence_5(records):
        records[0]["samples"][0]["meta"]["license"] = 5

    _rewrite_chunk(st / "chunks" / "chunk-000000.bin", licence_5)
    stats = merge_staging([st], tmp_path / "out", opts, progress=False)
    assert stats["pairs_total"] == 1 and stats["licenses"] == {"unknown": 1}
    assert json.loads(_samples(tmp_path / "out")["PMC300_F1"]["json"])["license"] is None


# ------------------------------------------------------------------------------------------ 3. file names


def test_non_utf8_file_names_build_slice_and_are_reported_escaped(tmp_path):
    # PMC\xff\xfe.tar.gz anywhere in the input tree crashed the build before any work (UnicodeEncodeError in the
    # plan digest and in slicing).
    src = tmp_path / "in"
    src.mkdir()
    good = _write_tar(tmp_path / "good.tar.gz", [("p/a.nxml", _xml([("F1", "A caption of a figure.", "g1")]).encode()),
                                                  ("p/g1.jpg", _jpeg(40))]).read_bytes()
    try:
        Path(os.fsdecode(os.fsencode(src) + b"/PMC\xff\xfe.tar.gz")).write_bytes(good)
        Path(os.fsdecode(os.fsencode(src) + b"/broken\xff.tar.gz")).write_bytes(b"not a tarball")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 file names")
    stats = _build([src], tmp_path / "out")
    assert stats["pairs_total"] == 1 and stats["skips"]["package"] == {"corrupt_package": 1}
    raw = (tmp_path / "out" / "stats.json").read_bytes().decode("utf-8")  # valid UTF-8
    assert any("broken\\xff.tar.gz" in e for e in json.loads(raw)["first_errors"])
    # the same name hashes the same on every run: two slices hold each package once, and a rerun resumes
    opts = BuildOptions(**NO_SPLITS)
    for k in range(2):
        for _ in range(2):
            stage([src], tmp_path / f"s{k}", opts, num_slices=2, slice_index=k, num_workers=0, progress=False)
    merged = merge_staging([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m", opts, progress=False)
    assert merged["pairs"] == stats["pairs"] and merged["skips"] == stats["skips"]
    assert _shard_bytes(tmp_path / "m") == _shard_bytes(tmp_path / "out")


# ------------------------------------------------------------------------------------------ 4. sample keys


def test_articles_whose_ids_sanitize_alike_get_distinct_keys(tmp_path):
    # DOIs 10.1000/x.y and 10.1000/x_y (no PMCID) both sanitize to 10_1000_x_y: one shard held each key twice
    # while sizes.json and manifest.json counted both samples.
    src = tmp_path / "in"
    src.mkdir()
    for i, doi in enumerate(["10.1000/x.y", "10.1000/x_y"]):
        figs = [(f"F{k}", f"Caption {k} of article {i}.", f"g{k}") for k in (1, 2)]
        images = {f"g{k}.jpg": _jpeg(50 + 10 * i + k) for k in (1, 2)}
        _package(src / f"a{i}.tar.gz", _xml(figs, pmcid=None, doi=doi), images)
    stats = _build([src], tmp_path / "out")
    names = _members(tmp_path / "out")
    assert len(names) == len(set(names)) == 12
    keys = sorted(_samples(tmp_path / "out"))
    assert stats["pairs_total"] == sum(json.loads((tmp_path / "out" / "sizes.json").read_text()).values()) == 4
    assert keys[:2] == ["10_1000_x_y_F1", "10_1000_x_y_F2"]  # the first article (package order) keeps its keys
    assert len(set(keys)) == 4 and all(k.startswith("10_1000_x_y_") for k in keys)
    metas = {k: json.loads(s["json"]) for k, s in _samples(tmp_path / "out").items()}
    assert {m["doi"] for k, m in metas.items() if k not in keys[:2]} == {"10.1000/x_y"}
    assert all(m["key"] == k for k, m in metas.items())
    _build([src], tmp_path / "again")
    assert _shard_bytes(tmp_path / "again") == _shard_bytes(tmp_path / "out")  # the same keys on every run


def test_figure_ids_that_collide_after_the_index_suffix_get_distinct_keys(tmp_path):
    # Figure ids A, A_3, A: the third became A_3 (its index suffix), which the second already had.
    src = tmp_path / "in"
    src.mkdir()
    figs = [("A", "First caption here.", "g1"), ("A_3", "Second caption here.", "g2"),
            ("A", "Third caption here.", "g3")]
    _package(src / "PMC400.tar.gz", _xml(figs, pmcid="PMC400"), {f"g{k}.jpg": _jpeg(60 + k) for k in (1, 2, 3)})
    stats = _build([src], tmp_path / "out")
    names = _members(tmp_path / "out")
    assert len(names) == len(set(names)) == 9 and stats["pairs_total"] == 3
    samples = _samples(tmp_path / "out")
    assert samples["PMC400_A"]["txt"] == b"First caption here."
    assert samples["PMC400_A_3"]["txt"] == b"Second caption here."
    assert samples["PMC400_A_3_2"]["txt"] == b"Third caption here."


def test_merge_disambiguates_a_duplicate_key_it_is_given(tmp_path):
    # A staging dir of the previous version can hold one key twice: the merge writes both samples, distinctly.
    src = tmp_path / "in"
    src.mkdir()
    figs = [("F1", "First caption here.", "g1"), ("F2", "Second caption here.", "g2")]
    _package(src / "PMC500.tar.gz", _xml(figs, pmcid="PMC500"), {f"g{k}.jpg": _jpeg(70 + k) for k in (1, 2)})
    st = tmp_path / "st"
    opts = BuildOptions(**NO_SPLITS)
    stage([src], st, opts, num_workers=0, progress=False)

    def same_key(records):
        for s in records[0]["samples"]:
            s["meta"]["key"] = "PMC500_F1"

    _rewrite_chunk(st / "chunks" / "chunk-000000.bin", same_key)
    stats = merge_staging([st], tmp_path / "out", opts, progress=False)
    names = _members(tmp_path / "out")
    assert len(names) == len(set(names)) == 6 and stats["pairs_total"] == 2
    samples = _samples(tmp_path / "out")
    assert samples["PMC500_F1"]["txt"] == b"First caption here."
    (other,) = set(samples) - {"PMC500_F1"}
    assert samples[other]["txt"] == b"Second caption here." and json.loads(samples[other]["json"])["key"] == other
    assert any("PMC500_F1" in e for e in stats["first_errors"])


# ------------------------------------------------------------------------------------------ 5. shared images


def test_figures_sharing_one_image_decode_it_once_and_stage_it_once(tmp_path, monkeypatch):
    # 6000 <fig>s on one image: decoded and re-encoded 6000 times, and 6000 copies staged (857 MB, 20 s).
    src = tmp_path / "in"
    src.mkdir()
    n = 300
    img = _jpeg(80, size=(700, 500))  # re-encoded (larger than max_side): the costly path
    figs = [(f"F{k}", f"Caption number {k} of this figure.", "shared") for k in range(n)]
    _package(src / "PMC600.tar.gz", _xml(figs, pmcid="PMC600"), {"shared.jpg": img})
    calls = []
    real = stage_mod.process_image
    monkeypatch.setattr(stage_mod, "process_image", lambda data, **kw: calls.append(1) or real(data, **kw))
    st = tmp_path / "st"
    opts = BuildOptions(**NO_SPLITS)
    stage([src], st, opts, num_workers=0, progress=False)
    assert len(calls) == 1
    chunk = (st / "chunks" / "chunk-000000.bin").read_bytes()
    records, blob = stage_mod._decode_chunk(chunk, "chunk")
    expected = real(img, max_side=opts.max_side, quality=opts.jpeg_quality, max_pixels=opts.max_pixels,
                     min_side=opts.min_side, max_aspect=opts.max_aspect, passthrough=opts.jpeg_passthrough)
    assert struct.unpack("<QQ", chunk[8:24])[1] == len(expected.jpeg)  # one copy of the JPEG, shared
    samples = records[0]["samples"]
    assert len(samples) == n
    for s in samples:  # every sample is what processing the image for it alone gives
        assert blob[s["offset"] : s["offset"] + s["length"]] == expected.jpeg
        assert (s["sha"], s["dhash"], s["meta"]["size"]) == (expected.sha, expected.dhash, list(expected.size))
    stats = merge_staging([st], tmp_path / "out", opts, progress=False)
    assert stats["pairs_total"] == 1 and stats["skips"]["figure"] == {"duplicate_exact": n - 1}
    assert _samples(tmp_path / "out")["PMC600_F0"]["jpg"] == expected.jpeg


# ------------------------------------------------------------------------------------------ 6. XML encodings


INT_ENTITY = '<!DOCTYPE article [<!ENTITY inj "INJECTED-BY-ENTITY">]>'


@pytest.mark.parametrize("declared, codec", [("UTF-16", "utf-16"), ("UTF-16BE", "utf-16-be"), ("UTF-16LE", "utf-16-le"),
                                             ("ISO-8859-1", "latin-1"), ("UTF-8", "utf-8")])
def test_entity_declarations_are_refused_whatever_the_encoding(tmp_path, declared, codec):
    # The fast parser looked for the UTF-8 bytes b"<!ENTITY", which UTF-16 text never contains: the entity's
    # text went into the caption.
    doc = _xml([("F1", "before &inj; after", "g1")], prolog=f'<?xml version="1.0" encoding="{declared}"?>{INT_ENTITY}')
    with pytest.raises(DataError, match="entity declaration 'inj' refused"):
        parse_jats(doc.encode(codec))
    plain = _xml([("F1", "plain caption é ü", "g1")], prolog=f'<?xml version="1.0" encoding="{declared}"?>')
    assert parse_jats(plain.encode(codec)) == parse_jats(plain.encode("utf-8").replace(declared.encode(), b"UTF-8"))
    src = tmp_path / "in"
    src.mkdir()
    _package(src / "PMC700.tar.gz", doc.encode(codec), {"g1.jpg": _jpeg(90)})
    stats = _build([src], tmp_path / "out")
    assert stats["pairs_total"] == 0 and stats["skips"]["package"] == {"xml_error": 1}


# ------------------------------------------------------------------------------------------ 7. output vs inputs


def test_an_output_or_staging_dir_among_the_inputs_is_refused_before_any_work(tmp_path, capsys):
    # --output equal to an input (or inside one) was accepted: the next run read its own shards as packages.
    from bmclip.cli import main

    src = tmp_path / "in"
    src.mkdir()
    xml = _xml([("F1", "A caption of a figure.", "g1")], pmcid="PMC800")
    _package(src / "PMC800.tar.gz", xml, {"g1.jpg": _jpeg(95)})
    (tmp_path / "link").symlink_to(src)
    before = sorted(p.name for p in src.rglob("*"))
    cases = [
        (["--output", str(src)], "is the input"),
        (["--output", str(src / "out")], "is inside the input"),
        (["--output", str(tmp_path / "link" / "out")], "is inside the input"),  # compared resolved
        (["--output", str(tmp_path / "o"), "--staging", str(src / "st")], "staging dir"),
        (["--output", str(tmp_path)], "is inside the output folder"),  # an input inside the output
        (["--staging", str(src / "st"), "--num-slices", "2", "--slice", "0"], "staging dir"),
    ]
    for extra, message in cases:
        assert main(["build-dataset", str(src), "-j", "0", "--no-progress", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert sorted(p.name for p in src.rglob("*")) == before, extra  # nothing written
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="inside the input"):  # the Python API: its staging dir is in the input
        build_dataset([str(src)], src / "out", num_workers=0, progress=False)
    assert sorted(p.name for p in src.rglob("*")) == before
    with pytest.raises(ConfigError, match="output folder .* inside the input"):  # staging elsewhere, output inside
        build_dataset([str(src)], src / "out", num_workers=0, progress=False, staging=tmp_path / "st2")
    assert sorted(p.name for p in src.rglob("*")) == before and not (tmp_path / "st2").exists()


@pytest.mark.slow  # a whole build; the stage/merge modules keep their fast tests
def test_an_article_repeated_within_its_package_keeps_its_first_copy(tmp_path):
    """A <pmc-articleset> holding one article twice dropped the figures of both copies (the merge took the
    repeat's ID as seen before, and every sample of that ID went): the first copy is now used, the repeat
    counted."""
    art = _xml([("F1", "A caption of a figure.", "g1"), ("F2", "Another caption here.", "g2")])
    inner = art[art.index("<article "):]
    xml = f"<pmc-articleset>{inner}{inner}</pmc-articleset>"
    src = tmp_path / "in"
    src.mkdir()
    _package(src / "PMC100.tar.gz", xml, {"g1.jpg": _jpeg(1), "g2.jpg": _jpeg(2)})
    stats = _build([src], tmp_path / "out")
    assert stats["pairs_total"] == 2
    assert stats["skips"]["article"] == {"duplicate_article": 1}
    assert stats["skips"]["figure"] == {"duplicate_article": 2}
    assert stats["figures"] == stats["pairs_total"] + sum(stats["skips"]["figure"].values())
