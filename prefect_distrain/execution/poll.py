"""Reading the workers while they train: every rank's outbox until each returns or fails.

``poll_workers`` hands each report to ``Iterations``, each finished upload to
``PendingCommits``, each log line to ``WorkerLogs``, each progress message to the ``Watch``
(hangs, stragglers, the deadline), and returns a frozen ``PollStatus``: what every rank
returned or raised, the ranks a stop had to end, the checkpoint after which an elastic group
should grow back, or that the deadline passed. After the first failure it waits only a short
window for the other ranks' outcomes (PREFECT_DISTRAIN_ERROR_GATHER_TIMEOUT_S; once a worker is
lost, LOST_GATHER_S at most); after a stop or the deadline, the grace period
(PREFECT_DISTRAIN_STOP_GRACE_S).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

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
#: Once a worker is lost, how much longer the driver gathers outcomes: the other ranks of a
#: lost node come within milliseconds, and the survivors' errors would not change the decision
#: (a lost worker wins, worker_errors.py); they wait for the dead peer (in a collective, or
#: for a commit that needs its report), so the whole window would only delay the restart.
LOST_GATHER_S = 0.5


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
    #: The run's deadline passed: the ranks were stopped (or ended after the grace period).
    timed_out: bool = False
    #: Why the attempt was preempted (SIGTERM to a worker or the driver), the ranks that were
    #: sent it (none: the driver was).
    preempted: str | None = None
    preempted_ranks: tuple[int, ...] = ()


@dataclass
class Watch:
    """What the driver watches besides the workers' outcomes: hangs, stragglers, the deadline,
    preemption.

    ``hang_timeout_s``: a running rank without progress this long hangs the attempt:
    ``on_hang(ranks, quiet_s)`` returns the error to raise (having gathered the forensics); a
    rank quiet for half of it is a straggler, logged once. ``deadline`` (``time.monotonic()``):
    when it passes, ``on_deadline()`` asks every rank to stop. A rank's notice of SIGTERM, or
    ``shutdown_requested()`` (SIGTERM to the driver), calls ``on_preemption(why, driver)``
    once: the ranks then have ``preemption_grace_s`` to commit and end."""

    hang_timeout_s: float | None = None
    on_hang: Callable[[list[int], dict[int, float]], BaseException] | None = None
    deadline: float | None = None
    on_deadline: Callable[[], None] | None = None
    logger: Any = None
    preemption_grace_s: float = 25.0
    on_preemption: Callable[[str, bool], None] | None = None
    shutdown_requested: Callable[[], bool] | None = None
    preempted: str | None = None
    preempted_ranks: list[int] = field(default_factory=list)
    _last: dict[int, float] = field(default_factory=dict)
    _counts: dict[int, int] = field(default_factory=dict)
    _warned: set[int] = field(default_factory=set)

    def started(self, ranks: list[int]) -> None:
        now = time.monotonic()
        self._last = {rank: now for rank in ranks}

    def progressed(self, rank: int, payload: dict | None = None) -> None:
        """A report (``payload`` None) or a progress message from ``rank``."""
        if payload is not None and payload["busy"] is None \
                and payload["count"] == self._counts.get(rank):
            return
        if payload is not None:
            self._counts[rank] = payload["count"]
        self._last[rank] = time.monotonic()

    def check(self, running: list[int]) -> None:
        """Raise the hang's error, or log a straggler, among the ranks still running."""
        if self.hang_timeout_s is None or not running:
            return
        now = time.monotonic()
        quiet = {r: now - self._last.get(r, now) for r in running}
        hung = sorted(r for r, q in quiet.items() if q > self.hang_timeout_s)
        if hung:
            raise self.on_hang(hung, quiet)
        half = self.hang_timeout_s / 2
        for rank in sorted(r for r, q in quiet.items() if q > half and r not in self._warned):
            moving = [r for r, q in quiet.items() if q <= half]
            if moving and self.logger is not None:
                self._warned.add(rank)
                self.logger.warning(
                    "Rank %d has made no progress for %.0f s while ranks %s have: a straggler "
                    "(a slow node, a long data load) or a hang beginning; it is ended after "
                    "FailureConfig(hang_timeout_s=%g)", rank, quiet[rank], moving,
                    self.hang_timeout_s)

    def deadline_passed(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def preemption(self, rank: int | None, why: str) -> None:
        """SIGTERM reached ``rank`` (None: the driver)."""
        if rank is not None and rank not in self.preempted_ranks:
            self.preempted_ranks.append(rank)
        if self.preempted is None:
            self.preempted = why
            if self.on_preemption is not None:
                self.on_preemption(why, rank is None)

    def look_for_shutdown(self) -> None:
        if self.preempted is None and self.shutdown_requested is not None \
                and self.shutdown_requested():
            self.preemption(None, "SIGTERM to the driver (pid %d)" % os.getpid())


def poll_workers(group: Any, generators: list, iterations: Iterations, commits: PendingCommits,
                 callbacks: Callbacks, logs: WorkerLogs | None, checkpoints: CheckpointManager,
                 should_resize: Callable[[], bool] | None = None,
                 watch: Watch | None = None) -> PollStatus:
    watch = watch or Watch()
    pending = {gen: rank for rank, gen in enumerate(generators)}
    watch.started(list(pending.values()))
    timed_out = False
    returns: list[Any] = [None] * len(generators)
    errors: dict[int, Any] = {}
    finished: dict[int, int] = {}  # rank -> its last iteration, once its function returned
    gather_deadline: float | None = None
    gathering_errors = False  # the deadline is the error window's (not a stop's or a preemption's)
    looked_after: int | None = None  # the commit after which the cluster was looked at
    while pending:
        if callbacks.error is not None:
            raise callbacks.error
        checkpoints.check_lease(look=False)
        commits.poll_validations()
        if not errors and gather_deadline is None:
            watch.check(sorted(pending.values()))
        if not timed_out and watch.deadline_passed():
            timed_out = True
            watch.on_deadline()
        watch.look_for_shutdown()
        if watch.preempted is not None and gather_deadline is None:
            gather_deadline = time.monotonic() + watch.preemption_grace_s
        if (callbacks.stop_reason is not None or timed_out) and gather_deadline is None:
            gather_deadline = time.monotonic() + settings.settings().stop_grace_s
        wait = POLL_S
        if gather_deadline is not None:
            wait = min(wait, max(0.0, gather_deadline - time.monotonic()))
        ready = group.ready(list(pending), wait)
        if not ready:
            if gather_deadline is not None and time.monotonic() >= gather_deadline:
                break  # the other ranks' outcomes did not come within the window
            continue
        for gen in ready:
            rank = pending[gen]
            try:
                batch = group.take(gen)
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
                    watch.progressed(rank)
                    iterations.add(rank, payload)
                elif kind == "progress":
                    watch.progressed(rank, payload)
                elif kind == "preempted":
                    watch.preemption(rank, payload["why"])
                elif kind == "log":
                    if logs is not None:
                        logs.add(rank, payload)
                elif kind == "persisted":
                    commits.retried(payload["retries"])
                    commits.uploaded(payload["index"], rank, payload["files"],
                                     payload["skipped"])
                else:
                    del pending[gen]
                    if kind == "done":
                        returns[rank] = payload
                        finished[rank] = iterations.last.get(rank, iterations.first - 1)
                    else:
                        errors[rank] = payload
                        lost = isinstance(payload, WorkerLostError)
                        if gather_deadline is None or (lost and gathering_errors):
                            window = settings.settings().error_gather_timeout_s
                            if lost:
                                window = min(window, LOST_GATHER_S)
                            gather_deadline = min(gather_deadline or float("inf"),
                                                  time.monotonic() + window)
                            gathering_errors = True
        if finished and not errors and watch.preempted is None \
                and (stranded := iterations.stranded(finished)):
            raise stranded
        committed = commits.last_committed
        if not errors and should_resize is not None and committed is not None \
                and committed != looked_after:
            looked_after = committed
            if should_resize():
                return PollStatus(tuple(returns), resize_after=committed)
    return PollStatus(tuple(returns), errors, tuple(sorted(pending.values())),
                      timed_out=timed_out, preempted=watch.preempted,
                      preempted_ranks=tuple(sorted(watch.preempted_ranks)))
