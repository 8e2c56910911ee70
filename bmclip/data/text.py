"""Caption tokenisation off the training thread.

``BackgroundTokenizer`` runs a tokenizer callable (``list[str] -> LongTensor [N, L]``, e.g.
``bmclip.tokenizer.Tokenizer`` built on HF ``tokenizers``, whose batch encode runs in Rust) in one
worker thread. ``ShardLoader`` submits each batch's captions before it decodes that batch's images, so
tokenisation overlaps the GIL-free C++ decode and ``input_ids`` are ready when the batch is handed out.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from bmclip.errors import ConfigError, DataError

__all__ = ["BackgroundTokenizer"]


class BackgroundTokenizer:
    """Tokenise caption batches in a background thread; ``submit(texts)`` -> Future of LongTensor [N, L]."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor], name: str = "ShardLoader-tokenize"):
        if not callable(tokenizer):
            raise ConfigError("tokenizer must be a callable list[str] -> LongTensor [N, L]")
        self.tokenizer = tokenizer
        self._name = name
        self._pool: ThreadPoolExecutor | None = None

    def _run(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != len(texts):
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise DataError(f"tokenizer must return a [N, L] tensor for N={len(texts)} texts, got {shape}")
        if ids.dtype != torch.long:
            ids = ids.long()
        return ids

    def submit(self, texts: list[str]) -> Future:
        """Start tokenising ``texts``; the Future's result is a LongTensor [len(texts), L] (or raises)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        return self._pool.submit(self._run, list(texts))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Tokenise synchronously (same checks as the background path)."""
        return self._run(list(texts))

    def close(self) -> None:
        """Stop the worker thread (pending work finishes first)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __getstate__(self):  # picklable for DataLoader workers: the thread is recreated on demand
        d = dict(self.__dict__)
        d["_pool"] = None
        return d
