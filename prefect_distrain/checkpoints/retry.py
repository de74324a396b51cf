"""Storage that fails now and then: a write is retried with a capped, jittered exponential
backoff, on a fresh filesystem each time (so credentials that expired are looked up again).

```python
files = with_retries("uploading checkpoint 3", policy, lambda fs: upload_into(fs))
```
Only transient errors are retried: timeouts, dropped or refused connections, throttling, a
server's 5xx, and expired credentials (a fresh client may hold new ones). Anything else (a
missing bucket, access denied, a full disk) fails at once. A write that used up its retries
raises its last error.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

logger = logging.getLogger("prefect_distrain")

T = TypeVar("T")

#: Errors of S3-like services, by code, that a later try may not meet.
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                   "TooManyRequests", "RequestTimeout", "RequestTimeoutException",
                   "ServiceUnavailable", "InternalError", "ExpiredToken", "ExpiredTokenException",
                   "TokenRefreshRequired", "RequestTimeTooSkewed"}
#: botocore / aiohttp / fsspec errors of the connection itself (by class name: no import).
TRANSIENT_TYPES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                   "ConnectTimeoutError", "ProxyConnectionError", "HTTPClientError",
                   "IncompleteReadError", "ResponseStreamingError", "ClientPayloadError",
                   "ServerDisconnectedError", "ClientConnectorError", "FSTimeoutError"}
_TRANSIENT_ERRNOS = {errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                     errno.EPIPE, errno.EREMOTEIO, errno.EAGAIN, errno.EHOSTUNREACH,
                     errno.ENETUNREACH}


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how patiently, a storage write is tried again."""

    retries: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 20.0

    def pause(self, retry: int) -> float:
        """Before retry ``retry`` (1, 2, ...): doubling from ``backoff_s``, at most
        ``backoff_max_s``, with full jitter (writers that failed together spread out)."""
        return random.uniform(0, min(self.backoff_max_s, self.backoff_s * 2 ** (retry - 1)))


@dataclass
class RetryCounts:
    """The storage retries of a run so far: the workers' uploads and the driver's writes."""

    uploads: int = 0
    driver: int = 0

    def driver_retried(self) -> None:
        self.driver += 1

    def snapshot(self) -> dict[str, int]:
        return {"uploads": self.uploads, "driver": self.driver}


def is_transient(error: BaseException) -> bool:
    """Whether a later try may succeed where this one failed (see the module's docstring)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _transient_itself(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _transient_itself(error: BaseException) -> bool:
    if type(error).__name__ in TRANSIENT_TYPES or isinstance(error, (TimeoutError,
                                                                     ConnectionError)):
        return True
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if code in TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
            return True
    return isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS


def with_retries(what: str, policy: RetryPolicy, call: Callable[[bool], T],
                 counter: Callable[[], None] | None = None) -> T:
    """``call(fresh)``: ``fresh`` is False on the first try, True on every retry (make a new
    filesystem). ``counter`` is called once per retry."""
    for retry in range(policy.retries + 1):
        try:
            return call(retry > 0)
        except Exception as error:
            if retry >= policy.retries or not is_transient(error):
                raise
            pause = policy.pause(retry + 1)
            logger.warning("%s failed (%s: %s); retry %d of %d in %.1f s", what,
                           type(error).__name__, str(error)[:200], retry + 1, policy.retries,
                           pause)
            if counter is not None:
                counter()
            time.sleep(pause)
    raise AssertionError("unreachable")
