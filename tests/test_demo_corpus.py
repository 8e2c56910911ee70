"""The synthetic PMC-style corpus: deterministic packages, well-formed JATS, captions that match the pixels."""

import hashlib
import tarfile
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from bmclip.demo_corpus import FIGURE_TYPES, generate_corpus, load_labels, render_figure

XLINK = "{http://www.w3.org/1999/xlink}href"


def _digest(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_corpus_is_deterministic_and_seed_dependent(tmp_path):
    a = generate_corpus(tmp_path / "a", n_articles=4, seed=3)
    b = generate_corpus(tmp_path / "b", n_articles=4, seed=3)
    c = generate_corpus(tmp_path / "c", n_articles=4, seed=4)
    assert [p.name for p in a] == [f"PMC{9000001 + i}.tar.gz" for i in range(4)]
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert (tmp_path / "a" / "labels.json").read_bytes() == (tmp_path / "b" / "labels.json").read_bytes()


def test_package_layout_xml_and_labels(tmp_path):
    paths = generate_corpus(tmp_path, n_articles=6, seed=1, figures_per_article=(2, 3))
    labels = load_labels(tmp_path)
    n_figs = 0
    for path in paths:
        pmcid = path.name.split(".")[0]
        with tarfile.open(path, "r:gz") as tar:
            names = tar.getnames()
            assert f"{pmcid}/{pmcid}.nxml" in names
            root = ET.fromstring(tar.extractfile(f"{pmcid}/{pmcid}.nxml").read())
            assert root.find(".//article-id[@pub-id-type='pmc']").text == pmcid[3:]
            figs = root.findall(".//fig")
            assert 2 <= len(figs) <= 3
            for fig in figs:
                n_figs += 1
                href = fig.find("graphic").get(XLINK)
                full = [n for n in names if n.startswith(f"{pmcid}/{href}.") and not n.endswith(".gif")]
                assert len(full) == 1 and f"{pmcid}/{href}.gif" in names
                img = Image.open(tar.extractfile(full[0]))
                assert min(img.size) >= 200
                caption = "".join(fig.find("caption").itertext())
                assert len(caption.split()) >= 8
                assert labels[(pmcid, fig.get("id"))] in FIGURE_TYPES
    assert len(labels) == n_figs


@pytest.mark.parametrize("fig_type", FIGURE_TYPES)
def test_captions_describe_the_drawn_figure(fig_type):
    for seed in range(5):
        img, caption, attrs = render_figure(fig_type, seed)
        arr = np.asarray(img)
        assert arr.ndim == 3 and arr.shape[2] == 3 and arr.std() > 5  # not blank
        if fig_type in ("bar chart", "flow diagram", "line chart"):
            assert attrs["colour"] in caption
        if fig_type == "radiograph":
            assert np.allclose(arr[..., 0], arr[..., 1])  # grayscale film
        if fig_type == "fluorescence microscopy":
            channel = {"red": 0, "green": 1, "blue": 2}[attrs["colour"]]
            assert arr.reshape(-1, 3).mean(0).argmax() == channel
            assert attrs["colour"] in caption


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError):
        generate_corpus(tmp_path, n_articles=0)
    with pytest.raises(ValueError):
        render_figure("pie chart", 0)


def _sentences(text):
    import re

    # "mean ± s.d. of three experiments." is one sentence
    return [s for s in re.split(r"(?<!s\.d\.)(?<=[.!?])\s+", text.strip()) if s]


@pytest.mark.slow
def test_captions_do_not_start_with_a_doubled_sentence(tmp_path):
    # The caption the builder stores is the figure title plus the body (bmclip.data.pmc.parse_jats); PMC
    # titles are a heading of their own, so the stored caption must not open with its first sentence twice
    # ("Bar chart of X. Bar chart of X. The bars ...") nor with the title repeated as the body's start.
    from bmclip.data.pmc import parse_jats

    paths = generate_corpus(tmp_path, n_articles=40, seed=0)
    captions = []
    for path in paths:
        pmcid = path.name.split(".")[0]
        with tarfile.open(path, "r:gz") as tar:
            art = parse_jats(tar.extractfile(f"{pmcid}/{pmcid}.nxml").read())
        captions += [(fig.caption, fig.caption.split(". ", 1)[0]) for fig in art.figures]
    assert len(captions) >= 80
    for caption, _ in captions:
        first, second, *_ = _sentences(caption) + [""]
        stem = first.rstrip(".").split(":")[0].strip().lower()
        assert stem and not second.lower().startswith(stem), caption
        assert first.lower() != second.lower(), caption
    assert not [s for c, _ in captions for s in _sentences(c) if s[0].islower()]  # sentences start capitalised
    assert len({t for _, t in captions}) >= 10  # titles vary: not one fixed heading
