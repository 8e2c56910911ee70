"""parse_jats on real articles of every flavour (values checked by hand against the XML) and on hostile XML."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from bmclip.data.pmc import Article, NotJatsError, parse_jats
from bmclip.errors import DataError


@pytest.fixture
def pmc(fixtures_dir):
    return fixtures_dir / "pmc"


# ---------------------------------------------------------------- real articles, hand-checked


def test_classic_pmc_nxml(pmc):
    a = parse_jats(pmc / "PMC3166277" / "1471-2180-11-174.nxml")
    assert isinstance(a, Article)
    assert (a.pmcid, a.pmid, a.doi) == ("PMC3166277", "21810267", "10.1186/1471-2180-11-174")
    assert a.license == "http://creativecommons.org/licenses/by/2.0"
    assert [f.id for f in a.figures] == ["F1", "F2", "F3", "F4"]
    assert [f.label for f in a.figures] == ["Figure 1", "Figure 2", "Figure 3", "Figure 4"]
    # classic PMC hrefs have no extension
    assert [f.graphics for f in a.figures] == [[f"1471-2180-11-174-{i}"] for i in range(1, 5)]
    # <bold>title</bold>, xrefs "[<xref>28</xref>,<xref>39</xref>]" and <italic>et al. </italic> kept as text
    assert a.figures[0].caption == (
        "Schematic presentation of two models of holin hole formation. Holin monomers (shaded circles) are "
        "produced in the cytoplasm, and then transported to the cell membrane (a top-down view of the cell "
        "membrane thereafter) where they dimerize. A previous model (open arrows) [28,39] hypothesized that "
        'the growth of the holin aggregates ("rafts") to a critical size that is responsible for the collapse '
        "of the proton motive force (pmf), thus resulting in hole formation. The current model [40] (filled "
        "arrows) suggests that the holin proteins are mostly in a mobile state, then quite suddenly, aggregates "
        "are formed, leading to the formation of holin holes. Addition of the energy poison KCN halts further "
        "holin production and abolishes the pmf. This figure is adapted from Wang et al. [28] and White et al. "
        "[40]."
    )
    # key and attribute access are both supported
    assert a["pmcid"] == a.pmcid and a.figures[0]["label"] == "Figure 1"


def test_europepmc_fulltext_title_and_paragraph(pmc):
    a = parse_jats(pmc / "europepmc_PMC4060021" / "fulltext.xml")
    assert a.pmcid == "PMC4060021" and a.doi == "10.7717/peerj.426"
    assert a.license == "http://creativecommons.org/publicdomain/zero/1.0/"
    assert len(a.figures) == 7
    f = a.figures[0]
    assert (f.id, f.label, f.graphics) == ("fig-1", "Figure 1", ["peerj-02-426-g001"])
    # <title> and <p> are separate blocks: one space between them; <object-id> is not caption text
    assert f.caption == (
        "Gel separation of Culicoides sonorensis salivary proteins. Silver stained gel with the most abundant "
        "proteins in each segment noted. A total of 45 proteins were identified by tandem mass spectroscopy "
        "from the seven segments."
    )


def test_new_pmc_xml_document_order_and_extensions(pmc):
    a = parse_jats(pmc / "PMC13239990" / "PMC13239990.xml")
    assert (a.pmcid, a.pmid) == ("PMC13239990", "42231137")
    assert len(a.figures) == 13
    assert [f.id for f in a.figures] == [f"pro70648-fig-{i:04d}" for i in range(1, 14)]
    # figures are in document order; their image files are numbered differently (out of numeric order)
    assert [f.graphics[0] for f in a.figures[:4]] == [
        "PRO-35-e70648-g011.jpg",
        "PRO-35-e70648-g013.jpg",
        "PRO-35-e70648-g012.jpg",
        "PRO-35-e70648-g006.jpg",
    ]
    assert a.figures[0].caption == (
        "Goodsell's illustration of Insulin Release (2022), demonstrating insulin crystals being carried to "
        "the extracellular space in vesicles. This image (Goodsell, 2022) is one of many in the Molecular "
        "Landscapes series, published on the RCSB Protein Data Bank and Scripps Research. Image used for "
        "educational purposes under CC\u2010BY\u20104.0 license."
    )


def test_alternatives_list_both_graphics_and_licence_from_prose(pmc):
    a = parse_jats(pmc / "PMC13173394" / "PMC13173394.xml")
    # <license> has no xlink:href: the CC URL linked from its prose is the licence
    assert a.license == "https://creativecommons.org/licenses/by/4.0/"
    assert len(a.figures) == 9
    f = a.figures[0]
    assert (f.id, f.label) == ("rcm70102-fig-0001", "FIGURE 1")
    assert f.graphics == ["RCM-40-e70102-g002.jpg", "RCM-40-e70102-g002.gif"]
    assert all(len(g.graphics) == 2 and g.graphics[1].endswith(".gif") for g in a.figures)
    assert f.caption.startswith("Positive ion mode MS analysis of PEG 3000 (1 mg/mL) using no added salt")
    assert f.caption.endswith(
        "(H) Deconvoluted ESI mass spectrum displayed in Panel (F), showing the relationship between mass and charge."
    )


def test_elife_fig_group_with_supplements(pmc):
    a = parse_jats(pmc / "elife04493" / "elife04493.xml")
    assert a.doi == "10.7554/eLife.04493" and a.pmcid is None
    ids = [f.id for f in a.figures]
    assert ids == [
        "fig1", "fig2", "fig3", "fig3s1", "fig4", "fig4s1", "fig5", "fig5s1",
        "fig6", "fig6s1", "fig7", "fig7s1", "fig8", "fig9",
    ]  # fmt: skip
    fs = a.figures[3]
    assert fs.label == "Figure 3—figure supplement 1."
    assert fs.graphics == ["elife04493fs001"]
    assert fs.caption.startswith("UAS-hPR-flp is fully active in the presence of RU486, but inactive without drug.")


def test_plos_info_doi_hrefs_and_tables_excluded(pmc):
    a = parse_jats(pmc / "pone.0056489" / "pone.0056489.xml")
    assert a.doi == "10.1371/journal.pone.0056489"
    # three <fig>; the three table images live in <table-wrap> and are not figures
    assert [f.graphics for f in a.figures] == [[f"info:doi/10.1371/journal.pone.0056489.g00{i}"] for i in (1, 2, 3)]
    assert a.figures[2].caption == (
        "Relationship between the mean values of the diameter at breast height (DBH) and observed "
        "heterozygosity (Ho) in artificial populations of Platycladus orientalis(Mean ± S.E.)."
    )


def test_biorxiv_whitespace_collapsed(pmc):
    a = parse_jats(pmc / "biorxiv-685172" / "biorxiv-685172.xml")
    assert a.doi == "10.1101/685172" and len(a.figures) == 4
    f = a.figures[0]
    assert f.label == "Figure 1:"
    # the source title spans several indented lines and an <italic> with newlines inside
    assert f.caption.startswith(
        "Two distinct T2D-association signals at the ANK1-NKX6-3 locus associated with expression levels "
        "of two transcripts in two tissues. (A) Regional association plot"
    )
    assert "  " not in f.caption and "\n" not in f.caption


def test_texture_dar_with_doctype(pmc):
    # DOCTYPE names an external DTD that is never fetched
    a = parse_jats(pmc / "elife-32671" / "manuscript.xml")
    assert [(f.id, f.label, f.graphics) for f in a.figures] == [
        (f"fig{i}", f"Figure {i}", [f"fig{i}.jpg"]) for i in range(1, 6)
    ]
    assert a.license is None
    with pytest.raises(NotJatsError):
        parse_jats(pmc / "elife-32671" / "manifest.xml")


def test_shared_samples_mathml_and_articleset(pmc_samples):
    a = parse_jats(pmc_samples / "PMC13170065" / "PMC13170065.xml")
    f = a.figures[4]
    assert f.graphics == ["RCM-40-e70104-g005.jpg", "RCM-40-e70104-g005.gif"]
    # MathML tokens kept as text, one space apart
    assert f.caption.endswith("following the linear regression function log CV = − 0.5 log Frequency + 2.")
    arts = parse_jats(pmc_samples / "pubget_articleset" / "articleset.xml")
    assert isinstance(arts, list) and len(arts) == 7
    assert [x.pmcid for x in arts[:3]] == ["PMC9057060", "PMC9056525", "PMC9056519"]
    b = parse_jats(pmc_samples / "PMC10802347" / "nihpp-2023.12.31.573776v1.nxml")
    assert (b.pmcid, b.pmid, len(b.figures)) == ("PMC10802347", "38260464", 4)
    assert b.figures[0].graphics == ["nihpp-2023.12.31.573776v1-f0001"]
    # every <fig> of every sample XML matches MANIFEST.tsv's n_fig_elements
    rows = (pmc_samples / "MANIFEST.tsv").read_text().splitlines()[1:]
    checked = 0
    for row in rows:
        cols = row.split("\t")
        if cols[8] != "article-xml":
            continue
        parsed = parse_jats(pmc_samples / cols[0])
        arts = parsed if isinstance(parsed, list) else [parsed]
        assert sum(len(x.figures) for x in arts) == int(cols[4]), cols[0]
        checked += 1
    assert checked == 40  # MANIFEST rows of kind article-xml


# ---------------------------------------------------------------- structure rules on small documents


def _doc(body: str, front: str = "") -> bytes:
    return (
        '<?xml version="1.0"?><article xmlns:xlink="http://www.w3.org/1999/xlink" '
        'xmlns:mml="http://www.w3.org/1998/Math/MathML"><front><article-meta>'
        f'<article-id pub-id-type="pmc">123</article-id>{front}</article-meta></front>'
        f"<body>{body}</body></article>"
    ).encode()


def test_nested_figures_graphics_go_to_nearest_fig():
    xml = _doc(
        '<fig-group id="G"><caption><p>group</p></caption>'
        '<fig id="A"><label>Fig 1A</label><caption><title>Panel <italic>A</italic>.</title>'
        '<p>CO<sub>2</sub> level <xref ref-type="bibr" rid="b1">1</xref>.</p></caption>'
        '<alternatives><graphic xlink:href="a.jpg"/><graphic xlink:href="a.gif"/></alternatives></fig>'
        '<fig id="B"><caption><p>Second</p></caption><graphic xlink:href="b"/></fig></fig-group>'
        '<boxed-text><fig id="C"><caption><p>boxed <named-content content-type="gene">Tp53</named-content>'
        "</p></caption><graphic xlink:href='c.png'/></fig></boxed-text>"
        '<app><fig id="D"><graphic xlink:href="d.tif"/></fig></app>'
        '<fig id="E"><caption><p>x</p></caption><fig id="E1"><graphic xlink:href="e1"/></fig>'
        '<graphic xlink:href="e"/></fig>'
    )
    a = parse_jats(xml)
    assert a.pmcid == "PMC123"
    got = [(f.id, f.label, f.caption, f.graphics) for f in a.figures]
    assert got == [
        ("A", "Fig 1A", "Panel A. CO2 level 1.", ["a.jpg", "a.gif"]),
        ("B", None, "Second", ["b"]),
        ("C", None, "boxed Tp53", ["c.png"]),
        ("D", None, "", ["d.tif"]),
        ("E", None, "x", ["e"]),
        ("E1", None, "", ["e1"]),
    ]


def test_alternatives_math_kept_once_and_tex_dropped():
    xml = _doc(
        '<fig id="F"><caption><p>Rate <inline-formula><alternatives>'
        "<tex-math>k_{on}</tex-math><mml:math><mml:msub><mml:mi>k</mml:mi><mml:mtext>on</mml:mtext>"
        "</mml:msub><mml:annotation>k_{on}</mml:annotation></mml:math></alternatives></inline-formula>"
        " is high.</p></caption><graphic xlink:href='f'/></fig>"
    )
    assert parse_jats(xml).figures[0].caption == "Rate k on is high."


def _caption_with_math(math: str) -> str:
    xml = _doc(f'<fig id="F"><caption><p>Value <inline-formula><mml:math>{math}</mml:math></inline-formula> shown'
               '</p></caption><graphic xlink:href="f"/></fig>')
    return parse_jats(xml).figures[0].caption


def test_mfenced_brackets_and_separators_kept():
    # <mfenced> renders its open and close brackets and separators (MathML defaults "(", ")", ","): the caption
    # text lost them ("f x" for f(x)).
    f_of_x = "<mml:mi>f</mml:mi><mml:mfenced><mml:mi>x</mml:mi></mml:mfenced>"
    assert _caption_with_math(f_of_x) == "Value f ( x ) shown"
    assert _caption_with_math('<mml:mi>exp</mml:mi><mml:mfenced open="[" close="]"><mml:mi>x</mml:mi><mml:mi>y</mml:mi>'
                              "</mml:mfenced>") == "Value exp [ x , y ] shown"
    # one separator per gap, the last one repeated; none at all; nesting and non-token children
    assert _caption_with_math('<mml:mfenced separators="; |"><mml:mi>a</mml:mi><mml:mi>b</mml:mi><mml:mi>c</mml:mi>'
                              "<mml:mi>d</mml:mi></mml:mfenced>") == "Value ( a ; b | c | d ) shown"
    assert _caption_with_math('<mml:mfenced open="{" close="" separators=""><mml:mi>a</mml:mi><mml:mi>b</mml:mi>'
                              "</mml:mfenced>") == "Value { a b shown"
    assert _caption_with_math('<mml:mfenced><mml:msup><mml:mi>x</mml:mi><mml:mn>2</mml:mn></mml:msup>'
                              '<mml:mfenced open="|" close="|"><mml:mi>y</mml:mi></mml:mfenced></mml:mfenced>'
                              ) == "Value ( x 2 , | y | ) shown"
    # the MathML of a real caption (PMC7417471, Nano Convergence 7:27 (2020), CC BY 4.0, Fig. 6): the
    # ferricyanide couple, whose TeX rendering reads L^{-1} [Fe(CN)_6]^{3-/4-}
    real = ('<mml:mrow><mml:msup><mml:mrow><mml:mtext>L</mml:mtext></mml:mrow><mml:mrow><mml:mo>-</mml:mo>'
            '<mml:mn>1</mml:mn></mml:mrow></mml:msup><mml:mrow><mml:mo stretchy="false">[</mml:mo>'
            '<mml:mtext>Fe</mml:mtext></mml:mrow><mml:msup><mml:mfenced close="]" open="("><mml:msub><mml:mrow>'
            '<mml:mtext>CN</mml:mtext><mml:mo stretchy="false">)</mml:mo></mml:mrow><mml:mn>6</mml:mn></mml:msub>'
            "</mml:mfenced><mml:mrow><mml:mn>3</mml:mn><mml:mo>-</mml:mo><mml:mo stretchy=\"false\">/</mml:mo>"
            "<mml:mn>4</mml:mn><mml:mo>-</mml:mo></mml:mrow></mml:msup></mml:mrow>")
    assert _caption_with_math(real) == "Value L - 1 [ Fe ( CN ) 6 ] 3 - / 4 - shown"


def test_shared_samples_mfenced_captions(pmc_samples):
    a = parse_jats(pmc_samples / "PMC7417471" / "PMC7417471.nxml")
    fig6 = next(f for f in a.figures if f.id == "Fig6")
    assert "in a 5 mmol L - 1 [ Fe ( CN ) 6 ] 3 - / 4 - solution" in fig6.caption
    b = parse_jats(pmc_samples / "europepmc_PMC4101712" / "fulltext.xml")
    assert "via RH = exp ( 17.27 ( D - 32 ) 5 / 9" in next(f for f in b.figures if f.id == "F5").caption


def test_formula_caption_and_table_graphics_are_not_the_figure_image():
    # A <graphic> in the caption, in a display or inline formula, or in a table inside the <fig> is not the
    # figure's image: it came first in document order and a formula image was stored as the figure.
    xml = _doc(
        '<fig id="F"><label>Figure 1</label><caption><p>Fit of <disp-formula><graphic xlink:href="e001"/>'
        '<label>(1)</label></disp-formula> and <inline-formula><alternatives><mml:math><mml:mi>x</mml:mi>'
        '</mml:math><graphic xlink:href="i001"/></alternatives></inline-formula>.</p><graphic xlink:href="c001"/>'
        '</caption><disp-formula><graphic xlink:href="e002"/></disp-formula>'
        '<table-wrap><caption><p>t</p></caption><graphic xlink:href="t001"/></table-wrap>'
        '<alternatives><graphic xlink:href="g001.jpg"/><graphic xlink:href="g001.gif"/></alternatives></fig>'
        '<fig id="G"><caption><p>Only a formula image here.</p><disp-formula><graphic xlink:href="e003"/>'
        "</disp-formula></caption></fig>"
    )
    f, g = parse_jats(xml).figures
    assert f.graphics == ["g001.jpg", "g001.gif"]
    assert f.caption == "Fit of (1) and x."
    assert g.graphics == []  # no image of its own: the builder counts it as no_graphic


def test_named_entities_without_dtd_and_file_objects():
    xml = (
        b'<!DOCTYPE article PUBLIC "-//NLM//DTD JATS" "http://127.0.0.1:9/never-fetched.dtd">'
        b'<article xmlns:xlink="http://www.w3.org/1999/xlink"><body><fig id="f"><caption>'
        b"<p>10&nbsp;&mu;m&#x2013;&alpha; &amp; more</p></caption><graphic xlink:href='x'/></fig></body></article>"
    )
    a = parse_jats(io.BytesIO(xml))
    assert a.figures[0].caption == "10\u00a0μm–α & more".replace("\u00a0", " ")
    assert a.pmcid is None and a.license is None


# ---------------------------------------------------------------- hostile and broken input


def test_xxe_external_entity_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    xml = (
        f'<?xml version="1.0"?><!DOCTYPE article [<!ENTITY xxe SYSTEM "file://{secret}">]>'
        '<article><body><fig id="f"><caption><p>&xxe;</p></caption></fig></body></article>'
    )
    p = tmp_path / "evil.xml"
    p.write_text(xml)
    with pytest.raises(DataError, match="evil.xml.*entity declaration 'xxe' refused"):
        parse_jats(p)


def test_billion_laughs_refused():
    lol = (
        '<?xml version="1.0"?><!DOCTYPE article [<!ENTITY a "lol"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
        '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]><article><body><p>&c;</p></body></article>'
    )
    with pytest.raises(DataError, match="entity declaration"):
        parse_jats(lol.encode())


def test_parameter_entity_dtd_fetch_refused(tmp_path):
    evil_dtd = tmp_path / "evil.dtd"
    evil_dtd.write_text('<!ENTITY leak "LEAKED">')
    xml = f'<!DOCTYPE article [<!ENTITY % p SYSTEM "file://{evil_dtd}"> %p;]><article><p>&leak;</p></article>'
    with pytest.raises(DataError):
        parse_jats(xml.encode())


def test_unknown_entity_names_the_file(tmp_path):
    p = tmp_path / "odd.nxml"
    p.write_bytes(b'<!DOCTYPE article SYSTEM "x.dtd"><article><body><p>&notarealentity;</p></body></article>')
    with pytest.raises(DataError, match=r"odd\.nxml: unknown XML entity '&notarealentity;'"):
        parse_jats(p)


def test_malformed_empty_and_foreign_xml(tmp_path):
    bad = tmp_path / "broken.xml"
    bad.write_bytes(b"<article><body><fig></body></article>")
    with pytest.raises(DataError, match="broken.xml: malformed XML"):
        parse_jats(bad)
    with pytest.raises(DataError, match="malformed XML"):
        parse_jats(b"<article><body>")  # truncated document
    with pytest.raises(DataError, match="empty XML"):
        parse_jats(b"  \n")
    with pytest.raises(NotJatsError, match="<html>"):
        parse_jats(b"<html><body/></html>")
    with pytest.raises(DataError, match="cannot read"):
        parse_jats(tmp_path / "missing.xml")


def test_importable_without_cxx_extension():
    code = (
        "import sys; sys.modules['bmclip._C'] = None\n"
        "from bmclip.data.pmc import parse_jats\n"
        "a = parse_jats(b'<article><body><fig id=\"x\"><caption><p>ok</p></caption></fig></body></article>')\n"
        "assert a.figures[0].caption == 'ok'\n"
        "assert 'torch' not in sys.modules, 'parse_jats must not pull in torch'\n"
        "print('fine')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "fine"


def test_fast_and_safe_parsers_agree(pmc, monkeypatch):
    """The C-parser fast path (no <!ENTITY> in the file) gives exactly what the expat safe path gives."""
    from bmclip.data.pmc import jats

    files = sorted(pmc.glob("*/*.*xml"))
    fast = {f: parse_jats(f).to_dict() for f in files if not f.name.startswith("manifest")}
    monkeypatch.setattr(jats, "_parse_fast", lambda data: None)
    safe = {f: parse_jats(f).to_dict() for f in fast}
    assert fast == safe and len(fast) == 8
    # a default namespace on the root is stripped in both paths
    xml = b'<article xmlns="http://jats.nlm.nih.gov"><body><fig id="n"><caption><p>ns</p></caption></fig>'
    xml += b"</body></article>"
    monkeypatch.undo()
    assert parse_jats(xml).figures[0].caption == "ns"
