"""Batched embedding of images and texts with a bmclip model, in memory or streamed to ``.npy`` files.

The model contract (``bmclip.model``): ``encode_image(float NCHW normalised) -> (B, D)``,
``encode_text(LongTensor (B, L), pad 0) -> (B, D)`` (both unnormalised), ``config.vision.image_size``.
Images are preprocessed by ``bmclip.model.transforms`` (BiomedCLIP's open_clip val transform): RGB, resize
the shorter side to the model's image size (bicubic), centre crop, scale to [0, 1], normalise with the
model's mean/std.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bmclip.data.images import IMAGE_MEAN, IMAGE_STD
from bmclip.data.normalize import normalize_images
from bmclip.errors import ConfigError, DataError, check_int
from bmclip.io import atomic_writer
from bmclip.model.transforms import resize_center_crop

# ---------------------------------------------------------------- model facts


def model_image_size(model: Any) -> int:
    """The square input size (pixels) the model's image tower expects."""
    try:
        return int(model.config.vision.image_size)
    except AttributeError as e:
        raise ConfigError("model has no config.vision.image_size; cannot preprocess images for it") from e


def model_mean_std(model: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel normalisation (mean, std) for the model: its own attributes if set, else BiomedCLIP's."""
    mean = getattr(model, "image_mean", None)
    std = getattr(model, "image_std", None)
    if mean is None or std is None:
        mean, std = IMAGE_MEAN, IMAGE_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def model_device(model: Any):
    """The device of the model's first parameter (cpu for a parameterless model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ---------------------------------------------------------------- preprocessing


def to_model_input(images: Any, model: Any, device: Any = None):
    """Images -> float32 NCHW normalised tensor on ``device``.

    Accepts a list of PIL images (any size; resized and centre-cropped), a uint8 NHWC array/tensor at
    the model's image size (as the shard loader yields), or a float NCHW tensor (assumed already
    normalised; passed through).
    """
    size = model_image_size(model)
    mean, std = model_mean_std(model)
    if device is None:
        device = model_device(model)
    if isinstance(images, (list, tuple)):
        if not images:
            raise DataError("empty image batch")
        arr = np.stack([np.asarray(resize_center_crop(im, size), dtype=np.uint8) for im in images])
        x = torch.from_numpy(arr)
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, torch.Tensor):
        x = images
    else:
        raise DataError(f"unsupported image batch type {type(images).__name__}")
    if x.dtype.is_floating_point:
        if x.ndim != 4 or x.shape[1] != 3:
            raise DataError(f"float image batch must be NCHW with 3 channels, got {tuple(x.shape)}")
        return x.to(device=device, dtype=torch.float32)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"integer image batch must be uint8 NHWC with 3 channels, got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] != size or x.shape[2] != size:
        raise DataError(f"uint8 image batch is {x.shape[1]}x{x.shape[2]}, model expects {size}x{size}")
    return normalize_images(x, device, mean=IMAGE_MEAN if mean is None else mean, std=IMAGE_STD if std is None else std)


# ---------------------------------------------------------------- encoding


def _autocast(device: Any, amp: bool):
    dev = torch.device(device)
    if amp and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def encode_images(model: Any, images: Any, amp: bool = False):
    """Image batch (see ``to_model_input``) -> float32 (B, D) unnormalised embeddings on the model's device."""
    x = to_model_input(images, model)
    with torch.no_grad(), _autocast(x.device, amp):
        out = model.encode_image(x)
    return out.float()


def tokenize(tokenizer: Any, texts: Sequence[str]):
    """Texts -> LongTensor (B, L) via the bmclip tokenizer callable (pad id 0)."""
    if isinstance(texts, str):
        raise DataError("expected a list of texts, got a single string")
    ids = tokenizer(list(texts))
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
    return ids.long()


def encode_texts(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 256, amp: bool = False):
    """List of texts -> float32 (N, D) unnormalised embeddings on the model's device, in batches."""
    dev = model_device(model)
    outs = []
    for s in range(0, len(texts), batch_size):
        ids = tokenize(tokenizer, texts[s : s + batch_size]).to(dev)
        with torch.no_grad(), _autocast(dev, amp):
            outs.append(model.encode_text(ids).float())
    if not outs:
        raise DataError("no texts to encode")
    return torch.cat(outs)


