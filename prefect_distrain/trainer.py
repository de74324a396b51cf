"""``Trainer``: the worker group and its backend, usable without Prefect (the seeds' API).

```python
trainer = Trainer(backend="torch", num_workers=2)
trainer.start()
results = trainer.run(train_func, config={"lr": 0.1}, callbacks=[PrintingCallback()])
trainer.shutdown()
```
The group stays up between ``run`` calls, so a second run skips the start-up.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Callable

from . import settings
from .backends import BackendConfig, resolve_backend
from .callbacks import RichProgress, TrainingCallback
from .checkpoint import Checkpoint
from .config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from .controller import (
    RunSpec,
    ScaleUp,
    is_infrastructure_failure,
    run_training,
    serialize_train_function,
)
from .data import DataConfig, resolve_datasets, split_datasets
from .exceptions import ConfigurationError, ResourcesUnavailableError
from .logs import WorkerLogs
from .result import TrainResult
from .checkpoint_manager import CheckpointManager, now_iso
from .fs import redact_url
from .lease import holder_identity
from .storage import RunStorage
from .worker_group import (
    WorkerGroup,
    capacity_now,
    check_cluster_can_hold,
    ray_connection,
    storage_is_visible,
)

_logger = logging.getLogger("prefect_distrain")

#: After a scale-up decision, how long to wait for the old group's resources to come back
#: before starting a smaller group after all.
_RELEASE_WAIT_S = 10.0


class Trainer:
    """Runs a training function on ``num_workers`` Ray actors with a backend set up on them."""

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
        self.history: list[dict[str, Any]] = []
        self._cluster_checked = False
        self.ray_address = ray_address
        self.ray_init_kwargs = ray_init_kwargs
        self.logger = logger or _logger
        self.worker_logs = WorkerLogs(
            self.logger, logging.getLevelName(self.run_config.other_ranks_log_level))
        #: A rich progress bar in the terminal; None: when RunConfig(total=...) is given and
        #: stdout is a terminal.
        self.progress_bar = progress_bar
        self._group: WorkerGroup | None = None
        self._backend = self.backend_config.make_backend()
        self._ray: contextlib.ExitStack | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True while the worker group is up (between ``start`` and ``shutdown``)."""
        return self._group is not None

    def start(self, expect_full: bool = False) -> None:
        """Connect to (or start) Ray, start the workers and set up the backend."""
        if self._group is not None:
            return
        if self._ray is None:
            stack = contextlib.ExitStack()
            stack.enter_context(ray_connection(self.ray_address, self.ray_init_kwargs))
            self._ray = stack
        try:
            if not self._cluster_checked:
                check_cluster_can_hold(self.scaling)
                self._cluster_checked = True
            self._group = self._start_group(expect_full)
        except BaseException:
            self._release_ray()
            raise

    def _start_group(self, expect_full: bool = False) -> WorkerGroup:
        """As many workers as the cluster holds now, up to ``num_workers`` and at least
        ``min_workers`` (``num_workers`` if not elastic); waits with a doubling, logged backoff
        while it holds fewer, up to PREFECT_DISTRAIN_PLACEMENT_GROUP_TIMEOUT_S.

        ``expect_full``: the cluster was just seen to hold the full group (a scale-up); give
        Ray a moment to release the old group's resources before settling for fewer.
        """
        wanted, least = self.scaling.num_workers, self.scaling.least_workers
        settle = time.monotonic() + (_RELEASE_WAIT_S if expect_full else 0.0)
        while capacity_now(self.scaling) < wanted and time.monotonic() < settle:
            time.sleep(0.2)
        timeout = settings.settings().placement_group_timeout_s
        deadline = time.monotonic() + timeout
        delay = 1.0
        while True:
            began = time.monotonic()
            size = min(wanted, capacity_now(self.scaling))
            if size >= least:
                group = WorkerGroup(self.scaling, size,
                                    env=self._backend.worker_env(self.backend_config))
                try:
                    group.start(timeout=max(1.0, min(deadline - began, 10.0)))
                    self._backend.on_start(group, self.backend_config)
                    self.logger.info("Started %d %s worker(s) in %.1f s", size,
                                     self.backend_config.name, time.monotonic() - began)
                    return group
                except ResourcesUnavailableError:
                    group.shutdown()  # not placed in time: the cluster changed; look again
                    self._backend.on_discard(self.backend_config)
                except BaseException:
                    group.shutdown()
                    self._backend.on_discard(self.backend_config)
                    raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ResourcesUnavailableError(
                    f"waited {timeout:g} s for the cluster to hold {least} worker(s) of "
                    f"{self.scaling.worker_resources}; it holds {max(size, 0)} now (other work "
                    f"holds its resources, or nodes are gone). Set "
                    f"{settings.PLACEMENT_GROUP_TIMEOUT_ENV} to wait longer",
                    requested=self.scaling.worker_resources, retryable=True)
            self.logger.warning(
                "Waiting for resources: the cluster can hold %d of the %d worker(s) needed; "
                "looking again in %.0f s", max(size, 0), least, min(delay, remaining))
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, settings.settings().backoff_max_s)

    def _discard_group(self) -> None:
        """After a failure: the actors are killed, not shut down gracefully."""
        group, self._group = self._group, None
        if group is not None:
            group.shutdown()
        self._backend.on_discard(self.backend_config)

    def shutdown(self) -> None:
        """Tear down the backend, kill the workers and leave Ray as it was found."""
        group, self._group = self._group, None
        try:
            if group is not None:
                try:
                    self._backend.on_shutdown(group, self.backend_config)
                except Exception as error:  # noqa: BLE001 - the actors die below anyway
                    self.logger.warning("Backend shutdown failed (%s); killing the workers", error)
                group.shutdown()
            self._backend.on_discard(self.backend_config)
        finally:
            self._release_ray()

    def _release_ray(self) -> None:
        stack, self._ray = self._ray, None
        if stack is not None:
            stack.close()

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
        callbacks = list(callbacks or [])
        for callback in callbacks:
            if not isinstance(callback, TrainingCallback):
                raise ConfigurationError(
                    f"callbacks must be TrainingCallback instances, got {type(callback).__name__}")
        total = self.run_config.total
        show_bar = self.progress_bar if self.progress_bar is not None else sys.stdout.isatty()
        if total and show_bar:
            callbacks.append(RichProgress(total, self.run_config.progress_key))
        url, options = self.run_config.resolved_storage()
        storage = RunStorage(url, self.run_config.name or _default_run_name(train_func), options)
        self.storage = storage
        manager = CheckpointManager(storage, self.checkpoint_config, self.logger)
        self.checkpoints = manager
        marker = storage.check_writable()  # a bad bucket or credentials fail before any worker
        try:
            try:  # one writer per run: a second one fails here, before any worker starts
                manager.open(self.holder, settings.settings().lease_timeout_s,
                             self.run_config.takeover)
                self.start()
                assert self._group is not None
                _check_workers_see(storage, marker, self._group)
            finally:
                storage.remove_marker(marker)
            return self._attempts(train_func, blob, config, callbacks, resume_from_checkpoint,
                                  resolve_datasets(datasets, storage.run_url,
                                                   storage.storage_options),
                                  data_config, manager, began)
        finally:
            manager.close()

    def _attempts(self, train_func: Callable, blob: bytes, config: Any,
                  callbacks: list[TrainingCallback], resume_from_checkpoint: Any,
                  resolved: dict[str, Any] | None, data_config: DataConfig | None,
                  manager: CheckpointManager, began: float) -> TrainResult:
        """Start the group and run the function until it completes, restarting after
        infrastructure failures (and to grow an elastic group back)."""
        storage = manager.storage
        history: list[dict[str, Any]] = []
        self.history = history  # rank 0's reports, for a summary even after a failure
        history_all_ranks: list[list[dict[str, Any]]] = []
        failures, attempt, restart_cause, scaled_up = 0, -1, None, False
        resume: Checkpoint | None = None
        while True:
            if restart_cause is None:
                resume = manager.resume_point(resume_from_checkpoint)
            else:
                resume = manager.latest() or resume
            self.start(expect_full=scaled_up)
            group = self._group
            assert group is not None
            resumed_index = resume.index if resume is not None and resume.index else 0
            history[:] = [h for h in history if h["_training_iteration"] <= resumed_index]
            history_all_ranks[:] = [h for h in history_all_ranks
                                    if h[0]["_training_iteration"] <= resumed_index]
            record = manager.claim_attempt({
                "started_at": now_iso(), "world_size": len(group),
                "resumed_from": redact_url(resume.path) if resume else None,
                **_after(manager.attempts(), resumed_index, restart_cause),
                "status": "running"}, at_least=attempt + 1)
            attempt = record["attempt"]
            spec = RunSpec(
                train_func=train_func, train_func_blob=blob, config=config, storage=storage,
                backend_name=self.backend_config.name, checkpoints=manager,
                checkpoint_config=self.checkpoint_config, resume_from=resume,
                callbacks=callbacks, attempt=attempt, history=history,
                history_all_ranks=history_all_ranks,
                dataset_shards=split_datasets(
                    resolved, len(group), data_config or DataConfig(),
                    [m.metadata["node_id"] for m in group.members]) if resolved else None,
                can_scale_up=self._scale_up_check(len(group)),
                is_backend_failure=self._backend.is_runtime_failure,
                fatal_exceptions=self.failure_config.fatal_exceptions, logs=self.worker_logs)
            self._backend.on_training_start(group, self.backend_config)
            try:
                outcome = run_training(group, spec, self.logger)
            except ScaleUp as scale:
                restart_cause = (f"scale up from {record['world_size']} workers after "
                                 f"checkpoint {scale.index}")
                self._discard_group()
                scaled_up = True
                self._end_attempt(manager, record, "scaled up", restart_cause, history)
                self.logger.info("The cluster can hold %d workers again: restarting from "
                                 "checkpoint %d", self.scaling.num_workers, scale.index)
                continue
            except BaseException as error:
                self._discard_group()
                scaled_up = False
                cause = f"{type(error).__name__}: {error}"[:300]
                self._end_attempt(manager, record, "failed", cause, history, error)
                if not is_infrastructure_failure(error):
                    raise
                if not self.failure_config.may_restart(failures):
                    if self.failure_config.max_failures:
                        self.logger.error("Giving up after %d restart(s): %s", failures, cause)
                    raise
                failures += 1
                restart_cause = cause
                self.logger.warning("Attempt %d failed (%s); restart %d of %s from the latest "
                                    "committed checkpoint", attempt, cause, failures,
                                    "unlimited" if self.failure_config.max_failures == -1
                                    else self.failure_config.max_failures)
                continue
            if not group.started:  # a stop ended ranks that did not reach a report
                self._discard_group()
            self._end_attempt(manager, record, "stopped" if outcome.stopped else "completed",
                              outcome.stopped, history)
            break
        best = [c.without_credentials() for c in manager.best_checkpoints()]
        latest = manager.latest()
        return TrainResult(
            metrics=history[-1] if history else None, metrics_history=history,
            metrics_all_ranks=history_all_ranks[-1] if history_all_ranks else [],
            metrics_history_all_ranks=history_all_ranks,
            worker_results=outcome.returns,
            checkpoint=latest.without_credentials() if latest else None,
            best_checkpoints=[(c, c.metrics) for c in best],
            run_name=storage.name, path=redact_url(storage.run_url),
            backend=self.backend_config.name, world_size=len(group), attempt=attempt,
            failures=failures, stopped_early=outcome.stopped,
            wall_time_s=time.monotonic() - began)

    def _end_attempt(self, manager: CheckpointManager, record: dict[str, Any], status: str,
                     cause: str | None, history: list[dict[str, Any]],
                     error: BaseException | None = None) -> None:
        """Record how the attempt ended; a failure to write it never hides the run's own
        error (it is logged, and noted on that error)."""
        try:
            manager.record_attempt({**record, "status": status, "ended_at": now_iso(),
                                    "cause": cause, "last_reported": _last_reported(history)})
        except Exception as failure:  # noqa: BLE001 - the run's outcome matters more
            self.logger.warning("Could not record the end of attempt %d: %s",
                                record["attempt"], failure)
            if error is not None:
                error.add_note(f"The attempt ledger could not be written either: {failure}")
            elif status in ("completed", "stopped"):
                raise

    def _scale_up_check(self, size: int) -> Callable[[], bool] | None:
        missing = self.scaling.num_workers - size
        if missing <= 0:
            return None
        return lambda: capacity_now(self.scaling) >= missing

