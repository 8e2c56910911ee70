"""File I/O shared by every part of bmclip, below ``train/`` and ``eval/``.

- ``bmclip.io`` (this package, torch-free): atomic writes (temp name, fsync, rename), from ``atomic``;
- ``bmclip.io.model_file``: the native model file (one writer, one reader) and code-free torch/safetensors loading;
- ``bmclip.io.checkpoint_dir``: which training checkpoint dirs exist, are complete, are the newest;
- ``bmclip.io.resolve``: the resolver of a model argument (model file, checkpoint dir, run dir, open_clip folder).

The last three need torch and are imported by name, not from here.
"""

from __future__ import annotations

from bmclip.io.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_text, atomic_writer, fsync_dir

__all__ = ["atomic_torch_save", "atomic_write_bytes", "atomic_write_text", "atomic_writer", "fsync_dir"]
