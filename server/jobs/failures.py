"""What a job-store or storage failure is, and how a loop rides one out.

Every layer that talks to the job store (SQLite or Redis) or writes to the data dir meets the same
few failures, and each must answer them alike: the API with one status, the worker by backing off
and carrying on, the health probes with the truth. They are classified here, once:

* **unavailable** (transient; try again): Redis unreachable, timing out, loading or read-only;
  SQLite locked past its busy timeout, an I/O error, or a damaged file; the S3 bucket of the file
  store unreachable, timing out, or answering 5xx / SlowDown. The API answers 503 with
  `Retry-After`; workers back off and retry.
* **full**: no space left on the device (ENOSPC, EDQUOT) while the file store or ffmpeg writes,
  SQLite's "database or disk is full", Redis out of memory. The API answers 507; a job failing this
  way ends with that error; workers back off and retry their store calls until space is back.

Anything else is not a storage failure (None) and keeps its usual handling: a bug stays a bug.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Literal

import redis
from botocore import exceptions as boto

FailureKind = Literal["unavailable", "full"]

# Exception classes that may carry a storage failure: the API registers its handler for these.
STORAGE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, redis.RedisError, OSError, boto.BotoCoreError,
                                               boto.ClientError)

_UNAVAILABLE_REDIS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError,
                      redis.exceptions.TryAgainError, redis.exceptions.MasterDownError)
_UNAVAILABLE_BUCKET = (boto.EndpointConnectionError, boto.ConnectionClosedError, boto.ReadTimeoutError,
                       boto.ConnectTimeoutError, boto.ResponseStreamingError, boto.IncompleteReadError)
_BUSY_BUCKET_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}
_SQLITE_FULL = 13
_SQLITE_DAMAGED = {11: "SQLITE_CORRUPT", 26: "SQLITE_NOTADB"}
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How the C library words ENOSPC: ffmpeg reports a full disk only in its log, which its RuntimeError carries.
_NO_SPACE_TEXT = os.strerror(errno.ENOSPC)
FREE_SPACE_HINT = "free space in the data dir"


@dataclass(frozen=True)
class StorageFailure:
    """A classified failure: its kind and a message for clients and logs."""

    kind: FailureKind
    detail: str

    @property
    def status_code(self) -> int:
        return 507 if self.kind == "full" else 503

    @property
    def error_type(self) -> str:
        return "insufficient_storage" if self.kind == "full" else "store_unavailable"


def storage_failure(exc: BaseException) -> StorageFailure | None:
    """The storage failure `exc` is, or was caused by; None for any other error.

    The whole chain (`__cause__`, `__context__`) is read, and a full disk wins over anything else in
    it: SQLite's own rollback after SQLITE_FULL can fail with a second, vaguer error that hides it.
    """
    found = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        failure = _classify_one(current)
        if failure is not None:
            found.append(failure)
        current = current.__cause__ or current.__context__
    return next((f for f in found if f.kind == "full"), found[0] if found else None)


def storage_failure_or_raise(exc: BaseException) -> StorageFailure:
    """The storage failure `exc` is; any other error (a bug) is re-raised as it is."""
    failure = storage_failure(exc)
    if failure is None:
        raise exc
    return failure


def _classify_one(exc: BaseException) -> StorageFailure | None:
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return StorageFailure("full", f"the job store (Redis) is out of memory ({exc}); raise its maxmemory "
                                      "or free memory")
    if isinstance(exc, _UNAVAILABLE_REDIS):  # BusyLoadingError (a Redis reading its data back) included
        return StorageFailure("unavailable", f"the job store (Redis) is unreachable ({_named(exc)}); try again "
                                             "shortly")
    if isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith("MISCONF"):
        return StorageFailure("unavailable", f"the job store (Redis) refuses writes: it cannot persist ({exc})")
    if isinstance(exc, sqlite3.Error):
        return _classify_sqlite(exc)
    if isinstance(exc, _UNAVAILABLE_BUCKET) or (isinstance(exc, boto.ClientError) and _bucket_busy(exc)):
        return StorageFailure("unavailable", f"the file store (S3 bucket) is unreachable ({_named(exc)}); try "
                                             "again shortly")
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
        return StorageFailure("full", f"no space left on device; {FREE_SPACE_HINT}")
    if isinstance(exc, RuntimeError) and _NO_SPACE_TEXT in str(exc):
        return StorageFailure("full", f"no space left on device; {FREE_SPACE_HINT}")
    return None


def _bucket_busy(exc: boto.ClientError) -> bool:
    """An S3 error that says "later" (5xx, throttling), not "never" (a missing bucket, denied access)."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return status >= 500 or exc.response.get("Error", {}).get("Code") in _BUSY_BUCKET_CODES


def sqlite_damage(exc: sqlite3.Error) -> str | None:
    """SQLITE_CORRUPT or SQLITE_NOTADB when `exc` says the file itself is damaged; None for anything else (a lock,
    an I/O error, a full disk: nothing that moving the file aside would mend)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else _SQLITE_DAMAGED.get(code & 0xFF)  # the primary code of an extended one


def _classify_sqlite(exc: sqlite3.Error) -> StorageFailure | None:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == _SQLITE_FULL:
        return StorageFailure("full", f"the job store is full ({exc}); {FREE_SPACE_HINT}")
    if sqlite_damage(exc) is not None:
        return StorageFailure("unavailable", f"the job store's file is damaged ({exc}); restore it from a backup "
                                             "or move it aside")
    if type(exc) in (sqlite3.OperationalError, sqlite3.DatabaseError):  # not a misuse (Programming, Integrity...)
        return StorageFailure("unavailable", f"the job store is unavailable ({exc}); try again shortly")
    return None


def _named(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class StoreOutage:
    """One loop's view of the store while it retries: how long to wait before the next try (capped
    exponential backoff), and one log line when the store becomes unusable (or the reason's kind
    changes) and one when it is usable again, never one per retry. Safe to share between threads."""

    def __init__(self, logger: logging.Logger, what: str, first_wait_s: float = 0.25, max_wait_s: float = 5.0):
        self.logger, self.what = logger, what
        self.first_wait_s, self.max_wait_s = first_wait_s, max_wait_s
        self.failure: StorageFailure | None = None
        self._next_wait_s = first_wait_s
        self._since = 0.0
        self._retries = 0
        self._lock = threading.Lock()

    def failed(self, failure: StorageFailure) -> float:
        """Note a failed try; returns the seconds to wait before the next one."""
        with self._lock:
            if self.failure is None or self.failure.kind != failure.kind:
                if self.failure is None:
                    self._since = time.monotonic()
                self.logger.warning("store unusable %s kind=%s detail=%r; retrying with backoff up to %gs",
                                    self.what, failure.kind, failure.detail, self.max_wait_s)
            self.failure = failure
            self._retries += 1
            wait = self._next_wait_s
            self._next_wait_s = min(wait * 2, self.max_wait_s)
            return wait

    def noted(self, exc: BaseException) -> float | None:
        """`failed` for any exception: the seconds to wait when `exc` is a storage failure (logged once per
        outage), None for any other error, which the caller handles as the bug it is."""
        failure = storage_failure(exc)
        return None if failure is None else self.failed(failure)

    def recovered(self) -> None:
        """Note a successful try: logs the recovery once, and the next failure starts its backoff afresh."""
        with self._lock:
            if self.failure is not None:
                self.logger.info("store usable again %s after_s=%.1f retries=%d", self.what,
                                 time.monotonic() - self._since, self._retries)
            self.failure, self._next_wait_s, self._retries = None, self.first_wait_s, 0
