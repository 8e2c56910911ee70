"""``bmclip finetune vqa``: closed-set medical VQA (VQA-RAD / SLAKE) on top of a bmclip or open_clip model.

Writes ``<out>/vqa.json`` (accuracy overall/open/closed, baseline, per-epoch loss), ``<out>/vqa.md`` and
``<out>/vqa_head.pt`` ({"fusion": state dict of the fusion module and classifier, "answers": vocab,
"config": hyper-parameters}; with --finetune-encoders also "encoders": the fine-tuned towers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bmclip.cli._text import plain_help
from bmclip.cli.eval import _device
from bmclip.eval.report import markdown_table, write_report
from bmclip.io import atomic_torch_save


def register(subparsers: Any) -> None:
    ft = subparsers.add_parser("finetune", help="fine-tune a model on a downstream task (vqa)",
                               description=plain_help(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ft.add_subparsers(dest="finetune_command", metavar="TASK")
    sub.required = True
    v = sub.add_parser("vqa", help="VQA-RAD / SLAKE answer classification with co-attention fusion")
    v.add_argument("model", metavar="MODEL",
                   help="bmclip model file, training checkpoint dir, run dir (its newest valid checkpoint), "
                        "open_clip folder, or model preset name")
    v.add_argument("--data", required=True,
                   help="VQA-RAD folder (or its 'VQA_RAD Dataset Public.json') or SLAKE folder")
    v.add_argument("--format", choices=["auto", "vqa-rad", "slake"], default="auto")
    v.add_argument("--epochs", type=int, default=20)
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--lr", type=float, default=1e-4, help="learning rate of the fusion module [1e-4]")
    v.add_argument("--encoder-lr", type=float, default=1e-5, help="learning rate of the towers when fine-tuned")
    v.add_argument("--finetune-encoders", action="store_true", help="train the image/text towers too (default frozen)")
    v.add_argument("--features", choices=["tokens", "pooled"], default="tokens",
                   help="fuse all encoder tokens (METER-style) or only the pooled embeddings [tokens]")
    v.add_argument("--hidden", type=int, default=256)
    v.add_argument("--layers", type=int, default=2)
    v.add_argument("--heads", type=int, default=4)
    v.add_argument("--answer-vocab", choices=["train", "all"], default="train",
                   help="label space: training answers only, or train+test answers as in METER-style set-ups")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default="auto")
    v.add_argument("--out", default=None, help="output folder (default eval_out/vqa_<format>)")
    v.set_defaults(func=run_vqa)


def run_vqa(args: argparse.Namespace) -> int:
    # start-up cost: `bmclip --help` imports no torch
    from bmclip.eval.models import load_model
    from bmclip.eval.vqa import load_vqa_splits, train_vqa

    data = load_vqa_splits(args.data, args.format)
    dev = _device(args.device)
    model, tok = load_model(args.model, device=dev)
    res = train_vqa(model, tok, data["train"], data["test"], epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr, encoder_lr=args.encoder_lr, finetune_encoders=args.finetune_encoders,
                    hidden=args.hidden, layers=args.layers, heads=args.heads, features=args.features,
                    seed=args.seed, device=dev, log=lambda s: print(s, file=sys.stderr),
                    answer_vocab=args.answer_vocab)
    m = res["metrics"]
    out = Path(args.out) if args.out else Path("eval_out") / f"vqa_{data['format']}"
    config = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "encoder_lr", "finetune_encoders",
                                            "features", "hidden", "layers", "heads", "seed", "answer_vocab")}
    vqa_model = res["model"]
    blob: dict[str, Any] = {
        "fusion": {k: v.detach().cpu() for k, v in vqa_model.state_dict().items() if not k.startswith("clip.")},
        "answers": res["vocab"],
        "config": config,
    }
    if args.finetune_encoders:
        blob["encoders"] = {k: v.detach().cpu() for k, v in vqa_model.clip.state_dict().items()}
    head = out / "vqa_head.pt"
    atomic_torch_save(blob, head)
    result = {"model": str(args.model), "data": str(args.data), "format": data["format"],
              "n_train": len(data["train"]), "n_test": len(data["test"]), "config": config, "metrics": m,
              "history": res["history"],
              "skipped": {"count": len(data["skipped"]), "examples": [list(s) for s in data["skipped"][:20]]},
              "weights": str(head)}
    md = (f"# VQA ({data['format']}): {args.model}\n\n{len(data['train'])} training / {len(data['test'])} test "
          f"questions, {m['n_answers']} answers, encoders {'fine-tuned' if args.finetune_encoders else 'frozen'}."
          "\n\n" + markdown_table([{"split": k, "n": m[f"{k}_n"], "accuracy": m[f"{k}_accuracy"]}
                                   for k in ("overall", "open", "closed")])
          + f"\nMajority answer `{m['majority_answer']}`: {m['majority_baseline']:.4f}. "
          f"Test answers not in the training vocabulary: {m['test_answers_not_in_vocab']}.\n")
    paths = write_report(out, "vqa", result, md)
    print(md)
    print(f"wrote {paths['json']}, {paths['markdown']} and {head}", file=sys.stderr)
    return 0