def embed_image_batches(
    model: Any, batches: Iterable[Any], amp: bool = False, label_key: str = "label"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Batches (dicts with "image" [+ label], or bare image batches) -> (float32 (N, D), int64 (N,) or None)."""
    feats, labels = [], []
    have_labels = None
    for b in batches:
        imgs = b["image"] if isinstance(b, dict) else b
        feats.append(encode_images(model, imgs, amp=amp).cpu().numpy())
        lab = b.get(label_key) if isinstance(b, dict) else None
        if have_labels is None:
            have_labels = lab is not None
        elif have_labels != (lab is not None):
            raise DataError("some batches have labels and some do not")
        if lab is not None:
            labels.append(np.asarray(lab, dtype=np.int64).reshape(-1))
    if not feats:
        raise DataError("no images to embed")
    x = np.concatenate(feats)
    y = np.concatenate(labels) if have_labels else None
    if y is not None and len(y) != len(x):
        raise DataError(f"{len(x)} images but {len(y)} labels")
    return x, y


# ---------------------------------------------------------------- streamed .npy writer

_NPY_HEADER_LEN = 128  # fixed, so the shape can be rewritten in place once N is known


class NpyStreamWriter:
    """Append (n, D) row blocks to a ``.npy`` file without knowing N in advance; ``close()`` finalises it.

    The rows go to a temporary file beside ``path`` (``bmclip.io.atomic_writer``) that ``close()`` fsyncs and
    renames into place once the final shape is in the header; ``abort()`` deletes it, so ``path`` is never
    half-written. The result is a standard NumPy v1.0 ``.npy`` (``np.load(path, mmap_mode="r")``).
    """

    def __init__(self, path: str | os.PathLike, dim: int, dtype: str = "float16"):
        self.path = Path(path)
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype("float16"), np.dtype("float32")):
            raise ConfigError(f"storage dtype must be float16 or float32, got {dtype}")
        self.n = 0
        self._writer = atomic_writer(self.path, "wb")
        self._f = self._writer.__enter__()
        self._open = True
        self._f.write(self._header(0))

    def _header(self, n: int) -> bytes:
        d = f"{{'descr': '{self.dtype.str}', 'fortran_order': False, 'shape': ({n}, {self.dim}), }}"
        body_len = _NPY_HEADER_LEN - 10  # magic (6) + version (2) + header length (2)
        if len(d) + 1 > body_len:
            raise DataError("array too large for the fixed .npy header")
        d = d.ljust(body_len - 1) + "\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", body_len) + d.encode("latin1")

    def append(self, rows: Any) -> None:
        """Append a (n, D) block (numpy or torch); converted to the storage dtype."""
        if hasattr(rows, "detach"):
            rows = rows.detach().float().cpu().numpy()
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise DataError(f"expected rows of shape (n, {self.dim}), got {rows.shape}")
        self._f.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.n += rows.shape[0]

    def close(self) -> Path:
        """Write the final shape into the header, fsync and rename into place; returns the path."""
        try:
            self._f.seek(0)
            self._f.write(self._header(self.n))
        except BaseException:
            self.abort()
            raise
        self._open = False
        self._writer.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Discard the partial file."""
        if self._open:
            self._open = False
            err = DataError(f"writing {self.path} aborted")
            # removes the temporary file; path stays untouched. Closing the file may fail again (the disk that
            # failed the write is still full): the file is removed all the same, and the caller's error stands.
            with contextlib.suppress(OSError):
                self._writer.__exit__(type(err), err, None)


def _iter_pairs(batches: Iterable[dict[str, Any]]) -> Iterator[tuple[Any, list[str]]]:
    for b in batches:
        if not isinstance(b, dict) or "image" not in b or "text" not in b:
            raise DataError("retrieval batches must be dicts with 'image' and 'text'")
        texts = list(b["text"])
        if len(texts) != len(b["image"]):
            raise DataError(f"batch has {len(b['image'])} images but {len(texts)} texts")
        yield b["image"], texts


def content_key(data: Any) -> int:
    """A 64-bit key of an image's pixels (array or tensor) or of a caption's text: equal content, equal key."""
    if isinstance(data, str):
        raw = data.encode("utf-8", "surrogatepass")
    else:
        arr = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
        raw = np.ascontiguousarray(arr).tobytes()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def embed_pairs_to_disk(
    model: Any,
    tokenizer: Any,
    batches: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike,
    device: Any = None,
    storage_dtype: str = "float16",
    amp: bool = False,
    max_pairs: int | None = None,
    content_keys: bool = False,
) -> dict[str, Any]:
    """Embed paired batches and stream them to ``out_dir/image_emb.npy`` and ``text_emb.npy`` (N, D).

    Returns {"image": path, "text": path, "n": N}; with ``content_keys`` also "image_keys" / "text_keys": (N,)
    uint64 arrays of :func:`content_key` (the same key for the same pixels / the same caption text), which tell
    duplicates apart for retrieval. Nothing is left behind on error.
    """
    if max_pairs is not None:
        max_pairs = check_int(max_pairs, "max_pairs", 1)
    out = Path(out_dir)
    created = not out.exists()  # a folder this call makes is removed again when it fails
    writers: list[NpyStreamWriter] = []
    keys: tuple[list[int], list[int]] = ([], [])
    n = 0
    try:
        for images, texts in _iter_pairs(batches):
            if max_pairs is not None and n + len(texts) > max_pairs:
                keep = max_pairs - n
                images, texts = images[:keep], texts[:keep]
            if content_keys:
                keys[0].extend(content_key(im) for im in images)
                keys[1].extend(content_key(t) for t in texts)
            ie = encode_images(model, images, amp=amp)
            te = encode_texts(model, tokenizer, texts, batch_size=max(1, len(texts)), amp=amp)
            if not writers:
                writers = [
                    NpyStreamWriter(out / "image_emb.npy", ie.shape[1], storage_dtype),
                    NpyStreamWriter(out / "text_emb.npy", te.shape[1], storage_dtype),
                ]
            writers[0].append(ie)
            writers[1].append(te)
            n += len(texts)
            if max_pairs is not None and n >= max_pairs:
                break  # not one batch more read (and decoded) than needed
        if not writers:
            raise DataError("no (image, text) pairs were read")
        out_paths = {"image": writers[0].close(), "text": writers[1].close(), "n": n}
        if content_keys:
            out_paths["image_keys"] = np.array(keys[0], dtype=np.uint64)
            out_paths["text_keys"] = np.array(keys[1], dtype=np.uint64)
        return out_paths
    except BaseException:
        for w in writers:
            w.abort()
        if created:
            with contextlib.suppress(OSError):  # only when empty: never anything but the aborted temp files
                out.rmdir()
        raise
