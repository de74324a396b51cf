"""One tree of typed errors. Each says whether retrying can help (``retryable``).

Errors cross process boundaries (Ray workers -> driver -> Prefect's result store), so every
error with its own constructor pickles through ``__reduce__``.
"""

from __future__ import annotations


class DistrainError(Exception):
    """Base of every error this package raises itself."""

    #: True when the same call may succeed later (lost node, busy cluster); False for a bug or
    #: a request that can never be met.
    retryable: bool = False


class ConfigurationError(DistrainError, ValueError):
    """A bad argument to ``train`` / ``Trainer``; the message names the fix."""


class DataChangedError(ConfigurationError):
    """A resume or warm start onto data other than its checkpoint was trained on, with
    ``DataConfig(on_data_change="fail")``; ``changes`` says what differs."""

    def __init__(self, message: str, changes: list[str] | None = None):
        super().__init__(message)
        self.changes = list(changes or [])

    def __reduce__(self):
        return (type(self), (self.args[0], self.changes))


class ResourcesUnavailableError(DistrainError):
    """The cluster cannot hold the worker group that was asked for."""

    def __init__(self, message: str, *, requested: dict | None = None,
                 available: dict | None = None, retryable: bool = False):
        super().__init__(message)
        self.requested = requested or {}
        self.available = available or {}
        self.retryable = retryable

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, {
            "requested": self.requested, "available": self.available,
            "retryable": self.retryable}))


class WorkerLostError(DistrainError):
    """A worker process or its node went away while training ran."""

    retryable = True

    def __init__(self, message: str, *, rank: int | None = None):
        super().__init__(message)
        self.rank = rank

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, {"rank": self.rank}))


class WorkerError(DistrainError):
    """A worker raised an exception whose own type could not be rebuilt on the driver.

    The usual case keeps the original exception (its type, so ``except ValueError`` still
    works); this one stands in when the type lives in a module the driver has not imported
    (only the worker can, or a framework such as TensorFlow that the driver never imports).
    ``exc_type`` is the qualified name of the worker's type.
    """

    def __init__(self, message: str, *, rank: int, exc_type: str, traceback: str):
        super().__init__(message)
        self.rank = rank
        self.exc_type = exc_type
        self.traceback = traceback

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, {
            "rank": self.rank, "exc_type": self.exc_type, "traceback": self.traceback}))


class RemoteTraceback(Exception):
    """The traceback of a worker's exception as it was on the worker.

    Set as ``__cause__`` of the re-raised exception, as ``concurrent.futures`` does, so the
    printed error shows where in the user's function it happened and on which rank.
    """

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class CheckpointUploadError(DistrainError):
    """A worker could not copy its checkpoint files into storage. The checkpoint was not
    committed; the previous one stays the latest."""

    retryable = True

    def __init__(self, message: str, *, index: int, rank: int):
        super().__init__(message)
        self.index = index
        self.rank = rank

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, {"index": self.index, "rank": self.rank}))


class UnequalReportsError(DistrainError):
    """Ranks called ``report()`` a different number of times, and a rank waits in a report
    that can never complete. The user's bug: never restarted or retried."""

    def __init__(self, message: str, *, counts: dict[int, int]):
        super().__init__(message)
        self.counts = counts

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, {"counts": self.counts}))


class StorageError(DistrainError):
    """The driver could not read or write the run's storage (disk full, no permission, a
    network error): infrastructure, retried; the original error is the cause."""

    retryable = True


class TrainingHangError(DistrainError):
    """Ranks made no progress for ``FailureConfig.hang_timeout_s``: stuck in a collective, a
    deadlock, a data loader that never yields. Infrastructure (restarted, retried); every
    rank's stack is in ``forensics`` and in the run's summary."""

    retryable = True

    def __init__(self, message: str, *, ranks: list[int] | None = None, forensics: str = ""):
        super().__init__(message)
        self.ranks = ranks or []
        self.forensics = forensics

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, {"ranks": self.ranks,
                                                   "forensics": self.forensics}))


class RunTimeoutError(DistrainError):
    """The run's deadline (``RunConfig(timeout_s)``) passed: it was stopped, what it committed
    stays. Not retried: a retry would meet the same deadline."""


class PreemptionError(DistrainError):
    """A worker (or the driver) was told to stop by SIGTERM: a spot reclaim, a node drain, an
    eviction. What it committed in the grace period stays; a worker's preemption restarts the
    group within ``FailureConfig.max_preemption_failures`` (not ``max_failures``), the driver's
    ends the run resumable (``resume_from_checkpoint="latest"``)."""

    retryable = True

    def __init__(self, message: str, *, ranks: list[int] | None = None, driver: bool = False):
        super().__init__(message)
        self.ranks = ranks or []
        self.driver = driver

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, {"ranks": self.ranks, "driver": self.driver}))


class CheckpointCorruptError(DistrainError):
    """A checkpoint's files do not match its manifest (missing, wrong size or hash)."""


class UnsafeCheckpointError(DistrainError):
    """A checkpoint file holds pickled objects that could run code when loaded; refused."""


def _rebuild(cls, args, state):
    error = cls(*args, **state)
    return error


class StopTraining(BaseException):
    """Raised by ``report()`` on a worker once a callback has stopped the run (e.g. early
    stopping): it ends the training function cleanly. A BaseException, so that a loop's
    ``except Exception`` does not swallow it. Not a failure: no restart, no retry."""
