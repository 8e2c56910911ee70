"""Batches of evaluation images for a model: uint8 (B, S, S, 3) arrays made with the evaluation transform's
geometry (``bmclip.model.transforms.resize_center_crop``), decoded in a thread pool.

- ``iterate_batches``: a classification dataset (``bmclip.eval.datasets``) -> {"image", "label", "index"};
- ``iter_shard_pairs``: webdataset shards (read by ``bmclip.data.tario``) -> {"image", "text", "key"}.

An image that cannot be read is a counted skip with its reason, and the labels stay aligned; a pass in
which nothing could be read raises ``DataError`` naming the cause with an example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from bmclip.data.shards import expand_urls
from bmclip.data.tario import TAR_PROBLEMS, iter_shard_samples
from bmclip.errors import DataError, check_int
from bmclip.eval.datasets import ImageDataset
from bmclip.eval.images import decode_sample_image
from bmclip.model.transforms import resize_center_crop

__all__ = ["iter_shard_pairs", "iterate_batches", "sample_text"]

T = TypeVar("T")
R = TypeVar("R")


def _decoded_chunks(chunks: Iterable[list[T]], decode: Callable[[T], R | None], workers: int) -> Iterator[list[R]]:
    """Each chunk decoded in a thread pool, in order, without the items ``decode`` returned None for."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        for chunk in chunks:
            yield [r for r in pool.map(decode, chunk) if r is not None]
    finally:  # Ctrl-C / an abandoned generator: queued decodes are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)


def _check_batching(batch_size: Any, workers: Any) -> None:
    """ConfigError unless batch_size >= 1 and workers >= 0 are integers (checked before any image is read)."""
    check_int(batch_size, "batch_size", 1)
    check_int(workers, "workers", 0)


def iterate_batches(dataset: ImageDataset, image_size: int, batch_size: int = 64, workers: int = 4,
                    indices: Sequence[int] | None = None) -> Iterator[dict[str, Any]]:
    """Batches {"image": uint8 (B, S, S, 3), "label": int64 (B,), "index": (B,)} of a classification dataset.

    Images are resized (shorter side) and centre-cropped to ``image_size`` in a thread pool. Unreadable
    images are skipped and recorded in ``dataset.skipped`` as (name, reason); labels stay aligned. An
    unlabelled dataset (``dataset.labelled`` false) gives batches without "label".
    """
    _check_batching(batch_size, workers)  # here, not at the first batch: the caller learns before any work
    return _iterate_batches(dataset, image_size, batch_size, workers, indices)


def _iterate_batches(dataset: ImageDataset, image_size: int, batch_size: int, workers: int,
                     indices: Sequence[int] | None) -> Iterator[dict[str, Any]]:
    idx = list(range(len(dataset))) if indices is None else list(indices)

    def load(i):
        try:
            img, lab = dataset[i]
            return i, np.asarray(resize_center_crop(img, image_size), dtype=np.uint8), lab
        except DataError as e:
            dataset.skipped.append((dataset.name_of(i), str(e)))
            return None

    n_good = 0
    chunks = (idx[s : s + batch_size] for s in range(0, len(idx), batch_size))
    for res in _decoded_chunks(chunks, load, workers):
        if res:
            n_good += len(res)
            batch = {"index": np.array([r[0] for r in res], dtype=np.int64), "image": np.stack([r[1] for r in res])}
            if getattr(dataset, "labelled", True):
                batch["label"] = np.array([r[2] for r in res], dtype=np.int64)
            yield batch
    if idx and n_good == 0:
        ex = f"; e.g. {dataset.skipped[-1][0]}: {dataset.skipped[-1][1]}" if dataset.skipped else ""
        raise DataError(f"none of the {len(idx)} images could be read{ex}")


