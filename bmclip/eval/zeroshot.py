"""Zero-shot classification: prompt-ensembled class embeddings, metrics (accuracy, balanced accuracy,
AUROC, per-class recall, confusion matrix) and a confusion-matrix PNG.

Class embedding = normalise(mean_t normalise(encode_text(template_t.format(class)))) (CLIP's prompt
ensembling). Image scores are cosine similarities times the model's logit scale (softmax gives the
probabilities; the argmax, and hence accuracy, does not depend on the scale).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from bmclip.errors import ConfigError, DataError, check_int
from bmclip.eval.embed import embed_image_batches, encode_texts
from bmclip.eval.prompts import check_template
from bmclip.io import atomic_write_bytes

# ---------------------------------------------------------------- metrics (numpy only)


def auroc(y_true: Any, score: Any) -> float:
    """Binary AUROC = Mann-Whitney U / (n1 n0), mid-ranks for ties; y (N,) in {0,1}, score (N,); NaN if one class."""
    y = np.asarray(y_true).astype(bool).reshape(-1)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    if len(y) != len(s):
        raise DataError(f"{len(y)} labels but {len(s)} scores")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # Mid-ranks: every member of a run of equal scores gets the mean of the run's 1-based positions,
    # which makes a tied (positive, negative) pair count 1/2.
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = true class, columns = predicted class."""
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if len(y) != len(p):
        raise DataError(f"{len(y)} labels but {len(p)} predictions")
    for name, v in (("label", y), ("prediction", p)):
        if len(v) and (v.min() < 0 or v.max() >= n_classes):
            raise DataError(f"{name} out of range [0, {n_classes})")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y, p), 1)
    return cm


def classification_metrics(y_true: Any, scores: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics from labels (N,) and class scores (N, C; logits: zero-shot's scaled cosines, the linear probe's
    outputs): accuracy, balanced accuracy, per-class recall, confusion matrix, AUROC (binary: score of class 1
    minus class 0, the order of softmax p(1); multi-class: macro one-vs-rest on the softmax probabilities, as
    scikit-learn's ``roc_auc_score(y, probs, multi_class="ovr")`` and the run's ``predictions.csv`` give it).

    Balanced accuracy averages recall over the classes that occur in ``y_true``.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    if s.ndim != 2 or len(s) != len(y):
        raise DataError(f"scores must be (N, C) with N = {len(y)}, got {s.shape}")
    if len(y) == 0:
        raise DataError("no samples to score")
    c = s.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ConfigError(f"{len(names)} class names for {c} score columns")
    pred = s.argmax(axis=1)
    cm = confusion_matrix(y, pred, c)
    support = cm.sum(axis=1)
    recall = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    present = support > 0
    out: dict[str, Any] = {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.nanmean(recall[present])),
        "per_class_recall": {names[i]: (float(recall[i]) if present[i] else None) for i in range(c)},
        "support": {names[i]: int(support[i]) for i in range(c)},
        "confusion_matrix": cm.tolist(),
        "class_names": names,
        "majority_baseline": float(support.max() / len(y)),
    }
    if c == 2:
        out["auroc"] = auroc(y == 1, s[:, 1] - s[:, 0])
    else:
        # class k's column of the probabilities ranks the images differently from its raw score column (the
        # softmax divides by every class's score): one-vs-rest AUROC is defined on the probabilities
        z = s - s.max(axis=1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        per = [auroc(y == k, prob[:, k]) for k in range(c) if present[k] and (~(y == k)).any()]
        out["auroc_ovr_macro"] = float(np.mean(per)) if per else float("nan")
    return out


# The figure is bounded whatever the class count: counts are written in the cells only up to
# CONFUSION_TEXT_MAX_CLASSES classes, and no PNG is drawn beyond CONFUSION_PNG_MAX_CLASSES (the JSON and
# CSV reports keep the full matrix; a 100 x 100 picture is already a heat map, not something to read).
CONFUSION_TEXT_MAX_CLASSES = 30
CONFUSION_PNG_MAX_CLASSES = 100
_CONFUSION_MAX_INCHES = 12.0
_CONFUSION_DPI = 110


def save_confusion_png(cm: Any, class_names: Sequence[str], path: str | os.PathLike, title: str = "") -> str:
    """Render a confusion matrix (rows true, columns predicted; counts and row-normalised colour) to PNG.

    At most ``CONFUSION_PNG_MAX_CLASSES`` classes (more: ConfigError); the figure is at most 12 inches at
    110 dpi, and cells carry their counts only up to ``CONFUSION_TEXT_MAX_CLASSES`` classes.
    """
    cm = np.asarray(cm)
    c = len(class_names)
    if c > CONFUSION_PNG_MAX_CLASSES:
        raise ConfigError(f"confusion PNG: {c} classes is more than {CONFUSION_PNG_MAX_CLASSES} "
                          "(the matrix is in the JSON report)")
    if cm.shape != (c, c):
        raise DataError(f"confusion matrix must be ({c}, {c}) for {c} class names, got {cm.shape}")
    # matplotlib is imported only when a figure is drawn (start-up cost); Agg renders without a display.
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # after matplotlib.use("Agg"): no display is needed

    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = min(_CONFUSION_MAX_INCHES, max(4.0, 0.9 * c + 2.5))
    tick_font = min(8.0, max(3.0, 400.0 / c))  # about 60% of a cell's height on the 12-inch figure
    labels = [n if len(n) <= 24 else n[:23] + "\u2026" for n in map(str, class_names)]
    fig = Figure(figsize=(size, size * 0.9))
    ax = fig.subplots()
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues", interpolation="nearest")
    ax.set_xticks(range(c), labels=labels, rotation=35 if c <= 12 else 90, ha="right" if c <= 12 else "center",
                  fontsize=tick_font)
    ax.set_yticks(range(c), labels=labels, fontsize=tick_font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= CONFUSION_TEXT_MAX_CLASSES:
        cell_font = min(8.0, max(4.0, 240.0 / c))
        for i in range(c):
            for j in range(c):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                        color="white" if norm[i, j] > 0.5 else "black", fontsize=cell_font)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_CONFUSION_DPI)
    atomic_write_bytes(buf.getvalue(), path)
    return str(path)


