"""Sub-caption splitting by panel labels ("(A) ... (B) ..."), kept as extra sample metadata.

A heuristic in the spirit of the PMC-Fine-Grained pipeline, without a model. Panel markers are

- parenthesised letters: ``(A)``, ``(b)``, and ranges/lists ``(A-C)``, ``(A–C)``, ``(A, B)``;
- a capital letter opening a sentence followed by ``.``, ``:`` or ``)``: ``A. ...``, ``B: ...``.

Labels usually open their panel's text ("prefix" style: ``(A) Western blot of ...``); when most labels
are followed by ``,``/``;``/``and``/the end, they close it instead ("postfix" style: ``... alleles (A),
richness (B) and range (C) in ...``) and the text after the last label is the shared part.

Markers are accepted only while they continue the sequence a, b, c, ... (in one letter case, starting
at ``a``/``A``; a range advances to its last letter), so back references such as "as in (A)" inside
panel C's text are left in the text. Fewer than two accepted panels -> no split.
"""

from __future__ import annotations

import re

__all__ = ["split_subcaptions"]

_MARK = re.compile(
    r"\((?P<p1>[A-Za-z])(?:\s*(?:[-–—,]|and)\s*(?P<p2>[A-Za-z]))?\)"
    r"|(?:(?<=^)|(?<=[.!?]\s))(?P<s1>[A-Z])[.:)](?=\s)"
)


def split_subcaptions(caption: str) -> dict | None:
    """Split a caption into shared text and panels: {'shared', 'panels': [{'label', 'text'}], 'style'}.

    Returns None when fewer than two sequential panel markers are found.
    """
    accepted: list[tuple[int, int, str]] = []  # (start, end, label)
    expect: str | None = None
    upper: bool | None = None
    for m in _MARK.finditer(caption):
        first = m.group("p1") or m.group("s1")
        last = m.group("p2") or first
        if upper is None:
            if first.lower() != "a":
                continue
            upper = first.isupper()
            expect = "a"
        if first.isupper() != upper or last.isupper() != upper:
            continue
        if first.lower() != expect or last.lower() < first.lower():
            continue
        label = first if last == first else f"{first}-{last}"
        accepted.append((m.start(), m.end(), label))
        expect = chr(ord(last.lower()) + 1)
    if len(accepted) < 2:
        return None
    if _is_postfix(caption, accepted):
        # "... alleles (A), Shannon's index (B) and allele range (C) in populations X": each label
        # closes its panel's text; what follows the last label is shared context.
        panels = []
        prev = 0
        for s0, e, label in accepted:
            text = _AND.sub("", caption[prev:s0].strip(" ,;"))
            panels.append({"label": label, "text": text})
            prev = e
        return {"shared": caption[prev:].strip(" ,;"), "panels": panels, "style": "postfix"}
    panels = []
    for i, (_s, e, label) in enumerate(accepted):
        end = accepted[i + 1][0] if i + 1 < len(accepted) else len(caption)
        text = _TRAILING_AND.sub("", caption[e:end].strip(" ,;"))
        panels.append({"label": label, "text": text})
    return {"shared": caption[: accepted[0][0]].strip(), "panels": panels, "style": "prefix"}


_AND = re.compile(r"^(?:and|&)\s+", re.I)
_TRAILING_AND = re.compile(r"\s+(?:and|&)$", re.I)
_AFTER_POSTFIX = re.compile(r"\s*(?:[,;]|and\b|&|$)")


def _is_postfix(caption: str, accepted: list[tuple[int, int, str]]) -> bool:
    """True when most labels are followed by ',', ';', 'and' or the end: labels close their panel."""
    closing = sum(1 for _s, e, _l in accepted if _AFTER_POSTFIX.match(caption, e))
    return closing * 2 > len(accepted)
