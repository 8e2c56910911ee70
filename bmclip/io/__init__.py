"""File I/O shared by every part of bmclip, below the data, model, train and eval packages (it imports none).

- ``bmclip.io`` (this package, torch-free): atomic writes (temp name, fsync, rename), from ``atomic``;
- ``bmclip.io.fs``: local paths and remote URLs (fsspec, the "cloud" extra), ``bmclip.io.retry``: backoff;
- ``bmclip.io.model_file``: the native model file's layout (one writer, one reader) and code-free torch/safetensors
  loading (``bmclip.model.file`` rebuilds a model from it; ``bmclip.resolve`` resolves a model argument);
- ``bmclip.io.checkpoint_dir``: which training checkpoint dirs exist, are complete, are the newest.

``model_file`` and ``checkpoint_dir`` need torch and are imported by name, not from here.
"""

from __future__ import annotations

from bmclip.io.atomic import Crc32, atomic_torch_save, atomic_write_bytes, atomic_write_text, atomic_writer, fsync_dir

__all__ = ["Crc32", "atomic_torch_save", "atomic_write_bytes", "atomic_write_text", "atomic_writer", "fsync_dir"]
