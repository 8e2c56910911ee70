"""Linear probe: L-BFGS logistic regression vs scipy, protocol (fractions/seeds/stratification),
and a sanity run on real images bundled in PyPI packages."""

from pathlib import Path

import numpy as np
import pytest
import torch

from bmclip.errors import ConfigError, DataError
from bmclip.eval.linear_probe import (
    fit_logistic_regression,
    linear_probe,
    stratified_split,
    stratified_subsample,
)


def test_lbfgs_matches_scipy_reference():
    scipy_opt = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    n, d, c, l2 = 120, 6, 3, 0.05
    X = rng.standard_normal((n, d))
    y = rng.integers(0, c, n)

    def obj(theta):
        W = theta[: d * c].reshape(d, c)
        b = theta[d * c :]
        z = X @ W + b
        z = z - z.max(1, keepdims=True)
        lse = np.log(np.exp(z).sum(1))
        p = np.exp(z - lse[:, None])
        loss = np.mean(lse - z[np.arange(n), y]) + l2 * (W * W).sum()
        g = p.copy()
        g[np.arange(n), y] -= 1
        g /= n
        return loss, np.concatenate([(X.T @ g + 2 * l2 * W).ravel(), g.sum(0)])

    ref = scipy_opt.minimize(obj, np.zeros(d * c + c), jac=True, method="L-BFGS-B",
                             options={"maxiter": 5000, "gtol": 1e-12, "ftol": 1e-15})
    w, b = fit_logistic_regression(X, y, c, l2, tol=1e-10)
    ours = obj(np.concatenate([w.numpy().ravel(), b.numpy()]))[0]
    assert ours == pytest.approx(ref.fun, abs=1e-9)
    # W is unique (strictly convex); the unpenalised bias only up to a constant shared by all classes,
    # so compare centred logits.
    Wr = ref.x[: d * c].reshape(d, c)
    br = ref.x[d * c :]
    lo, lr = X @ w.numpy() + b.numpy(), X @ Wr + br
    np.testing.assert_allclose(lo - lo.mean(1, keepdims=True), lr - lr.mean(1, keepdims=True), atol=1e-4)
    np.testing.assert_allclose(w.numpy(), Wr, atol=1e-4)


def test_stratification():
    y = np.array([0] * 90 + [1] * 9 + [2] * 1)
    rng = np.random.default_rng(0)
    sub = stratified_subsample(y, 0.1, rng)
    assert sorted(np.bincount(y[sub]).tolist()) == [1, 1, 9]
    fit, val = stratified_split(y, 0.2, rng)
    assert len(set(fit) & set(val)) == 0 and len(fit) + len(val) == 100
    assert np.bincount(y[val], minlength=3).tolist() == [18, 2, 0]  # single-example class stays in fit


def test_probe_separable_vs_random_labels():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((4, 16)) * 4
    ytr = rng.integers(0, 4, 800)
    yte = rng.integers(0, 4, 400)
    Xtr = centers[ytr] + rng.standard_normal((800, 16))
    Xte = centers[yte] + rng.standard_normal((400, 16))
    r = linear_probe(Xtr, ytr, Xte, yte, fractions=(0.05, 1.0), seeds=(0, 1), l2_grid=(1e-4, 1e-2, 1.0))
    assert set(r["fractions"]) == {"0.05", "1"}
    full = r["fractions"]["1"]
    assert full["accuracy_mean"] > 0.97 and full["n_train"] == 800
    assert len(full["runs"]) == 2 and all(run["l2_selection"] == "validation" for run in full["runs"])
    assert r["fractions"]["0.05"]["n_train"] == pytest.approx(40, abs=2)
    # Labels independent of features: test accuracy near chance (0.25).
    r2 = linear_probe(Xtr, rng.integers(0, 4, 800), Xte, rng.integers(0, 4, 400), fractions=(1.0,), seeds=(0,))
    assert abs(r2["fractions"]["1"]["accuracy_mean"] - 0.25) < 0.1


