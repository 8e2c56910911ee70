"""Safe JATS XML parsing: an article's figures (id, label, caption, graphic hrefs) and its identifiers.

Security: a document containing ``<!ENTITY`` anywhere, or not encoded in UTF-8 (UTF-16/32, or a declared
encoding such as ISO-8859-1 or an EBCDIC code page, where the bytes of ``<!ENTITY`` need not appear), is parsed
by the stdlib expat binding directly (the "safe path"), with

- no DTD ever read (``SetParamEntityParsing(NEVER)``; ``UseForeignDTD`` only tells expat that an
  external subset *exists*, so undeclared entities are "skipped" instead of fatal — nothing is fetched);
- any ``<!ENTITY ...>`` declaration in the document refused (:class:`~bmclip.errors.DataError`): that
  removes both XXE (external entities) and entity-expansion bombs ("billion laughs");
- named entity references that the (unread) JATS DTD would define, e.g. ``&nbsp;``/``&alpha;``, replaced
  by the character of the same HTML5/ISO name (``html.entities.html5``); an unknown name is a
  DataError naming the file and the entity (we never guess text).

Every other document (UTF-8 without ``<!ENTITY``) has nothing to expand, so the faster C ElementTree
parser reads it (no external entity handler is installed, so no DTD or entity is ever opened; the same
HTML5 names are mapped);
whatever that parser rejects is re-parsed by the safe path, which then produces the error. Both paths
give identical results (tested on all sample articles).

Caption text rules (what ``Figure.caption`` holds):

- all text inside the figure's ``<caption>``: the ``<title>`` and every paragraph, inline markup
  (italic, bold, sub/sup, xref, named-content, styled-content, MathML tokens, ...) kept as plain text;
- block elements (title, p, list-item, ...) are separated by one space, inline markup is joined as is
  ("CO<sub>2</sub>" -> "CO2"); then whitespace runs collapse to one space and the ends are stripped;
- MathML keeps the text of its token elements (``mi``, ``mn``, ``mo``, ``mtext``, ``ms``), one space
  between tokens (``log CV = − 0.5 log Frequency + 2``); ``<mfenced>`` gives its brackets and separators
  (``open``, default "(", the children separated by ``separators``, default ",", then ``close``, default ")"):
  ``f ( x )``, ``exp [ x , y ]``;
- inside ``<alternatives>`` only the first textual rendering is kept (MathML before TeX), and MathML
  ``<annotation>`` (TeX source) is dropped, so a formula is not repeated;
- the ``<label>`` of the figure is excluded (it is returned separately as ``Figure.label``).
"""

from __future__ import annotations

import html.entities
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from xml.parsers import expat

from bmclip.errors import DataError

__all__ = ["Article", "Figure", "NotJatsError", "parse_jats"]


class NotJatsError(DataError):
    """Well-formed XML whose root is not a JATS ``<article>`` or ``<pmc-articleset>``."""


@dataclass
class Figure:
    """One ``<fig>``: id, label, caption text and its graphic hrefs (document order)."""

    id: str | None
    label: str | None
    caption: str
    graphics: list[str] = field(default_factory=list)

    def __getitem__(self, key: str):
        return getattr(self, key)

    def to_dict(self) -> dict:
        """Plain-dict view (JSON-serialisable)."""
        return {"id": self.id, "label": self.label, "caption": self.caption, "graphics": list(self.graphics)}


@dataclass
class Article:
    """One article: identifiers, licence and figures in document order."""

    pmcid: str | None
    pmid: str | None
    doi: str | None
    license: str | None
    title: str | None
    figures: list[Figure] = field(default_factory=list)

    def __getitem__(self, key: str):
        return getattr(self, key)

    def to_dict(self) -> dict:
        """Plain-dict view (JSON-serialisable)."""
        return {
            "pmcid": self.pmcid,
            "pmid": self.pmid,
            "doi": self.doi,
            "license": self.license,
            "title": self.title,
            "figures": [f.to_dict() for f in self.figures],
        }


# Entities of the HTML5/ISO sets: the JATS DTD's named character entities are a subset of these.
_ENTITIES = {k[:-1]: v for k, v in html.entities.html5.items() if k.endswith(";")}
_WS = re.compile(r"\s+")

# Elements whose text is a separate block: a space is inserted at their boundaries.
_BLOCK = frozenset(
    {
        "title",
        "p",
        "list-item",
        "list",
        "def-item",
        "def",
        "term",
        "disp-quote",
        "disp-formula",
        "attrib",
        "table-wrap",
        "tr",
        "td",
        "th",
        "break",
        "fn",
        "sec",
        "statement",
        "preformat",
        "caption",
    }
)
# MathML token elements: their text is kept, one space between tokens.
_MATH_TOKENS = frozenset({"mi", "mn", "mo", "mtext", "ms"})
# Never text: TeX annotations of MathML and object/permission metadata inside captions.
_SKIP_TEXT = frozenset({"annotation", "annotation-xml", "object-id", "permissions"})


