"""One attempt of a run: start the function on every rank of a started group, follow it to
the end, and say how it ended (``RunOutcome``).

The pieces: ``poll`` reads the workers, ``iterations`` pairs reports and collects commits,
``dispatch`` runs the callbacks, ``worker_errors`` turns failures into one exception and the
facts the failure policy needs. What to do about an outcome is the trainer's question to the
failure policy, not this module's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import settings
from ..callbacks import TrainingCallback
from ..checkpoints.checkpoint import Checkpoint
from ..checkpoints.fs import redact_url
from ..checkpoints.manager import CheckpointManager
from ..checkpoints.storage import FORENSICS, RunStorage, driver_io
from ..config import CheckpointConfig
from ..exceptions import PreemptionError, RunTimeoutError, TrainingHangError
from ..logs import WorkerLogs
from ..session.context import TrainContext
from .dispatch import Callbacks
from .failure_policy import Failure
from .history import RunHistory
from .iterations import Iterations, PendingCommits
from .poll import PollStatus, Watch, poll_workers
from .validations import Validations
from .worker_errors import worker_failure
from .worker_group import WorkerGroup

#: How long the ranks have to show their stacks when the attempt hangs.
_STACKS_TIMEOUT_S = 10.0


@dataclass
class RunSpec:
    """Everything one attempt needs, resolved and validated by the Trainer."""

    #: The function pickled once, before anything starts (``pickling.serialize_train_function``).
    train_func_blob: bytes
    takes_config: bool
    config: Any
    storage: RunStorage
    backend_name: str
    #: Commits, retention and the lease of the run (the only place that decides them).
    checkpoints: CheckpointManager
    checkpoint_config: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume_from: Checkpoint | None = None
    callbacks: list[TrainingCallback] = field(default_factory=list)
    attempt: int = 0
    #: Every complete iteration of the run (kept by the trainer across restarts).
    history: RunHistory = field(default_factory=RunHistory)
    #: One ``{name: DataIterator}`` per rank, split for this group's size.
    dataset_shards: list[dict[str, Any]] | None = None
    #: Asked after each commit while an elastic group runs small: may it grow now?
    should_resize: Callable[[], bool] | None = None
    #: The backend's own test for errors of its runtime (e.g. a collective timeout).
    is_backend_failure: Callable[[BaseException], bool] = lambda error: False
    fatal_exceptions: tuple[type[BaseException], ...] = ()
    logs: WorkerLogs | None = None
    #: ``FailureConfig.hang_timeout_s``; the run's deadline (``time.monotonic()``) and its
    #: length (``RunConfig.timeout_s``).
    hang_timeout_s: float | None = None
    deadline: float | None = None
    timeout_s: float | None = None
    #: ``FailureConfig.preemption_grace_s``; whether the driver was sent SIGTERM.
    preemption_grace_s: float = 25.0
    shutdown_requested: Callable[[], bool] | None = None
    #: The run's validations (``CheckpointConfig(validate=...)``), across its attempts.
    validations: Validations | None = None

    @property
    def first_index(self) -> int:
        """Report (and checkpoint) numbers go on after the checkpoint the run resumes from."""
        resumed = self.resume_from.index if self.resume_from is not None else None
        latest = max((m.index for m in self.checkpoints.committed), default=0)
        return max(resumed or 0, latest) + 1


@dataclass(frozen=True)
class RunOutcome:
    """How an attempt ended: the function returned on every rank (``returns``; ``stopped`` if a
    callback ended it), it failed (``error`` and its ``failure`` facts), or an elastic group
    is to grow back after checkpoint ``resize_after``."""

    returns: list[Any] = field(default_factory=list)
    stopped: str | None = None
    error: BaseException | None = None
    failure: Failure | None = None
    resize_after: int | None = None


def run_training(group: WorkerGroup, spec: RunSpec, logger: logging.Logger) -> RunOutcome:
    """Run the function on every worker of a started group until all return, one fails, or
    the group is to grow. Unless all returned, the group is killed (a survivor may hang in a
    collective). Errors of the driver itself (storage, the lease, a misuse it detected, a
    fatal callback) are raised."""
    fn_ref = group.share(spec.train_func_blob)
    session_args = [
        {
            "context": TrainContext(info=m.info, experiment_name=spec.storage.run_name,
                                    storage_url=spec.storage.run_url, attempt=spec.attempt,
                                    backend=spec.backend_name),
            "storage": spec.storage,
            "resume_from": spec.resume_from,
            "iteration": spec.first_index - 1,
            "upload": spec.checkpoint_config.upload,
            "checkpoint_mode": spec.checkpoint_config.mode,
            "auto_every_n_batches": spec.checkpoint_config.every_n_batches,
            "datasets": spec.dataset_shards[m.info.world_rank] if spec.dataset_shards else {},
            "await_verdicts": any(c.exact_stop for c in spec.callbacks),
            "progress_every_s": min(5.0, spec.hang_timeout_s / 4)
            if spec.hang_timeout_s else None,
            "preemption_grace_s": spec.preemption_grace_s,
            "validates": spec.validations is not None,
        }
        for m in group.members
    ]
    iterations: Iterations
    callbacks = Callbacks(spec.callbacks, logger,
                          on_stop=lambda reason: group.request_stop(reason, iterations.highest),
                          on_verdict=group.judge)
    commits = PendingCommits(spec, group, callbacks, logger)
    if spec.validations is not None:
        spec.validations.attach(callbacks, spec.attempt)
        spec.validations.resume()
    iterations = Iterations(len(group), spec, commits, callbacks, logger)
    # The storage (with its options) for trackers that write into the run's folder.
    callbacks.call("start_training", redact_url(spec.storage.run_url), spec.config,
                   world_size=len(group), backend=spec.backend_name, run_name=spec.storage.run_name,
                   attempt=spec.attempt, storage=spec.storage)
    config = spec.config if spec.config is not None else {}
    watch = Watch(hang_timeout_s=spec.hang_timeout_s, deadline=spec.deadline, logger=logger,
                  on_hang=lambda ranks, quiet: _hang(group, spec, iterations, ranks, quiet,
                                                     logger),
                  on_deadline=lambda: group.request_stop(
                      f"the run's deadline of {spec.timeout_s:g} s passed "
                      "(RunConfig(timeout_s))", iterations.highest),
                  preemption_grace_s=spec.preemption_grace_s,
                  shutdown_requested=spec.shutdown_requested,
                  on_preemption=lambda why, driver: _preempt(group, spec, iterations, why,
                                                             driver, logger))
    generators = group.run(fn_ref, spec.takes_config, config, session_args)
    try:
        status = poll_workers(group, generators, iterations, commits, callbacks, spec.logs,
                              spec.checkpoints, spec.should_resize, watch)
    except BaseException:
        _end(group, callbacks, error=True, validations=spec.validations)
        raise
    if status.preempted is not None:
        _end(group, callbacks, error=True, validations=spec.validations)
        raise _preemption_error(spec, status, commits.last_committed or (
            spec.resume_from.index if spec.resume_from is not None else None))
    if status.errors:
        error, failure = worker_failure(status.errors, len(group), iterations.last,
                                        spec.is_backend_failure, spec.fatal_exceptions)
        _end(group, callbacks, error=True, validations=spec.validations)
        return RunOutcome(error=error, failure=failure)
    if status.resize_after is not None:
        _end(group, callbacks, error=False, validations=spec.validations)
        return RunOutcome(resize_after=status.resize_after)
    if status.timed_out:
        _end(group, callbacks, error=True, validations=spec.validations)
        raise RunTimeoutError(
            f"the run's deadline of {spec.timeout_s:g} s (RunConfig(timeout_s)) passed: every "
            "rank was stopped"
            + (f", ranks {list(status.unfinished)} after the grace period"
               if status.unfinished else " at its next report")
            + "; what it committed stays (resume_from_checkpoint='latest' goes on from there)")
    iterations.flush(stopped=callbacks.stop_reason is not None)
    if status.unfinished:  # stopped, but these ranks never reached a report (in a collective)
        logger.warning("Ranks %s did not stop within %g s of the stop; ending them",
                       list(status.unfinished), settings.settings().stop_grace_s)
        group.shutdown()
    for index in sorted(commits.waiting):
        logger.warning("Checkpoint %d was not committed: not every rank reported it", index)
    if spec.validations is not None:
        try:
            spec.validations.finish(spec.deadline, spec.shutdown_requested)
        except BaseException:
            _end(group, callbacks, error=True, validations=spec.validations)
            raise
        spec.validations.attach(None, spec.attempt)
    callbacks.call("finish_training", error=False)
    callbacks.close()
    if callbacks.error is not None:
        raise callbacks.error
    return RunOutcome(list(status.returns), callbacks.stop_reason)


def _hang(group: WorkerGroup, spec: RunSpec, iterations: Iterations, ranks: list[int],
          quiet: dict[int, float], logger: logging.Logger) -> TrainingHangError:
    """The error of a hang, with every rank's stack as its forensics (also logged and written
    to ``<run>/forensics/``)."""
    stacks = group.stacks(timeout=_STACKS_TIMEOUT_S)
    lines = [f"Ranks {ranks} made no progress for {spec.hang_timeout_s:g} s "
             f"(FailureConfig(hang_timeout_s)), attempt {spec.attempt}."]
    for rank, stack in enumerate(stacks):
        last = iterations.last.get(rank)
        lines += ["", f"== rank {rank}: quiet for {quiet.get(rank, 0.0):.0f} s, last report "
                      f"{'none' if last is None else f'iteration {last}'}", stack.rstrip()]
    forensics = "\n".join(lines)
    logger.error("%s Where each rank is:\n%s", lines[0],
                 "\n".join(f"  rank {r}: {_innermost(s)}" for r, s in enumerate(stacks)))
    name = f"attempt_{spec.attempt:05d}-hang.txt"
    try:
        with driver_io("writing the hang's forensics", spec.storage):
            spec.storage.write_text(forensics, FORENSICS, name)
    except Exception as error:  # noqa: BLE001 - the hang's own error matters more
        logger.warning("Could not write the forensics: %s", error)
    return TrainingHangError(
        f"ranks {ranks} made no progress for {spec.hang_timeout_s:g} s (a collective waiting "
        f"for a peer, a deadlock, a loader that never yields); every rank's stack is in the "
        f"run's summary and in {redact_url(spec.storage.run_url)}/{FORENSICS}/{name}",
        ranks=ranks, forensics=forensics)


def _preempt(group: WorkerGroup, spec: RunSpec, iterations: Iterations, why: str,
             driver: bool, logger: logging.Logger) -> None:
    """Every rank's next report commits and ends its function; with the driver's SIGTERM, the
    ranks also hear of it (``preemption_requested()``)."""
    logger.warning("Preempted: %s. Every rank commits at its next report and ends, within "
                   "FailureConfig(preemption_grace_s=%g)", why, spec.preemption_grace_s)
    if driver:
        group.preempt(why)
    group.request_stop(f"the run was preempted ({why})", iterations.highest)


def _preemption_error(spec: RunSpec, status: PollStatus, committed: int | None
                      ) -> PreemptionError:
    ranks = list(status.preempted_ranks)
    kept = f"checkpoint {committed}" if committed is not None else "no checkpoint yet"
    late = (f"; ranks {list(status.unfinished)} did not end within the grace period"
            if status.unfinished else "")
    return PreemptionError(
        f"{status.preempted}: attempt {spec.attempt} ended after committing what was in "
        f"flight (the latest is {kept}){late}", ranks=ranks, driver=not ranks)


def _innermost(stack: str) -> str:
    """The innermost frame of the first thread (the training function's), as one line."""
    first = stack.split("\nThread ", 1)[0]
    frames = [line.strip() for line in first.splitlines() if line.strip().startswith("File ")]
    return frames[-1] if frames else (first.strip().splitlines() or ["?"])[0]


def _end(group: WorkerGroup, callbacks: Callbacks, error: bool,
         validations: Validations | None = None) -> None:
    group.shutdown()  # a survivor may hang in a collective: kill, don't wait
    if validations is not None:  # they go on; the next attempt's callbacks hear of them
        validations.attach(None, validations.attempt)
    callbacks.call("finish_training", error=error)
    callbacks.close()