def _check_workers_see(storage: RunStorage, marker: str, group: WorkerGroup) -> None:
    """Every worker must see the marker the driver wrote, or checkpoints would be lost."""
    reasons = group.execute(storage_is_visible, storage, marker)
    blind = [(m, why) for m, why in zip(group.members, reasons) if why is not None]
    if blind:
        where = "; ".join(f"rank {m.info.world_rank} on {m.info.node_ip} ({why})"
                          for m, why in blind)
        raise ConfigurationError(
            f"storage {redact_url(storage.run_url)!r} is not visible from {where}. A local "
            "path is private to one node and memory:// to one process; a custom fsspec "
            "protocol must be installed on every node. Use storage every worker can reach: "
            "s3://, gs://, or a folder mounted on every node")


def _last_reported(history: list[dict[str, Any]]) -> int | None:
    return history[-1]["_training_iteration"] if history else None


def _after(ledger: list[dict], resumed_index: int, restart_cause: str | None) -> dict[str, Any]:
    """Why this attempt started and how many reported steps it must do again."""
    previous = ledger[-1] if ledger else None
    if previous is None or previous["status"] in ("completed", "stopped"):
        return {"restarted_because": restart_cause, "steps_redone": 0}
    cause = restart_cause or previous.get("cause") or "the driver was lost (no outcome recorded)"
    last = previous.get("last_reported")
    return {"restarted_because": cause,
            "steps_redone": None if last is None else max(0, last - resumed_index)}


def _default_run_name(fn: Callable) -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "_"
                   for c in getattr(fn, "__name__", "train"))
    return f"{name.strip('_') or 'train'}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"

