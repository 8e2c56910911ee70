"""Linear probe on frozen features: multinomial logistic regression (torch L-BFGS, float64) with the L2
strength chosen on a validation split carved from the training subset, over label fractions and seeds.

Protocol per (fraction, seed): a stratified subsample of ``fraction`` of the training set (at least one
per class); a stratified validation split of it (``val_fraction``, classes with a single example stay in
training); fit each L2 value of the grid on the rest, pick the best validation accuracy (ties -> the
stronger regularisation); refit on the whole subsample with it; score the test set. Features are
standardised with the subsample's mean/std (improves L-BFGS conditioning; a linear model's capacity is
unchanged). Mean and standard deviation (ddof=0) over seeds are reported per fraction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bmclip.errors import ConfigError, DataError
from bmclip.eval.zeroshot import classification_metrics

DEFAULT_L2_GRID = tuple(float(v) for v in np.logspace(-6, 1, 8))
DEFAULT_L2_WHEN_NO_VAL = 1e-3


def fit_logistic_regression(X: Any, y: Any, n_classes: int, l2: float, max_iter: int = 200,
                            init: tuple[Any, Any] | None = None, device: str = "cpu", tol: float = 1e-7):
    """Minimise mean cross-entropy(X W + b, y) + l2 * ||W||_F^2 (bias unpenalised); X (N, D), y (N,) int.

    Returns (W (D, C), b (C,)) float64 torch tensors on ``device``.
    """
    if not (math.isfinite(l2) and l2 >= 0):
        raise ConfigError(f"l2 must be finite and >= 0, got {l2}")
    x = torch.as_tensor(np.asarray(X), dtype=torch.float64, device=device)
    t = torch.as_tensor(np.asarray(y), dtype=torch.int64, device=device)
    if x.ndim != 2 or len(x) != len(t):
        raise DataError(f"X must be (N, D) with N = len(y); got {tuple(x.shape)} and {len(t)}")
    if len(t) and (t.min() < 0 or t.max() >= n_classes):
        raise DataError(f"labels must be in [0, {n_classes})")
    if init is not None:
        w = init[0].detach().clone().to(device).requires_grad_(True)
        b = init[1].detach().clone().to(device).requires_grad_(True)
    else:
        w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, device=device, requires_grad=True)
        b = torch.zeros(n_classes, dtype=torch.float64, device=device, requires_grad=True)
    # Gradient tolerance 1e-7 on a mean loss is far below anything that changes a prediction.
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, t) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with _few_threads_if_small(x):
        opt.step(closure)
    return w.detach(), b.detach()


class _few_threads_if_small:
    """Run small CPU fits single-threaded: each L-BFGS step is a few tiny ops, where intra-op thread
    wake-ups cost more than the work (20x slower on a busy 2-core box). Restores the setting after."""

    def __init__(self, x):
        self.active = x.device.type == "cpu" and x.numel() < 4_000_000

    def __enter__(self):
        if self.active:
            self.prev = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.prev)


def _predict(X, w, b):
    x = torch.as_tensor(np.asarray(X), dtype=torch.float64, device=w.device)
    return (x @ w + b).cpu().numpy()


def stratified_subsample(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a stratified ``fraction`` of ``y`` (at least one per class present), sorted."""
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = max(1, int(round(fraction * len(idx))))
        out.append(rng.choice(idx, size=k, replace=False) if k < len(idx) else idx)
    return np.sort(np.concatenate(out))


