"""A synthetic corpus of PMC-style article packages for the end-to-end demo and the tests.

Each article is a legacy PMC Open Access package (``PMC9xxxxxx.tar.gz``) holding JATS XML and
procedurally rendered figures of six biomedical figure types. Every caption describes what is drawn
(figure type, colours, counts, trends, anatomy), in varied wording with realistic filler sentences,
so a contrastive model has something real to learn: retrieval needs more than the figure type.

Everything is deterministic per seed: the same call writes byte-identical packages.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bmclip.io import atomic_write_text, atomic_writer

FIGURE_TYPES = [
    "bar chart",
    "line chart",
    "fluorescence microscopy",
    "radiograph",
    "gel electrophoresis",
    "flow diagram",
]

# Names each figure type goes by in captions: zero-shot prompts average over them (a prompt ensemble).
FIGURE_TYPE_NAMES = {
    "bar chart": ["bar chart", "bar graph"],
    "line chart": ["line chart", "line plot", "time course plot"],
    "fluorescence microscopy": ["fluorescence micrograph", "immunofluorescence image", "confocal microscopy image"],
    "radiograph": ["radiograph", "X-ray image", "plain radiograph"],
    "gel electrophoresis": ["gel electrophoresis", "western blot", "agarose gel"],
    "flow diagram": ["flow diagram", "flowchart", "schematic overview"],
}

_COLOURS = {
    "red": (214, 39, 40),
    "blue": (31, 119, 180),
    "green": (44, 160, 44),
    "orange": (255, 127, 14),
    "purple": (148, 103, 189),
}
_STAINS = {"green": (60, 255, 90), "red": (255, 60, 60), "blue": (80, 120, 255)}
_STAIN_NAMES = {
    "green": ["GFP", "green fluorescent protein", "FITC"],
    "red": ["mCherry", "rhodamine", "Texas Red"],
    "blue": ["DAPI", "Hoechst", "DAPI nuclear stain"],
}
_NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

_MEASURES = ["expression level", "cell viability", "tumour volume", "mean fluorescence intensity",
             "relative mRNA abundance", "serum concentration", "colony count", "enzyme activity"]
_GROUPS = ["treatment groups", "cell lines", "time points", "patient cohorts", "mouse strains",
           "drug doses", "experimental conditions"]
_FILLER = [
    "Data are shown as mean ± s.d. of three independent experiments.",
    "Error bars indicate the standard error of the mean.",
    "Representative image from n = 3 biological replicates.",
    "Scale bar, 50 µm.",
    "Statistical significance was assessed by two-tailed t-test (*P < 0.05).",
    "See Methods for details of sample preparation.",
    "Images were acquired with identical exposure settings.",
    "Source data are provided in the Supplementary Information.",
]
# Figure titles (the caption's bold first sentence in PMC) name what the experiment is about, as real ones
# do; the caption body then describes what is drawn.
_FIG_HEADINGS = ["Effect of treatment on", "Changes in", "Characterisation of", "Dose dependence of",
                 "Validation of", "Comparison of", "Overview of", "Assessment of"]
_TITLE_WORDS = ["Regulation", "Characterisation", "Analysis", "Role", "Dynamics", "Mapping"]
_TOPICS = ["kinase signalling", "immune infiltration", "mitochondrial stress", "bone remodelling",
           "bacterial persistence", "neuronal development", "tumour metabolism", "lung fibrosis"]


def _num(n: int) -> str:
    return _NUM_WORDS[n] if 0 <= n < len(_NUM_WORDS) else str(n)


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _canvas(rng: np.random.Generator, bg=(255, 255, 255)) -> Image.Image:
    w = int(rng.integers(240, 400))
    h = int(rng.integers(200, 320))
    return Image.new("RGB", (w, h), bg)


def _bar_chart(rng):
    img = _canvas(rng)
    d = ImageDraw.Draw(img)
    w, h = img.size
    n = int(rng.integers(2, 7))
    colour = _pick(rng, list(_COLOURS))
    trend = _pick(rng, ["increasing", "decreasing", "mixed"])
    vals = np.sort(rng.uniform(0.15, 0.95, n))
    if trend == "decreasing":
        vals = vals[::-1]
    elif trend == "mixed":
        vals = rng.permutation(vals)
    left, bottom, top = 30, h - 25, 20
    d.line([(left, top), (left, bottom), (w - 10, bottom)], fill=(0, 0, 0), width=2)
    slot = (w - 10 - left) / n
    for i, v in enumerate(vals):
        x0 = left + i * slot + slot * 0.18
        x1 = left + (i + 1) * slot - slot * 0.18
        y0 = bottom - v * (bottom - top)
        d.rectangle([x0, y0, x1, bottom - 1], fill=_COLOURS[colour], outline=(0, 0, 0))
        d.line([((x0 + x1) / 2, y0 - 8), ((x0 + x1) / 2, y0)], fill=(0, 0, 0), width=1)
    measure, groups = _pick(rng, _MEASURES), _pick(rng, _GROUPS)
    trend_txt = {
        "increasing": f"{measure} rises steadily from left to right",
        "decreasing": f"{measure} falls progressively from left to right",
        "mixed": f"{measure} varies without a monotonic trend",
    }[trend]
    caption = _pick(rng, [
        f"Bar chart of {measure} across {_num(n)} {groups}. The {colour} bars show that {trend_txt}.",
        f"{measure[0].upper() + measure[1:]} in {_num(n)} {groups}, shown as {colour} bars; {trend_txt}.",
        f"Quantification of {measure}: a bar graph with {_num(n)} {colour} bars in which {trend_txt}.",
    ])
    return img, caption, dict(colour=colour, count=n, trend=trend)


def _line_chart(rng):
    img = _canvas(rng)
    d = ImageDraw.Draw(img)
    w, h = img.size
    n_lines = int(rng.integers(1, 4))
    colours = list(rng.permutation(list(_COLOURS))[:n_lines])
    trend = _pick(rng, ["rising", "falling", "peaking"])
    left, bottom, top = 30, h - 25, 20
    d.line([(left, top), (left, bottom), (w - 10, bottom)], fill=(0, 0, 0), width=2)
    xs = np.linspace(left + 5, w - 15, 12)
    t = np.linspace(0, 1, 12)
    for j, c in enumerate(colours):
        base = {"rising": t, "falling": 1 - t, "peaking": np.exp(-((t - 0.5) ** 2) / 0.04)}[trend]
        ys = 0.1 + 0.75 * base * (1 - 0.2 * j) + rng.normal(0, 0.03, 12)
        pts = [(float(x), float(bottom - y * (bottom - top))) for x, y in zip(xs, ys)]
        d.line(pts, fill=_COLOURS[c], width=3)
        for x, y in pts[::3]:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_COLOURS[c])
    cols = " and ".join(colours) if n_lines > 1 else colours[0]
    what = _pick(rng, ["over 48 hours", "with increasing dose", "across passages", "over time"])
    trend_txt = {"rising": "increase", "falling": "decline", "peaking": "rise to a peak and then fall"}[trend]
    if n_lines == 1:  # verb agreement with "the line"
        trend_txt = {"rising": "increases", "falling": "declines", "peaking": "rises to a peak and then falls"}[trend]
    measure = _pick(rng, _MEASURES)
    lines = f"{_num(n_lines)} {'curves' if n_lines > 1 else 'curve'}"
    caption = _pick(rng, [
        f"Line chart of {measure} {what}: {lines} ({cols}) {trend_txt}.",
        f"Time course of {measure}. The {cols} {'lines' if n_lines > 1 else 'line'} {trend_txt} {what}.",
        f"Plot with {lines} in {cols} showing how {measure} changes {what}: {'they' if n_lines > 1 else 'it'} "
        f"{trend_txt}.",
    ])
    return img, caption, dict(colour=colours[0], count=n_lines, trend=trend)


def _microscopy(rng):
    img = _canvas(rng, bg=(0, 0, 0))
    w, h = img.size
    stain = _pick(rng, list(_STAINS))
    density = _pick(rng, ["sparse", "dense"])
    n = int(rng.integers(4, 10)) if density == "sparse" else int(rng.integers(25, 45))
    arr = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(n):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(6, 13)
        arr += np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)) ** 1.5)
    arr = np.clip(arr + rng.normal(0, 0.04, arr.shape), 0, 1)
    rgb = (arr[..., None] * np.array(_STAINS[stain], np.float32)[None, None]).astype(np.uint8)
    img = Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(0.8))
    d = ImageDraw.Draw(img)
    d.rectangle([w - 60, h - 14, w - 15, h - 10], fill=(255, 255, 255))  # scale bar
    stain_name = _pick(rng, _STAIN_NAMES[stain])
    cells = f"{'a few scattered' if density == 'sparse' else 'many densely packed'} cells"
    caption = _pick(rng, [
        f"Fluorescence micrograph of {cells} labelled with {stain_name} ({stain}). Scale bar, 20 µm.",
        f"Confocal microscopy image: {stain} {stain_name} signal in {cells} on a dark background.",
        f"Immunofluorescence staining ({stain_name}, {stain} channel) showing {cells}.",
    ])
    return img, caption, dict(colour=stain, count=n, trend=density)


def _radiograph(rng):
    w, h = int(rng.integers(240, 360)), int(rng.integers(260, 380))
    part = _pick(rng, ["chest", "hand", "skull"])
    lesion = bool(rng.integers(2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.full((h, w), 0.08, np.float32)
    if part == "chest":
        arr += 0.45 * (((xx - w / 2) / (w * 0.45)) ** 2 + ((yy - h * 0.55) / (h * 0.48)) ** 2 < 1)
        for side in (-1, 1):  # lungs: dark (air-filled) fields inside the brighter thorax
            cx = w / 2 + side * w * 0.2
            arr -= 0.3 * (((xx - cx) / (w * 0.17)) ** 2 + ((yy - h * 0.5) / (h * 0.33)) ** 2 < 1)
        for k in range(7):  # ribs
            y = h * (0.22 + 0.09 * k)
            arr += 0.35 * (np.abs(yy - y - 0.002 * (xx - w / 2) ** 2) < 3)
        arr += 0.5 * (np.abs(xx - w / 2) < w * 0.05)  # spine
    elif part == "hand":
        arr += 0.45 * (((xx - w / 2) / (w * 0.22)) ** 2 + ((yy - h * 0.75) / (h * 0.18)) ** 2 < 1)
        for k in range(5):  # fingers
            ang = math.radians(-50 + 25 * k)
            x0, y0 = w / 2 + math.sin(ang) * w * 0.15, h * 0.62
            x1, y1 = x0 + math.sin(ang) * h * 0.45, y0 - math.cos(ang) * h * 0.45
            t = np.clip(((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
            dist = np.hypot(xx - (x0 + t * (x1 - x0)), yy - (y0 + t * (y1 - y0)))
            arr += 0.6 * (dist < w * 0.03)
    else:
        r = ((xx - w / 2) / (w * 0.4)) ** 2 + ((yy - h * 0.5) / (h * 0.42)) ** 2
        arr += 0.7 * ((r < 1) & (r > 0.8)) + 0.2 * (r <= 0.8)
    if lesion:
        cx, cy = rng.uniform(w * 0.35, w * 0.65), rng.uniform(h * 0.35, h * 0.65)
        arr += 0.6 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 9.0**2))
    arr = np.clip(arr + rng.normal(0, 0.03, arr.shape), 0, 1)
    img = Image.fromarray((arr * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2)).convert("RGB")
    view = {"chest": "posteroanterior chest", "hand": "hand", "skull": "lateral skull"}[part]
    finding = (
        _pick(rng, ["a focal bright opacity", "a dense rounded lesion", "a well-defined radiopaque mass"])
        if lesion else _pick(rng, ["no focal abnormality", "normal appearances", "no lesion"])
    )
    caption = _pick(rng, [
        f"Plain radiograph ({view} X-ray) showing {finding}.",
        f"X-ray image of the {part}: {finding} is seen.",
        f"Grayscale {view} radiograph of a patient, demonstrating {finding}.",
    ])
    return img, caption, dict(colour="gray", count=int(lesion), trend=part)


def _gel(rng):
    inverted = bool(rng.integers(2))  # ethidium-style bright bands on dark vs stained dark on light
    w, h = int(rng.integers(260, 400)), int(rng.integers(200, 300))
    n_lanes = int(rng.integers(3, 11))
    bg, band = ((20, 20, 20), (235, 235, 235)) if inverted else ((235, 235, 225), (40, 40, 60))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    slot = w / n_lanes
    n_bands_common = int(rng.integers(1, 4))
    common = rng.uniform(0.15, 0.9, n_bands_common)
    for i in range(n_lanes):
        x0, x1 = i * slot + slot * 0.2, (i + 1) * slot - slot * 0.2
        ys = list(common) + list(rng.uniform(0.15, 0.9, int(rng.integers(0, 2))))
        for y in ys:
            yc = 15 + y * (h - 30)
            d.rectangle([x0, yc - 3, x1, yc + 3], fill=band)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    kind = _pick(rng, ["Western blot", "agarose gel", "SDS-PAGE gel", "PCR product gel"])
    look = "bright bands on a dark background" if inverted else "dark bands on a light background"
    caption = _pick(rng, [
        f"{kind[0].upper() + kind[1:]} with {_num(n_lanes)} lanes; {look}.",
        f"Gel electrophoresis ({kind.lower()}) of {_num(n_lanes)} samples, showing {look}.",
        f"Representative {kind.lower()} image: {_num(n_lanes)} lanes with {look}.",
    ])
    return img, caption, dict(colour="dark" if inverted else "light", count=n_lanes, trend=kind)


def _flow(rng):
    img = _canvas(rng)
    d = ImageDraw.Draw(img)
    w, h = img.size
    n = int(rng.integers(3, 7))
    colour = _pick(rng, list(_COLOURS))
    vertical = bool(rng.integers(2))
    boxes = []
    for i in range(n):
        if vertical:
            bh = (h - 20) / n
            box = [w * 0.3, 10 + i * bh + bh * 0.15, w * 0.7, 10 + (i + 1) * bh - bh * 0.15]
        else:
            bw = (w - 20) / n
            box = [10 + i * bw + bw * 0.12, h * 0.35, 10 + (i + 1) * bw - bw * 0.12, h * 0.65]
        boxes.append(box)
        d.rounded_rectangle(box, radius=6, fill=tuple(int(c * 0.35 + 255 * 0.65) for c in _COLOURS[colour]),
                            outline=_COLOURS[colour], width=3)
    for a, b in zip(boxes, boxes[1:]):
        if vertical:
            x = (a[0] + a[2]) / 2
            d.line([(x, a[3]), (x, b[1])], fill=(0, 0, 0), width=2)
            d.polygon([(x - 4, b[1] - 6), (x + 4, b[1] - 6), (x, b[1])], fill=(0, 0, 0))
        else:
            y = (a[1] + a[3]) / 2
            d.line([(a[2], y), (b[0], y)], fill=(0, 0, 0), width=2)
            d.polygon([(b[0] - 6, y - 4), (b[0] - 6, y + 4), (b[0], y)], fill=(0, 0, 0))
    what = _pick(rng, ["patient enrolment", "the study design", "sample processing", "the analysis pipeline",
                       "the signalling cascade"])
    orient = "top to bottom" if vertical else "left to right"
    caption = _pick(rng, [
        f"Flow diagram of {what} with {_num(n)} {colour} boxes connected by arrows from {orient}.",
        f"Schematic overview of {what}: {_num(n)} steps drawn as {colour} boxes, read {orient}.",
        f"Flowchart ({colour}) summarising {what} in {_num(n)} stages arranged {orient}.",
    ])
    return img, caption, dict(colour=colour, count=n, trend="vertical" if vertical else "horizontal")


_RENDERERS = {
    "bar chart": _bar_chart,
    "line chart": _line_chart,
    "fluorescence microscopy": _microscopy,
    "radiograph": _radiograph,
    "gel electrophoresis": _gel,
    "flow diagram": _flow,
}
_FORMAT = {"bar chart": "png", "line chart": "png", "flow diagram": "png"}  # photos/scans are JPEG


def render_figure(fig_type: str, seed: int) -> tuple[Image.Image, str, dict]:
    """Render one figure of ``fig_type``; returns (RGB image, caption, drawn attributes)."""
    if fig_type not in _RENDERERS:
        raise ValueError(f"unknown figure type {fig_type!r}; expected one of {FIGURE_TYPES}")
    return _RENDERERS[fig_type](np.random.default_rng(seed))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=90)
    elif fmt == "gif":
        img.convert("P", palette=Image.Palette.ADAPTIVE).save(buf, format="GIF")
    else:
        img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _article_xml(pmcid: str, pmid: int, doi: str, title: str, figs: list[dict]) -> str:
    fig_xml = []
    for f in figs:
        fig_xml.append(
            f'<fig id="{f["id"]}" position="float">\n'
            f"<label>Figure {f['n']}</label>\n"
            f"<caption><title>{escape(f['title'])}</title><p>{escape(f['caption'])}</p></caption>\n"
            f'<graphic xlink:href="{f["href"]}"/>\n'
            "</fig>"
        )
    paras = "\n".join(
        f"<p>As shown in <xref ref-type=\"fig\" rid=\"{f['id']}\">Figure {f['n']}</xref>, the results were "
        f"consistent across replicates.</p>\n{x}"
        for f, x in zip(figs, fig_xml)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<!DOCTYPE article PUBLIC "-//NLM//DTD JATS (Z39.96) Journal Archiving and Interchange DTD v1.2 '
        '20190208//EN" "JATS-archivearticle1.dtd">\n'
        '<article xmlns:xlink="http://www.w3.org/1999/xlink" xmlns:mml="http://www.w3.org/1998/Math/MathML" '
        'article-type="research-article">\n'
        "<front>\n<journal-meta><journal-title-group><journal-title>bmclip Synthetic Biomedical Reports"
        "</journal-title></journal-title-group></journal-meta>\n<article-meta>\n"
        f'<article-id pub-id-type="pmc">{pmcid[3:]}</article-id>\n'
        f'<article-id pub-id-type="pmid">{pmid}</article-id>\n'
        f'<article-id pub-id-type="doi">{doi}</article-id>\n'
        f"<title-group><article-title>{escape(title)}</article-title></title-group>\n"
        '<permissions><license license-type="open-access" '
        'xlink:href="https://creativecommons.org/licenses/by/4.0/"><license-p>This is an open access '
        "article distributed under the terms of the Creative Commons Attribution License.</license-p>"
        "</license></permissions>\n"
        "</article-meta>\n</front>\n"
        f"<body>\n<sec><title>Results</title>\n{paras}\n</sec>\n</body>\n</article>\n"
    )


def _write_package(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Write a deterministic .tar.gz (fixed mtimes/owners, gzip mtime 0) atomically."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    with atomic_writer(path, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0,
                                                         compresslevel=6) as gz:
        gz.write(raw.getvalue())


def generate_corpus(
    out_dir: str | os.PathLike,
    n_articles: int = 120,
    seed: int = 0,
    figures_per_article: tuple[int, int] = (2, 4),
    first_pmcid: int = 9000001,
) -> list[Path]:
    """Write ``n_articles`` PMC OA-style packages (``PMC9xxxxxx.tar.gz``) + ``labels.json`` into out_dir."""
    if n_articles < 1:
        raise ValueError("n_articles must be >= 1")
    lo, hi = figures_per_article
    if not 1 <= lo <= hi:
        raise ValueError(f"figures_per_article must satisfy 1 <= min <= max, got {figures_per_article}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels: dict[str, str] = {}
    paths = []
    for a in range(n_articles):
        rng = np.random.default_rng([seed, a])
        pmcid = f"PMC{first_pmcid + a}"
        n_figs = int(rng.integers(lo, hi + 1))
        figs, members = [], []
        title_rng = np.random.default_rng([seed, a, 1])  # its own stream: figures and bodies do not depend on it
        for k in range(1, n_figs + 1):
            fig_type = FIGURE_TYPES[int(rng.integers(len(FIGURE_TYPES)))]
            img, caption, _attrs = render_figure(fig_type, int(rng.integers(2**31)))
            extra = " ".join(rng.permutation(_FILLER)[: int(rng.integers(0, 3))])
            stem = f"{pmcid.lower()}-fig{k}"
            fmt = _FORMAT.get(fig_type, "jpg")
            fig_title = f"{_pick(title_rng, _FIG_HEADINGS)} {_pick(title_rng, _TOPICS)}."
            figs.append(dict(id=f"F{k}", n=k, href=stem, title=fig_title, caption=(caption + " " + extra).strip()))
            members.append((f"{pmcid}/{stem}.{fmt}", _encode(img, fmt)))
            thumb = img.copy()
            thumb.thumbnail((80, 80))
            members.append((f"{pmcid}/{stem}.gif", _encode(thumb, "gif")))
            labels[f"{pmcid}/F{k}"] = fig_type
        title = f"{_pick(rng, _TITLE_WORDS)} of {_pick(rng, _TOPICS)} in a synthetic cohort"
        xml = _article_xml(pmcid, 39000000 + a, f"10.5555/bmclip.demo.{first_pmcid + a}", title, figs)
        members.insert(0, (f"{pmcid}/{pmcid}.nxml", xml.encode("utf-8")))
        path = out / f"{pmcid}.tar.gz"
        _write_package(path, members)
        paths.append(path)
    atomic_write_text(json.dumps({"figure_types": FIGURE_TYPES, "figures": labels}, indent=1, sort_keys=True),
                      out / "labels.json")
    return paths


def load_labels(out_dir: str | os.PathLike) -> dict[tuple[str, str], str]:
    """Read ``labels.json`` written by generate_corpus: {(pmcid, fig_id): figure type}."""
    data = json.loads((Path(out_dir) / "labels.json").read_text())
    return {tuple(k.split("/", 1)): v for k, v in data["figures"].items()}
