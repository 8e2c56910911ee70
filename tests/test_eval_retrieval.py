"""Retrieval metrics: known answers, blockwise == dense (ties included), streamed .npy writer."""

import numpy as np
import pytest
import torch

from bmclip.errors import DataError
from bmclip.eval.embed import NpyStreamWriter
from bmclip.eval.retrieval import (
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
)


def dense_retrieval_ranks(image_emb: np.ndarray, text_emb: np.ndarray, tie_tol: float = 1e-5, image_groups=None,
                          text_groups=None):
    """Reference ranks from the full (N, N) float64 similarity matrix (the definition, without blocks); with groups,
    a candidate in the ground truth's group is no competitor."""
    a = np.asarray(image_emb, dtype=np.float64)
    b = np.asarray(text_emb, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    s = a @ b.T
    d = np.diag(s).copy()
    ge_rows = s >= (d[:, None] - tie_tol)
    ge_cols = s >= (d[None, :] - tie_tol)
    np.fill_diagonal(ge_rows, False)
    np.fill_diagonal(ge_cols, False)
    n = len(d)
    for i in range(n):
        for j in range(n):
            if text_groups is not None and text_groups[j] == text_groups[i]:
                ge_rows[i, j] = False  # image i: text j is a copy of its ground truth, text i
            if image_groups is not None and image_groups[i] == image_groups[j]:
                ge_cols[i, j] = False  # text j: image i is a copy of its ground truth, image j
    return ge_rows.sum(axis=1), ge_cols.sum(axis=0)


def test_identity_embeddings_give_perfect_recall():
    x = np.eye(50, 64, dtype=np.float32) * 3.0  # unnormalised on purpose
    m = retrieval_metrics(x, x, block=7)
    for d in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            assert m[f"{d}_R@{k}"] == 1.0
        assert m[f"{d}_median_rank"] == 1.0
    assert m["n"] == 50
    assert m["chance_R@1"] == pytest.approx(1 / 50)
    assert m["chance_R@10"] == pytest.approx(10 / 50)


def test_shuffled_pairs_are_near_chance():
    rng = np.random.default_rng(0)
    n, d = 2000, 32
    img = rng.standard_normal((n, d)).astype(np.float32)
    txt = img[rng.permutation(n)] + 0.01 * rng.standard_normal((n, d)).astype(np.float32)
    m = retrieval_metrics(img, txt, block=256)
    # Binomial sd of R@10 at p=0.005, n=2000 is ~0.0016: allow 4 sd around chance.
    for k in (1, 5, 10):
        for dname in ("image_to_text", "text_to_image"):
            assert abs(m[f"{dname}_R@{k}"] - k / n) < 4 * np.sqrt(k / n / n) + 1.5 / n


def test_blockwise_equals_dense_with_ties_and_odd_blocks():
    rng = np.random.default_rng(1)
    n, d = 97, 16
    img = rng.standard_normal((n, d)).astype(np.float32)
    txt = img + 0.8 * rng.standard_normal((n, d)).astype(np.float32)
    # Exact duplicates create ties: text 5 == text 60, image 10 == image 11 == image 90.
    txt[60] = txt[5]
    img[11] = img[10]
    img[90] = img[10]
    ref_i2t, ref_t2i = dense_retrieval_ranks(img, txt)
    for block in (1, 8, 13, 97, 500):
        i2t, t2i = retrieval_ranks(img, txt, block=block)
        np.testing.assert_array_equal(i2t, ref_i2t)
        np.testing.assert_array_equal(t2i, ref_t2i)
    # Pessimistic ties: image 5's ground truth (text 5) has an exact duplicate (text 60) ranked with it.
    assert ref_i2t[5] >= 1 and ref_i2t[60] >= 1


def test_duplicates_as_matches_blockwise_equals_dense():
    """Several captions per image (each image stored once per caption) and repeated captions: with groups, a copy
    of the ground truth is not a competitor. Without them, a COCO-style set of 5 captions per image scores R@1 = 0
    however good the model."""
    from bmclip.eval.retrieval import content_groups, duplicate_count

    rng = np.random.default_rng(3)
    n_img, per, d = 19, 3, 16
    base = rng.standard_normal((n_img, d)).astype(np.float32)
    img = np.repeat(base, per, axis=0)  # image k stored once per caption
    txt = img + 0.3 * rng.standard_normal(img.shape).astype(np.float32)
    txt[7] = txt[40]  # one caption text repeated under another image
    img_keys = np.repeat(np.arange(n_img) * 1000 + 17, per)
    txt_keys = np.arange(len(txt)) * 7 + 1
    txt_keys[7] = txt_keys[40]
    ig, tg = content_groups(img_keys), content_groups(txt_keys)
    assert duplicate_count(img_keys) == n_img * (per - 1) and duplicate_count(txt_keys) == 1
    assert ig[0] == ig[1] == ig[2] != ig[3] and tg[7] == tg[40]
    ref = dense_retrieval_ranks(img, txt, image_groups=ig, text_groups=tg)
    for block in (1, 4, 13, 57, 100):
        got = retrieval_ranks(img, txt, block=block, image_groups=ig, text_groups=tg)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    # text -> image: the copies of the right image tie with it; as competitors they push every rank to >= per - 1
    assert (retrieval_ranks(img, txt)[1] >= per - 1).all()
    assert retrieval_metrics(img, txt, image_groups=ig, text_groups=tg)["text_to_image_R@1"] > 0.9
    assert retrieval_metrics(img, txt)["text_to_image_R@1"] == 0.0
    with pytest.raises(DataError, match=r"image_groups must have one id per pair, shape \(57,\)"):
        retrieval_ranks(img, txt, image_groups=ig[:-1])


def test_hand_checked_ranks():
    # Image 0 vs texts: t0=1 (gt), t1=.6, t2=.8 -> rank 0. Image 1: t1=.6 (gt) beaten by t0=1, t2=.8 -> 2.
    # Image 2 = (0, 1): t2=.6 (gt) beaten by t1=.8 -> 1.
    img = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    txt = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]], dtype=np.float32)
    i2t, t2i = retrieval_ranks(img, txt, block=2)
    assert i2t.tolist() == [0, 2, 1]
    # Text 0 vs images: i0=1, i1=1 (tie -> counts against), i2=0 -> rank 1.
    # Text 1: i0=.6, i1=.6 (gt), i2=.8 -> rank 2 (i0 ties, i2 beats). Text 2: i0=.8, i1=.8, i2=.6 (gt) -> 2.
    assert t2i.tolist() == [1, 2, 2]
    m = metrics_from_ranks(i2t, t2i, ks=(1, 2))
    assert m["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert m["text_to_image_R@2"] == pytest.approx(1 / 3)


def test_collapsed_model_scores_zero():
    x = np.ones((20, 8), dtype=np.float32)
    m = retrieval_metrics(x, x)
    assert m["image_to_text_R@10"] == 0.0


def test_torch_float16_memmap_inputs(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    w = NpyStreamWriter(tmp_path / "e.npy", 24, "float16")
    for s in range(0, 300, 64):
        w.append(torch.from_numpy(x[s : s + 64]))
    path = w.close()
    mm = np.load(path, mmap_mode="r")
    assert mm.shape == (300, 24) and mm.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(mm), x.astype(np.float16))
    assert [q.name for q in tmp_path.iterdir()] == ["e.npy"]  # no temporary file left beside it
    m = retrieval_metrics(mm, torch.from_numpy(x), block=50)
    assert m["image_to_text_R@1"] == 1.0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(DataError, match="same shape"):
        retrieval_metrics(np.ones((3, 4)), np.ones((4, 4)))
    z = np.eye(4, dtype=np.float32)
    z[2] = 0
    with pytest.raises(DataError, match="row 2 is all zeros"):
        retrieval_metrics(z, np.eye(4))
    n = np.eye(4, dtype=np.float32)
    n[1, 1] = np.nan
    with pytest.raises(DataError, match="row 1"):
        retrieval_metrics(np.eye(4), n)
    with pytest.raises(DataError, match="N = 0"):
        retrieval_metrics(np.zeros((0, 4)), np.zeros((0, 4)))


def test_writer_abort_leaves_nothing(tmp_path):
    w = NpyStreamWriter(tmp_path / "x.npy", 4)
    w.append(np.ones((2, 4)))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_inputs_requiring_grad_are_fine():
    x = torch.randn(30, 8, requires_grad=True)
    m = retrieval_metrics(x, x * 2, block=7)
    assert m["image_to_text_R@1"] == 1.0
