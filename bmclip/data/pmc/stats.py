"""Build statistics: counts of pairs, articles and skip reasons, histograms, the licence mix, plots, summary.

``stats.json`` (written by the merge) holds: packages / articles / figures seen, pairs and articles per split,
skips per level (figure, article, package) and reason, the licence mix of the pairs, caption-length (tokens)
and original-image-size histograms, the options and the first errors. ``stats.png`` plots them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from bmclip.data.pmc.options import SPLITS, BuildOptions
from bmclip.io import atomic_writer

__all__ = ["BuildStats", "Histogram", "licence_code", "printable", "summary_lines", "write_plots"]

STATS_FORMAT = "bmclip-pmc-wds-1"
TEXT_CONTEXT = 256  # captions longer than this many tokens are truncated by a context-256 text tower


def printable(s: str) -> str:
    """``s`` as valid UTF-8 text: a file name's undecodable bytes (``os.fsdecode`` gives them as lone surrogates,
    which UTF-8 cannot encode) as ``\\xNN`` escapes, for messages and the JSON files; other text unchanged."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def licence_code(lic: str | None) -> str:
    """Short licence class for statistics: 'CC BY', 'CC BY-NC-ND', 'CC0', 'public domain', 'other', 'unknown'."""
    if not lic:
        return "unknown"
    s = lic.lower()
    m = re.search(r"creativecommons\.org/licen[cs]es/([a-z-]+)", s)
    if m:
        return "CC " + m.group(1).upper()
    if "publicdomain/zero" in s or re.search(r"\bcc0\b", s):
        return "CC0"
    if "publicdomain/mark" in s or "public domain" in s or "free of all copyright" in s:
        return "public domain"
    m = re.match(r"^\s*cc[ -]?(by(?:[ -](?:nc|nd|sa))*)\b", s)
    if m:
        return "CC " + m.group(1).upper().replace(" ", "-")
    if "creative commons attribution" in s:
        parts = ["BY"]
        if "noncommercial" in s or "non-commercial" in s:
            parts.append("NC")
        if "noderivatives" in s or "no derivatives" in s or "noderivs" in s:
            parts.append("ND")
        if "sharealike" in s or "share alike" in s:
            parts.append("SA")
        return "CC " + "-".join(parts)
    return "other"