def _local(tag: str) -> str:
    """Local part of a prefixed or namespace-qualified name: 'mml:math' / '{uri}math' -> 'math'."""
    if tag[:1] == "{":
        return tag[tag.index("}") + 1 :]
    i = tag.rfind(":")
    return tag[i + 1 :] if i >= 0 else tag


def _href(el: ET.Element) -> str | None:
    """The element's xlink:href (whatever the prefix is called), or None."""
    for k, v in el.attrib.items():
        if k == "href" or k.endswith(":href") or k.endswith("}href"):
            return v
    return None


class _Builder:
    """Expat handlers feeding an ElementTree TreeBuilder, with the entity policy described above."""

    def __init__(self, name: str):
        self.name = name
        self.tb = ET.TreeBuilder()

    def start(self, tag, attrs):
        self.tb.start(tag, attrs)

    def end(self, tag):
        self.tb.end(tag)

    def data(self, text):
        self.tb.data(text)

    def entity_decl(self, entity_name, *args):
        raise DataError(f"{self.name}: XML entity declaration '{entity_name}' refused (XXE/entity-bomb guard)")

    def skipped(self, entity_name, is_parameter_entity):
        if is_parameter_entity:
            return  # parameter entities live in the DTD, which is never read
        ch = _ENTITIES.get(entity_name)
        if ch is None:
            raise DataError(f"{self.name}: unknown XML entity '&{entity_name};'")
        self.tb.data(ch)


def _read_source(source) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        try:
            return p.read_bytes(), str(p)
        except OSError as e:
            raise DataError(f"{p}: cannot read: {e}") from e
    if hasattr(source, "read"):
        data = source.read()
        if isinstance(data, str):
            data = data.encode("utf-8")
        return data, str(getattr(source, "name", "<stream>"))
    raise TypeError(f"parse_jats: unsupported source type {type(source).__name__}")


_UTF8_NAMES = (b"utf-8", b"utf8", b"us-ascii", b"ascii")
_ENCODING_DECL = re.compile(rb"\sencoding\s*=\s*[\"']([^\"']*)[\"']")