def test_probe_errors():
    with pytest.raises(DataError, match="same D"):
        linear_probe(np.ones((4, 3)), [0, 1, 0, 1], np.ones((2, 4)), [0, 1])
    with pytest.raises(DataError, match="NaN"):
        linear_probe(np.full((4, 3), np.nan), [0, 1, 0, 1], np.ones((2, 3)), [0, 1])
    with pytest.raises(DataError, match="2 classes"):
        linear_probe(np.ones((4, 3)), [1, 1, 1, 1], np.ones((2, 3)), [0, 1])


@pytest.mark.parametrize("kwargs, msg", [
    ({"l2_grid": [1e-3, float("nan")]}, "l2"),  # before: NaN weights, chance accuracy, no error
    ({"l2_grid": [float("inf")]}, "l2"),
    ({"l2_grid": [-1.0]}, "l2"),
    ({"seeds": []}, "seeds"),  # before: NaN means after all the work
])
def test_probe_refuses_bad_numbers_before_fitting(kwargs, msg, monkeypatch):
    import bmclip.eval.linear_probe as lp

    def no_fit(*a, **k):
        raise AssertionError("fitted before the arguments were checked")

    monkeypatch.setattr(lp, "fit_logistic_regression", no_fit)
    x = np.random.default_rng(0).normal(size=(8, 3))
    with pytest.raises(ConfigError, match=msg):
        linear_probe(x, [0, 1] * 4, x, [0, 1] * 4, **kwargs)


@pytest.mark.parametrize("l2", [float("nan"), float("inf"), -1e-3])
def test_fit_refuses_non_finite_l2(l2):
    with pytest.raises(ConfigError, match="l2 must be finite"):
        fit_logistic_regression(np.ones((4, 2)), [0, 1, 0, 1], 2, l2)


def _real_bundled_images():
    """(name, RGB uint8 array) of real biomedical images shipped inside installed packages."""
    from bmclip.eval.images import load_image

    out = []
    try:
        import skimage.data as sd

        out += [("retina", sd.retina()), ("ihc", sd.immunohistochemistry()),
                ("cell", np.stack([sd.cell()] * 3, -1))]
    except Exception:  # pragma: no cover - skimage missing
        pass
    try:
        import pydicom

        base = Path(pydicom.__file__).parent / "data" / "test_files"
        out += [(n, np.asarray(load_image(base / f"{n}.dcm"))) for n in ("CT_small", "MR_small")]
    except ImportError:  # pragma: no cover
        pass
    return out


@pytest.mark.slow
def test_real_image_probe_with_tiny_model():
    """Sanity run: random 48px crops of 5 real images (retina, IHC, cell, CT, MR); features of the
    (random-init) tiny bmclip model; the probe must tell the sources apart far above chance (0.2)."""
    from PIL import Image

    from bmclip.eval.embed import embed_image_batches
    from bmclip.model import create_model
    from bmclip.model.transforms import resize_center_crop

    imgs = _real_bundled_images()
    if len(imgs) < 4:
        pytest.skip("bundled images not available")
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    size = model.config.vision.image_size
    rng = np.random.default_rng(0)

    def crops(n):
        xs, ys = [], []
        for k, (_, a) in enumerate(imgs):
            h, w = a.shape[:2]
            for _ in range(n):
                s = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
                y0, x0 = rng.integers(0, h - s), rng.integers(0, w - s)
                xs.append(np.asarray(resize_center_crop(Image.fromarray(a[y0 : y0 + s, x0 : x0 + s]), size)))
                ys.append(k)
        return np.stack(xs), np.array(ys)

    xtr, ytr = crops(24)
    xte, yte = crops(12)
    ftr, _ = embed_image_batches(model, [xtr[i : i + 32] for i in range(0, len(xtr), 32)])
    fte, _ = embed_image_batches(model, [xte[i : i + 32] for i in range(0, len(xte), 32)])
    r = linear_probe(ftr, ytr, fte, yte, fractions=(0.25, 1.0), seeds=(0, 1), l2_grid=(1e-3, 1e-1))
    assert r["fractions"]["1"]["accuracy_mean"] > 0.6
