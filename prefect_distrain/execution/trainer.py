"""``Trainer``: a worker group with a framework's backend, usable without Prefect.

```python
trainer = Trainer(backend="torch", num_workers=2)
trainer.start()
results = trainer.run(train_func, config={"lr": 0.1}, callbacks=[PrintingCallback()])
trainer.shutdown()
```
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import weakref
from typing import Any, Callable

from .. import settings
from ..backends import BackendConfig, resolve_backend
from ..callbacks import RichProgress, TrainingCallback, callback_list
from ..checkpoints.checkpoint import Checkpoint
from ..checkpoints.fs import redact_url
from ..checkpoints.lease import holder_identity
from ..checkpoints.ledger import AttemptLedger, attempt_record
from ..checkpoints.manager import CheckpointManager
from ..checkpoints.retry import RetryPolicy
from ..checkpoints.storage import RunStorage, driver_io
from ..config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, run_name_part
from ..exceptions import ConfigurationError, DataChangedError
from ..integrations.data import DataConfig, needs_tasks, resolve_datasets, split_datasets
from ..integrations.data_fingerprint import changes, fingerprints
from ..logs import WorkerLogs
from ..result import RunReport, TrainResult
from ..session.positions import own_positions
from . import warm_pool
from .backend_setup import BackendSetup
from .cluster import (
    capacity_now,
    check_cluster_can_hold,
    check_cluster_can_validate,
    check_cpus_left_for_data,
    ray_connection,
)
from .controller import RunOutcome, RunSpec, run_training
from .failure_policy import MESSAGE_LIMIT, Decision, Failure, classify, decide, should_resize
from .history import RunHistory
from .local_group import LocalGroup
from .pickling import serialize_train_function, takes_config
from .placement import start_group
from .preflight import storage_preflight
from .signals import sigterm_ends_gracefully
from .validations import Validations
from .worker_errors import driver_failure
from .worker_group import WorkerGroup

_logger = logging.getLogger("prefect_distrain")

class Trainer:
    """Runs a training function on ``num_workers`` Ray actors with a backend set up on them.

    ``start()`` connects to Ray (the one this process uses, ``ray_address`` / ``RAY_ADDRESS``,
    or a new local one), checks the cluster can hold the group, starts the actors and sets up
    the backend; the group stays up between ``fit`` / ``run`` calls, so a second run skips the
    start-up. ``fit`` runs the function on every worker until it returns, restarting the group
    after an infrastructure failure as the failure policy decides; ``shutdown()`` (or leaving a
    ``with`` block) tears the backend down, kills the workers and leaves Ray as it was found.
    ``train`` (the Prefect task) is this, plus what Prefect shows.

    ``keep_warm``: ``shutdown()`` after a clean run leaves the group warm (warm_pool.py) for
    the next ``Trainer(keep_warm=True)`` of this process with the same backend, scaling and
    Ray options, whose start then takes it in a fraction of a second; ``train`` does this
    within a flow run, whose end ends the group.
    """

    def __init__(
        self,
        backend: str | BackendConfig = "torch",
        num_workers: int | None = None,
        use_gpu: bool | None = None,
        resources_per_worker: dict[str, float] | None = None,
        *,
        scaling: ScalingConfig | None = None,
        run: RunConfig | None = None,
        checkpoint: CheckpointConfig | None = None,
        failure: FailureConfig | None = None,
        ray_address: str | None = None,
        ray_init_kwargs: dict[str, Any] | None = None,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        progress_bar: bool | None = None,
        keep_warm: bool = False,
    ):
        self.backend_config = resolve_backend(backend)
        if scaling is not None:
            if not isinstance(scaling, ScalingConfig):
                raise ConfigurationError(
                    f"scaling must be a ScalingConfig, got {type(scaling).__name__}: "
                    "use scaling=ScalingConfig(num_workers=2)")
            if (num_workers, use_gpu, resources_per_worker) != (None, None, None):
                raise ConfigurationError(
                    "give either scaling=ScalingConfig(...) or num_workers/use_gpu/"
                    "resources_per_worker, not both")
        else:
            scaling = ScalingConfig(num_workers=1 if num_workers is None else num_workers,
                                    use_gpu=bool(use_gpu),
                                    resources_per_worker=resources_per_worker)
        if run is not None and not isinstance(run, RunConfig):
            raise ConfigurationError(
                f"run must be a RunConfig, got {type(run).__name__}: use "
                "run=RunConfig(name=..., storage=...)")
        if checkpoint is not None and not isinstance(checkpoint, CheckpointConfig):
            raise ConfigurationError(
                f"checkpoint must be a CheckpointConfig, got {type(checkpoint).__name__}")
        self.backend_config.check_scaling(scaling.use_gpu)
        self.scaling = scaling
        self.run_config = run or RunConfig()
        self.checkpoint_config = checkpoint or CheckpointConfig()
        if failure is not None and not isinstance(failure, FailureConfig):
            raise ConfigurationError(
                f"failure must be a FailureConfig, got {type(failure).__name__}")
        self.failure_config = failure or FailureConfig()
        self.storage: RunStorage | None = None
        self.checkpoints: CheckpointManager | None = None
        #: Who writes the runs of this trainer (the run's lease names it); ``train`` adds
        #: Prefect's flow and task run ids.
        self.holder: dict[str, Any] = holder_identity()
        #: What the current (or last) fit reported, also after a failure (for its summary), and
        #: the forensics of its hangs (every rank's stack).
        self.history = RunHistory()
        self.forensics: list[str] = []
        self.data_changes: list[str] = []
        self._cluster_checked = False
        self.ray_address = ray_address
        self.ray_init_kwargs = ray_init_kwargs
        self.logger = logger or _logger
        self.worker_logs = WorkerLogs(
            self.logger, logging.getLevelName(self.run_config.other_ranks_log_level))
        #: A rich progress bar in the terminal; None: when RunConfig(total=...) is given and
        #: stdout is a terminal.
        self.progress_bar = progress_bar
        self._group: WorkerGroup | LocalGroup | None = None
        self.backend = BackendSetup(self.backend_config, self.logger)
        self._ray: contextlib.ExitStack | None = None
        self._ray_finalizer: weakref.finalize | None = None
        self.keep_warm = keep_warm
        #: The flow run whose end ends the group this trainer leaves warm (set by ``train``).
        self.warm_owner: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True while the worker group is up (between ``start`` and ``shutdown``)."""
        return self._group is not None

    def start(self, expect_full: bool = False) -> None:
        """Connect to (or start) Ray, start the workers and set up the backend."""
        if self._group is not None:
            return
        if self.scaling.local:  # in this process, no Ray (local_group.py)
            group = LocalGroup()
            group.start()
            self._group = group
            return
        if self._ray is None:
            # Warm groups that keep a Ray up made with other options give way (warm_pool.py).
            warm_pool.drain_other_rays(self._ray_options())
            stack = contextlib.ExitStack()
            stack.enter_context(ray_connection(self.ray_address, self.ray_init_kwargs,
                                               self.scaling))
            self._ray = stack
            # A trainer never shut down gives Ray back when it is collected or, at the latest,
            # at exit while Python can still run Ray's shutdown (not at interpreter teardown).
            self._ray_finalizer = weakref.finalize(self, stack.close)
        try:
            if not self._cluster_checked:
                check_cluster_can_hold(self.scaling)
                self._cluster_checked = True
            self._group = start_group(self.scaling, self.backend, self.logger, expect_full,
                                      warm_key=self._warm_key() if self.keep_warm else None)
        except BaseException:
            self._release_ray()
            raise

    def _ray_options(self) -> tuple:
        return self.ray_address, repr(sorted((self.ray_init_kwargs or {}).items()))

    def _warm_key(self) -> tuple:
        """What must match for a warm group to serve this trainer: everything that shaped its
        workers (the runtime_env among the Ray options)."""
        return (type(self.backend_config), repr(self.backend_config), repr(self.scaling),
                *self._ray_options())

    def _leave_warm(self, group: WorkerGroup | LocalGroup | None) -> bool:
        """After a clean run: leave the group warm for the next run (warm_pool.py), if this
        trainer keeps groups warm and the group can serve one; False otherwise."""
        idle_s = settings.settings().warm_pool_idle_s
        if not (self.keep_warm and idle_s > 0 and isinstance(group, WorkerGroup)
                and group.started and len(group) == self.scaling.num_workers
                and self.backend_config.reusable and self._ray is not None
                # a run's concurrency slots stand for its workers: none are held while idle
                and self.scaling.concurrency_limit is None):
            return False
        try:
            self.backend.group_rests(group)
        except Exception as error:  # noqa: BLE001 - it ends instead, as without a pool
            self.logger.info("The worker group is not kept warm (%s)", error)
            return False
        warm_pool.give(warm_pool.WarmGroup(self._warm_key(), self._ray_options(), group,
                                           self._hand_over_ray(), self.warm_owner), idle_s)
        return True

    def _discard_group(self) -> None:
        """After a failure: the actors are killed, not shut down gracefully."""
        group, self._group = self._group, None
        self.backend.group_ends(group, graceful=False)

    def shutdown(self) -> None:
        """Tear down the backend, kill the workers and leave Ray as it was found (or, with
        ``keep_warm``, leave the group warm for the next run)."""
        group, self._group = self._group, None
        if self._leave_warm(group):
            return
        try:
            self.backend.group_ends(group, graceful=True)
        finally:
            self._release_ray()

    def _release_ray(self) -> None:
        if (stack := self._hand_over_ray()) is not None:
            stack.close()

    def _hand_over_ray(self) -> contextlib.ExitStack | None:
        """This trainer's Ray connection, no longer its own to close."""
        stack, self._ray = self._ray, None
        if self._ray_finalizer is not None:
            self._ray_finalizer.detach()
            self._ray_finalizer = None
        return stack

    def __enter__(self) -> Trainer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- runs -------------------------------------------------------------------------------------

    def run(self, train_func: Callable, config: Any = None,
            callbacks: list[TrainingCallback] | None = None,
            resume_from_checkpoint: Checkpoint | str | None = None,
            datasets: dict[str, Any] | None = None,
            data_config: DataConfig | None = None) -> list[Any]:
        """Run ``train_func`` on every worker; its return values, in rank order."""
        return self.fit(train_func, config=config, callbacks=callbacks,
                        resume_from_checkpoint=resume_from_checkpoint, datasets=datasets,
                        data_config=data_config).worker_results

    def fit(self, train_func: Callable, config: Any = None,
            callbacks: list[TrainingCallback] | None = None,
            resume_from_checkpoint: Checkpoint | str | None = None,
            datasets: dict[str, Any] | None = None,
            data_config: DataConfig | None = None) -> TrainResult:
        """Run ``train_func`` on every worker; the full result (metrics, checkpoint, returns).

        ``resume_from_checkpoint``: a Checkpoint, the path/URL of one, or ``"latest"`` for this
        run's latest committed checkpoint (a fresh start, logged, when there is none). After an
        infrastructure failure the group restarts (``FailureConfig.max_failures`` times) from
        the latest committed checkpoint; an elastic group also restarts to grow back.

        ``datasets``: name -> Ray Dataset or URL of parquet / CSV files (read with the run's
        storage options); each worker reads its share with ``pd.get_dataset_shard(name)``,
        split anew at every start of the group (``data_config`` says which are split).
        """
        began = time.monotonic()
        blob = serialize_train_function(train_func)  # refused before anything starts
        if data_config is not None and not isinstance(data_config, DataConfig):
            raise ConfigurationError(
                f"data_config must be a DataConfig, got {type(data_config).__name__}")
        callbacks = callback_list(callbacks)
        if datasets and self.scaling.local:
            raise ConfigurationError(
                "datasets= needs Ray Data on Ray workers, and num_workers=0 runs in this process "
                "without Ray: give num_workers=1 or more, or read the data in the function")
        total = self.run_config.total
        show_bar = self.progress_bar if self.progress_bar is not None else sys.stdout.isatty()
        if total and show_bar:
            callbacks.append(RichProgress(total, self.run_config.progress_key))
        url, options = self.run_config.resolved_storage()
        retry = RetryPolicy(retries=self.checkpoint_config.upload_retries,
                            backoff_max_s=self.checkpoint_config.upload_backoff_max_s)
        storage = RunStorage(url, self.run_config.name or _default_run_name(train_func), options,
                             retry=retry)
        self.storage = storage
        self.history = RunHistory()
        self.forensics = []
        self.data_changes = []
        manager = CheckpointManager(storage, self.checkpoint_config, self.logger)
        self.checkpoints = manager
        validation = self.checkpoint_config.validate
        validations = Validations(validation, manager, config, self.scaling.local, self.logger) \
            if validation is not None else None
        # SIGTERM (after the lease is given back): see signals.py.
        with sigterm_ends_gracefully(self.logger) as shutdown_requested:
            try:
                with storage_preflight(storage) as check_workers_see:
                    # One writer per run: a second one fails here, before any worker starts.
                    manager.open(self.holder, settings.settings().lease_timeout_s,
                                 self.run_config.takeover)
                    self.start()
                    assert self._group is not None
                    check_workers_see(self._group)
                    if validation is not None and not self.scaling.local:
                        check_cluster_can_validate(validation.task_resources,
                                                   self.scaling.worker_resources,
                                                   len(self._group))
                failure = self.failure_config
                spec = RunSpec(
                    train_func_blob=blob, takes_config=takes_config(train_func), config=config,
                    storage=storage, backend_name=self.backend.name, checkpoints=manager,
                    checkpoint_config=self.checkpoint_config, callbacks=callbacks,
                    history=self.history, is_backend_failure=self.backend.is_runtime_failure,
                    fatal_exceptions=failure.fatal_exceptions, logs=self.worker_logs,
                    hang_timeout_s=failure.hang_timeout_s, timeout_s=self.run_config.timeout_s,
                    deadline=began + self.run_config.timeout_s if self.run_config.timeout_s
                    else None, preemption_grace_s=failure.preemption_grace_s,
                    shutdown_requested=shutdown_requested, validations=validations)
                data = fingerprints(datasets, storage.run_url, storage.storage_options)
                if needs_tasks(datasets):  # reading a URL runs Ray tasks: refused, not waiting
                    check_cpus_left_for_data(self.scaling, len(self._group))
                return self._attempts(spec, resume_from_checkpoint,
                                      resolve_datasets(datasets, storage.run_url,
                                                       storage.storage_options),
                                      data_config or DataConfig(), began, data)
            finally:
                if validations is not None:  # a failed run: the next writer validates again
                    validations.cancel()
                manager.close()

    def _attempts(self, spec: RunSpec, resume_from_checkpoint: Any,
                  datasets: dict[str, Any] | None, data_config: DataConfig,
                  began: float, data: dict[str, dict]) -> TrainResult:
        """Start the group and run the function until it completes, restarting it as the
        failure policy decides (and to grow an elastic group back)."""
        manager, history = spec.checkpoints, spec.history
        ledger = AttemptLedger(spec.storage, manager.lease.generation if manager.lease else None,
                               on_retry=manager.retries.driver_retried)
        previous = _failure_of_last_attempt(ledger.records())
        restarts, preemptions, restart_cause, grow = 0, 0, None, False
        resume: Checkpoint | None = None
        attempt = -1
        while True:
            resume = manager.resume_point(resume_from_checkpoint) if restart_cause is None \
                else manager.latest() or resume
            if attempt == -1:  # the first start: is this the data the checkpoint was made on?
                self._check_data(resume, data, data_config.on_data_change)
            self.start(expect_full=grow)
            group = self._group
            assert group is not None
            if needs_tasks(datasets):
                check_cpus_left_for_data(self.scaling, len(group))
            history.forget_after(resume.index if resume is not None and resume.index else 0)
            record = ledger.begin(world_size=len(group), resumed_from=resume,
                                  restart_cause=restart_cause, at_least=attempt + 1, data=data)
            attempt = record["attempt"]
            retries_before = manager.retries.snapshot()
            spec.attempt, spec.resume_from = attempt, resume
            # Positions go on in the same data only: not after a change the check found.
            positions = None if self.data_changes else own_positions(
                resume, spec.storage.run_url, "rows", auto=spec.checkpoint_config.mode == "auto")
            spec.dataset_shards = split_datasets(
                datasets, len(group), data_config,
                [m.metadata["node_id"] for m in group.members], positions) if datasets else None
            spec.should_resize = self._resize_check(len(group))
            self.backend.training_starts(group)
            try:
                outcome = run_training(group, spec, self.logger)
            except BaseException as error:  # the driver's own failure
                outcome = RunOutcome(error=error,
                                     failure=driver_failure(error, record["world_size"]))
            if outcome.resize_after is not None:
                restart_cause = (f"scale up from {record['world_size']} workers after "
                                 f"checkpoint {outcome.resize_after}")
                self._discard_group()
                grow = True
                self._end_attempt(ledger, record, "scaled up", restart_cause,
                                  retries=_since(manager, retries_before))
                self.logger.info("The cluster can hold %d workers again: restarting from "
                                 "checkpoint %d", self.scaling.num_workers, outcome.resize_after)
                continue
            if outcome.error is not None:
                error, failure = outcome.error, outcome.failure
                self._discard_group()
                grow = False
                if getattr(error, "forensics", None):
                    self.forensics.append(error.forensics)
                infrastructure, why = classify(failure, previous)
                _mark(error, infrastructure, why, failure.repeats(previous))
                cause = f"{type(error).__name__}: {error}"[:300] + _where(failure)
                preempted = failure.kind in ("preempted", "shutdown")
                self._end_attempt(ledger, record, "preempted" if preempted else "failed", cause,
                                  error, failure, retries=_since(manager, retries_before))
                max_failures = self.failure_config.max_failures
                max_preemptions = self.failure_config.max_preemption_failures
                if decide(failure, previous, restarts, max_failures, preemptions,
                          max_preemptions) is Decision.RAISE:
                    if infrastructure and max_failures and not preempted:
                        self.logger.error("Giving up after %d restart(s): %s", restarts, cause)
                    raise error
                if preempted:  # its own budget; not a failure of the training
                    preemptions += 1
                    restart_cause = cause
                    self.logger.warning(
                        "Attempt %d was preempted; restart %d of %s for preemptions from the "
                        "latest committed checkpoint", attempt, preemptions,
                        "unlimited" if max_preemptions == -1 else max_preemptions)
                    continue
                previous, restart_cause = failure, cause
                restarts += 1
                self.logger.warning("Attempt %d failed (%s); restart %d of %s from the latest "
                                    "committed checkpoint", attempt, cause, restarts,
                                    "unlimited" if max_failures == -1 else max_failures)
                continue
            if not group.started:  # a stop ended ranks that did not reach a report
                self._discard_group()
            self._end_attempt(ledger, record, "stopped" if outcome.stopped else "completed",
                              outcome.stopped, retries=_since(manager, retries_before))
            break
        best = [c.without_credentials() for c in manager.best_checkpoints()]
        latest = manager.latest()
        return TrainResult(
            metrics=history.rank0[-1] if history.all_ranks else None,
            metrics_history=history.rank0,
            metrics_all_ranks=history.all_ranks[-1] if history.all_ranks else [],
            metrics_history_all_ranks=history.all_ranks,
            worker_results=outcome.returns,
            checkpoint=latest.without_credentials() if latest else None,
            best_checkpoints=[(c, c.metrics) for c in best],
            run_name=spec.storage.run_name, path=redact_url(spec.storage.run_url),
            backend=self.backend.name, world_size=record["world_size"], attempt=attempt,
            failures=restarts, preemptions=preemptions, stopped_early=outcome.stopped,
            wall_time_s=time.monotonic() - began,
            checkpoints=[c.without_credentials() for c in manager.checkpoints()])

    def _check_data(self, resume: Checkpoint | None, data: dict[str, dict],
                    on_change: str) -> None:
        """Compare the datasets given now with those the checkpoint's attempt recorded
        (data_fingerprint.py); ``DataConfig(on_data_change=...)`` says what a difference does."""
        if resume is None or on_change == "ignore":
            return
        with driver_io("reading the checkpoint's attempt record", self.storage):
            record = attempt_record(resume)
        if record is None or "data" not in record:
            return  # trained before fingerprints were kept, or on no datasets= at all
        lines = changes(record["data"], data)
        if not lines:
            return
        where = f"checkpoint {resume.index} ({redact_url(resume.path)})"
        if on_change == "fail":
            raise DataChangedError(
                f"resuming from {where} onto data other than it was trained on: "
                f"{'; '.join(lines)}. Give it the data it was trained on, start without it, "
                "or pass DataConfig(on_data_change='warn') to train on the new data anyway",
                changes=lines)
        self.logger.warning("Resuming from %s onto data other than it was trained on: %s "
                            "(DataConfig(on_data_change='fail') makes this an error)", where,
                            "; ".join(lines))
        self.data_changes = [f"since {where}: {line}" for line in lines]

    def _resize_check(self, size: int) -> Callable[[], bool] | None:
        if size >= self.scaling.num_workers:
            return None
        return lambda: should_resize(size, self.scaling.num_workers, capacity_now(self.scaling))

    def _end_attempt(self, ledger: AttemptLedger, record: dict[str, Any], status: str,
                     cause: str | None, error: BaseException | None = None,
                     failure: Failure | None = None,
                     retries: dict[str, int] | None = None) -> None:
        """Record how the attempt ended (and the storage retries it needed); a failure to
        write it never hides the run's own error (it is logged, and noted on that error)."""
        if retries is not None:
            record = {**record, "storage_retries": retries}
        if failure is not None:
            record = {**record, "failure": {"kind": failure.kind, "type": failure.type,
                                            "message": failure.message[:MESSAGE_LIMIT],
                                            "iteration": failure.iteration}}
        try:
            ledger.end(record, status, cause, self.history.last_reported)
        except Exception as problem:  # noqa: BLE001 - the run's outcome matters more
            self.logger.warning("Could not record the end of attempt %d: %s",
                                record["attempt"], problem)
            if error is not None:
                error.add_note(f"The attempt ledger could not be written either: {problem}")
            elif status in ("completed", "stopped"):
                raise

    def run_report(self, result: TrainResult | None, error: BaseException | None,
                   wall_time_s: float) -> RunReport:
        """What the last fit shows when it ends (``train`` publishes it to Prefect)."""
        return RunReport(storage=self.storage, backend=self.backend.name,
                         history=self.history.rank0, wall_time_s=wall_time_s, result=result,
                         error=error, tails={r: list(t) for r, t in self.worker_logs.tails.items()},
                         forensics=list(self.forensics), data_changes=list(self.data_changes))


