"""Reading the workers while they train: every rank's outbox until each returns or fails.

``poll_workers`` hands each report to ``Iterations``, each finished upload to
``PendingCommits``, each log line to ``WorkerLogs``, and returns a frozen ``PollStatus``: what
every rank returned or raised, the ranks a stop had to end, or the checkpoint after which an
elastic group should grow back. After the first failure it waits only a short window for the
other ranks' outcomes (PREFECT_DISTRAIN_ERROR_GATHER_TIMEOUT_S); after a stop, the grace period.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from .. import settings
from ..checkpoints.manager import CheckpointManager
from ..exceptions import WorkerLostError
from ..logs import WorkerLogs
from .dispatch import Callbacks
from .iterations import Iterations, PendingCommits

#: How often the driver looks at the callbacks (a fatal error, a stop) and the run's lease
#: while it waits for the workers.
POLL_S = 0.5


@dataclass(frozen=True)
class PollStatus:
    """How the workers of an attempt ended."""

    #: Each rank's return value (None for a rank that did not return).
    returns: tuple[Any, ...]
    #: rank -> its error (a description from the worker, or WorkerLostError).
    errors: dict[int, Any] = field(default_factory=dict)
    #: Ranks still running when the stop's grace period ended (stuck in a collective, say).
    unfinished: tuple[int, ...] = ()
    #: The checkpoint after which an elastic group running small should grow back.
    resize_after: int | None = None


def poll_workers(generators: list, iterations: Iterations, commits: PendingCommits,
                 callbacks: Callbacks, logs: WorkerLogs | None, checkpoints: CheckpointManager,
                 should_resize: Callable[[], bool] | None = None) -> PollStatus:
    pending = {gen: rank for rank, gen in enumerate(generators)}
    returns: list[Any] = [None] * len(generators)
    errors: dict[int, Any] = {}
    finished: dict[int, int] = {}  # rank -> its last iteration, once its function returned
    gather_deadline: float | None = None
    looked_after: int | None = None  # the commit after which the cluster was looked at
    while pending:
        if callbacks.error is not None:
            raise callbacks.error
        checkpoints.check_lease(look=False)
        if callbacks.stop_reason is not None and gather_deadline is None:
            gather_deadline = time.monotonic() + settings.settings().stop_grace_s
        wait = POLL_S
        if gather_deadline is not None:
            wait = min(wait, max(0.0, gather_deadline - time.monotonic()))
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
        if not ready:
            if gather_deadline is not None and time.monotonic() >= gather_deadline:
                break  # the other ranks' outcomes did not come within the window
            continue
        for gen in ready:
            rank = pending[gen]
            try:
                batch = ray.get(next(gen))
            except StopIteration:
                del pending[gen]
                continue
            except RayActorError as error:
                batch = [("error", WorkerLostError(
                    f"rank {rank}'s worker died (actor or node lost): {error}", rank=rank))]
            except RayTaskError as error:
                batch = [("error", error.as_instanceof_cause())]
            for kind, payload in batch:
                if kind == "report":
                    iterations.add(rank, payload)
                elif kind == "log":
                    if logs is not None:
                        logs.add(rank, payload)
                elif kind == "persisted":
                    commits.uploaded(payload["index"], rank, payload["files"])
                else:
                    del pending[gen]
                    if kind == "done":
                        returns[rank] = payload
                        finished[rank] = iterations.last.get(rank, iterations.first - 1)
                    else:
                        errors[rank] = payload
                        if gather_deadline is None:
                            gather_deadline = (time.monotonic()
                                               + settings.settings().error_gather_timeout_s)
            if finished and not errors and (stranded := iterations.stranded(finished)):
                raise stranded
        committed = commits.last_committed
        if not errors and should_resize is not None and committed is not None \
                and committed != looked_after:
            looked_after = committed
            if should_resize():
                return PollStatus(tuple(returns), resize_after=committed)
    return PollStatus(tuple(returns), errors, tuple(sorted(pending.values())))
