"""``bmclip eval retrieval|zeroshot|linear-probe``: evaluation of a bmclip checkpoint or open_clip folder.

Every command writes ``<out>/<name>.json`` (all numbers) and ``<out>/<name>.md`` (tables), atomically,
with its other files (zeroshot: predictions.csv, confusion.png; retrieval: embeddings/) as one set: the
previous run's files of that command are replaced together, and the JSON report is written last, so a
JSON report present means every file beside it is from the same run. A run that fails or is stopped
leaves the folder as it was.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
from pathlib import Path
from typing import Any

from bmclip._ext import load_ext
from bmclip.cli._text import plain_help
from bmclip.errors import ConfigError, DataError
from bmclip.eval.prompts import BUILTIN_TASKS, TaskSpec, get_task, load_task_yaml
from bmclip.eval.report import OutputSet, markdown_table, write_report
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
    r.add_argument("--duplicates", choices=["competitor", "match"], default="competitor",
                   help="a copy of the ground truth elsewhere in the set (identical pixels or caption text): "
                        "competitor = it counts against the ground truth (each pair is its own item), match = it is "
                        "as right as the ground truth (several captions per image, repeated images) [competitor]")
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
    out = Path(args.out) if args.out else Path("eval_out") / default
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    return out


def _check_common(args: argparse.Namespace) -> None:
    """The cheap arguments every command has, checked before anything is read or loaded."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0 (image decoding threads), got {args.workers}")


def _load(args):
    from bmclip.eval.models import load_model  # start-up cost: `bmclip --help` imports no torch

    dev = _device(args.device)
    model, tok = load_model(args.model, device=dev)
    return model, tok, dev


def _batch_len(batch: Any) -> int:
    return len(batch["image"])


_SKIP_KIND = re.compile(r"([a-z]+(?:_[a-z]+)*): ")  # the tar reader's reasons: "<kind>: <details>"


def _skip_reason(name: str, reason: str) -> str:
    """What went wrong in a skip, without which sample it happened to, so that skips of one kind are counted
    together: a tar reader kind ("damaged_tar_sample", "truncated", ...) as is; otherwise the reason with the
    sample's name (path or key), quoted values, object addresses and numbers taken out (e.g. "cannot read
    image: cannot identify image file", "corrupt png: cannot identify image file", "no cls member")."""
    m = _SKIP_KIND.match(reason)
    if m:
        return m.group(1)
    text = reason
    if name:
        text = re.sub(r"(?<![\w/.-])['\"]?" + re.escape(name) + r"(?:\.\w+)?['\"]?(?![\w/.-])", "", text)
    text = re.sub(r"<[^<>]*\bat 0x[0-9a-fA-F]+>|\bb?'[^']*'|\"[^\"]*\"", "", text)
    text = re.sub(r"[0-9]+", "N", text)
    text = re.sub(r"^sample\s*:", "", " ".join(text.split()).replace(" :", ":"))
    return text.strip(" :")[:100] or "unspecified"


def _skips_summary(skipped: list) -> dict[str, Any]:
    reasons: dict[str, int] = {}
    for name, r in skipped:
        key = _skip_reason(str(name), str(r))
        reasons[key] = reasons.get(key, 0) + 1
    return {"count": len(skipped), "by_reason": reasons, "examples": [list(s) for s in skipped[:20]]}


# ---------------------------------------------------------------- retrieval


