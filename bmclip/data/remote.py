"""Remote shards: URLs fetched into a bounded local cache ahead of the reader, with retries.

A shard URL is remote by :func:`bmclip.io.fs.is_remote`: a URL other than ``file://`` (``s3://``, ``gs://``,
``http(s)://``, any fsspec protocol), or ``pipe:CMD`` (webdataset's convention: the rest is a shell command
whose standard output is the shard, e.g. ``pipe:aws s3 cp s3://bucket/shard-000001.tar -``; a non-zero exit
status is a failed fetch). fsspec URLs are opened by :func:`bmclip.io.fs.filesystem` and need the optional
extra ``pip install 'bmclip[cloud]'`` (fsspec, s3fs, gcsfs). Local paths and ``file://`` URLs never come
here: the loader memory-maps them in place.

:class:`ShardCache` keeps local copies for ONE loader split (rank x worker): the loader asks it for
shard i (:meth:`ShardCache.open`) together with the shards it will open next, in its deterministic
order; a background thread downloads those next shards while the decoder works on the current one.
Files are written through :func:`bmclip.io.atomic_writer` (a temporary name renamed when complete, so a
killed download leaves a ``.tmp`` file that is never opened) into a private folder under ``cache_dir``
(default: ``<tmp>/bmclip-shard-cache-<uid>``; a RAM-backed folder such as ``/dev/shm/...`` keeps the
cache in memory). A shard's file is deleted once the loader has dropped every reference to it (its index and
every zero-copy view of its bytes) and it is not among the next shards. ``cache_bytes`` bounds
prefetching: a download ahead starts only while the files held plus the expected size of the next one
fit; the shard the loader needs now is always fetched, and shards still in use are kept.

Failures: each download attempt has a connect and a read (stall) timeout (fsspec's asynchronous backends:
http(s), s3, gs, ...; and ``pipe:``; a blocking fsspec backend relies on its own); a failed attempt is retried
after an exponential backoff with jitter (:func:`bmclip.io.retry.backoff_delay`, the schedule every remote
read and write of bmclip uses), up to ``FetchOptions.attempts`` attempts per shard (a missing
object or a refused permission is not retried). A shard that still fails is reported to the loader,
which counts it as a ``shard_fetch_failed`` skip and logs it on the ``bmclip.data.remote`` logger. The
order of samples never depends on timing: it is fixed by the loader's cursor; only whether a flaky
shard finally fails can.

:func:`open_stream` reads one shard front to back without a local copy (the evaluation reader), with the
same timeouts and retries: a failed read reopens the shard and continues where it stopped.

Storage options (credentials, ``endpoint_url``, ...) are passed to every fsspec filesystem as keyword
arguments (:func:`bmclip.io.fs.filesystem`); fsspec's own configuration also applies
(environment variables ``FSSPEC_<PROTOCOL>_<OPTION>``, e.g. ``FSSPEC_S3_ENDPOINT_URL``), and botocore's
(``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ...) for ``s3://``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import logging
import os
import random
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bmclip.errors import ConfigError, check_int, check_real
from bmclip.io import atomic_writer
from bmclip.io.fs import filesystem, is_pipe, is_remote, protocol
from bmclip.io.retry import RetryError, backoff_delay, is_transient, retry

__all__ = ["DEFAULT_CACHE_BYTES", "DEFAULT_PREFETCH_SHARDS", "FetchOptions", "ShardCache", "ShardFetchError",
           "check_remote_urls", "fetch_shard", "is_remote", "open_stream"]

_log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 4 << 30
DEFAULT_PREFETCH_SHARDS = 2
_DIR_PREFIX = "bmclip-shards-"
_LOCK_NAME = ".lock"


@dataclass(frozen=True)
class FetchOptions:
    """Retry and timeout policy of shard downloads.

    ``attempts``: tries per shard (>= 1); the wait before try k+1 is ``min(backoff_max_s, backoff_s * 2**(k-1))``
    scaled by a random factor in [0.5, 1] (:func:`bmclip.io.retry.backoff_delay`). ``connect_timeout_s`` /
    ``read_timeout_s``: an attempt fails when connecting takes longer, or when no byte arrives for that long.
    ``chunk_bytes``: read size.
    """

    attempts: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    connect_timeout_s: float = 30.0
    read_timeout_s: float = 60.0
    chunk_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        check_int(self.attempts, "fetch attempts", 1)
        check_int(self.chunk_bytes, "fetch chunk_bytes", 1)
        for name in ("backoff_s", "backoff_max_s"):
            object.__setattr__(self, name, check_real(getattr(self, name), f"fetch {name}", 0))
        for name in ("connect_timeout_s", "read_timeout_s"):
            object.__setattr__(self, name, check_real(getattr(self, name), f"fetch {name}", 0, above=True))

    @classmethod
    def coerce(cls, value: FetchOptions | dict[str, Any] | None) -> FetchOptions:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            try:
                return cls(**value)
            except TypeError as e:
                raise ConfigError(f"fetch_options: {e}") from None
        raise ConfigError(f"fetch_options must be a dict or FetchOptions, got {type(value).__name__}")

    def delay(self, failed_attempt: int, rng: random.Random) -> float:
        """Seconds to wait after the ``failed_attempt``-th failure (1-based)."""
        return backoff_delay(failed_attempt, self.backoff_s, self.backoff_max_s, rng)


class ShardFetchError(OSError):
    """A shard could not be downloaded within its attempts."""

    def __init__(self, url: str, attempts: int, cause: BaseException | None):
        self.url, self.attempts, self.cause = url, attempts, cause
        what = f"{type(cause).__name__}: {cause}" if cause is not None else "unknown error"
        super().__init__(f"fetch failed after {attempts} attempt{'s' if attempts != 1 else ''}: {what}")


class _Cancelled(Exception):
    """The cache was closed while a download ran."""


# -- filesystems ------------------------------------------------------------------------------------
def _filesystem(url: str, storage_options: dict[str, Any] | None, opts: FetchOptions):
    """(fsspec filesystem, path inside it), with the fetch timeouts on the backends that take them."""
    return filesystem(url, storage_options, connect_timeout_s=opts.connect_timeout_s,
                      read_timeout_s=opts.read_timeout_s)


def check_remote_urls(urls: Iterable[str], storage_options: dict[str, Any] | None = None,
                      fetch_options: FetchOptions | None = None) -> None:
    """Fail early (no network) when a remote URL's backend is missing or the storage options are wrong."""
    opts = fetch_options or FetchOptions()
    seen: set[str] = set()
    for u in urls:
        p = protocol(u)
        if p in seen or is_pipe(u) or not is_remote(u):
            continue
        seen.add(p)
        _filesystem(u, storage_options, opts)


