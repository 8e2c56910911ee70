"""Retry with exponential backoff: THE backoff schedule of every network and object-store call that can fail
transiently (shard downloads of the training loader and the evaluation reader, build-dataset's reads and uploads).

``backoff_delay(k, base_delay, max_delay, rng)`` is the wait after the k-th failed try (1-based):
``min(max_delay, base_delay * 2**(k-1))`` scaled by a random factor in [0.5, 1] (``jitter``).
``retry(fn, attempts=5, base_delay=0.5, max_delay=30.0, retry_on=(OSError,), what="upload of x")`` calls
``fn()`` until it returns; after a failure that ``retry_on`` accepts it sleeps ``min(max_delay, base_delay *
2**k)`` (k = 0, 1, ...; with ``jitter`` a uniformly drawn 50-100 % of that, so that many processes that failed
together do not retry together) and tries again. A failure ``retry_on`` refuses is raised at once; the last
failure of ``attempts`` raises :class:`RetryError` naming ``what`` and the number of attempts, chained to the
last error.

``is_transient(e)`` is THE answer to "may another attempt succeed?" that every caller passes as ``retry_on``:
I/O and connection errors yes; a missing object, a refused permission, a missing backend, a bad configuration
or credentials, an HTTP status a retry cannot change, and programming errors no.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from bmclip.errors import BmclipError

__all__ = ["PERMANENT_HTTP_STATUS", "RetryError", "backoff_delay", "backoff_delays", "is_transient", "retry"]

T = TypeVar("T")
log = logging.getLogger(__name__)


# HTTP statuses that another attempt cannot change (fsspec's HTTP and aiohttp errors carry ``.status``)
PERMANENT_HTTP_STATUS = frozenset({400, 401, 403, 404, 405, 410})
_PERMANENT_TYPES = (
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,  # the object or the place
    ImportError,  # a missing fsspec backend (s3fs, gcsfs): configuration, not a flaky store
    BmclipError,  # bmclip's own verdicts (bad config, unusable data, an upload already given up)
    TypeError, ValueError, KeyError, AttributeError, NotImplementedError,  # bugs and bad arguments
)
# botocore's configuration errors, by name (botocore is optional): no credentials or region appear by retrying
_PERMANENT_NAMES = frozenset({"NoCredentialsError", "PartialCredentialsError", "NoRegionError"})


def is_transient(e: BaseException, permanent: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether another attempt of a store, network or command operation that raised ``e`` may succeed (see the
    module docstring); ``permanent``: the caller's own exception types that end the retries too."""
    if isinstance(e, _PERMANENT_TYPES + tuple(permanent)) or type(e).__name__ in _PERMANENT_NAMES:
        return False
    status = getattr(e, "status", None)
    return not (isinstance(status, int) and status in PERMANENT_HTTP_STATUS)


class RetryError(RuntimeError):
    """An operation still failed after its last attempt (``__cause__`` is the last error)."""


def backoff_delay(failed_attempt: int, base_delay: float, max_delay: float, rng: random.Random | None = None,
                  jitter: bool = True) -> float:
    """Seconds to wait after the ``failed_attempt``-th failed try (1-based): ``min(max_delay, base_delay *
    2**(failed_attempt-1))``, times a uniform factor in [0.5, 1] with ``jitter`` (``rng``: the random source)."""
    d = min(max_delay, base_delay * 2.0 ** (failed_attempt - 1))
    return d * (0.5 + 0.5 * (rng or random).random()) if jitter else d


def backoff_delays(attempts: int, base_delay: float, max_delay: float) -> list[float]:
    """The sleeps between ``attempts`` tries, before jitter: ``min(max_delay, base_delay * 2**k)``."""
    return [backoff_delay(k + 1, base_delay, max_delay, jitter=False) for k in range(max(0, attempts - 1))]


def retry(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 30.0,
    retry_on: tuple[type[BaseException], ...] | Callable[[BaseException], bool] = (OSError,),
    what: str = "operation",
    jitter: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    logger: logging.Logger | None = None,
) -> T:
    """``fn()``, retried with exponential backoff on the failures ``retry_on`` accepts (exception types or a
    predicate); raises RetryError after ``attempts`` failed tries. ``sleep`` waits (it may raise to give up
    early, e.g. when the caller was cancelled), ``rng`` draws the jitter, ``logger`` gets a warning per retry."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if isinstance(retry_on, type):
        retry_on = (retry_on,)
    accept = None if isinstance(retry_on, tuple) else retry_on
    for k in range(attempts):
        try:
            return fn()
        except Exception as e:
            transient = accept(e) if accept is not None else isinstance(e, retry_on)
            if not transient:
                raise
            if k == attempts - 1:
                raise RetryError(f"{what} failed after {attempts} attempts: {type(e).__name__}: {e}") from e
            delay = backoff_delay(k + 1, base_delay, max_delay, rng, jitter)
            (logger or log).warning("%s failed (attempt %d of %d: %s: %s); retrying in %.2f s",
                        what, k + 1, attempts, type(e).__name__, e, delay)
            sleep(delay)
    raise AssertionError("unreachable")