def _since(manager: CheckpointManager, before: dict[str, int]) -> dict[str, int]:
    now = manager.retries.snapshot()
    return {kind: now[kind] - before[kind] for kind in now}


def _where(failure: Failure) -> str:
    """Which ranks raised it, for the ledger's cause (a peer's collective error names none)."""
    if failure.kind != "raised" or not failure.ranks:
        return ""
    ranks = failure.ranks
    named = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {list(ranks)}"
    return f" (on {named} of {failure.world_size})"


def _failure_of_last_attempt(records: list[dict[str, Any]]) -> Failure | None:
    """The failure of the run's last attempt (a Prefect retry's "attempt before")."""
    if not records or records[-1].get("status") != "failed":
        return None
    facts = records[-1].get("failure")
    if not isinstance(facts, dict):
        return None
    return Failure(kind=str(facts.get("kind")), type=str(facts.get("type")),
                   message=str(facts.get("message")), iteration=facts.get("iteration"))


def _mark(error: BaseException, infrastructure: bool, why: str, repeated: bool) -> None:
    """The failure policy's verdict, on the error itself (Prefect's retry condition reads it)."""
    try:
        error.retryable = infrastructure
    except AttributeError:  # an exception type with __slots__
        pass
    if repeated:
        error.add_note(f"Not restarted or retried: {why}. That is a bug in the training "
                       "function or its data, not bad luck.")


def _default_run_name(fn: Callable) -> str:
    return f"{run_name_part(fn)}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
