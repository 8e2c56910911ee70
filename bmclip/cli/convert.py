"""``bmclip convert``: open_clip (released BiomedCLIP layout) <-> bmclip model files.

The input of either direction may be any model argument: a bmclip model file, a training checkpoint dir, a
training run dir (its newest valid checkpoint) or an open_clip folder (``bmclip.resolve``).
"""

from __future__ import annotations

import argparse


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
    p.add_argument("--out", required=True, help="output model file (from) or folder (to)")
    p.add_argument("--vocab", metavar="PATH",
                   help="with --to-open-clip: also write this tokenizer's vocab.txt (default: the tokenizer "
                        "shipped with MODEL, e.g. a training checkpoint's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # start-up cost: `bmclip --help` imports no torch
    from bmclip.interop import export_open_clip
    from bmclip.io.model_file import save_model
    from bmclip.resolve import resolve_model
    from bmclip.tokenizer import get_tokenizer

    source = args.from_open_clip or args.to_open_clip
    resolved = resolve_model(source)
    model = resolved.model
    if args.from_open_clip:
        save_model(model, args.out)
        print(f"{resolved.description} -> {args.out} ({model.num_params() / 1e6:.1f}M parameters)")
    else:
        vocab = args.vocab or resolved.tokenizer_dir
        tok = get_tokenizer(vocab) if vocab is not None else None
        export_open_clip(model, args.out, tokenizer=tok)
        shipped = f", tokenizer from {vocab}" if tok is not None else ""
        print(f"{resolved.description} -> {args.out}/ (open_clip_pytorch_model.bin + open_clip_config.json{shipped})")
    return 0