def run_retrieval(args: argparse.Namespace) -> int:
    # start-up cost: `bmclip --help` imports no torch
    from bmclip.data.loader import ShardLoader
    from bmclip.eval.batching import iter_shard_pairs
    from bmclip.eval.embed import model_image_size
    from bmclip.eval.retrieval import evaluate_retrieval

    _check_common(args)
    if not args.ks or any(k < 1 for k in args.ks):
        raise ConfigError(f"--ks must be integers >= 1, got {args.ks}")
    if args.block < 1:
        raise ConfigError(f"--block must be >= 1, got {args.block}")
    if args.max_pairs is not None and args.max_pairs < 1:
        raise ConfigError(f"max_pairs must be an integer >= 1, got {args.max_pairs}")
    storage_options = parse_storage_options(args.storage_option)
    out = _out_dir(args, "retrieval")
    reader = args.reader
    if reader == "auto":
        try:
            load_ext()  # the loader needs the compiled extension; auto picks it only if it loads
            reader = "loader"
        except ImportError:
            reader = "python"
    if reader == "loader" and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1 with the loader reader (its decode threads), got {args.workers}")
    model, tok, dev = _load(args)
    size = model_image_size(model)
    skipped: list = []
    loader = None
    if reader == "loader":
        loader = ShardLoader(args.shards, batch_size=args.batch_size, image_size=size, augment="center",
                             shuffle=False, num_threads=args.workers, storage_options=storage_options)
        batches = loader
    else:
        batches = iter_shard_pairs(args.shards, size, batch_size=args.batch_size, skipped=skipped,
                                   workers=args.workers, storage_options=storage_options)
    emb = ("embeddings/image_emb.npy", "embeddings/text_emb.npy")
    with OutputSet(out, "retrieval", owned=emb) as outputs:
        with Progress("embed pairs", "pairs", args.max_pairs, enabled=not args.no_progress) as bar:
            res = evaluate_retrieval(model, tok, bar.wrap(batches, _batch_len), outputs.stage("embeddings"),
                                     ks=args.ks, block=args.block, device=dev, storage_dtype=args.storage_dtype,
                                     amp=args.amp, max_pairs=args.max_pairs, duplicates=args.duplicates)
        res["embeddings"].update(image=str(outputs.final(emb[0])), text=str(outputs.final(emb[1])))
        res, md = _retrieval_report(args, res, reader, loader, skipped)
        paths = outputs.commit(res, md)
    print(md)
    print(f"wrote {paths['json']}, {paths['markdown']} and {out / 'embeddings'}", file=sys.stderr)
    return 0


def _retrieval_report(args, res, reader, loader, skipped):
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
    di, dt = res["duplicate_images"], res["duplicate_texts"]
    dup = ""
    if di or dt:
        rule = ("count against the ground truth (--duplicates=match counts them as right answers)"
                if res["duplicates"] == "competitor" else "count as right answers (--duplicates=match)")
        dup = (f" {di} image(s) and {dt} caption(s) repeat an earlier one (identical pixels / text); such copies of "
               f"a ground truth {rule}.")
    md = (f"# Retrieval: {args.model}\n\nShards `{args.shards}`, n = {res['n']} pairs, ties: {res['tie_rule']}.{dup}"
          "\n\n" + markdown_table(rows))
    return res, md


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
    from bmclip.eval.zeroshot import CONFUSION_PNG_MAX_CLASSES, save_confusion_png, zeroshot_classify

    _check_common(args)
    if args.max_samples is not None and args.max_samples < 1:
        raise ConfigError(f"--max-samples must be >= 1, got {args.max_samples}")
    task, spec = _resolve_task(args)
    ds = open_dataset(spec, data_root=args.data_root, split=args.split, task=task)
    labelled = getattr(ds, "labelled", True)
    if task is None:
        if not labelled:
            raise ConfigError(f"{spec} has no class folders: give the classes with --task (YAML or built-in name)")
        # No prompts given: the class (folder) names themselves are the prompts.
        task = TaskSpec(name=Path(spec).name, classes=tuple(ds.classes), templates=("{}",))
    out = _out_dir(args, f"zeroshot_{task.name}")
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
    classes = list(task.classes)
    with OutputSet(out, "zeroshot", owned=["predictions.csv", "confusion.png"]) as outputs:
        pred_csv = outputs.final("predictions.csv")
        atomic_write_bytes(_predictions_csv(ds, seen, res, classes), outputs.stage("predictions.csv"))
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
            paths = outputs.commit(result, md)
            print(md)
            print(f"wrote {paths['json']}, {paths['markdown']} and {pred_csv}", file=sys.stderr)
            return 0
        m = res["metrics"]
        if len(classes) <= CONFUSION_PNG_MAX_CLASSES:
            save_confusion_png(np.array(m["confusion_matrix"]), classes, outputs.stage("confusion.png"),
                               title=f"{task.name} zero-shot")
            png: str | None = str(outputs.final("confusion.png"))
            png_note = f"Confusion matrix: `{Path(png).name}`."
        else:
            png = None
            png_note = (f"Confusion matrix: not drawn for {len(classes)} classes (more than "
                        f"{CONFUSION_PNG_MAX_CLASSES}); the full matrix is in `zeroshot.json`.")
        result.update(headline_metric=task.metric, headline=m.get(task.metric), metrics=m, confusion_png=png)
        if png is None:
            result["confusion_png_note"] = png_note
        keys = ["n", "accuracy", "balanced_accuracy", "auroc", "auroc_ovr_macro", "majority_baseline"]
        md = (head + f"; headline metric: {task.metric}.\n\n"
              + markdown_table([{k: m[k] for k in keys if k in m}])
              + "\nPer-class recall:\n\n"
              + markdown_table([{"class": c, "recall": r, "support": m["support"][c]}
                                for c, r in m["per_class_recall"].items()])
              + f"\nSkipped images: {len(ds.skipped)}. {png_note}\n")
        paths = outputs.commit(result, md)
    print(md)
    print(f"wrote {paths['json']}, {paths['markdown']}, {png or 'no confusion PNG'} and {pred_csv}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- linear probe


def _check_linear_probe_args(args: argparse.Namespace) -> None:
    """The linear probe's numeric arguments, before any dataset is read or model loaded."""
    for f in args.fraction:
        if not (math.isfinite(f) and 0 < f <= 1):
            raise ConfigError(f"--fraction values must be in (0, 1], got {f}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1 (seeds per fraction), got {args.seeds}")
    if not (math.isfinite(args.val_fraction) and 0 < args.val_fraction < 1):
        raise ConfigError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    for v in args.l2 or ():
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"--l2 values must be finite and >= 0, got {v}")


