"""A remote output prefix: the merge's files uploaded as they are finished, retried, then deleted locally.

With ``--output s3://bucket/prefix/`` (or ``gs://``, any writable fsspec URL) the merge writes each shard
into a local work folder; :class:`RemoteOutput` uploads the shard's tar and DALI index in background threads
as soon as the shard is finished and deletes the local copies, so the merge needs local disk for a few shards
(``MAX_PENDING`` finished ones at most, plus the one being written) instead of the whole output.

Every upload is retried with exponential backoff (``UPLOAD_ATTEMPTS``); one that still fails stops the build
with an :class:`UploadError` naming the object. No reader ever sees a half-written object:

- object stores (S3, GCS, Azure) make a PUT visible all at once, and a multipart upload only when it is
  completed, so a failed or killed upload leaves the key absent (or its previous, complete object). The
  object is therefore PUT under its final key: S3 has no rename, and an upload to a temporary key followed by
  a server-side copy would double the requests and, above 5 GB, need a multipart copy, for no gain;
- any other fsspec filesystem is written under a temporary name (``.NAME.<random>.tmp``) and renamed.

(``file://`` outputs never come here: they are local paths, written with :mod:`bmclip.io`.)

Shard files are deterministic (equal staging gives byte-identical shards), so a rerun after a kill simply
uploads every file again: the objects it leaves are the same bytes whichever run wrote them.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from bmclip.errors import ConfigError, DataError
from bmclip.io.fs import filesystem
from bmclip.io.retry import RetryError, is_transient, retry

__all__ = ["RemoteOutput", "UploadError"]

UPLOAD_ATTEMPTS = 6
UPLOAD_BASE_DELAY = 1.0  # seconds; doubled after every failed attempt
UPLOAD_MAX_DELAY = 60.0
UPLOAD_THREADS = 2
MAX_PENDING = 4  # finished shards waiting for their upload before the merge waits for one

# Protocols whose PUT is atomic (the object appears complete or not at all).
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


class UploadError(DataError):
    """An output file could not be uploaded (after retries): the build stops; a rerun redoes the merge."""


class RemoteOutput:
    """Uploads files to ``url`` (a prefix): :meth:`put` now, or :meth:`submit` in the background."""

    def __init__(self, url: str, storage_options: dict | None = None, *, threads: int | None = None,
                 max_pending: int | None = None):
        self.url = url.rstrip("/")
        self.fs, root = filesystem(self.url, storage_options)
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        if "file" in protocols or "local" in protocols:
            raise ConfigError(f"{url}: a local output is a path or file:// URL, not a remote output")
        self.atomic_put = any(p in _ATOMIC_PUT for p in protocols)
        self.max_pending = max(1, MAX_PENDING if max_pending is None else max_pending)
        threads = UPLOAD_THREADS if threads is None else threads
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="bmclip-upload")
        self._pending: deque[Future] = deque()
        self._closing = threading.Event()

    def url_of(self, name: str) -> str:
        """The URL of the output file ``name``."""
        return f"{self.url}/{name}"

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _sleep(self, seconds: float) -> None:
        if self._closing.wait(seconds):
            raise UploadError("upload cancelled: the build is stopping")

    def _call(self, fn, what: str, hint: str = "rerun the same command to redo the merge and its uploads"):
        try:
            return retry(fn, attempts=UPLOAD_ATTEMPTS, base_delay=UPLOAD_BASE_DELAY, max_delay=UPLOAD_MAX_DELAY,
                         retry_on=is_transient, what=what, sleep=self._sleep)
        except UploadError:
            raise
        except RetryError as e:
            raise UploadError(f"{e}; {hint}") from e
        except Exception as e:
            raise UploadError(f"{what} failed: {type(e).__name__}: {e}") from e

    def _tmp_key(self, name: str) -> str:
        """A temporary key beside ``name``'s: ``[DIR/].BASE.<random>.tmp``."""
        head, _, base = name.rpartition("/")
        return self._key(f"{head}/" * bool(head) + f".{base}.{uuid.uuid4().hex[:8]}.tmp")

    def _put_once(self, local: Path | bytes, name: str) -> None:
        """One upload attempt of ``local`` (a file, or the bytes themselves) as ``name``, checked by its size on
        the server."""
        key = self._key(name)
        is_data = isinstance(local, (bytes, bytearray, memoryview))
        size = len(local) if is_data else local.stat().st_size

        def send(dest: str) -> None:
            if is_data:
                self.fs.pipe_file(dest, bytes(local))
            else:
                self.fs.put_file(os.fspath(local), dest)

        if self.atomic_put:
            send(key)
        else:
            tmp = self._tmp_key(name)
            try:
                send(tmp)
                self.fs.mv(tmp, key)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.fs.rm(tmp)
                raise
        self.fs.invalidate_cache(key)
        got = self.fs.info(key).get("size")
        if got != size:
            raise OSError(f"{self.url_of(name)} has {got} bytes after the upload, expected {size}")

    def put(self, local: str | os.PathLike, name: str | None = None, *, remove: bool = True) -> str:
        """Upload ``local`` as ``name`` (default: its file name), retried; then delete it unless ``remove`` is
        False. Returns the object's URL; raises UploadError when the last attempt fails."""
        local = Path(local)
        name = name or local.name
        self._call(lambda: self._put_once(local, name), f"upload of {self.url_of(name)}")
        if remove:
            local.unlink()
        return self.url_of(name)

    def put_bytes(self, data: bytes, name: str) -> str:
        """Write ``data`` as the object ``name`` (a ``/`` in it makes sub-prefixes), atomically as :meth:`put`
        does, retried; returns its URL."""
        self._call(lambda: self._put_once(data, name), f"upload of {self.url_of(name)}",
                   "rerun the same command to resume")
        return self.url_of(name)

    def get(self, name: str) -> bytes | None:
        """The bytes of the object ``name``, or None when it does not exist (reads retried)."""

        def cat() -> bytes | None:
            try:
                return self.fs.cat_file(self._key(name))
            except FileNotFoundError:
                return None

        return self._call(cat, f"reading {self.url_of(name)}", "rerun the same command to resume")

    def _put_all(self, files: list[tuple[Path, str]]) -> None:
        for local, name in files:
            self.put(local, name)

    def submit(self, files: list[tuple[str | os.PathLike, str]]) -> None:
        """Upload ``(local path, name)`` pairs in the background, in order, deleting each local file once it is
        uploaded. Waits while ``max_pending`` earlier submissions are unfinished; raises the UploadError of any
        earlier one that failed."""
        self._reap(block=False)
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._put_all, [(Path(p), n) for p, n in files]))

    def _reap(self, block: bool) -> None:
        while self._pending and (block or self._pending[0].done()):
            self._pending.popleft().result()

    def wait(self) -> None:
        """Wait for every submitted upload; raises the first failure."""
        self._reap(block=True)

    def close(self) -> None:
        """Stop: cancel queued uploads, end retry waits, wait for uploads in progress (leaving no thread)."""
        self._closing.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def names(self, under: str = "") -> set[str]:
        """The names of the files directly under the prefix, or under its sub-prefix ``under`` (none when it
        does not exist yet)."""
        root = f"{self.root}/{under.strip('/')}" if under.strip("/") else self.root

        def ls() -> list[str]:
            self.fs.invalidate_cache(root)
            try:
                return self.fs.ls(root, detail=False)
            except FileNotFoundError:
                return []

        listed = self._call(ls, f"listing {self.url}/{under}".rstrip("/"))
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in listed if p.rstrip("/") != root}

    def delete_all(self) -> None:
        """Delete every object under the prefix (nothing when there is none)."""

        def rm() -> None:
            self.fs.invalidate_cache(self.root)
            try:
                self.fs.rm(self.root, recursive=True)
            except FileNotFoundError:
                pass
            self.fs.invalidate_cache(self.root)

        self._call(rm, f"deleting {self.url}/")

    def delete(self, name: str) -> None:
        """Delete the file ``name`` under the prefix (nothing when it is absent)."""

        def rm() -> None:
            try:
                self.fs.rm(self._key(name))
            except FileNotFoundError:
                pass

        self._call(rm, f"deleting {self.url_of(name)}")