# -- one download -----------------------------------------------------------------------------------
class _PipeSource:
    """``pipe:CMD``: the command's standard output, with a stall timeout and its exit status checked."""

    def __init__(self, cmd: str, opts: FetchOptions):
        self.cmd, self.opts, self.size = cmd, opts, None
        self.err = tempfile.TemporaryFile()
        self.p = subprocess.Popen(cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=self.err, start_new_session=True)
        self.fd = self.p.stdout.fileno()

    def read(self) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], self.opts.read_timeout_s)
        if not ready:
            raise TimeoutError(f"no output from {self.cmd!r} for {self.opts.read_timeout_s:g} s")
        return os.read(self.fd, self.opts.chunk_bytes)

    def finish(self) -> None:
        try:
            rc = self.p.wait(timeout=self.opts.read_timeout_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.cmd!r} closed its output but did not exit") from None
        if rc != 0:
            self.err.seek(0)
            tail = self.err.read()[-400:].decode("utf-8", "replace").strip()
            raise OSError(f"command {self.cmd!r} exited with status {rc}" + (f": {tail}" if tail else ""))

    def close(self) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self.p.wait(timeout=5)
        self.p.stdout.close()
        self.err.close()


class _AsyncSource:
    """An async fsspec filesystem streamed through its loop; every call bounded by the timeouts."""

    def __init__(self, fs, path: str, opts: FetchOptions):
        from fsspec.asyn import sync  # optional dependency: fsspec (the "cloud" extra)

        self.sync, self.fs, self.opts = sync, fs, opts
        self.f = sync(fs.loop, fs.open_async, path, "rb", timeout=opts.connect_timeout_s + opts.read_timeout_s)
        self.first = True
        self.size = getattr(self.f, "size", None)

    def read(self) -> bytes:
        # the first read may also connect (the streamed GET starts there)
        t = self.opts.read_timeout_s + (self.opts.connect_timeout_s if self.first else 0.0)
        self.first = False
        out = self.sync(self.fs.loop, self.f.read, self.opts.chunk_bytes, timeout=t)
        if self.size is None:
            self.size = getattr(self.f, "size", None)
        return out

    def finish(self) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sync(self.fs.loop, self.f.close, timeout=5)


