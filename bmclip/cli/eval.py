"""``bmclip eval retrieval|zeroshot|linear-probe``: evaluation of a bmclip checkpoint or open_clip folder.

Every command writes ``<out>/<name>.json`` (all numbers) and ``<out>/<name>.md`` (tables), atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any

from bmclip._ext import load_ext
from bmclip.cli._text import plain_help
from bmclip.errors import ConfigError, DataError
from bmclip.eval.prompts import BUILTIN_TASKS, TaskSpec, get_task, load_task_yaml
from bmclip.eval.report import markdown_table, write_report
from bmclip.io import atomic_write_bytes
from bmclip.io.fs import parse_storage_options
from bmclip.progress import Progress


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="bmclip model file, training checkpoint dir, run dir (its newest valid checkpoint), "
                        "open_clip folder, or model preset name")
    p.add_argument("--out", default=None, help="output folder for the JSON/markdown report (default: eval_out/<task>)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available) [auto]")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="image decoding threads [4]")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA for the encoders")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (default: a bar on a terminal, a line every 30 s in a log)")


def register(subparsers: Any) -> None:
    ev = subparsers.add_parser("eval", help="evaluate a model: retrieval, zero-shot, linear probe",
                               description=plain_help(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ev.add_subparsers(dest="eval_command", metavar="TASK")
    sub.required = True

    r = sub.add_parser("retrieval", help="image<->text Recall@K on webdataset shards")
    _common(r)
    r.add_argument("--shards", required=True, help="shard pattern, e.g. 'test/{000000..000099}.tar' or 'test/*.tar'")
    r.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    r.add_argument("--block", type=int, default=4096, help="similarity tile size (memory ~ block^2) [4096]")
    r.add_argument("--max-pairs", type=int, default=None, help="evaluate only the first N pairs")
    r.add_argument("--storage-dtype", choices=["float16", "float32"], default="float16",
                   help="dtype of the embeddings streamed to <out>/embeddings [float16]")
    r.add_argument("--reader", choices=["auto", "loader", "python"], default="auto",
                   help="loader = the C++ ShardLoader, python = bmclip.data.tario + PIL; auto = loader if built")
    r.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option for remote shards (s3://, gs://, https://; pip install 'bmclip[cloud]'), "
                        "e.g. endpoint_url=http://host:9000; values are JSON or strings (repeatable)")
    r.set_defaults(func=run_retrieval)

    z = sub.add_parser("zeroshot", help="zero-shot classification with class-name prompts")
    _common(z)
    z.add_argument("--dataset", default=None,
                   help="dataset SPEC: folder, .csv/.tsv, PCam .h5 prefix/folder, shards, or a built-in task name "
                        "(pcam, lc25000_lung, lc25000_colon, tcga_til, rsna_pneumonia)")
    z.add_argument("--data-root", default=None, help="local copy of a built-in dataset")
    z.add_argument("--split", default="test", help="split for PCam (train/valid/test) [test]")
    z.add_argument("--task", default=None,
                   help="YAML task file {classes, templates, data} or a built-in task name (default: from --dataset)")
    z.add_argument("--max-samples", type=int, default=None, help="evaluate a random subset of N samples (seed 0)")
    z.set_defaults(func=run_zeroshot)

    lp = sub.add_parser("linear-probe", help="logistic regression on frozen image features")
    _common(lp)
    lp.add_argument("--train", required=True, help="training dataset SPEC (as for zeroshot --dataset)")
    lp.add_argument("--test", required=True, help="test dataset SPEC")
    lp.add_argument("--data-root", default=None)
    lp.add_argument("--fraction", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    lp.add_argument("--seeds", type=int, default=3, help="number of seeds per fraction [3]")
    lp.add_argument("--val-fraction", type=float, default=0.2)
    lp.add_argument("--l2", type=float, nargs="+", default=None, help="L2 grid (default 1e-6 .. 10, log spaced)")
    lp.set_defaults(func=run_linear_probe)


def _device(name: str) -> str:
    import torch  # start-up cost: `bmclip --help` imports no torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {name!r}: not a torch device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "meta":
        raise ConfigError(f"--device {name}: the meta device holds no data to compute with (use cpu or cuda)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def _out_dir(args: argparse.Namespace, default: str) -> Path:
    return Path(args.out) if args.out else Path("eval_out") / default


def _load(args):
    from bmclip.eval.models import load_model  # start-up cost: `bmclip --help` imports no torch

    dev = _device(args.device)
    model, tok = load_model(args.model, device=dev)
    return model, tok, dev


def _batch_len(batch: Any) -> int:
    return len(batch["image"])


def _skips_summary(skipped: list) -> dict[str, Any]:
    reasons: dict[str, int] = {}
    for _, r in skipped:
        key = r.split(":")[0][:80]
        reasons[key] = reasons.get(key, 0) + 1
    return {"count": len(skipped), "by_reason": reasons, "examples": [list(s) for s in skipped[:20]]}


# ---------------------------------------------------------------- retrieval


def run_retrieval(args: argparse.Namespace) -> int:
    # start-up cost: `bmclip --help` imports no torch
    from bmclip.data.loader import ShardLoader
    from bmclip.eval.batching import iter_shard_pairs
    from bmclip.eval.embed import model_image_size
    from bmclip.eval.retrieval import evaluate_retrieval

    storage_options = parse_storage_options(args.storage_option)
    model, tok, dev = _load(args)
    size = model_image_size(model)
    out = _out_dir(args, "retrieval")
    reader = args.reader
    if reader == "auto":
        try:
            load_ext()  # the loader needs the compiled extension; auto picks it only if it loads
            reader = "loader"
        except ImportError:
            reader = "python"
    skipped: list = []
    loader = None
    if reader == "loader":
        if args.workers < 1:
            raise ConfigError(f"--workers must be >= 1 with the loader reader (its decode threads), got {args.workers}")
        loader = ShardLoader(args.shards, batch_size=args.batch_size, image_size=size, augment="center",
                             shuffle=False, num_threads=args.workers, storage_options=storage_options)
        batches = loader
    else:
        batches = iter_shard_pairs(args.shards, size, batch_size=args.batch_size, skipped=skipped,
                                   workers=args.workers, storage_options=storage_options)
    with Progress("embed pairs", "pairs", args.max_pairs, enabled=not args.no_progress) as bar:
        res = evaluate_retrieval(model, tok, bar.wrap(batches, _batch_len), out / "embeddings", ks=args.ks,
                                 block=args.block, device=dev, storage_dtype=args.storage_dtype, amp=args.amp,
                                 max_pairs=args.max_pairs)
    res["model"] = str(args.model)
    res["shards"] = args.shards
    res["reader"] = reader
    if loader is not None:
        st = loader.stats
        res["skipped"] = {"count": st["skipped_total"], "by_reason": st["skipped"],
                          "tar_errors": st.get("tar_errors", [])}
    else:
        res["skipped"] = _skips_summary(skipped)
    rows = []
    for d in ("image_to_text", "text_to_image"):
        row = {"direction": d.replace("_", " ")}
        for k in args.ks:
            row[f"R@{k}"] = res[f"{d}_R@{k}"]
        row["median rank"] = res[f"{d}_median_rank"]
        rows.append(row)
    rows.append({"direction": "chance", **{f"R@{k}": res[f"chance_R@{k}"] for k in args.ks}})
    md = (f"# Retrieval: {args.model}\n\nShards `{args.shards}`, n = {res['n']} pairs, ties: {res['tie_rule']}.\n\n"
          + markdown_table(rows))
    paths = write_report(out, "retrieval", res, md)
    print(md)
    print(f"wrote {paths['json']} and {paths['markdown']}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- zero-shot


def _resolve_task(args):
    task = None
    if args.task:
        task = get_task(args.task) if args.task in BUILTIN_TASKS else load_task_yaml(args.task)
    elif args.dataset in BUILTIN_TASKS:
        task = get_task(args.dataset)
    spec = args.dataset or (task.data if task is not None else None)
    if spec is None:
        raise ConfigError("give --dataset SPEC (or a --task YAML with a 'data' entry)")
    return task, spec


def _predictions_csv(ds, indices, res, classes) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["sample", "label", "prediction", *[f"p({c})" for c in classes]])
    labels = ds.labels() if getattr(ds, "labelled", True) else None
    for row, i in enumerate(indices):
        lab = classes[int(labels[i])] if labels is not None else ""
        w.writerow([ds.name_of(i), lab, classes[int(res["pred"][row])],
                    *[f"{p:.6f}" for p in res["probs"][row]]])
    return buf.getvalue().encode("utf-8")


def run_zeroshot(args: argparse.Namespace) -> int:
    # start-up cost: `bmclip --help` imports no torch or numpy
    import numpy as np

    from bmclip.eval.batching import iterate_batches
    from bmclip.eval.datasets import open_dataset
    from bmclip.eval.embed import model_image_size
    from bmclip.eval.zeroshot import save_confusion_png, zeroshot_classify

    task, spec = _resolve_task(args)
    ds = open_dataset(spec, data_root=args.data_root, split=args.split, task=task)
    labelled = getattr(ds, "labelled", True)
    if task is None:
        if not labelled:
            raise ConfigError(f"{spec} has no class folders: give the classes with --task (YAML or built-in name)")
        # No prompts given: the class (folder) names themselves are the prompts.
        task = TaskSpec(name=Path(spec).name, classes=tuple(ds.classes), templates=("{}",))
    model, tok, _ = _load(args)
    idx = range(len(ds))
    if args.max_samples is not None and args.max_samples < len(ds):
        idx = sorted(np.random.default_rng(0).choice(len(ds), args.max_samples, replace=False).tolist())
    seen: list[int] = []

    def tap(batches):
        for b in batches:
            seen.extend(int(i) for i in b["index"])
            yield b

    batches = iterate_batches(ds, model_image_size(model), batch_size=args.batch_size, workers=args.workers,
                              indices=idx)
    with Progress("embed images", "img", len(idx), enabled=not args.no_progress) as bar:
        res = zeroshot_classify(model, tok, bar.wrap(tap(batches), _batch_len), list(task.classes),
                                list(task.templates), amp=args.amp)
    out = _out_dir(args, f"zeroshot_{task.name}")
    classes = list(task.classes)
    pred_csv = out / "predictions.csv"
    atomic_write_bytes(_predictions_csv(ds, seen, res, classes), pred_csv)
    result: dict[str, Any] = {"model": str(args.model), "task": task.name, "dataset": spec, "classes": classes,
                              "templates": list(task.templates), "skipped": _skips_summary(ds.skipped),
                              "predictions_csv": str(pred_csv)}
    head = (f"# Zero-shot {task.name}: {args.model}\n\nDataset `{spec}`; templates: "
            + "; ".join(f"`{t}`" for t in task.templates))
    if not labelled:
        counts = np.bincount(res["pred"], minlength=len(classes))
        result.update(n=len(seen), predicted_counts=dict(zip(classes, counts.tolist())))
        md = (head + f". Unlabelled data: predictions only ({len(seen)} images).\n\n"
              + markdown_table([{"sample": Path(ds.name_of(i)).name, "prediction": classes[int(p)],
                                 "probability": float(res["probs"][r].max())}
                                for r, (i, p) in enumerate(zip(seen[:50], res["pred"][:50]))])
              + (f"\n(first 50 of {len(seen)}; all in `predictions.csv`)\n" if len(seen) > 50 else ""))
        paths = write_report(out, "zeroshot", result, md)
        print(md)
        print(f"wrote {paths['json']}, {paths['markdown']} and {pred_csv}", file=sys.stderr)
        return 0
    m = res["metrics"]
    png = save_confusion_png(np.array(m["confusion_matrix"]), classes, out / "confusion.png",
                             title=f"{task.name} zero-shot")
    result.update(headline_metric=task.metric, headline=m.get(task.metric), metrics=m, confusion_png=png)
    keys = ["n", "accuracy", "balanced_accuracy", "auroc", "auroc_ovr_macro", "majority_baseline"]
    md = (head + f"; headline metric: {task.metric}.\n\n"
          + markdown_table([{k: m[k] for k in keys if k in m}])
          + "\nPer-class recall:\n\n"
          + markdown_table([{"class": c, "recall": r, "support": m["support"][c]}
                            for c, r in m["per_class_recall"].items()])
          + f"\nSkipped images: {len(ds.skipped)}. Confusion matrix: `{Path(png).name}`.\n")
    paths = write_report(out, "zeroshot", result, md)
    print(md)
    print(f"wrote {paths['json']}, {paths['markdown']}, {png} and {pred_csv}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- linear probe


def run_linear_probe(args: argparse.Namespace) -> int:
    # start-up cost: `bmclip --help` imports no torch
    from bmclip.eval.batching import iterate_batches
    from bmclip.eval.datasets import open_dataset
    from bmclip.eval.embed import embed_image_batches, model_image_size
    from bmclip.eval.linear_probe import DEFAULT_L2_GRID, linear_probe

    train = open_dataset(args.train, data_root=args.data_root, split="train")
    test = open_dataset(args.test, data_root=args.data_root, split="test")
    if list(train.classes) != list(test.classes):
        raise DataError(f"train classes {train.classes} differ from test classes {test.classes}")
    model, _, dev = _load(args)
    size = model_image_size(model)
    feats = {}
    for name, ds in (("train", train), ("test", test)):
        with Progress(f"embed {name} images", "img", len(ds), enabled=not args.no_progress) as bar:
            batches = iterate_batches(ds, size, args.batch_size, args.workers)
            x, y = embed_image_batches(model, bar.wrap(batches, _batch_len), amp=args.amp)
        feats[name] = (x, y)
    res = linear_probe(feats["train"][0], feats["train"][1], feats["test"][0], feats["test"][1],
                       n_classes=len(train.classes), fractions=args.fraction, seeds=list(range(args.seeds)),
                       l2_grid=args.l2 or DEFAULT_L2_GRID, val_fraction=args.val_fraction,
                       class_names=train.classes, device=dev)
    res.update(model=str(args.model), train=args.train, test=args.test, classes=list(train.classes),
               skipped={"train": _skips_summary(train.skipped), "test": _skips_summary(test.skipped)})
    rows = []
    for f, s in res["fractions"].items():
        row = {"fraction": f, "n_train": s["n_train"], "accuracy": s["accuracy_mean"], "± (sd)": s["accuracy_std"],
               "balanced acc": s["balanced_accuracy_mean"]}
        if "auroc_mean" in s:
            row["AUROC"] = s["auroc_mean"]
        row["l2 chosen"] = ", ".join(f"{r['l2']:g}" for r in s["runs"])
        rows.append(row)
    md = (f"# Linear probe: {args.model}\n\ntrain `{args.train}` ({res['n_train']}), test `{args.test}` "
          f"({res['n_test']}), {args.seeds} seeds per fraction.\n\n" + markdown_table(rows))
    out = _out_dir(args, "linear_probe")
    paths = write_report(out, "linear_probe", res, md)
    print(md)
    print(f"wrote {paths['json']} and {paths['markdown']}", file=sys.stderr)
    return 0
