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
import time
from typing import Any, Callable

from .backends import BackendConfig, resolve_backend
from .callbacks import TrainingCallback
from .checkpoint import Checkpoint
from .config import CheckpointConfig, RunConfig, ScalingConfig
from .controller import RunSpec, run_training
from .exceptions import ConfigurationError
from .result import TrainResult
from .storage import RunStorage, find_manifest, redact_url
from .worker_group import WorkerGroup, ray_connection, storage_is_visible

_logger = logging.getLogger("prefect_distrain")


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
        ray_address: str | None = None,
        ray_init_kwargs: dict[str, Any] | None = None,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
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
        self.ray_address = ray_address
        self.ray_init_kwargs = ray_init_kwargs
        self.logger = logger or _logger
        self._group: WorkerGroup | None = None
        self._backend = self.backend_config.make_backend()
        self._ray: contextlib.ExitStack | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect to (or start) Ray, start the workers and set up the backend."""
        if self._group is not None:
            return
        if self._ray is None:
            stack = contextlib.ExitStack()
            stack.enter_context(ray_connection(self.ray_address, self.ray_init_kwargs))
            self._ray = stack
        began = time.monotonic()
        group = WorkerGroup(self.scaling)
        try:
            group.start()
            self._backend.on_start(group, self.backend_config)
        except BaseException:
            group.shutdown()
            self._release_ray()
            raise
        self._group = group
        self.logger.info("Started %d %s worker(s) in %.1f s", len(group),
                         self.backend_config.name, time.monotonic() - began)

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
        finally:
            self._release_ray()

    def _release_ray(self) -> None:
        stack, self._ray = self._ray, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> Trainer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- runs -------------------------------------------------------------------------------------

    def run(self, train_func: Callable, config: Any = None,
            callbacks: list[TrainingCallback] | None = None,
            resume_from_checkpoint: Checkpoint | str | None = None) -> list[Any]:
        """Run ``train_func`` on every worker; its return values, in rank order."""
        return self.fit(train_func, config=config, callbacks=callbacks,
                        resume_from_checkpoint=resume_from_checkpoint).worker_results

    def fit(self, train_func: Callable, config: Any = None,
            callbacks: list[TrainingCallback] | None = None,
            resume_from_checkpoint: Checkpoint | str | None = None) -> TrainResult:
        """Run ``train_func`` on every worker; the full result (metrics, checkpoint, returns).

        ``resume_from_checkpoint``: a Checkpoint, the path/URL of one, or ``"latest"`` for this
        run's latest committed checkpoint (a fresh start when there is none).
        """
        began = time.monotonic()
        callbacks = list(callbacks or [])
        for callback in callbacks:
            if not isinstance(callback, TrainingCallback):
                raise ConfigurationError(
                    f"callbacks must be TrainingCallback instances, got {type(callback).__name__}")
        url, options = self.run_config.resolved_storage()
        storage = RunStorage(url, self.run_config.name or _default_run_name(train_func), options)
        marker = storage.check_writable()  # a bad bucket or credentials fail before any worker
        try:
            self.start()
            assert self._group is not None
            _check_workers_see(storage, marker, self._group)
        finally:
            storage.remove_marker(marker)
        committed, attempt = storage.layout()
        resume = self._resume_checkpoint(resume_from_checkpoint, storage, committed)
        spec = RunSpec(train_func=train_func, config=config, storage=storage,
                       backend_name=self.backend_config.name, checkpoint_config=self.checkpoint_config,
                       resume_from=resume, callbacks=callbacks, attempt=attempt,
                       committed=committed,
                       protected={resume.manifest["directory"]} if resume and resume.manifest
                       and resume.path.startswith(storage.run_url + "/") else set())
        self._backend.on_training_start(self._group, self.backend_config)
        try:
            outcome = run_training(self._group, spec, self.logger)
        except BaseException:
            if self._group is not None:
                self._group.shutdown()  # a failed group is not reused
                self._group = None
            raise
        checkpoints = [storage.checkpoint(m["directory"], m).without_credentials()
                       for m in outcome.committed]
        history = outcome.history
        return TrainResult(
            metrics=history[-1] if history else None, metrics_history=history,
            worker_results=outcome.returns,
            checkpoint=max(checkpoints, key=lambda c: c.index, default=None),
            best_checkpoints=_best_first(checkpoints, self.checkpoint_config),
            run_name=storage.name, path=redact_url(storage.run_url),
            backend=self.backend_config.name, world_size=len(self._group), attempt=attempt,
            wall_time_s=time.monotonic() - began)

    def _resume_checkpoint(self, value: Checkpoint | str | None, storage: RunStorage,
                           committed: list[dict]) -> Checkpoint | None:
        if value is None:
            return None
        if value == "latest":
            latest = max(committed, key=lambda m: m["index"], default=None)
            return storage.checkpoint(latest["directory"], latest) if latest else None
        if isinstance(value, str):
            value = Checkpoint(value, storage.storage_options)
        if not isinstance(value, Checkpoint):
            raise ConfigurationError(
                "resume_from_checkpoint takes a Checkpoint, a path/URL or 'latest', got "
                f"{type(value).__name__}")
        if not value.storage_options and storage.storage_options:
            value = Checkpoint(value.path, storage.storage_options, value.manifest)
        fs, path = value.filesystem, value._fs_and_path()[1]
        if not fs.isdir(path):
            raise ConfigurationError(
                f"resume_from_checkpoint={redact_url(value.path)!r}: no such checkpoint "
                "directory. Pass result.checkpoint of an earlier run, the path of a "
                "checkpoint folder, or 'latest'")
        if value.manifest is None:
            value = Checkpoint(value.path, value.storage_options, find_manifest(value))
        return value


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


def _best_first(checkpoints: list[Checkpoint], config: CheckpointConfig
                ) -> list[tuple[Checkpoint, dict]]:
    attribute = config.checkpoint_score_attribute
    if attribute is None:
        ordered = sorted(checkpoints, key=lambda c: c.index, reverse=True)
    else:
        sign = 1 if config.checkpoint_score_order == "max" else -1
        ordered = sorted(checkpoints, key=lambda c: (sign * c.metrics[attribute], c.index),
                         reverse=True)
    return [(c, c.metrics) for c in ordered]


def _default_run_name(fn: Callable) -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "_"
                   for c in getattr(fn, "__name__", "train"))
    return f"{name.strip('_') or 'train'}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"