class _SyncSource:
    """A blocking fsspec filesystem (``file://`` and backends without an async interface)."""

    def __init__(self, fs, path: str, opts: FetchOptions):
        self.opts = opts
        try:
            self.size = int(fs.info(path)["size"])
        except (KeyError, TypeError, ValueError):
            self.size = None
        self.f = fs.open(path, "rb")

    def read(self) -> bytes:
        return self.f.read(self.opts.chunk_bytes)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.f.close()


def _open_source(url: str, opts: FetchOptions, storage_options: dict[str, Any] | None):
    if is_pipe(url):
        return _PipeSource(url[len("pipe:"):], opts)
    fs, path = _filesystem(url, storage_options, opts)
    if getattr(fs, "async_impl", False):
        try:
            return _AsyncSource(fs, path, opts)
        except NotImplementedError:  # no open_async in this backend
            pass
    return _SyncSource(fs, path, opts)


def _download(url: str, dest: Path, opts: FetchOptions, storage_options: dict[str, Any] | None,
              cancelled: Callable[[], bool]) -> int:
    """One attempt: the whole shard into ``dest`` (a temporary file renamed when complete); bytes written."""
    src = _open_source(url, opts, storage_options)
    try:
        n = 0
        # not durable: the cache folder is deleted at the next start, so an fsync would only force to disk
        # bytes that are read once from the page cache and deleted seconds later
        with atomic_writer(dest, "wb", durable=False) as f:
            while True:
                if cancelled():
                    raise _Cancelled(url)
                b = src.read()
                if not b:
                    break
                f.write(b)
                n += len(b)
            src.finish()
            if src.size is not None and n != src.size:
                raise OSError(f"incomplete download: {n} of {src.size} bytes")
        return n
    finally:
        src.close()


def fetch_shard(url: str, dest: str | os.PathLike, *, fetch_options: FetchOptions | None = None,
                storage_options: dict[str, Any] | None = None, cancelled: Callable[[], bool] | None = None,
                rng: random.Random | None = None) -> tuple[int, int]:
    """Download ``url`` to ``dest`` with retries; (bytes, attempts used). Raises :class:`ShardFetchError`.

    ``dest`` appears only when complete. A missing backend (ImportError) is raised at once: it is a
    configuration problem, not a flaky store.
    """
    opts = fetch_options or FetchOptions()
    cancelled = cancelled or (lambda: False)
    tries = 0

    def once() -> int:
        nonlocal tries
        if cancelled():
            raise _Cancelled(url)
        tries += 1
        return _download(url, Path(dest), opts, storage_options, cancelled)

    try:
        n = _retrying(once, url, opts, cancelled, rng)
    except ShardFetchError as e:  # the attempts really made (a permanent failure ends them early)
        raise ShardFetchError(url, tries, e.cause) from None
    return n, tries


def _transient(e: BaseException) -> bool:
    """Another attempt of a download may succeed (``io.retry.is_transient``; a cancellation is final)."""
    return is_transient(e, (_Cancelled,))