def stratified_split(y: np.ndarray, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, val indices) of ``y``: per class round(val_fraction * n) >= 1 to val if n >= 2."""
    fit, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = max(1, int(round(val_fraction * len(idx)))) if len(idx) >= 2 else 0
        val.append(idx[:k])
        fit.append(idx[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def _standardise(train: np.ndarray, *others: np.ndarray):
    mu = train.mean(axis=0)
    sd = train.std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return [(a - mu) / sd for a in (train, *others)]


def linear_probe(
    train_X: Any, train_y: Any, test_X: Any, test_y: Any,
    n_classes: int | None = None,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seeds: Sequence[int] = (0, 1, 2),
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    val_fraction: float = 0.2,
    class_names: Sequence[str] | None = None,
    max_iter: int = 200,
    device: str = "cpu",
) -> dict[str, Any]:
    """Linear-probe results per fraction: {"fractions": {f: {accuracy_mean, accuracy_std, ..., runs: [...]}}}.

    ``train_X`` (N, D) / ``test_X`` (M, D) float features, ``*_y`` int labels.
    """
    Xtr = np.asarray(train_X, dtype=np.float64)
    ytr = np.asarray(train_y, dtype=np.int64).reshape(-1)
    Xte = np.asarray(test_X, dtype=np.float64)
    yte = np.asarray(test_y, dtype=np.int64).reshape(-1)
    if Xtr.ndim != 2 or Xte.ndim != 2 or Xtr.shape[1] != Xte.shape[1]:
        raise DataError(f"features must be (N, D) with the same D; got {Xtr.shape} and {Xte.shape}")
    if len(Xtr) != len(ytr) or len(Xte) != len(yte):
        raise DataError("features and labels differ in length")
    if not np.isfinite(Xtr).all() or not np.isfinite(Xte).all():
        raise DataError("features contain NaN or inf")
    # The cheap arguments first: a bad one is reported before any fit.
    if not l2_grid:
        raise ConfigError("l2_grid is empty")
    for v in l2_grid:
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"l2 values must be finite and >= 0, got {v}")
    if not (math.isfinite(val_fraction) and 0 < val_fraction < 1):
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not fractions:
        raise ConfigError("fractions is empty")
    for f in fractions:
        if not (math.isfinite(f) and 0 < f <= 1):
            raise ConfigError(f"fraction must be in (0, 1], got {f}")
    if not seeds:
        raise ConfigError("seeds is empty: at least one seed per fraction is needed")
    c = int(n_classes if n_classes is not None else max(ytr.max(), yte.max()) + 1)
    if len(np.unique(ytr)) < 2:
        raise DataError("the training set needs at least 2 classes")
    grid = sorted((float(v) for v in l2_grid), reverse=True)  # strong -> weak, warm-started
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    result: dict[str, Any] = {"n_train": int(len(ytr)), "n_test": int(len(yte)), "n_classes": c,
                              "l2_grid": grid, "val_fraction": val_fraction, "fractions": {}}
    for frac in fractions:
        runs = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            sub = stratified_subsample(ytr, float(frac), rng)
            fit_i, val_i = stratified_split(ytr[sub], val_fraction, rng)
            fit_idx, val_idx = sub[fit_i], sub[val_i]
            run: dict[str, Any] = {"seed": int(seed), "n_train": int(len(sub))}
            if len(val_idx) == 0 or len(np.unique(ytr[fit_idx])) < 2:
                best_l2 = DEFAULT_L2_WHEN_NO_VAL
                run["l2_selection"] = f"no usable validation split; fixed l2={best_l2:g}"
            else:
                xf, xv = _standardise(Xtr[fit_idx], Xtr[val_idx])
                best_l2, best_acc, init, val_accs = None, -1.0, None, {}
                for l2 in grid:
                    w, b = fit_logistic_regression(xf, ytr[fit_idx], c, l2, max_iter=max_iter, init=init,
                                                   device=device)
                    init = (w, b)
                    acc = float((_predict(xv, w, b).argmax(1) == ytr[val_idx]).mean())
                    val_accs[f"{l2:g}"] = acc
                    if acc > best_acc:  # strict: ties keep the stronger regularisation seen first
                        best_l2, best_acc = l2, acc
                run["val_accuracy_by_l2"] = val_accs
                run["l2_selection"] = "validation"
            xs, xt = _standardise(Xtr[sub], Xte)
            w, b = fit_logistic_regression(xs, ytr[sub], c, best_l2, max_iter=max_iter, device=device)
            m = classification_metrics(yte, _predict(xt, w, b), names)
            run.update(l2=best_l2, accuracy=m["accuracy"], balanced_accuracy=m["balanced_accuracy"])
            if "auroc" in m:
                run["auroc"] = m["auroc"]
            runs.append(run)
        summary: dict[str, Any] = {"n_train": int(np.mean([r["n_train"] for r in runs])), "runs": runs}
        for key in ("accuracy", "balanced_accuracy", "auroc"):
            vals = [r[key] for r in runs if key in r]
            if vals:
                summary[f"{key}_mean"] = float(np.mean(vals))
                summary[f"{key}_std"] = float(np.std(vals))
        result["fractions"][f"{float(frac):g}"] = summary
    return result
