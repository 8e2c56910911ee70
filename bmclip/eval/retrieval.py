"""Image<->text retrieval: Recall@K in both directions, computed block by block.

Definitions (used everywhere in bmclip, including the trainer's validation):

- Pair ``i`` is (image ``i``, text ``i``). Its ground truth is index ``i`` only: a duplicate caption
  or image elsewhere in the set is a *different* item and counts as a competitor (``duplicates="competitor"``,
  the default). With ``duplicates="match"`` (groups of identical content: the same pixels, the same caption
  text) a candidate identical to the ground truth is not a competitor: it is as good an answer. The report
  counts the duplicates either way.
- Similarity is the cosine (both sides are L2-normalised here, so raw embeddings are fine).
- The rank of a query is the number of *other* candidates whose similarity is ``>= s_ii - tie_tol``.
  Ties are therefore resolved pessimistically (a candidate scoring the same as the ground truth is
  ranked above it), so a collapsed model whose embeddings are all equal scores Recall@K = 0, not 1,
  and the result never depends on sort stability. ``tie_tol`` absorbs float32 rounding differences
  between blocks (identical vectors in different blocks can differ in the last bits).
- Recall@K is the fraction of queries with rank < K. ``chance_R@K`` = min(K, N) / N is the expected
  Recall@K of random scores. Median rank is reported 1-based.

Memory: the normalised embeddings are held once (O(N*D)) and the score matrix only as one
``block x block`` tile at a time (O(block^2)); one pass over the tiles serves both directions because
image->text uses the rows of the tile and text->image its columns.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bmclip.errors import ConfigError, DataError
from bmclip.eval.embed import embed_pairs_to_disk

DEFAULT_KS = (1, 5, 10)


def _load_normalised(x, device, dtype, chunk: int = 65536):
    """Copy (N, D) array-like to ``device`` as L2-normalised ``dtype``, chunk by chunk (memmap friendly)."""
    n, d = x.shape
    out = torch.empty((n, d), dtype=dtype, device=device)
    for s in range(0, n, chunk):
        part = x[s : s + chunk]
        if not isinstance(part, torch.Tensor):
            part = torch.from_numpy(np.array(part))  # copy: memmaps are read-only
        part = part.to(device=device, dtype=dtype)
        if not torch.isfinite(part).all():
            bad = s + int((~torch.isfinite(part)).any(dim=1).nonzero()[0])
            raise DataError(f"embedding row {bad} contains NaN or inf")
        norm = part.norm(dim=1, keepdim=True)
        if (norm == 0).any():
            bad = s + int((norm[:, 0] == 0).nonzero()[0])
            raise DataError(f"embedding row {bad} is all zeros (cosine similarity undefined)")
        out[s : s + chunk] = part / norm
    return out


def retrieval_ranks(
    image_emb: Any,
    text_emb: Any,
    block: int = 4096,
    device: str | None = None,
    tie_tol: float = 1e-5,
    compute_dtype: Any = None,
    image_groups: Any = None,
    text_groups: Any = None,
):
    """0-based ranks of each pair's ground truth: returns (image_to_text (N,), text_to_image (N,)) int64 arrays.

    ``image_emb``/``text_emb``: (N, D) numpy arrays, np.memmap or torch tensors (any float dtype).
    ``image_groups``/``text_groups``: optional (N,) integer ids; a candidate text (image) in the same group as the
    query's ground-truth text (image) is not counted as a competitor (see :func:`content_groups`).
    """
    if block < 1:
        raise ConfigError(f"block must be >= 1, got {block}")
    if tie_tol < 0:
        raise ConfigError(f"tie_tol must be >= 0, got {tie_tol}")
    if not isinstance(image_emb, (np.ndarray, torch.Tensor)):
        image_emb = np.asarray(image_emb)
    if not isinstance(text_emb, (np.ndarray, torch.Tensor)):
        text_emb = np.asarray(text_emb)
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise DataError(
            f"embeddings must be 2-D (N, D); got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    if image_emb.shape != text_emb.shape:
        raise DataError(
            f"image and text embeddings must have the same shape (paired), got "
            f"{tuple(image_emb.shape)} vs {tuple(text_emb.shape)}"
        )
    n = int(image_emb.shape[0])
    if n == 0:
        raise DataError("no pairs to evaluate (N = 0)")
    if device is None:
        device = str(image_emb.device) if isinstance(image_emb, torch.Tensor) else "cpu"
    dtype = compute_dtype or torch.float32
    groups = []
    for name, g in (("image_groups", image_groups), ("text_groups", text_groups)):
        if g is not None:
            g = torch.as_tensor(np.asarray(g, dtype=np.int64), device=device)
            if g.shape != (n,):
                raise DataError(f"{name} must have one id per pair, shape ({n},), got {tuple(g.shape)}")
        groups.append(g)
    img_g, txt_g = groups
    with torch.no_grad():
        img = _load_normalised(image_emb, device, dtype)
        txt = _load_normalised(text_emb, device, dtype)
        # Ground-truth similarity s_ii, accumulated in float64 (chunked: no N x D float64 copy) so the
        # threshold itself is not noisier than the tile entries it is compared with.
        diag = torch.cat([(img[s : s + block].double() * txt[s : s + block].double()).sum(dim=1)
                          for s in range(0, n, block)]).to(dtype) - tie_tol
    i2t = torch.zeros(n, dtype=torch.int64, device=device)
    t2i = torch.zeros(n, dtype=torch.int64, device=device)
    with torch.no_grad():
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            q = img[r0:r1]
            thr_rows = diag[r0:r1, None]
            for c0 in range(0, n, block):
                c1 = min(n, c0 + block)
                tile = q @ txt[c0:c1].T  # (rows, cols) = s[image r, text c]
                ge_row = tile >= thr_rows
                ge_col = tile >= diag[None, c0:c1]
                if r0 < c1 and c0 < r1:
                    # The tile contains part of the diagonal: a pair never competes with itself.
                    lo, hi = max(r0, c0), min(r1, c1)
                    idx = torch.arange(lo, hi, device=device)
                    ge_row[idx - r0, idx - c0] = False
                    ge_col[idx - r0, idx - c0] = False
                if txt_g is not None:  # image r's ground truth is text r: a copy of it is no competitor
                    ge_row &= txt_g[c0:c1][None, :] != txt_g[r0:r1, None]
                if img_g is not None:  # text c's ground truth is image c
                    ge_col &= img_g[r0:r1, None] != img_g[c0:c1][None, :]
                i2t[r0:r1] += ge_row.sum(dim=1)
                t2i[c0:c1] += ge_col.sum(dim=0)
    return i2t.cpu().numpy(), t2i.cpu().numpy()


def metrics_from_ranks(i2t: np.ndarray, t2i: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
    """Recall@K, median/mean rank (1-based) and chance level from 0-based rank arrays (N,)."""
    n = int(len(i2t))
    out: dict[str, Any] = {"n": n}
    for name, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = float(np.mean(ranks < k))
        out[f"{name}_median_rank"] = float(np.median(ranks) + 1)
        out[f"{name}_mean_rank"] = float(np.mean(ranks) + 1)
    for k in ks:
        out[f"chance_R@{k}"] = min(k, n) / n
    out["mean_recall"] = float(
        np.mean([out[f"{d}_R@{k}"] for d in ("image_to_text", "text_to_image") for k in ks])
    )
    return out


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"ks must be positive integers, got {ks}")
    return ks


def content_groups(keys: Any) -> np.ndarray:
    """Group ids (N,) from content keys (N,): equal keys, equal id (e.g. ``embed_pairs_to_disk``'s image_keys)."""
    return np.unique(np.asarray(keys), return_inverse=True)[1].reshape(-1).astype(np.int64)


def duplicate_count(keys: Any) -> int:
    """How many items repeat the content of an earlier one (0: all distinct)."""
    keys = np.asarray(keys)
    return int(len(keys) - len(np.unique(keys)))


DUPLICATE_RULES = ("competitor", "match")


def retrieval_metrics(
    image_emb: Any,
    text_emb: Any,
    ks: Sequence[int] = DEFAULT_KS,
    block: int = 4096,
    device: str | None = None,
    tie_tol: float = 1e-5,
    image_groups: Any = None,
    text_groups: Any = None,
) -> dict[str, Any]:
    """Recall@K both directions for paired (N, D) embeddings; keys ``image_to_text_R@1``..., ``n``, ``chance_R@K``.

    See the module docstring for the ground-truth, duplicate (``image_groups``/``text_groups``) and tie rules.
    Memory O(N*D + block^2).
    """
    ks = _check_ks(ks)
    i2t, t2i = retrieval_ranks(image_emb, text_emb, block=block, device=device, tie_tol=tie_tol,
                               image_groups=image_groups, text_groups=text_groups)
    out = metrics_from_ranks(i2t, t2i, ks)
    out["tie_rule"] = f"pessimistic, tol={tie_tol:g}"
    return out


def evaluate_retrieval(
    model: Any,
    tokenizer: Any,
    batches: Iterable[dict[str, Any]],
    work_dir: str | os.PathLike,
    ks: Sequence[int] = DEFAULT_KS,
    block: int = 4096,
    device: str = "cpu",
    storage_dtype: str = "float16",
    amp: bool = False,
    max_pairs: int | None = None,
    duplicates: str = "competitor",
) -> dict[str, Any]:
    """Embed (image, text) batches to ``work_dir/{image,text}_emb.npy`` (streamed) and compute retrieval metrics.

    ``batches`` yields dicts with "image" (uint8 NHWC at the model's image size, or float NCHW already
    normalised) and "text" (list[str]); the embeddings never live in RAM as a whole during embedding.
    ``duplicates``: "competitor" (a copy of the ground truth elsewhere in the set counts against it) or "match"
    (it counts as the right answer); ``duplicate_images`` / ``duplicate_texts`` in the result say how many items
    repeat an earlier one (identical pixels as read, identical caption text).
    """
    ks = _check_ks(ks)
    if duplicates not in DUPLICATE_RULES:
        raise ConfigError(f"duplicates must be one of {', '.join(DUPLICATE_RULES)}, got {duplicates!r}")
    work = Path(work_dir)
    paths = embed_pairs_to_disk(
        model, tokenizer, batches, work, device=device, storage_dtype=storage_dtype, amp=amp, max_pairs=max_pairs,
        content_keys=True,
    )
    img = np.load(paths["image"], mmap_mode="r")
    txt = np.load(paths["text"], mmap_mode="r")
    groups = {}
    if duplicates == "match":
        groups = {"image_groups": content_groups(paths["image_keys"]),
                  "text_groups": content_groups(paths["text_keys"])}
    out = retrieval_metrics(img, txt, ks=ks, block=block, device=device, **groups)
    out["duplicates"] = duplicates
    out["duplicate_images"] = duplicate_count(paths["image_keys"])
    out["duplicate_texts"] = duplicate_count(paths["text_keys"])
    out["embeddings"] = {"image": str(paths["image"]), "text": str(paths["text"]), "dtype": storage_dtype}
    out["skipped"] = paths.get("skipped", 0)
    return out
