"""The workers' errors of an attempt, made into the one exception ``train`` raises and the
plain facts the failure policy decides on.

A lost worker explains whatever its peers raised, so it wins. Otherwise the root cause wins
over its echoes: a rank's own exception over a peer's collective error ("connection closed by
peer"), then the lowest rank. It is raised with its own type (or ``WorkerError`` when that type
lives in a module the driver has not imported), a note naming the ranks, and the worker's
traceback as its cause.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from ray import cloudpickle

from ..exceptions import (
    DistrainError,
    PreemptionError,
    RemoteTraceback,
    WorkerError,
    WorkerLostError,
)
from .failure_policy import Failure


def worker_failure(errors: dict[int, Any], world_size: int, last_iterations: dict[int, int],
                   is_runtime: Callable[[BaseException], bool],
                   fatal_exceptions: tuple[type[BaseException], ...]
                   ) -> tuple[BaseException, Failure]:
    """(the exception to raise, the facts) from each failed rank's error."""
    failed = sorted(errors)
    lost = [(r, e) for r, e in sorted(errors.items()) if isinstance(e, WorkerLostError)]
    if lost:
        rank, error = lost[0]
        others = [r for r in failed if r != rank]
        if others:
            error.add_note(f"Ranks {others} failed too, most likely because of it.")
        return error, Failure(kind="lost", type=_qualified(error), message=str(error),
                              ranks=tuple(failed), world_size=world_size,
                              iteration=last_iterations.get(rank))
    rebuilt = {r: _rebuild(e, r, world_size, failed) for r, e in errors.items()}
    rank = min(failed, key=lambda r: (is_runtime(rebuilt[r]), r))
    error = rebuilt[rank]
    types = {_type_of(e) for e in errors.values()}
    for name, value in (("rank", rank), ("ranks", failed)):
        try:
            setattr(error, name, value)
        except AttributeError:  # an exception type with __slots__
            pass
    return error, Failure(
        kind="raised", type=_type_of(errors[rank]), message=_message_of(errors[rank]),
        ranks=tuple(failed), world_size=world_size, iteration=last_iterations.get(rank),
        every_rank=len(failed) == world_size and len(types) == 1,
        fatal=isinstance(error, fatal_exceptions), runtime=is_runtime(error),
        retryable=_own_verdict(error))


def _own_verdict(error: BaseException) -> bool | None:
    """Our own error's ``retryable``; None for the user's (a WorkerError stands in for one)."""
    if isinstance(error, DistrainError) and not isinstance(error, WorkerError):
        return error.retryable
    return None


def driver_failure(error: BaseException, world_size: int) -> Failure:
    """The facts of a failure the driver raised: its own (storage, the lease, a detected
    misuse), or a preemption it ended the attempt for."""
    kind = "driver"
    if isinstance(error, PreemptionError):
        kind = "shutdown" if error.driver else "preempted"
    return Failure(kind=kind, type=_qualified(error), message=str(error),
                   ranks=tuple(getattr(error, "ranks", None) or ()), world_size=world_size,
                   retryable=getattr(error, "retryable", False) is True)


def _rebuild(described: Any, rank: int, world_size: int, failed: list[int]) -> BaseException:
    if not isinstance(described, dict):  # e.g. a return value Ray could not serialize
        return described
    where = f"rank {rank} of {world_size} (pid {described['pid']} on {described['node_ip']})"
    also = f"; ranks {failed} raised" if len(failed) > 1 else ""
    error: BaseException | None = None
    # Only a type whose module the driver has imported is rebuilt: re-raising must not import
    # a framework (TensorFlow would take seconds, memory and change the environment).
    module = described["type"].split(".", 1)[0]
    if described["pickled"] is not None and module in sys.modules:
        try:
            error = cloudpickle.loads(described["pickled"])
        except Exception:  # noqa: BLE001 - its type may exist only on the worker
            error = None
    if error is None:
        error = WorkerError(f"{described['type']}: {described['message']} (on {where}{also})",
                            rank=rank, exc_type=described["type"],
                            traceback=described["traceback"])
    else:
        error.add_note(f"Raised in the training function on {where}{also}.")
    error.__cause__ = RemoteTraceback(f"\nTraceback on {where}:\n{described['traceback']}")
    error.__suppress_context__ = True
    return error


def _type_of(described: Any) -> str:
    return described["type"] if isinstance(described, dict) else _qualified(described)


def _message_of(described: Any) -> str:
    return described["message"] if isinstance(described, dict) else str(described)


def _qualified(error: BaseException) -> str:
    return f"{type(error).__module__}.{type(error).__qualname__}"
