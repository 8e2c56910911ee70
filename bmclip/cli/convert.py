"""``bmclip convert``: open_clip (released BiomedCLIP layout) <-> bmclip model files.

The input of either direction may be any model argument: a bmclip model file, a training checkpoint dir, a
training run dir (its newest valid checkpoint) or an open_clip folder (``bmclip.resolve``).

The tokenizer travels with the weights: ``--from-open-clip`` writes the input's tokenizer (or ``--vocab``) beside
the model file as ``vocab.txt`` + ``bmclip_tokenizer.json``, where every command looks for a model file's tokenizer,
and ``--to-open-clip`` ships it in the export; an export without one is refused (it would have to name a tokenizer
it does not know). Nothing is written over the input, inside the folder it is read from, or beside a model file
over a different tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bmclip.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert between open_clip BiomedCLIP folders and bmclip model files",
        description="--from-open-clip DIR --out model.pt|.safetensors, or --to-open-clip MODEL --out DIR. "
        "MODEL: a bmclip model file, a training checkpoint dir or a training run dir (its newest valid "
        "checkpoint).",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-open-clip", metavar="DIR", help="folder with open_clip_pytorch_model.bin + config")
    g.add_argument("--to-open-clip", metavar="MODEL",
                   help="bmclip model file, training checkpoint dir or run dir to export")
    p.add_argument("--out", required=True,
                   help="output model file (from) or folder (to; a new folder, or an earlier export, which is "
                        "replaced as a whole)")
    p.add_argument("--vocab", metavar="PATH",
                   help="the tokenizer (vocab.txt or its folder) to ship with the output: beside the model file "
                        "(--from-open-clip) or in the export (--to-open-clip); default: the tokenizer shipped "
                        "with the input, e.g. an open_clip folder's or a training checkpoint's vocab.txt")
    p.set_defaults(func=run)


def _check_model_file_out(out: str) -> None:
    """--out of --from-open-clip must name a file that can be written (checked before any model is loaded)."""
    if not out:
        raise ConfigError("--out is empty: name the model file to write (e.g. model.pt)")
    p = Path(out)
    if out.endswith(("/", os.sep)) or p.name in ("", ".", "..") or p.is_dir():
        raise ConfigError(f"--out {out} names a folder: --from-open-clip writes a model file "
                          f"(e.g. {Path(out) / 'model.pt'})")
    above = p.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if above.exists() and not above.is_dir():
        raise ConfigError(f"--out {out}: {above} is a file, not a folder")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _as_given_and_resolved(path: str) -> list[Path]:
    return [Path(os.path.abspath(path)), Path(path).resolve()]


def _check_not_input(source: str, out: str, direction: str) -> None:
    """Refuse (before anything is loaded or written) an --out that would overwrite what is being read: for
    --from-open-clip a file inside the folder the model is read from (open_clip folder, checkpoint dir, run dir), the
    input file itself or the tokenizer files beside it; for --to-open-clip (a folder replaced as a whole) the input
    or a folder containing it. Also refused: a model file written into a checkpoint dir or an open_clip folder
    (bmclip would read it as part of that model)."""
    from bmclip.interop import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
    from bmclip.resolve import model_input_paths
    from bmclip.tokenizer import CONFIG_NAME as TOKENIZER

    folders, files = model_input_paths(source)
    targets = _as_given_and_resolved(out)
    if direction == "from":
        for t in targets:
            for f in files:
                if t == f:
                    what = (f"the tokenizer ({f.name}) of the input {source}" if f.name in ("vocab.txt", TOKENIZER)
                            else f"the input {source}")
                    raise ConfigError(f"--out {out} is {what}: refusing to overwrite what is being read; name "
                                      "another file")
            for d in folders:
                if _inside(t, d):
                    raise ConfigError(f"--out {out} is inside {d}, which is read as the input {source}: refusing to "
                                      "write into it (it would replace or add to that model's files); name a file "
                                      "outside it")
        for t in targets:
            folder = t.parent
            if (folder / "meta.json").is_file() or any((folder / n).is_file()
                                                       for n in (CONFIG_NAME, WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME)):
                what = "a training checkpoint dir" if (folder / "meta.json").is_file() else "an open_clip folder"
                raise ConfigError(f"--out {out}: {folder} is {what}, whose files bmclip reads as that model: refusing "
                                  "to write a model file (and its tokenizer) there; name a file in another folder")
        return
    for t in targets:
        for q in (*files, *folders):
            if _inside(q, t):
                raise ConfigError(f"--out {out} {'is' if q == t else 'contains'} the input {source}: the export "
                                  "replaces the whole folder; name another folder")


def _tokenizer_beside(out: str, tok, source: str) -> bool:
    """Whether ``tok`` (the output's tokenizer, None: none) must be written beside the model file ``out``: False
    when the same tokenizer is already there; ConfigError when another one is (the model file would be read with
    it) or when there is one but the input ships none."""
    from bmclip.tokenizer import CONFIG_NAME as TOKENIZER_CONFIG_NAME
    from bmclip.tokenizer import Tokenizer

    folder = Path(out).parent
    vocab, cfg = folder / "vocab.txt", folder / TOKENIZER_CONFIG_NAME
    present = [q for q in (vocab, cfg) if q.exists() or q.is_symlink()]
    if not present:
        return tok is not None
    if tok is None:
        raise ConfigError(f"--out {out}: {present[0]} exists, and every command would read the new model file with "
                          f"that tokenizer, but {source} ships none: pass --vocab with the model's tokenizer, or "
                          "write the model file into another folder")
    try:
        there = Tokenizer.from_vocab(folder)
    except ConfigError as e:
        raise ConfigError(f"--out {out}: the tokenizer beside it cannot be read ({e}): remove it, or write the "
                          "model file into another folder") from None
    if there.vocab != tok.vocab or there.clean != tok.clean:
        why = (f"{there.vocab_size} tokens, not {tok.vocab_size}" if there.vocab_size != tok.vocab_size else
               "other tokens" if there.vocab != tok.vocab else f"clean={there.clean}, not {tok.clean}")
        raise ConfigError(f"--out {out}: {vocab} is another tokenizer than the model's ({why}), and every command "
                          "would read the new model file with it: write the model file into another folder (or "
                          "remove that tokenizer)")
    return False


def _load_vocab(vocab: str, context_length: int | None = None):
    from bmclip.tokenizer import get_tokenizer

    try:
        return get_tokenizer(vocab, context_length=context_length)
    except ConfigError as e:
        raise ConfigError(f"--vocab {vocab}: {e}") from None


def _write_model_file(model, out: str, tok, write_tok: bool) -> None:
    """The tokenizer first (so the model file never appears without it), then the model file; both atomic. When the
    model file cannot be written, the tokenizer files written just now are removed again."""
    from bmclip.io.model_file import save_model
    from bmclip.tokenizer import CONFIG_NAME as TOKENIZER_CONFIG_NAME
    from bmclip.tokenizer import Tokenizer

    folder = Path(out).parent
    if write_tok:
        ctx = int(model.config.text.context_length)
        (tok if tok.context_length == ctx else Tokenizer(tok.vocab, ctx, clean=tok.clean)).save(folder)
    try:
        save_model(model, out)
    except BaseException:
        if write_tok:
            for name in ("vocab.txt", TOKENIZER_CONFIG_NAME):
                (folder / name).unlink(missing_ok=True)
        raise


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    # start-up cost: `bmclip --help` imports no torch
    from bmclip.interop import check_export_folder, export_open_clip, open_clip_config
    from bmclip.resolve import resolve_model
    from bmclip.tokenizer import get_tokenizer

    source = args.from_open_clip or args.to_open_clip
    # Everything that can be refused without the model is refused before it is loaded (seconds for 200M params).
    if args.from_open_clip:
        _check_model_file_out(args.out)
    else:
        try:
            check_export_folder(args.out)
        except ConfigError as e:
            raise ConfigError(f"--out: {e}") from None
    if Path(source).exists():  # a missing input is resolve_model's error
        _check_not_input(source, args.out, "from" if args.from_open_clip else "to")
    tok = _load_vocab(args.vocab) if args.vocab is not None else None

    resolved = resolve_model(source)
    model = resolved.model
    vocab = args.vocab if tok is not None else resolved.tokenizer_dir
    if tok is None and resolved.tokenizer_dir is not None:
        # read beside the weights by resolve_model; None only when it cannot be read (this says why)
        tok = resolved.tokenizer or get_tokenizer(resolved.tokenizer_dir)
    if tok is not None and tok.vocab_size > model.config.text.vocab_size:
        raise ConfigError(f"{'--vocab ' if args.vocab else 'tokenizer '}{vocab}: tokenizer has {tok.vocab_size} "
                          f"ids but the model's text.vocab_size is {model.config.text.vocab_size}")
    if args.from_open_clip:
        write_tok = _tokenizer_beside(args.out, tok, source)
        _write_model_file(model, args.out, tok, write_tok)
        shipped = f", tokenizer from {vocab} beside it" if tok is not None else ""
        print(f"{resolved.description} -> {args.out} ({model.num_params() / 1e6:.1f}M parameters{shipped})")
        if tok is None:
            _note(f"{source} ships no tokenizer (no vocab.txt), so none was written beside {args.out}: commands "
                  "reading it use the bundled tokenizer unless --vocab says otherwise; put the model's vocab.txt "
                  f"beside it (or rerun with --vocab)")
    else:
        if tok is None:
            open_clip_config(model)  # an architecture open_clip cannot build is the error to report first
            raise ConfigError(f"{resolved.description} ships no tokenizer (no vocab.txt with it): pass --vocab with "
                              "the vocabulary the model was trained with (BiomedBERT's vocab.txt for the released "
                              "BiomedCLIP weights); the export must name its tokenizer, and bmclip does not guess it")
        export_open_clip(model, args.out, tokenizer=tok)
        print(f"{resolved.description} -> {args.out}/ (open_clip_pytorch_model.bin + open_clip_config.json, "
              f"tokenizer from {vocab})")
    return 0

