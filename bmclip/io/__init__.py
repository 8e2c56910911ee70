"""File I/O shared by every part of bmclip: atomic writes (temp name, fsync, rename)."""

from bmclip.io.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_text, atomic_writer, fsync_dir

__all__ = ["atomic_torch_save", "atomic_write_bytes", "atomic_write_text", "atomic_writer", "fsync_dir"]
