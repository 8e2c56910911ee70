"""``bmclip finetune vqa``: closed-set medical VQA (VQA-RAD / SLAKE) on top of a bmclip or open_clip model.

Writes ``<out>/vqa.json`` (accuracy overall/open/closed, baseline, per-epoch loss, skipped questions by
reason), ``<out>/vqa.md`` and ``<out>/vqa_head.pt`` ({"fusion": state dict of the fusion module and
classifier, "answers": vocab, "config": hyper-parameters}; with --finetune-encoders also "encoders": the
fine-tuned towers). The three are one set (``report.OutputSet``): when training has succeeded, the previous
run's files are removed, then the weights and the markdown are moved in and vqa.json is written last, so a
folder holding vqa.json holds a complete set of one run; a failed or interrupted run leaves the previous set as
it was.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Any

from bmclip.cli._text import plain_help
from bmclip.cli.eval import _device
from bmclip.errors import ConfigError
from bmclip.eval.report import OutputSet, markdown_table
from bmclip.io import atomic_torch_save

OUTPUT_NAMES = ("vqa.json", "vqa.md", "vqa_head.pt")


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


def _check_out(out: Path) -> None:
    """Check that ``out`` can take the output files (before any data or model is loaded): FileExistsError
    (EEXIST, as mkdir would raise) when it or a parent is a file, ConfigError when an output name is taken by
    something other than a regular file."""
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(p))
            break
    for name in OUTPUT_NAMES:
        t = out / name
        if (t.exists() or t.is_symlink()) and not t.is_file():
            raise ConfigError(f"--out {out}: {t} exists and is not a regular file (a folder?)")


def _by_reason(skipped: list) -> dict[str, int]:
    from bmclip.eval.vqa import skip_kind

    out: dict[str, int] = {}
    for _, reason in skipped:
        k = skip_kind(reason)
        out[k] = out.get(k, 0) + 1
    return out


def run_vqa(args: argparse.Namespace) -> int:
    # start-up cost: `bmclip --help` imports no torch
    from bmclip.eval.models import load_model
    from bmclip.eval.vqa import check_vqa_options, load_vqa_splits, train_vqa

    # Cheap checks first: the options and the output folder, before the data, the model or any training.
    check_vqa_options(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, encoder_lr=args.encoder_lr,
                      hidden=args.hidden, layers=args.layers, heads=args.heads, features=args.features,
                      answer_vocab=args.answer_vocab, flags=True)
    if args.out is not None:
        _check_out(Path(args.out))
    data = load_vqa_splits(args.data, args.format)
    out = Path(args.out) if args.out else Path("eval_out") / f"vqa_{data['format']}"
    _check_out(out)
    dev = _device(args.device)
    model, tok = load_model(args.model, device=dev, seed=args.seed)  # a preset's random init from --seed too
    skipped = list(data["skipped"])
    res = train_vqa(model, tok, data["train"], data["test"], epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr, encoder_lr=args.encoder_lr, finetune_encoders=args.finetune_encoders,
                    hidden=args.hidden, layers=args.layers, heads=args.heads, features=args.features,
                    seed=args.seed, device=dev, log=lambda s: print(s, file=sys.stderr),
                    answer_vocab=args.answer_vocab, skipped=skipped)
    m = res["metrics"]
    n_train, n_test = res["n_train"], res["n_test"]
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
    by_reason = _by_reason(skipped)
    result = {"model": str(args.model), "data": str(args.data), "format": data["format"],
              "n_train": n_train, "n_test": n_test, "config": config, "metrics": m,
              "history": res["history"],
              "skipped": {"count": len(skipped), "by_reason": by_reason,
                          "examples": [list(s) for s in skipped[:20]]},
              "weights": str(head)}
    skip_line = (f"Skipped {len(skipped)} question(s): "
                 + ", ".join(f"{k} {n}" for k, n in sorted(by_reason.items())) + ".\n" if skipped else "")
    md = (f"# VQA ({data['format']}): {args.model}\n\n{n_train} training / {n_test} test "
          f"questions, {m['n_answers']} answers, encoders {'fine-tuned' if args.finetune_encoders else 'frozen'}."
          "\n\n" + markdown_table([{"split": k, "n": m[f"{k}_n"], "accuracy": m[f"{k}_accuracy"]}
                                   for k in ("overall", "open", "closed")])
          + f"\nMajority answer `{m['majority_answer']}`: {m['majority_baseline']:.4f}. "
          f"Test answers not in the training vocabulary: {m['test_answers_not_in_vocab']}.\n" + skip_line)
    # One set (report.OutputSet): the previous run's files go first, the new head and markdown are moved in,
    # vqa.json comes last; a failure before the commit leaves the previous set as it was.
    with OutputSet(out, "vqa", owned=["vqa_head.pt"]) as outputs:
        atomic_torch_save(blob, outputs.stage("vqa_head.pt"))
        paths = outputs.commit(result, md)
    report, markdown = paths["json"], paths["markdown"]
    print(md)
    print(f"wrote {report}, {markdown} and {head}", file=sys.stderr)
    return 0
