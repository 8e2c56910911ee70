"""Rebuild the bundled WordPiece vocabulary from the CC BY / CC0 / public-domain articles in pmc_samples.

Usage: python bmclip/assets/make_vocab.py /path/to/shared/data/pmc_samples [vocab_size]
Writes bmclip/assets/vocab-pmc-<N>.txt (N = the resulting vocabulary size). See README.md here.
"""

from __future__ import annotations

import csv
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from bmclip.tokenizer import Tokenizer

# Licences whose text may be redistributed in a derived vocabulary with attribution (no NC / ND).
_OK = (
    "licenses/by/",
    "publicdomain/zero",
    "publicdomain/mark",
    "creative commons attribution license",
    "creative commons attribution 4.0",
    "free of all copyright",
)


def licence_ok(text: str) -> bool:
    t = text.lower()
    if "not verified" in t or "-nc" in t or "-nd" in t or "noncommercial" in t:
        return False
    return any(k in t for k in _OK)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def article_texts(path: Path) -> list[str]:
    """Figure captions, titles, abstracts and body paragraphs of one JATS file, one string each."""
    root = ET.parse(path).getroot()
    out = []
    for el in root.iter():
        name = _local(el.tag) if isinstance(el.tag, str) else ""
        if name in ("caption", "article-title", "abstract") or (name == "p" and el.text):
            s = " ".join("".join(el.itertext()).split())
            if s:
                out.append(s)
    return out


def main(samples: Path, vocab_size: int = 4096) -> None:
    files, texts = [], []
    with open(samples / "MANIFEST.tsv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            p = samples / row["file"]
            if p.suffix in (".nxml", ".xml") and p.is_file() and licence_ok(row["license"]):
                t = article_texts(p)
                if t:
                    files.append((row["file"], row["license"][:60], len(t)))
                    texts.extend(t)
    tok = Tokenizer.train(texts, vocab_size=vocab_size, context_length=256, min_frequency=2)
    out = Path(__file__).resolve().parent / f"vocab-pmc-{tok.vocab_size}.txt"
    tok.save_vocab(out)
    for name, lic, n in files:
        print(f"{name}\t{lic}\t{n} texts")
    print(f"{len(files)} articles, {len(texts)} texts, {sum(map(len, texts))} chars -> {out} ({tok.vocab_size})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 4096)