class Histogram:
    """Fixed-width bins from 0; the last bin collects everything beyond."""

    def __init__(self, width: int, nbins: int):
        self.width, self.counts = width, [0] * (nbins + 1)

    def add(self, v: int) -> None:
        self.counts[min(v // self.width, len(self.counts) - 1)] += 1

    def as_dict(self) -> dict:
        edges = [i * self.width for i in range(len(self.counts))]
        return {"bin_width": self.width, "bin_starts": edges, "counts": self.counts, "last_bin_is_overflow": True}


class BuildStats:
    """The merge's counters: fed with staging records, skip reasons and written pairs; :meth:`as_dict` is stats.json."""

    MAX_ERRORS = 50

    def __init__(self) -> None:
        self.skips = {"figure": Counter(), "article": Counter(), "package": Counter()}
        self.pairs: Counter = Counter()
        self.articles_per_split: Counter = Counter()
        self.licences: Counter = Counter()
        self.tokens, self.long_side = Histogram(8, 128), Histogram(128, 64)
        self.packages = self.articles = self.figures = self.over_context = 0
        self.tokenizer: str | None = None
        self.errors: list[str] = []

    def skip(self, level: str, reason: str, n: int = 1) -> None:
        """Count ``n`` skips of ``reason`` at ``level`` ("figure", "article" or "package")."""
        self.skips[level][reason] += n

    def add_package(self, rec: dict) -> None:
        """Count a staging record: the package, its staged skips and errors, the tokenizer that counted it."""
        self.packages += 1
        for level in ("package", "article", "figure"):
            self.skips[level].update(rec["skips"][level])
        self.errors.extend(printable(e) for e in rec.get("errors", ())[: self.MAX_ERRORS - len(self.errors)])
        if self.tokenizer is None and rec["samples"]:
            self.tokenizer = rec.get("tokenizer")

    def note(self, message: str) -> None:
        """Record a message in ``first_errors`` (while there is room) without counting a skip."""
        if len(self.errors) < self.MAX_ERRORS:
            self.errors.append(printable(message))

    def add_pair(self, split: str, sample: dict, first_of_article: bool) -> None:
        """Count a written pair; ``first_of_article``: the first pair of its article in ``split``."""
        meta = sample["meta"]
        self.pairs[split] += 1
        if first_of_article:
            self.articles_per_split[split] += 1
        self.licences[licence_code(meta["license"])] += 1
        tokens = int(sample["tokens"])
        self.tokens.add(tokens)
        self.over_context += tokens > TEXT_CONTEXT
        self.long_side.add(max(meta["original_size"]))

    def as_dict(self, opts: BuildOptions) -> dict:
        """The stats.json content."""
        return {
            "format": STATS_FORMAT,
            "packages": self.packages,
            "articles": self.articles,
            "figures": self.figures,
            "pairs": {s: self.pairs[s] for s in SPLITS},
            "pairs_total": sum(self.pairs.values()),
            "articles_per_split": {s: self.articles_per_split[s] for s in SPLITS},
            # (a count moved to another reason by the merge can leave a 0: not a reason that occurred)
            "skips": {level: {k: n for k, n in sorted(self.skips[level].items()) if n}
                      for level in ("figure", "article", "package")},
            "licenses": dict(sorted(self.licences.items(), key=lambda kv: (-kv[1], kv[0]))),
            "caption_tokens": {
                "tokenizer": self.tokenizer or "(no captions)",
                f"over_{TEXT_CONTEXT}": self.over_context,  # captions a context-256 text tower truncates
                **self.tokens.as_dict(),
            },
            "image_long_side_original": self.long_side.as_dict(),
            "options": asdict(opts),
            "first_errors": self.errors[: self.MAX_ERRORS],
        }


def summary_lines(stats: dict, top: int = 5) -> tuple[list[str], list[str]]:
    """(summary lines, warning lines) for people: pairs per split, the most frequent skip reasons, and a
    warning for every split that came out empty although its fraction is > 0 (or for no pairs at all)."""
    pairs = stats["pairs"]
    lines = [
        f"pairs: {stats['pairs_total']} ("
        + ", ".join(f"{s} {pairs[s]}" for s in SPLITS)
        + f") from {stats['articles']} articles, {stats['figures']} figures, {stats['packages']} packages"
    ]
    reasons = [(f"{level}:{r}", n) for level in ("figure", "article", "package")
               for r, n in stats["skips"][level].items() if n]
    reasons.sort(key=lambda kv: (-kv[1], kv[0]))
    if reasons:
        lines.append("top skip reasons: " + ", ".join(f"{r} {n}" for r, n in reasons[:top])
                     + (f" (+{len(reasons) - top} more in stats.json)" if len(reasons) > top else ""))
    else:
        lines.append("nothing skipped")
    warnings = []
    if stats["pairs_total"] == 0:
        warnings.append("no figure-caption pairs were written"
                        + ("; see the skip reasons above" if reasons else "; were any packages found?"))
    else:
        opts = stats.get("options", {})
        for split in ("val", "test"):
            frac = float(opts.get(f"{split}_fraction", 0) or 0)
            if pairs[split] == 0 and frac > 0:
                warnings.append(f"the {split} split is empty ({split}_fraction {frac:g} of "
                                f"{stats['articles']} articles drew none); use more articles or a larger fraction")
    return lines, warnings


def write_plots(path: Path, stats: dict) -> None:
    """Write a PNG of the caption-length and image-size histograms, pairs and skips, and the licence mix."""
    # matplotlib costs ~0.5 s to import and only the end of a merge needs it; Figure + Agg canvas directly:
    # no pyplot (global state, slow import), safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    ct = stats["caption_tokens"]
    ax = axes[0, 0]
    ax.bar(ct["bin_starts"], ct["counts"], width=ct["bin_width"], align="edge")
    ax.set_title("caption length")
    ax.set_xlabel(f"tokens ({ct['tokenizer'][:60]}); last bin = overflow")
    ax.set_ylabel("pairs")
    im = stats["image_long_side_original"]
    ax = axes[0, 1]
    ax.bar(im["bin_starts"], im["counts"], width=im["bin_width"], align="edge")
    ax.set_title("original image size")
    ax.set_xlabel("longest side (px); last bin = overflow")
    ax = axes[1, 0]
    sk = {**{f"fig:{k}": v for k, v in stats["skips"]["figure"].items()}}
    sk.update({f"art:{k}": v for k, v in stats["skips"]["article"].items()})
    sk.update({f"pkg:{k}": v for k, v in stats["skips"]["package"].items()})
    labels = list(stats["pairs"]) + list(sk)
    vals = list(stats["pairs"].values()) + list(sk.values())
    ax.barh(labels, vals, color=["tab:green"] * len(stats["pairs"]) + ["tab:red"] * len(sk))
    ax.set_title("pairs per split (green) and skips per reason (red)")
    ax = axes[1, 1]
    lic = stats["licenses"]
    ax.barh(list(lic) or ["(none)"], list(lic.values()) or [0])
    ax.set_title("licence mix (pairs)")
    fig.tight_layout()
    with atomic_writer(path, "wb") as f:
        fig.savefig(f, format="png", dpi=80, metadata={"Software": None})