class _StopFlag:
    """A cache's stop request. ``set()`` takes ``gate``, which a retry warning also holds while it checks for
    the stop and logs: once ``set()`` has returned no prefetch retry is logged (the loader's own last word, e.g.
    that no shard could be downloaded, is not followed by retry lines of downloads it no longer wants)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.gate = threading.Lock()

    def set(self) -> None:
        with self.gate:
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


class _GatedLog:
    """The retry logger of a cancellable download: a warning is dropped once the download is cancelled."""

    def __init__(self, cancelled: Callable[[], bool], gate: threading.Lock):
        self.cancelled, self.gate = cancelled, gate

    def warning(self, msg: str, *args: Any) -> None:
        with self.gate:
            if not self.cancelled():
                _log.warning(msg, *args)


def _retrying(fn: Callable[[], Any], url: str, opts: FetchOptions, cancelled: Callable[[], bool],
              rng: random.Random | None) -> Any:
    """``fn()`` with the fetch policy's retries (:func:`bmclip.io.retry.retry`); a store's or command's
    failure that remains is a :class:`ShardFetchError`; ImportError (a missing backend) and cancellation pass."""

    def sleep(d: float) -> None:  # a backoff that ends early when the caller is cancelled
        end = time.monotonic() + d
        while time.monotonic() < end:
            if cancelled():
                raise _Cancelled(url)
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))

    gate = getattr(cancelled, "gate", None)
    try:
        return retry(fn, attempts=opts.attempts, base_delay=opts.backoff_s, max_delay=opts.backoff_max_s,
                     retry_on=_transient, what=f"shard {url}", sleep=sleep, rng=rng or random.Random(),
                     logger=_GatedLog(cancelled, gate) if gate is not None else _log)
    except RetryError as e:
        raise ShardFetchError(url, opts.attempts, e.__cause__) from None
    except (ImportError, _Cancelled):
        raise
    except Exception as e:  # a permanent failure (missing object, refused permission): not retried
        raise ShardFetchError(url, 1, e) from None


class _ShardStream(io.RawIOBase):
    """A remote shard read front to back without a local copy.

    A read that fails (a dropped connection, a stall past the read timeout, a 503, a command that exits
    non-zero) reopens the shard after the fetch policy's backoff and skips the bytes already delivered, so
    the caller sees one uninterrupted stream; ``attempts`` bounds the connections made for the whole shard.
    A shard that still fails raises :class:`ShardFetchError` (from ``read``, or from the first open).
    """

    def __init__(self, url: str, opts: FetchOptions, storage_options: dict[str, Any] | None):
        super().__init__()
        self.url, self.opts, self.storage_options = url, opts, storage_options
        self.src: Any = None
        self.pos = 0  # bytes taken from the shard so far (delivered or buffered)
        self.buf = memoryview(b"")
        self.opens = 0  # connections made (attempts)
        self.failures = 0
        self.eof = False
        self._fill()  # connect now: a shard that cannot be opened fails here

    def readable(self) -> bool:
        return True

    def _drop_source(self) -> None:
        if self.src is not None:
            self.src.close()
            self.src = None

    def _chunk(self) -> bytes:
        """One chunk at ``pos`` (reconnecting and skipping what was read when the source was dropped)."""
        if self.src is None:
            self.opens += 1
            self.src = _open_source(self.url, self.opts, self.storage_options)
            skip = self.pos
            while skip > 0:
                b = self.src.read()
                if not b:
                    raise OSError(f"shard ended after {self.pos - skip} bytes on reconnect ({self.pos} read before)")
                if len(b) > skip:
                    self.pos += len(b) - skip
                    return b[skip:]
                skip -= len(b)
        b = self.src.read()
        if b:
            self.pos += len(b)
            return b
        self.src.finish()
        if self.src.size is not None and self.pos != self.src.size:
            raise OSError(f"incomplete read: {self.pos} of {self.src.size} bytes")
        return b

    def _fill(self) -> None:
        def once() -> bytes:
            try:
                return self._chunk()
            except Exception as e:
                self._drop_source()
                if _transient(e):
                    self.failures += 1
                raise

        left = dataclasses.replace(self.opts, attempts=self.opts.attempts - self.failures)
        try:
            b = _retrying(once, self.url, left, lambda: False, None)
        except ShardFetchError as e:
            self._drop_source()
            raise ShardFetchError(self.url, self.opens, e.cause) from None
        if not b:
            self.eof = True
            self._drop_source()
        self.buf = memoryview(b)

    def readinto(self, b) -> int:
        if self.closed:
            raise ValueError("read of a closed shard stream")
        if not self.buf and not self.eof:
            self._fill()
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n

    def close(self) -> None:
        self._drop_source()
        super().close()


def open_stream(url: str, *, fetch_options: FetchOptions | dict[str, Any] | None = None,
                storage_options: dict[str, Any] | None = None) -> io.BufferedReader:
    """A remote shard (fsspec URL or ``pipe:CMD``) as a readable binary stream, front to back.

    Same timeouts and retries as :func:`fetch_shard`; a failed read reconnects and continues where it
    stopped. Raises :class:`ShardFetchError` (an OSError) when the shard cannot be opened or read within the
    attempts, ImportError/``CloudExtraMissing`` when the fsspec backend is missing.
    """
    opts = FetchOptions.coerce(fetch_options)
    return io.BufferedReader(_ShardStream(url, opts, storage_options), buffer_size=opts.chunk_bytes)


# -- the cache --------------------------------------------------------------------------------------
def _remove_stale(root: Path, min_age_s: float = 60.0) -> None:
    """Delete cache folders under ``root`` left by processes that died (their lock is free)."""
    for d in root.glob(f"{_DIR_PREFIX}*"):
        if not d.is_dir():
            continue
        lock = d / _LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:  # a folder being created, or one whose lock is gone: only when old
            with contextlib.suppress(OSError):
                if time.time() - d.stat().st_mtime > min_age_s:
                    shutil.rmtree(d, ignore_errors=True)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live cache
            os.close(fd)
            continue
        shutil.rmtree(d, ignore_errors=True)
        os.close(fd)


def _default_root() -> Path:
    """``<tmp>/bmclip-shard-cache-<uid>``: one per user, so users of a shared machine do not collide."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"bmclip-shard-cache-{uid}"


