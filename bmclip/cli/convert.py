"""``bmclip convert``: open_clip (released BiomedCLIP layout) <-> bmclip model checkpoints."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert between open_clip BiomedCLIP folders and bmclip checkpoints",
        description="--from-open-clip DIR --out model.pt|.safetensors, or --to-open-clip model.pt --out DIR.",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-open-clip", metavar="DIR", help="folder with open_clip_pytorch_model.bin + config")
    g.add_argument("--to-open-clip", metavar="CKPT", help="bmclip model checkpoint to export")
    p.add_argument("--out", required=True, help="output checkpoint (from) or folder (to)")
    p.add_argument("--vocab", metavar="PATH", help="with --to-open-clip: also write this tokenizer's vocab.txt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bmclip.checkpoint_io import load_model, save_model
    from bmclip.interop import export_open_clip, load_open_clip

    if args.from_open_clip:
        model = load_open_clip(args.from_open_clip)
        save_model(model, args.out)
        print(f"{args.from_open_clip} -> {args.out} ({model.num_params() / 1e6:.1f}M parameters)")
    else:
        tok = None
        if args.vocab:
            from bmclip.tokenizer import get_tokenizer

            tok = get_tokenizer(args.vocab)
        model = load_model(args.to_open_clip)
        export_open_clip(model, args.out, tokenizer=tok)
        print(f"{args.to_open_clip} -> {args.out}/ (open_clip_pytorch_model.bin + open_clip_config.json)")
    return 0