def sample_text(sample: dict[str, Any]) -> str:
    """The caption of a shard sample (``txt`` member, UTF-8, stripped as the training loader does)."""
    if "txt" not in sample:
        raise DataError(f"sample {sample.get('__key__')} has no txt member")
    try:
        return sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"sample {sample.get('__key__')}: caption is not UTF-8") from e


def _chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    buf: list[T] = []
    for x in items:
        buf.append(x)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def iter_shard_pairs(pattern: str, image_size: int, batch_size: int = 64, skipped: list | None = None,
                     workers: int = 4, storage_options: dict[str, Any] | None = None,
                     fetch_options: Any = None) -> Iterator[dict[str, Any]]:
    """Batches {"image": uint8 (B, S, S, 3), "text": list[str], "key": list[str]} read from webdataset shards
    (``pattern``: anything ``bmclip.data.shards.expand_urls`` takes) and decoded with PIL/pydicom (every
    extension in ``IMAGE_EXTENSIONS``, and DICOM; see ``bmclip.eval.images``), resized (shorter side) and
    centre-cropped to ``image_size``. Bad samples and tar damage are appended to ``skipped`` as
    (key or shard, reason) when a list is given, else raise DataError. Remote shards (``s3://``, ``https://``,
    ``pipe:CMD``, ...) are streamed (``bmclip.data.tario``; ``storage_options`` go to fsspec, ``fetch_options``
    are ``bmclip.data.remote.FetchOptions``); one that cannot be read is a ``shard_fetch_failed`` skip."""
    _check_batching(batch_size, workers)
    return _iter_shard_pairs(pattern, image_size, batch_size, skipped, workers, storage_options, fetch_options)


def _iter_shard_pairs(pattern: str, image_size: int, batch_size: int, skipped: list | None, workers: int,
                      storage_options: dict[str, Any] | None, fetch_options: Any) -> Iterator[dict[str, Any]]:
    urls = expand_urls(pattern)

    def decode(sample):
        try:
            img = np.asarray(resize_center_crop(decode_sample_image(sample), image_size), dtype=np.uint8)
            return sample["__key__"], img, sample_text(sample)
        except DataError as e:
            if skipped is None:
                raise
            skipped.append((sample["__key__"], str(e)))
            return None

    n_samples = n_good = 0

    def counted(chunks):
        nonlocal n_samples
        for chunk in chunks:
            n_samples += len(chunk)
            yield chunk

    samples = iter_shard_samples(urls, skipped, storage_options=storage_options, fetch_options=fetch_options)
    for res in _decoded_chunks(counted(_chunked(samples, batch_size)), decode, workers):
        if res:
            n_good += len(res)
            yield {"key": [r[0] for r in res], "image": np.stack([r[1] for r in res]), "text": [r[2] for r in res]}
    if n_good == 0:
        raise DataError(_no_valid_samples(pattern, urls, n_samples, skipped))


def _is_tar_problem(reason: str) -> bool:
    return reason.split(":", 1)[0] in TAR_PROBLEMS


def _no_valid_samples(pattern: str, urls: Sequence[str], n_samples: int, skipped: list | None) -> str:
    """The cause when a whole pass over shards gave no usable sample (with counts and one example)."""
    where = f"{len(urls)} shard(s) {pattern!r}"
    tar_problems = [r for _, r in (skipped or []) if _is_tar_problem(r)]
    if n_samples == 0:
        if tar_problems:
            return f"no samples in {where}: {tar_problems[0]}"
        return f"no samples in {where}: the tar files hold no webdataset members (<key>.<ext>)"
    sample_skips = [(k, r) for k, r in (skipped or []) if not _is_tar_problem(r)]
    example = f"; e.g. {sample_skips[0][0]}: {sample_skips[0][1]}" if sample_skips else ""
    if sample_skips and all("corrupt" in r for _, r in sample_skips):
        return f"no valid sample in {where}: all {n_samples} images are undecodable{example}"
    return f"no valid sample in {where}: all {n_samples} samples were skipped{example}"