class _Entry:
    __slots__ = ("state", "path", "size", "reserved", "refs", "done", "error")

    def __init__(self, path: Path, reserved: int):
        self.state = "fetching"  # -> "ready" | "failed"
        self.path, self.size, self.reserved = path, 0, reserved
        self.refs = 0
        self.done = threading.Event()
        self.error: str | None = None


def _shutdown(stop: _StopFlag, folder: Path, lock_fd: int, pid: int) -> None:
    # Runs wherever the cache is collected (possibly fsspec's event-loop thread): it must not block, so the
    # prefetch thread is only told to stop (it polls; a download in progress is cancelled between chunks).
    # A forked child (DataLoader worker) holding a copy of the cache leaves the parent's folder alone.
    if os.getpid() != pid:
        return
    stop.set()
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.close(lock_fd)


def _prefetch_loop(ref: weakref.ref, stop: _StopFlag, cv: threading.Condition, folder: Path) -> None:
    try:
        _prefetch(ref, stop, cv)
    finally:
        if stop.is_set() or ref() is None:  # a download cancelled at shutdown may have made the folder again
            shutil.rmtree(folder, ignore_errors=True)


def _prefetch(ref: weakref.ref, stop: _StopFlag, cv: threading.Condition) -> None:
    rng = random.Random()
    while not stop.is_set():
        cache = ref()
        if cache is None:
            return
        job = cache._next_job()
        if job is None:
            del cache
            with cv:
                cv.wait(0.2)
            continue
        shard, entry = job
        url, opts, so = cache.urls[shard], cache.fetch_options, cache.storage_options
        del cache  # the download holds no reference: a dropped cache cancels it

        def cancelled() -> bool:
            return stop.is_set() or ref() is None

        cancelled.gate = stop.gate  # retry warnings and the stop exclude each other (see _StopFlag)
        result: Any
        try:
            result = fetch_shard(url, entry.path, fetch_options=opts, storage_options=so, cancelled=cancelled,
                                 rng=rng)
        except _Cancelled:
            return
        except BaseException as e:  # recorded on the entry; the loader reports it when it needs the shard
            result = e
        cache = ref()
        if cache is None:
            return
        cache._finish(shard, entry, result)
        del cache