# ---------------------------------------------------------------- zero-shot with a model


def class_embeddings(model: Any, tokenizer: Any, classnames: Sequence[str], templates: Sequence[str],
                     amp: bool = False, synonyms: Mapping[str, Sequence[str]] | None = None):
    """(C, D) float32 unit-norm class embeddings: per class, mean of normalised prompt embeddings, renormalised.

    A class's prompts are every template filled with each of its names: the class name itself, or the
    list ``synonyms[classname]`` when given (a prompt ensemble over names, as CLIP-style evaluations do).
    """
    if len(classnames) < 2:
        raise ConfigError("zero-shot classification needs at least 2 classes")
    if not templates:
        raise ConfigError("zero-shot classification needs at least one template")
    for t in templates:
        check_template(t)
    synonyms = synonyms or {}
    names = [list(synonyms.get(c, [c])) for c in classnames]
    if any(not n for n in names):
        raise ConfigError("every class needs at least one name in synonyms")
    texts = [t.format(n) for ns in names for n in ns for t in templates]
    e = torch.nn.functional.normalize(encode_texts(model, tokenizer, texts), dim=-1)
    out, start = [], 0
    for ns in names:
        count = len(ns) * len(templates)
        out.append(e[start : start + count].mean(dim=0))
        start += count
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def _logit_scale(model: Any) -> float:
    ls = getattr(model, "logit_scale", None)
    if ls is None:
        return 100.0  # CLIP's clamp value; only affects probabilities, not predictions
    return float(ls.detach().exp().clamp(max=100.0)) if hasattr(ls, "detach") else float(np.exp(ls))


def _image_batches(images_or_loader: Any, batch_size: int) -> Iterable[Any]:
    """Normalise the accepted inputs into an iterable of batches (dict or bare image batch)."""
    x = images_or_loader
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], Image.Image):
        for s in range(0, len(images_or_loader), batch_size):
            yield list(images_or_loader[s : s + batch_size])
        return
    if isinstance(images_or_loader, np.ndarray) or hasattr(images_or_loader, "dtype"):
        for s in range(0, len(images_or_loader), batch_size):
            yield images_or_loader[s : s + batch_size]
        return
    yield from images_or_loader


def zeroshot_classify(
    model: Any,
    tokenizer: Any,
    images_or_loader: Any,
    classnames: Sequence[str],
    templates: Sequence[str] = ("{}",),
    labels: Any = None,
    batch_size: int = 64,
    amp: bool = False,
    synonyms: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Classify images zero-shot. Returns {"pred" (N,), "probs" (N, C), "scores" (N, C)} + metrics if labels given.

    ``images_or_loader``: a list of PIL images, a uint8 NHWC array at the model's size, or an iterable of
    batches (dicts with "image" and optional "label", e.g. ``bmclip.eval.batching.iterate_batches`` or ShardLoader).
    Labels come from ``labels`` or from the batches' "label" entries. ``synonyms`` maps a class name to
    several names whose prompts are averaged into that class's embedding (see ``class_embeddings``).
    """
    batch_size = check_int(batch_size, "batch_size", 1)
    was_training = model.training
    model.eval()
    try:
        w = class_embeddings(model, tokenizer, classnames, templates, amp=amp, synonyms=synonyms)
        feats, batch_labels = embed_image_batches(model, _image_batches(images_or_loader, batch_size), amp=amp)
    finally:
        model.train(was_training)
    f = torch.nn.functional.normalize(torch.from_numpy(feats), dim=-1)
    cos = (f @ w.cpu().T).double().numpy()
    scores = cos * _logit_scale(model)
    probs = torch.softmax(torch.from_numpy(scores), dim=1).numpy()
    out: dict[str, Any] = {"pred": scores.argmax(axis=1), "probs": probs, "scores": scores}
    y = labels if labels is not None else batch_labels
    if y is not None:
        y = np.asarray(y, dtype=np.int64).reshape(-1)
        if len(y) != len(scores):
            raise DataError(f"{len(scores)} images but {len(y)} labels")
        out["metrics"] = classification_metrics(y, scores, classnames)
    return out
