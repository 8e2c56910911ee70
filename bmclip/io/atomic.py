"""Atomic file writes: a temporary file beside the target, fsynced, renamed over it, the folder fsynced.

A process killed at any point leaves either the old file or the new one, never a half-written file; the
temporary name starts with a dot and ends in ``.tmp`` so readers and globbing skip it, and it is removed
when the write fails. The file gets the permissions ``open()`` would give a new file (0666 minus the
umask), so checkpoints and reports stay readable by whoever could read them before.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["Crc32", "atomic_torch_save", "atomic_write_bytes", "atomic_write_text", "atomic_writer", "fsync_dir",
           "replace_as_set", "temp_file_beside"]


class Crc32:
    """The running CRC32 (zlib's) of the bytes a binary atomic write sends to its file: pass one as ``crc=`` and
    read ``.value`` after the write. It costs one pass over bytes already in memory, instead of reading the file
    back (``bmclip.io.checkpoint_dir.file_crc32``) to record what was written."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)


class _CrcFile:
    """A binary file whose writes also update a :class:`Crc32` (torch.save and the tar writers only write)."""

    def __init__(self, f: IO[bytes], crc: Crc32):
        self._f, self._crc = f, crc

    def write(self, data) -> int:
        self._crc.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()

    def tell(self) -> int:
        return self._f.tell()


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (os.umask can only set and return)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it is durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb", *, durable: bool = True,
                  crc: Crc32 | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` (``mode`` "wb" or "w"); on success fsync it and rename it to ``path``.

    An exception inside the ``with`` block removes the temporary file and leaves ``path`` untouched.
    ``durable=False`` skips both fsyncs (the file's and the folder's): the rename is still atomic for every
    reader, but a power loss may leave nothing (or an empty file) where ``path`` was. Only for throwaway copies
    that are rebuilt after a crash anyway, such as the remote-shard download cache (deleted at the next start),
    where an fsync would only force to disk bytes that are deleted seconds later. ``crc`` (mode "wb" only): a
    :class:`Crc32` that every write through the yielded file updates.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_writer mode must be 'wb' or 'w', not {mode!r}")
    if crc is not None and mode != "wb":
        raise ValueError("atomic_writer: crc= needs mode 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temp_file_beside(path, mode) as (f, tmp):
        yield f if crc is None else _CrcFile(f, crc)
        f.flush()
        if durable:
            os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def temp_file_beside(path: str | os.PathLike, mode: str = "wb") -> Iterator[tuple[IO, str]]:
    """``(file, name)`` of a new temporary file beside ``path`` (hidden, ``.NAME.*.tmp``, with the permissions
    ``open()`` gives a new file), open in ``mode`` ("wb" or "w", UTF-8); removed when the block ends unless it was
    renamed away by then. :func:`atomic_writer` is one file written through it; a writer of several files that must
    land together (``Tokenizer.save``) writes them all first, then renames each."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f, tmp
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def replace_as_set(moves: Sequence[tuple[str | os.PathLike, str | os.PathLike]], marker: str | os.PathLike,
                   remove: Sequence[str | os.PathLike] = ()) -> None:
    """Move finished files into place as one set, ``marker`` last: what several writers of "files that belong
    together" share (``Tokenizer.save``, ``bmclip.eval.report.OutputSet``).

    ``moves`` are (finished temp file, target) pairs, each temp file fsynced and on the target's file system; the
    one whose target is ``marker`` is moved last. First the old ``marker`` is removed, then every path in
    ``remove`` (the old set's other files; missing ones are fine), then the files are renamed into place and
    their folders fsynced. Whatever stops it, a folder holding ``marker`` holds the set that came with it: a
    reader that trusts a set only when its marker is there never sees old and new files mixed. An OSError names
    the target it concerns.
    """
    marker = Path(marker)
    pairs = [(Path(src), Path(dst)) for src, dst in moves]
    rest, last = [m for m in pairs if m[1] != marker], [m for m in pairs if m[1] == marker]
    for target in dict.fromkeys([marker, *map(Path, remove)]):  # the old marker first
        with _naming(target):
            if target.is_file() or target.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
    for src, target in rest:
        with _naming(target):
            os.replace(src, target)
    for folder in dict.fromkeys(target.parent for _, target in rest):
        fsync_dir(folder)  # the set is on disk before its marker is
    for src, target in last:
        with _naming(target):
            os.replace(src, target)
    fsync_dir(marker.parent)


@contextlib.contextmanager
def _naming(target: Path) -> Iterator[None]:
    """An OSError inside names ``target`` (a rename's error would name the hidden temp file)."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(target)) from None


def atomic_write_bytes(data: bytes, path: str | os.PathLike, *, crc: Crc32 | None = None) -> int:
    """Atomically write ``data`` to ``path``; returns the number of bytes written (``crc``: see atomic_writer)."""
    with atomic_writer(path, "wb", crc=crc) as f:
        f.write(data)
    return len(data)


def atomic_write_text(text: str, path: str | os.PathLike) -> int:
    """Atomically write ``text`` (UTF-8) to ``path``; returns the file size in bytes."""
    return atomic_write_bytes(text.encode("utf-8"), path)


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, crc: Crc32 | None = None) -> int:
    """``torch.save(obj)`` to ``path`` atomically; returns the file size in bytes (``crc``: see atomic_writer)."""
    import torch  # bmclip.io is imported by torch-free tools (the dataset builder's workers)

    with atomic_writer(path, "wb", crc=crc) as f:
        try:
            torch.save(obj, f)
        except Exception as e:
            # A Ctrl-C or SIGTERM (bmclip's Terminated) inside torch.save makes its zip writer fail while it
            # unwinds ("unexpected pos N vs M"), and that error hides the interrupt: give the interrupt back, so
            # the command stops as interrupted (exit 130/143) instead of with a traceback.
            interrupt = _interrupt_in(e)
            if interrupt is not None:
                raise interrupt from None
            raise
    return Path(path).stat().st_size


def _interrupt_in(e: BaseException) -> BaseException | None:
    """The KeyboardInterrupt (or SystemExit) among the exceptions ``e`` was raised while handling, if any."""
    seen: set[int] = set()
    cur: BaseException | None = e.__context__
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (KeyboardInterrupt, SystemExit)):
            return cur
        seen.add(id(cur))
        cur = cur.__context__
    return None