class ShardCache:
    """Local copies of remote shards for one loader split, fetched ahead of use and deleted after it.

    ``open(shard, ahead, opener)`` returns ``opener(local_path)`` (the loader's TarIndex) once the shard
    is downloaded, or None when its download failed (``failure(shard)`` says why); ``ahead`` lists the
    shards the loader will open next, in order, and the background thread fetches the first
    ``prefetch_shards`` of them within ``cache_bytes``. ``stats()``: ``fetch_wait_s`` (time ``open``
    waited for downloads), ``bytes_fetched``, ``shards_fetched``, ``fetch_retries`` (attempts beyond the
    first of each shard), ``fetch_failures``, ``cache_bytes_used``.
    """

    def __init__(self, urls: Sequence[str], *, cache_dir: str | os.PathLike | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, prefetch_shards: int = DEFAULT_PREFETCH_SHARDS,
                 fetch_options: FetchOptions | dict[str, Any] | None = None,
                 storage_options: dict[str, Any] | None = None, name: str = "split"):
        self.check_args(cache_bytes, prefetch_shards)
        self.urls = list(urls)
        self.cache_bytes, self.prefetch_shards = int(cache_bytes), int(prefetch_shards)
        self.fetch_options = FetchOptions.coerce(fetch_options)
        self.storage_options = dict(storage_options or {})
        root = Path(cache_dir) if cache_dir else _default_root()
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{name}-{os.getpid()}-", dir=root))
        lock_fd = os.open(self.dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        self._cv = threading.Condition(threading.RLock())
        self._entries: dict[int, _Entry] = {}
        self._ahead: list[int] = []
        self._released: deque = deque()  # (shard, entry) appended by finalizers (any thread, lock-free)
        self._failures: dict[int, str] = {}
        self._stop = _StopFlag()
        self._thread: threading.Thread | None = None
        self._stats = {"fetch_wait_s": 0.0, "bytes_fetched": 0, "shards_fetched": 0, "fetch_retries": 0,
                       "fetch_failures": 0}
        self._pid = os.getpid()
        self._finalizer = weakref.finalize(self, _shutdown, self._stop, self.dir, lock_fd, self._pid)

    @staticmethod
    def check_args(cache_bytes: int, prefetch_shards: int) -> None:
        """ConfigError for a cache size or prefetch depth that is not a non-negative integer."""
        check_int(cache_bytes, "cache_bytes", 0)
        check_int(prefetch_shards, "prefetch_shards", 0)

    # -- public ------------------------------------------------------------------------------------
    def open(self, shard: int, ahead: Sequence[int], opener: Callable[[str], Any]):
        """``opener(path of the local copy)``, or None when the download failed (see :meth:`failure`)."""
        t0 = time.perf_counter()
        with self._cv:
            self._drain_released()
            self._ahead = [s for s in dict.fromkeys(int(s) for s in ahead)
                           if s != shard and is_remote(self.urls[s])][: self.prefetch_shards]
            e = self._entries.get(shard)
            if e is not None and e.state == "failed":  # a download ahead already spent its attempts
                del self._entries[shard]
                self._failures[shard] = e.error or "fetch failed"
                self._evict()
                self._cv.notify_all()
                return None
            own = e is None
            if own:  # fetched here, now; its expected size counts against what may be fetched ahead
                e = self._entries[shard] = _Entry(self._path(shard), self._estimate())
            e.refs += 1  # pinned while waiting and opening
            ready = e.state == "ready"
            self._start_thread()
            self._cv.notify_all()
        if own:
            try:
                result: Any = fetch_shard(self.urls[shard], e.path, fetch_options=self.fetch_options,
                                          storage_options=self.storage_options, cancelled=self._stop.is_set)
            except _Cancelled:
                result = OSError("the shard cache was closed")
            except Exception as err:  # a failed download: reported, counted by the loader
                result = err
            except BaseException as err:  # KeyboardInterrupt etc.: settle the entry (no waiter hangs), re-raise
                self._finish(shard, e, err)
                with self._cv:
                    self._unpin(shard, e)
                raise
            self._finish(shard, e, result)
            if isinstance(result, ImportError):
                with self._cv:
                    self._unpin(shard, e)
                raise result
        else:
            while not e.done.wait(0.2):
                if self._stop.is_set():
                    break
        with self._cv:
            if not ready:
                self._stats["fetch_wait_s"] += time.perf_counter() - t0
            if e.state != "ready":
                self._failures[shard] = e.error or "the shard cache was closed"
                self._unpin(shard, e)
                return None
        try:
            obj = opener(str(e.path))
        except BaseException:
            with self._cv:
                self._unpin(shard, e)
            raise
        with self._cv:
            self._failures.pop(shard, None)
        try:  # the file stays until the opened object (and every view into it) is gone
            weakref.finalize(obj, self._released.append, (shard, e))
        except TypeError:  # an object without weak references: its mapping keeps the data after unlink
            self._released.append((shard, e))
        return obj

    def usable(self) -> bool:
        """False in a forked child (its copy has no prefetch thread and shares the parent's folder) or when closed."""
        return self._pid == os.getpid() and not self._stop.is_set()

    def failure(self, shard: int) -> str | None:
        """Why the last :meth:`open` of ``shard`` returned None (None after a successful open)."""
        with self._cv:
            return self._failures.get(shard)

    def stats(self) -> dict[str, Any]:
        with self._cv:
            self._drain_released()
            self._evict()
            out = dict(self._stats)
            out["cache_bytes_used"] = self._used()
            return out

    def close(self) -> None:
        """Stop the prefetch thread and delete the cache folder (also done when the cache is collected)."""
        self._finalizer()

    # -- internals ---------------------------------------------------------------------------------
    def _path(self, shard: int) -> Path:
        base = self.urls[shard].rstrip("/").rsplit("/", 1)[-1]
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[-80:] or "shard"
        return self.dir / f"{shard:07d}-{base}"

    def _start_thread(self) -> None:
        if self._thread is not None or self.prefetch_shards == 0:
            return
        t = threading.Thread(target=_prefetch_loop, args=(weakref.ref(self), self._stop, self._cv, self.dir),
                             name="ShardCache-prefetch", daemon=True)
        self._thread = t
        t.start()

    def _estimate(self) -> int:
        """Expected size of a shard not yet fetched: the mean of those fetched so far."""
        n = self._stats["shards_fetched"]
        return self._stats["bytes_fetched"] // n if n else 0

    def _used(self) -> int:
        return sum(e.size if e.state == "ready" else e.reserved for e in self._entries.values())

    def _drain_released(self) -> None:
        while self._released:
            shard, e = self._released.popleft()
            e.refs -= 1
        self._evict()

    def _unpin(self, shard: int, e: _Entry) -> None:
        e.refs -= 1
        if e.state == "failed" and self._entries.get(shard) is e:
            del self._entries[shard]
        self._evict()

    def _evict(self) -> None:
        """Delete the files nobody uses and that are not among the next shards."""
        keep = set(self._ahead)
        for s, e in list(self._entries.items()):
            if e.refs > 0 or s in keep or e.state == "fetching":
                continue
            del self._entries[s]
            if e.state == "ready":
                with contextlib.suppress(OSError):
                    e.path.unlink()

    def _next_job(self) -> tuple[int, _Entry] | None:
        with self._cv:
            self._drain_released()
            if self._stop.is_set():
                return None
            used = self._used()
            if self._stats["shards_fetched"] == 0 and any(e.state == "fetching" for e in self._entries.values()):
                return None  # no size estimate yet: one download at a time until the first completes
            est = self._estimate()
            for s in self._ahead:
                if s in self._entries:
                    continue
                if used + est > self.cache_bytes:
                    return None
                e = self._entries[s] = _Entry(self._path(s), est)
                return s, e
            return None

    def _finish(self, shard: int, e: _Entry, result: Any) -> None:
        with self._cv:
            if isinstance(result, tuple):
                nbytes, attempts = result
                e.state, e.size = "ready", int(nbytes)
                self._stats["bytes_fetched"] += int(nbytes)
                self._stats["shards_fetched"] += 1
                self._stats["fetch_retries"] += attempts - 1
            else:
                e.state = "failed"
                e.error = str(result) if isinstance(result, ShardFetchError) else \
                    f"{type(result).__name__}: {result}"
                if isinstance(result, ShardFetchError):
                    self._stats["fetch_retries"] += result.attempts - 1
                self._stats["fetch_failures"] += 1
                _log.warning("shard %s could not be downloaded (the loader skips it): %s", self.urls[shard], e.error)
            e.done.set()
            self._evict()
            self._cv.notify_all()
