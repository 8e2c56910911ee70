"""``bmclip convert``: open_clip (released BiomedCLIP layout) <-> bmclip model files.

The input of either direction may be any model argument: a bmclip model file, a training checkpoint dir, a
training run dir (its newest valid checkpoint) or an open_clip folder (``bmclip.resolve``).
"""

from __future__ import annotations

import argparse
import os
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
                   help="with --to-open-clip: also write this tokenizer's vocab.txt (default: the tokenizer "
                        "shipped with MODEL, e.g. a training checkpoint's)")
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


def run(args: argparse.Namespace) -> int:
    # start-up cost: `bmclip --help` imports no torch
    from bmclip.interop import check_export_folder, export_open_clip
    from bmclip.io.model_file import save_model
    from bmclip.resolve import resolve_model
    from bmclip.tokenizer import get_tokenizer

    # Everything that can be refused without the model is refused before it is loaded (seconds for 200M params).
    if args.from_open_clip:
        if args.vocab is not None:
            raise ConfigError("--vocab has no effect with --from-open-clip (a bmclip model file holds no tokenizer): "
                              "drop it, and pass the vocabulary to the commands that use the model")
        _check_model_file_out(args.out)
    else:
        try:
            check_export_folder(args.out)
        except ConfigError as e:
            raise ConfigError(f"--out: {e}") from None
    tok = get_tokenizer(args.vocab) if args.vocab is not None else None

    source = args.from_open_clip or args.to_open_clip
    resolved = resolve_model(source)
    model = resolved.model
    if args.from_open_clip:
        save_model(model, args.out)
        print(f"{resolved.description} -> {args.out} ({model.num_params() / 1e6:.1f}M parameters)")
    else:
        vocab = args.vocab or resolved.tokenizer_dir
        if tok is None and vocab is not None:
            tok = get_tokenizer(vocab)
        if tok is not None and tok.vocab_size > model.config.text.vocab_size:
            raise ConfigError(f"{'--vocab ' if args.vocab else 'tokenizer '}{vocab}: tokenizer has {tok.vocab_size} "
                              f"ids but the model's text.vocab_size is {model.config.text.vocab_size}")
        export_open_clip(model, args.out, tokenizer=tok)
        shipped = f", tokenizer from {vocab}" if tok is not None else ""
        print(f"{resolved.description} -> {args.out}/ (open_clip_pytorch_model.bin + open_clip_config.json{shipped})")
    return 0