def run_linear_probe(args: argparse.Namespace) -> int:
    # start-up cost: `bmclip --help` imports no torch
    import numpy as np

    from bmclip.eval.batching import iterate_batches
    from bmclip.eval.datasets import open_dataset
    from bmclip.eval.embed import embed_image_batches, model_image_size
    from bmclip.eval.linear_probe import DEFAULT_L2_GRID, linear_probe

    _check_common(args)
    _check_linear_probe_args(args)
    out = _out_dir(args, "linear_probe")
    train = open_dataset(args.train, data_root=args.data_root, split="train")
    test = open_dataset(args.test, data_root=args.data_root, split="test")
    for flag, spec, ds in (("--train", args.train, train), ("--test", args.test, test)):
        if not getattr(ds, "labelled", True):
            raise ConfigError(f"{flag} {spec}: unlabelled images (no class folders or labels); the linear probe "
                              "needs labelled data")
    classes = list(train.classes)
    # The test set may lack some training classes; its label indices are mapped onto the training classes.
    unknown = [c for c in test.classes if c not in classes]
    if unknown:
        raise DataError(f"test classes {unknown} do not occur in the training set (train classes {classes})")
    test_to_train = np.array([classes.index(c) for c in test.classes], dtype=np.int64)
    model, _, dev = _load(args)
    size = model_image_size(model)
    feats = {}
    for name, ds in (("train", train), ("test", test)):
        with Progress(f"embed {name} images", "img", len(ds), enabled=not args.no_progress) as bar:
            batches = iterate_batches(ds, size, args.batch_size, args.workers)
            x, y = embed_image_batches(model, bar.wrap(batches, _batch_len), amp=args.amp)
        feats[name] = (x, y)
    y_test = test_to_train[np.asarray(feats["test"][1], dtype=np.int64)]
    res = linear_probe(feats["train"][0], feats["train"][1], feats["test"][0], y_test,
                       n_classes=len(classes), fractions=args.fraction, seeds=list(range(args.seeds)),
                       l2_grid=args.l2 or DEFAULT_L2_GRID, val_fraction=args.val_fraction,
                       class_names=classes, device=dev)
    res.update(model=str(args.model), train=args.train, test=args.test, classes=classes,
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
    paths = write_report(out, "linear_probe", res, md)
    print(md)
    print(f"wrote {paths['json']} and {paths['markdown']}", file=sys.stderr)
    return 0
