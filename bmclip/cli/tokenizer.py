"""``bmclip tokenizer``: train a WordPiece vocabulary from captions, or show how a text is tokenized."""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

from bmclip.errors import DataError


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train or inspect a WordPiece tokenizer")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train an uncased WordPiece vocabulary from caption files or webdataset shards",
        description="Train a vocabulary from text files (one caption per line) and/or .tar shards "
        "(every .txt member is one caption). Writes DIR/vocab.txt and DIR/bmclip_tokenizer.json.",
    )
    t.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="captions.txt files and/or .tar shards (brace patterns: shard-{000..009}.tar)",
    )
    t.add_argument("--vocab-size", type=int, default=30522,
                   help=("target vocabulary size: merges stop there, but the special tokens and every "
                         "character seen (and its ## form) are always kept, so a small target can be exceeded"))
    t.add_argument("--min-frequency", type=int, default=2, help="minimum pair frequency for a merge")
    t.add_argument("--context-length", type=int, default=256, help="context length stored with the tokenizer")
    t.add_argument("--out", required=True, metavar="DIR", help="output folder")
    t.set_defaults(func=_train)

    e = sub.add_parser("encode", help="print the tokens and ids of texts")
    e.add_argument("texts", nargs="+", help="texts to tokenize")
    e.add_argument("--vocab", default=None, help="vocab.txt or tokenizer folder (default: the bundled vocabulary)")
    e.add_argument("--context-length", type=int, default=None)
    e.set_defaults(func=_encode)


def iter_texts(paths: list[str], counts: dict[str, int]):
    """Captions from text files (one per non-empty line) and .tar shards (.txt members)."""
    # start-up cost: numpy (~0.1 s) would load on every `bmclip` command, which imports each subcommand module
    from bmclip.data.shards import expand_urls

    # Brace patterns and "::"-joined lists, as in webdataset shard specs: train-{000000..000099}.tar
    for p in map(Path, expand_urls(paths)):
        if not p.is_file():
            raise DataError(f"input not found: {p}")
        if p.name.endswith(".tar") or tarfile.is_tarfile(p):
            try:
                with tarfile.open(p, "r:*") as tf:
                    for m in tf:
                        if not (m.isfile() and m.name.endswith(".txt")):
                            continue
                        f = tf.extractfile(m)
                        try:
                            text = f.read().decode("utf-8").strip() if f else ""
                        except UnicodeDecodeError:
                            counts["skipped_not_utf8"] = counts.get("skipped_not_utf8", 0) + 1
                            continue
                        if text:
                            counts["texts"] = counts.get("texts", 0) + 1
                            yield text
            except (tarfile.TarError, OSError) as e:
                raise DataError(f"cannot read shard {p}: {e}") from None
        else:
            with open(p, encoding="utf-8", errors="replace") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        counts["texts"] = counts.get("texts", 0) + 1
                        yield line


def _train(args: argparse.Namespace) -> int:
    from bmclip.tokenizer import Tokenizer  # start-up cost: numpy and tokenizers, not needed for --help

    counts: dict[str, int] = {}
    tok = Tokenizer.train(
        iter_texts(args.input, counts),
        vocab_size=args.vocab_size,
        context_length=args.context_length,
        min_frequency=args.min_frequency,
    )
    tok.save(args.out)
    extra = "".join(f", {k}={v}" for k, v in counts.items() if k != "texts")
    over = (f" (above --vocab-size {args.vocab_size}: the special tokens and the characters seen alone take that "
            "many)" if tok.vocab_size > args.vocab_size else "")
    print(f"trained on {counts.get('texts', 0)} texts{extra}: vocabulary of {tok.vocab_size}{over} -> {args.out}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from bmclip.tokenizer import get_tokenizer  # start-up cost: numpy and tokenizers, not needed for --help

    tok = get_tokenizer(args.vocab, args.context_length)
    ids = tok(args.texts)
    for text, row, n in zip(args.texts, ids, tok.encode_batch_lengths(args.texts)):
        row = row[:n].tolist()
        print(" ".join(tok.tokenize(text)), file=sys.stdout)
        print(" ".join(map(str, row)))
    return 0