def _read_as_utf8(data: bytes) -> bool:
    """True when expat reads ``data`` as UTF-8 (or ASCII): no UTF-16/32 byte order mark or NUL-padded start,
    and an XML declaration, if any, that names no other encoding. Only then does ``<!ENTITY`` in the text mean
    the bytes ``b"<!ENTITY"`` in the file."""
    head = data[3:] if data[:3] == b"\xef\xbb\xbf" else data
    if head[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in head[:4]:
        return False
    if not head.startswith(b"<?xml"):
        return True  # no declaration: XML says UTF-8, and so does expat
    end = head.find(b"?>", 0, 4096)
    if end < 0:
        return False  # an unreadable declaration: the safe path decides
    m = _ENCODING_DECL.search(head, 0, end)
    return m is None or m.group(1).strip().lower() in _UTF8_NAMES


def _parse_fast(data: bytes) -> ET.Element | None:
    """The C ElementTree parser, for UTF-8 documents that declare no entities at all; None if it cannot be used.

    Without any ``<!ENTITY`` declaration there is nothing to expand or fetch (expat never reads the
    external DTD: no external-entity handler is installed), and the named character entities come from
    the same HTML5 table as in the safe path. Anything unusual (undefined entity, unbound prefix,
    malformed) returns None and the safe path parses the document and produces the error.
    """
    if b"<!ENTITY" in data or not _read_as_utf8(data):
        # Any other encoding (UTF-16, a declared 8-bit code page) hides the declaration from a byte search: the
        # safe path refuses entity declarations in whatever encoding expat decodes.
        return None
    parser = ET.XMLParser()
    parser.entity.update(_ENTITIES)
    try:
        parser.feed(data)
        root = parser.close()
    except ET.ParseError:
        return None
    if root.tag[:1] == "{":
        # A default namespace on the root: strip namespaces so JATS names match as in the safe path.
        for el in root.iter():
            if el.tag[:1] == "{":
                el.tag = el.tag[el.tag.index("}") + 1 :]
    return root


def parse_xml_safely(data: bytes, name: str = "<bytes>") -> ET.Element:
    """Parse XML bytes into an ElementTree root with no DTD, no network and no entity expansion."""
    root = _parse_fast(data) if data.strip() else None
    if root is not None:
        return root
    b = _Builder(name)
    p = expat.ParserCreate()
    p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    p.UseForeignDTD(True)
    p.buffer_text = True
    p.StartElementHandler = b.start
    p.EndElementHandler = b.end
    p.CharacterDataHandler = b.data
    p.EntityDeclHandler = b.entity_decl
    p.UnparsedEntityDeclHandler = b.entity_decl
    p.SkippedEntityHandler = b.skipped
    # Returning 1 ("handled") without reading anything: no external entity or DTD is ever opened.
    p.ExternalEntityRefHandler = lambda *a: 1
    if not data.strip():
        raise DataError(f"{name}: empty XML file")
    try:
        p.Parse(data, True)
    except expat.ExpatError as e:
        raise DataError(f"{name}: malformed XML: {e}") from e
    except (ValueError, LookupError) as e:  # pyexpat on a declared encoding it cannot use or does not know
        raise DataError(f"{name}: unsupported XML encoding: {e}") from e
    try:
        return b.tb.close()
    except Exception as e:  # TreeBuilder raises on an unclosed document
        raise DataError(f"{name}: malformed XML: {e}") from e


def _math_tokens(el: ET.Element, out: list[str]) -> None:
    """Append the tokens of MathML element ``el``'s children to ``out``."""
    for k in el:
        _math_token(k, out)


def _math_token(k: ET.Element, out: list[str]) -> None:
    """Append the tokens of one MathML element (a token element, an ``<mfenced>`` or a container)."""
    n = _local(k.tag)
    if n in _SKIP_TEXT:
        return
    if n in _MATH_TOKENS:
        t = "".join(k.itertext()).strip()
        if t:
            out.append(t)
    elif n == "mfenced":
        # as MathML renders it: open (default "("), the children separated by separators (default ","; whitespace
        # ignored; the last one repeats when there are more children, none when empty), then close (default ")")
        opening, closing = k.get("open", "(").strip(), k.get("close", ")").strip()
        seps = "".join(k.get("separators", ",").split())
        if opening:
            out.append(opening)
        kids = [c for c in k if _local(c.tag) not in _SKIP_TEXT]
        for i, c in enumerate(kids):
            if i and seps:
                out.append(seps[min(i - 1, len(seps) - 1)])
            _math_token(c, out)
        if closing:
            out.append(closing)
    else:
        _math_tokens(k, out)


def _text(el: ET.Element, parts: list[str]) -> None:
    """Append the text of el (tail excluded) to parts following the caption rules."""
    name = _local(el.tag)
    if name in _SKIP_TEXT:
        return
    if name == "math":
        # MathML: token texts separated by single spaces ("log CV = − 0.5"), markup dropped.
        toks: list[str] = []
        _math_tokens(el, toks)
        parts.append(" ".join(toks))
        return
    block = name in _BLOCK
    if block:
        parts.append(" ")
    if el.text:
        parts.append(el.text)
    if name == "alternatives":
        # One rendering only: MathML if present, else the first child that yields text.
        kids = list(el)
        kids.sort(key=lambda k: 0 if _local(k.tag) == "math" else 1)
        for k in kids:
            sub: list[str] = []
            _text(k, sub)
            if "".join(sub).strip():
                parts.extend(sub)
                break
        # the tails of all alternatives' children are whitespace in practice; keep them anyway
        for k in el:
            if k.tail:
                parts.append(k.tail)
    else:
        for k in el:
            _text(k, parts)
            if k.tail:
                parts.append(k.tail)
    if block:
        parts.append(" ")


_WS_WINDOW = 1 << 16


def _collapse_ws(text: str) -> str:
    """``text`` with every whitespace run made one space and the ends stripped (``_WS.sub(" ", text).strip()``),
    in windows of 64Ki characters: ``re.sub`` keeps one string object per piece until it joins them, so on a
    200 MB caption of short words it took 4 GB. A window never ends inside a whitespace run (same result)."""
    if len(text) <= _WS_WINDOW:
        return _WS.sub(" ", text).strip()
    out, pos, n = [], 0, len(text)
    while pos < n:
        end = min(pos + _WS_WINDOW, n)
        m = _WS.match(text, end) if end < n else None
        if m:
            end = m.end()  # the run that starts at the boundary belongs to this window, whole
        out.append(_WS.sub(" ", text[pos:end]))
        pos = end
    out[0], out[-1] = out[0].lstrip(), out[-1].rstrip()  # the ends stripped before the join: no extra copy
    return "".join(out).strip()  # (a caption of spaces only: empty windows between the ends)


def text_of(el: ET.Element | None) -> str:
    """All text of an element by the caption rules, whitespace collapsed (str, '' for None)."""
    if el is None:
        return ""
    parts: list[str] = []
    _text(el, parts)
    return _collapse_ws("".join(parts))


def _first_child(el: ET.Element, name: str) -> ET.Element | None:
    for k in el:
        if _local(k.tag) == name:
            return k
    return None


# A <graphic> inside these, within a <fig>, is not the figure's image: a formula image in the caption or the
# figure (PLOS puts display formulas in as <disp-formula><graphic/>), a table's image, or a nested figure's.
_NOT_FIGURE_IMAGE = frozenset({"caption", "disp-formula", "inline-formula", "table-wrap", "fig"})


def _figure_graphics(fe: ET.Element) -> list[ET.Element]:
    """The <graphic> elements of <fig> ``fe`` that are its image, in document order (see _NOT_FIGURE_IMAGE)."""
    out: list[ET.Element] = []
    stack = list(reversed(fe))
    while stack:
        el = stack.pop()
        name = _local(el.tag) if isinstance(el.tag, str) else ""
        if name == "graphic":
            out.append(el)
        elif name not in _NOT_FIGURE_IMAGE:
            stack.extend(reversed(el))
    return out


def _collect_figures(root: ET.Element) -> list[Figure]:
    """Every <fig> under root in document order; each graphic goes to its nearest <fig> ancestor, and graphics
    inside the caption, a formula or a table are not the figure's (_NOT_FIGURE_IMAGE)."""
    figs: list[Figure] = []
    for fe in root.iter("fig"):
        hrefs = [h.strip() for h in (_href(g) for g in _figure_graphics(fe)) if h]
        figs.append(
            Figure(
                id=fe.get("id"),
                label=text_of(_first_child(fe, "label")) or None,
                caption=text_of(_first_child(fe, "caption")),
                graphics=hrefs,
            )
        )
    return figs


def _normalize_pmcid(v: str) -> str:
    v = v.strip()
    if v.upper().startswith("PMC"):
        return "PMC" + v[3:]
    return "PMC" + v if v.isdigit() else v


def _find_meta(article: ET.Element) -> ET.Element | None:
    """The article's own <article-meta> (front/article-meta), not those of sub-articles or refs."""
    front = _first_child(article, "front")
    if front is None:
        return None
    return _first_child(front, "article-meta")


def _licence(meta: ET.Element | None) -> str | None:
    if meta is None:
        return None
    perms = _first_child(meta, "permissions")
    if perms is None:
        return None
    lic = _first_child(perms, "license")
    if lic is None:
        return None
    h = _href(lic)
    if h:
        return h.strip()
    for el in lic.iter():
        if _local(el.tag) == "license_ref" and (el.text or "").strip():
            return el.text.strip()
    # Licence given only as prose: the Creative Commons URL it links to is the machine-readable part.
    for el in lic.iter():
        h = _href(el)
        if h and "creativecommons.org" in h:
            return h.strip()
    t = text_of(lic)
    if t:
        return t
    return lic.get("license-type")


def _article(el: ET.Element) -> Article:
    meta = _find_meta(el)
    ids: dict[str, str] = {}
    title = None
    if meta is not None:
        for k in meta:
            if _local(k.tag) == "article-id" and (k.text or "").strip():
                ids.setdefault((k.get("pub-id-type") or "").lower(), k.text.strip())
        tg = _first_child(meta, "title-group")
        if tg is not None:
            title = text_of(_first_child(tg, "article-title")) or None
    pmc = ids.get("pmcid") or ids.get("pmc")
    return Article(
        pmcid=_normalize_pmcid(pmc) if pmc else None,
        pmid=ids.get("pmid"),
        doi=ids.get("doi"),
        license=_licence(meta),
        title=title,
        figures=_collect_figures(el),
    )


def parse_jats(source: str | os.PathLike | bytes | BinaryIO) -> Article | list[Article]:
    """Parse one JATS XML document (path, bytes or binary file object) into its figures and identifiers.

    Returns an :class:`Article` for an ``<article>`` root, or a ``list[Article]`` (document order) for
    a ``<pmc-articleset>`` holding several articles. Raises DataError naming the file for malformed
    XML, refused entities or unreadable input, and NotJatsError (a DataError) for other roots.
    """
    data, name = _read_source(source)
    root = parse_xml_safely(data, name)
    tag = _local(root.tag)
    if tag == "article":
        return _article(root)
    if tag == "pmc-articleset":
        return [_article(k) for k in root if _local(k.tag) == "article"]
    raise NotJatsError(f"{name}: root element <{root.tag}> is not a JATS <article> or <pmc-articleset>")
