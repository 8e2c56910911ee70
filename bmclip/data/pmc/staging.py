"""Where a staging dir lives: a local folder, or a remote prefix (``s3://bucket/run/_staging``, ``gs://...``).

:class:`StagingDir` is the one interface the stage and the merge use for ``plan.json``, ``complete.json``
and ``chunks/chunk-NNNNNN.bin``, so both rules hold wherever the staging dir is:

- **nothing is half-written**: local files are written with :mod:`bmclip.io` (temp + fsync + rename);
  remote ones with :class:`~bmclip.data.pmc.upload.RemoteOutput` (an object store's PUT makes the key
  appear only when it is complete; other fsspec stores get a temporary name and a rename), retried with
  exponential backoff. A chunk's existence therefore means it is complete: that is the stage's journal, and
  a rerun lists the chunks that exist and redoes the others. Temporary files or objects a killed write left
  (``.NAME.*.tmp``) are deleted before a stage resumes.
- **no full local copy**: a remote staging dir is written from memory (each worker uploads the chunk it has
  just encoded) and read one chunk at a time into memory (the next one fetched while the current one is
  merged), so a remote build's local disk holds only the merge's few shards waiting for their upload.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bmclip.data.pmc.upload import RemoteOutput
from bmclip.errors import ConfigError
from bmclip.io import atomic_write_bytes
from bmclip.io.fs import is_remote, local_path, location_name

__all__ = ["BuildLock", "StagingDir", "remove_partial_files"]


def remove_partial_files(folder: Path) -> None:
    """Delete the temporary files an interrupted atomic write left in ``folder`` (``.NAME.*.tmp``, and
    ``.NAME.tmp-PID`` from earlier builder versions); a finished file never starts with a dot."""
    for f in folder.iterdir():
        if f.name.startswith(".") and (f.name.endswith(".tmp") or ".tmp-" in f.name):
            f.unlink()


LOCK_NAME = ".build.lock"  # flock'd by the build using the staging dir (StagingDir.lock) or the output folder


class BuildLock:
    """An exclusive ``flock`` on the file ``path``, held by this process from :meth:`acquire` to :meth:`release`
    (or its death: the kernel drops a flock when its holder dies, so a killed build never blocks its rerun).
    ``what`` names the place locked and ``why`` the harm two holders would do, for the one-line ConfigError a
    second taker gets (with the holder's pid and host, which the file records). ``remove``: delete the file on
    release, for a lock file that must not stay behind in a published folder; a taker that opened the file
    before it was deleted sees that its inode is gone and takes the new one. File systems without flock (some
    network mounts) go unlocked."""

    def __init__(self, path: Path, what: str, why: str, *, remove: bool = False):
        self.path, self.what, self.why, self.remove = path, what, why, remove
        self._fd: int | None = None

    def acquire(self) -> None:
        for _ in range(100):  # each retry means a holder released (and deleted) the file just now
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise ConfigError(f"{self.what} is in use by another build ({holder}): wait for it to end or stop "
                                  f"it, then rerun; {self.why}") from None
            except OSError:  # no flock on this file system: go on unlocked
                os.close(fd)
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file we locked was deleted by its releasing holder: lock the one there now
        else:
            raise ConfigError(f"{self.what}: could not take its lock file {self.path}")
        self._fd = fd
        try:  # who holds it, for the message of a refused build (the lock itself needs no bytes: a full disk is fine)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        except OSError:
            pass

    def release(self) -> None:
        if self._fd is None:
            return
        if self.remove:  # still holding it: a taker waiting on this inode re-checks and takes the new file
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self._fd)  # releases the flock
        self._fd = None

    def __enter__(self) -> BuildLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _is_partial(name: str) -> bool:
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name)


class StagingDir:
    """A staging dir at a local path (or ``file://`` URL) or a remote prefix URL (``storage_options`` go to
    fsspec). Names are relative to it (``plan.json``, ``chunks/chunk-000000.bin``)."""

    def __init__(self, loc: str | os.PathLike, storage_options: dict | None = None):
        self.remote = is_remote(loc)
        self.storage_options = dict(storage_options or {})
        if self.remote:
            self.url = os.fspath(loc).rstrip("/")
            self.path = None
            self._store = RemoteOutput(self.url, self.storage_options, threads=1)
            if self._store.atomic_put and "/" not in self._store.root.strip("/"):
                self._store.close()
                # the whole prefix is deleted after a build: never a whole bucket
                raise ConfigError(f"{self.url}: a remote staging dir must be a prefix inside a bucket "
                                  "(s3://bucket/run/_staging), not the bucket itself")
        else:
            self.path = local_path(loc)
            self.url = str(self.path)
            self._store = None
        self._lock: BuildLock | None = None

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        """The last component of the location (for progress bars)."""
        return location_name(self.url) if self.remote else self.path.name

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def lock(self) -> None:
        """Take this (local) staging dir for this process until :meth:`close`, or raise ConfigError naming the
        build that holds it.

        Two builds in one staging dir undo each other: a starting stage deletes the temporary files of the
        chunks the other is writing, and a finished merge deletes the dir the other still reads (a resubmitted
        job whose first run still lives, a command started twice). Remote prefixes are not locked (an object
        store has no lock), nor are file systems without flock (see :class:`BuildLock`).
        """
        if self.path is None or self._lock is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        lock = BuildLock(self.path / LOCK_NAME, f"staging dir {self.path}",
                         "two builds in one staging dir would delete each other's files")
        lock.acquire()
        self._lock = lock

    def __enter__(self) -> StagingDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, name: str) -> bytes | None:
        """The bytes of ``name``, or None when it does not exist."""
        if self._store is not None:
            return self._store.get(name)
        p = self.path / name
        return p.read_bytes() if p.is_file() else None

    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically (it exists complete or not at all)."""
        if self._store is not None:
            self._store.put_bytes(data, name)
        else:
            atomic_write_bytes(data, self.path / name)

    def prepare(self) -> None:
        """Make the local folders (nothing for a remote prefix: keys need no folders)."""
        if self.path is not None:
            (self.path / "chunks").mkdir(parents=True, exist_ok=True)

    def chunk_dir_names(self) -> set[str]:
        """The names of the complete files in ``chunks/`` (chunks, and the retracted articles' lists of some)."""
        if self._store is not None:
            names = self._store.names("chunks")
        else:
            d = self.path / "chunks"
            names = {p.name for p in d.iterdir()} if d.is_dir() else set()
        return {n for n in names if not _is_partial(n)}

    def chunk_names(self) -> set[str]:
        """The names of the complete chunk files (``chunk-NNNNNN.bin``)."""
        return {n for n in self.chunk_dir_names() if n.startswith("chunk-") and n.endswith(".bin")}

    def remove_partial(self) -> None:
        """Delete the temporary files/objects that an interrupted write of a chunk or plan left."""
        if self._store is not None:
            for under in ("", "chunks"):
                for n in self._store.names(under):
                    if _is_partial(n):
                        self._store.delete(f"{under}/{n}" if under else n)
        elif self.path.is_dir():
            remove_partial_files(self.path)
            if (self.path / "chunks").is_dir():
                remove_partial_files(self.path / "chunks")

    def remove(self) -> None:
        """Delete the whole staging dir."""
        if self._store is not None:
            self._store.delete_all()
        else:
            shutil.rmtree(self.path)

    def read_ahead(self, names: list[str]):
        """Yield ``(name, bytes or None)`` for ``names`` in order; a remote one is fetched while the caller
        works on the one before it (at most two in memory)."""
        if self._store is None:
            for n in names:
                yield n, self.read(n)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="bmclip-staging-read") as pool:
            nxt = pool.submit(self.read, names[0]) if names else None
            for i, n in enumerate(names):
                data = nxt.result()
                nxt = pool.submit(self.read, names[i + 1]) if i + 1 < len(names) else None
                yield n, data
