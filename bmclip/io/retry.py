"""Retry with exponential backoff: for network and object-store calls that fail transiently.

``retry(fn, attempts=5, base_delay=0.5, max_delay=30.0, retry_on=(OSError,), what="upload of x")`` calls
``fn()`` until it returns; after a failure that ``retry_on`` accepts it sleeps ``min(max_delay, base_delay *
2**k)`` (k = 0, 1, ...; with ``jitter`` a uniformly drawn 50-100 % of that, so that many processes that failed
together do not retry together) and tries again. A failure ``retry_on`` refuses is raised at once; the last
failure of ``attempts`` raises :class:`RetryError` naming ``what`` and the number of attempts, chained to the
last error.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["RetryError", "backoff_delays", "retry"]

T = TypeVar("T")
log = logging.getLogger(__name__)


class RetryError(RuntimeError):
    """An operation still failed after its last attempt (``__cause__`` is the last error)."""


def backoff_delays(attempts: int, base_delay: float, max_delay: float) -> list[float]:
    """The sleeps between ``attempts`` tries, before jitter: ``min(max_delay, base_delay * 2**k)``."""
    return [min(max_delay, base_delay * 2.0**k) for k in range(max(0, attempts - 1))]


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
) -> T:
    """``fn()``, retried with exponential backoff on the failures ``retry_on`` accepts (exception types or a
    predicate); raises RetryError after ``attempts`` failed tries."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if isinstance(retry_on, type):
        retry_on = (retry_on,)
    accept = None if isinstance(retry_on, tuple) else retry_on
    delays = backoff_delays(attempts, base_delay, max_delay)
    for k in range(attempts):
        try:
            return fn()
        except Exception as e:
            transient = accept(e) if accept is not None else isinstance(e, retry_on)
            if not transient:
                raise
            if k == attempts - 1:
                raise RetryError(f"{what} failed after {attempts} attempts: {type(e).__name__}: {e}") from e
            delay = delays[k] * (0.5 + 0.5 * random.random()) if jitter else delays[k]
            log.warning("%s failed (attempt %d of %d: %s: %s); retrying in %.2f s",
                        what, k + 1, attempts, type(e).__name__, e, delay)
            sleep(delay)
    raise AssertionError("unreachable")
