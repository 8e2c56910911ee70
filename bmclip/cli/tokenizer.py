"""``bmclip tokenizer``: train a WordPiece vocabulary from captions, or show how a text is tokenized."""

from __future__ import annotations

import argparse
import gzip
import sys
import tarfile
import zlib
from pathlib import Path

from bmclip.errors import ConfigError, DataError


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


# Compressed or archive formats a caption file must not be (read as text they would be mojibake).
_MAGIC = ((b"\x1f\x8b", "gzip-compressed"), (b"BZh", "bzip2-compressed"), (b"\xfd7zXZ\x00", "xz-compressed"),
          (b"\x28\xb5\x2f\xfd", "zstd-compressed"), (b"PK\x03\x04", "a zip archive"))
_SNIFF_BYTES = 1 << 16
# tario's reasons that concern a whole shard (the rest name one sample or member): printed as warnings.
_SHARD_PROBLEMS = ("truncated", "bad_header", "tar_lost_tail", "shard_fetch_failed")


def _input_kind(p: Path) -> str:
    """"tar", "gz-tar" or "text" for an input path; DataError for a folder, a missing file or a binary file."""
    if p.is_dir():
        raise DataError(f"input {p} is a folder; pass the caption files or .tar shards inside it "
                        f"(e.g. {p}/*.txt or {p}/shard-{{000..009}}.tar)")
    if not p.exists():
        raise DataError(f"input not found: {p}")
    if not p.is_file():
        raise DataError(f"input {p} is not a regular file")
    try:
        with open(p, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        raise DataError(f"cannot read input {p}: {e.strerror or e}") from None
    for magic, what in _MAGIC:
        if head.startswith(magic) and (magic != b"BZh" or head[4:10] == b"1AY&SY"):  # "BZh" alone can be text
            if magic == b"\x1f\x8b" and tarfile.is_tarfile(p):
                return "gz-tar"
            raise DataError(f"input {p} is {what}, not a text file or .tar shard; decompress it first "
                            "(text inputs are read as plain UTF-8, one caption per line)")
    if p.name.endswith(".tar") or tarfile.is_tarfile(p):
        return "tar"
    if b"\0" in head:
        raise DataError(f"input {p} is a binary file (NUL bytes in its first {len(head)} bytes), not UTF-8 text "
                        "with one caption per line")
    return "text"


class _GzipStream:
    """A gzip stream whose read() ends (returns b"") at a decompression error instead of raising, so that tario
    reports a cut-off or corrupt .tar.gz as a truncated shard; ``error`` keeps what went wrong."""

    def __init__(self, path: Path):
        self.f = gzip.open(path, "rb")
        self.error: Exception | None = None

    def read(self, n: int) -> bytes:
        if self.error is not None:
            return b""
        try:
            return self.f.read(n)
        except (EOFError, OSError, zlib.error) as e:
            self.error = e
            return b""

    def close(self) -> None:
        self.f.close()


def _bump(counts: dict[str, int], key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


def _tar_texts(p: Path, kind: str, counts: dict[str, int], problems: list):
    from bmclip.data.tario import iter_samples  # start-up cost: only when shards are read

    stream = _GzipStream(p) if kind == "gz-tar" else None
    skipped: list = []
    try:
        for sample in iter_samples(str(p), skipped, stream):
            for ext in sorted(sample):
                if not (ext == "txt" or ext.endswith(".txt")):
                    continue
                try:
                    text = sample[ext].decode("utf-8").lstrip("\ufeff").strip()
                except UnicodeDecodeError:
                    _bump(counts, "skipped_not_utf8")
                    continue
                if text:
                    _bump(counts, "texts")
                    yield text
    finally:
        if stream is not None:
            stream.close()
    if stream is not None and stream.error is not None:
        why = f"gzip data cut off or corrupt ({stream.error})"
        at = next((i for i, (_, r) in enumerate(skipped) if r.startswith("truncated:")), None)
        if at is None:
            skipped.append((str(p), f"truncated: {why}"))
        else:
            skipped[at] = (skipped[at][0], f"{skipped[at][1]}: {why}")
    for where, reason in skipped:
        k = reason.split(":", 1)[0]
        _bump(counts, k)
        problems.append((where, reason))


def _file_texts(p: Path, counts: dict[str, int]):
    good = bad = 0
    try:
        with open(p, "rb") as f:
            for i, raw in enumerate(f):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    bad += 1
                    _bump(counts, "skipped_not_utf8")
                    continue
                if i == 0:
                    line = line.lstrip("\ufeff")
                line = line.strip()
                if line:
                    good += 1
                    _bump(counts, "texts")
                    yield line
    except OSError as e:
        raise DataError(f"cannot read input {p}: {e.strerror or e}") from None
    if bad > good:
        raise DataError(f"input {p}: {bad} of its {good + bad} non-empty lines are not UTF-8; it is not a UTF-8 "
                        "text file (convert it, e.g. iconv -f latin1 -t utf-8)")


def check_inputs(paths: list[str]) -> list[tuple[Path, str]]:
    """The input files with their kind ("text", "tar", "gz-tar"), checked before any is read: DataError naming
    a missing path, a folder or a file that is neither text nor a tar shard (e.g. gzip-compressed text)."""
    # start-up cost: numpy (~0.1 s) would load on every `bmclip` command, which imports each subcommand module
    from bmclip.data.shards import expand_urls

    # Brace patterns and "::"-joined lists, as in webdataset shard specs: train-{000000..000099}.tar
    return [(p, _input_kind(p)) for p in map(Path, expand_urls(paths))]


def iter_texts(paths: list[str], counts: dict[str, int], *, problems: list | None = None):
    """Captions from text files (one per non-empty line) and .tar shards (.txt members), in order.

    Text files are read as UTF-8: an undecodable line is skipped and counted (``counts["skipped_not_utf8"]``,
    as an undecodable .txt member of a shard is), and a file whose lines are mostly undecodable, a compressed
    or binary file, a folder or a missing path is a DataError. Shards are read with ``bmclip.data.tario``
    (webdataset member naming; .tar.gz is decompressed): damage such as a truncated shard is counted under
    tario's problem names (``counts["truncated"]``, ``counts["damaged_tar_sample"]``, ...) and appended to
    ``problems`` as (shard or sample, reason) when a list is given.
    """
    yield from _texts_of(check_inputs(paths), counts, [] if problems is None else problems)


def _texts_of(inputs: list[tuple[Path, str]], counts: dict[str, int], problems: list):
    for p, kind in inputs:
        if kind == "text":
            yield from _file_texts(p, counts)
        else:
            yield from _tar_texts(p, kind, counts, problems)


def _train(args: argparse.Namespace) -> int:
    # start-up cost: numpy and tokenizers, not needed for --help
    from bmclip.tokenizer import Tokenizer, check_save_folder, check_train_options

    # Cheap checks first: the options, the output folder and every input, before any text is read.
    check_train_options(args.vocab_size, args.min_frequency, args.context_length, prefix="--")
    check_save_folder(args.out)
    inputs = check_inputs(args.input)
    counts: dict[str, int] = {}
    problems: list = []

    def log(msg: str) -> None:  # what the run is doing, for an operator watching a long one
        print(f"[bmclip] tokenizer: {msg}", file=sys.stderr, flush=True)

    log(f"reading the captions of {len(inputs)} input(s)")
    try:
        tok = Tokenizer.train(
            _texts_of(inputs, counts, problems),
            vocab_size=args.vocab_size,
            context_length=args.context_length,
            min_frequency=args.min_frequency,
            log=log,
        )
    except ConfigError:
        if counts.get("texts"):
            raise
        extra = "".join(f", {k}={v}" for k, v in counts.items())
        raise DataError(f"no captions in the {len(inputs)} input(s) (0 texts{extra})") from None
    finally:
        for where, reason in problems:
            if reason.split(":", 1)[0] in _SHARD_PROBLEMS:
                print(f"bmclip tokenizer: warning: {where}: {reason}", file=sys.stderr)
    extra = "".join(f", {k}={v}" for k, v in counts.items() if k != "texts")
    tok.save(args.out)
    over = (f" (above --vocab-size {args.vocab_size}: the special tokens and the characters seen alone take that "
            "many)" if tok.vocab_size > args.vocab_size else "")
    print(f"trained on {counts.get('texts', 0)} texts{extra}: vocabulary of {tok.vocab_size}{over} -> {args.out}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    # start-up cost: numpy and tokenizers, not needed for --help
    from bmclip.tokenizer import check_context_length, get_tokenizer

    if args.context_length is not None:
        check_context_length(args.context_length, "--context-length")
    tok = get_tokenizer(args.vocab, args.context_length)
    ids = tok(args.texts)
    for text, row, n in zip(args.texts, ids, tok.encode_batch_lengths(args.texts)):
        row = row[:n].tolist()
        print(" ".join(tok.tokenize(text)), file=sys.stdout)
        print(" ".join(map(str, row)))
    return 0
