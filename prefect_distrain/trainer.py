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

import fsspec

from .backends import BackendConfig, resolve_backend
from .callbacks import TrainingCallback
from .checkpoint import Checkpoint
from .config import RunConfig, ScalingConfig
from .controller import RunSpec, run_training
from .exceptions import ConfigurationError
from .result import TrainResult
from .storage import RunStorage
from .worker_group import WorkerGroup, ray_connection

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
        self.scaling = scaling
        self.run_config = run or RunConfig()
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
        """Run ``train_func`` on every worker; the full result (metrics, checkpoint, returns)."""
        began = time.monotonic()
        callbacks = list(callbacks or [])
        for callback in callbacks:
            if not isinstance(callback, TrainingCallback):
                raise ConfigurationError(
                    f"callbacks must be TrainingCallback instances, got {type(callback).__name__}")
        storage = RunStorage(self.run_config.storage,
                             self.run_config.name or _default_run_name(train_func),
                             self.run_config.storage_options)
        spec = RunSpec(train_func=train_func, config=config, storage=storage,
                       backend_name=self.backend_config.name,
                       resume_from=self._resume_checkpoint(resume_from_checkpoint),
                       callbacks=callbacks)
        self.start()
        assert self._group is not None
        self._backend.on_training_start(self._group, self.backend_config)
        try:
            returns, iterations = run_training(self._group, spec, self.logger)
        except BaseException:
            if self._group is not None:
                self._group.shutdown()  # a failed group is not reused
                self._group = None
            raise
        history = iterations.history
        return TrainResult(
            metrics=history[-1] if history else None, metrics_history=history,
            worker_results=returns,
            checkpoint=iterations.latest_checkpoint or storage.latest_checkpoint(),
            run_name=storage.name, path=storage.run_url, backend=self.backend_config.name,
            world_size=len(self._group), wall_time_s=time.monotonic() - began)

    def _resume_checkpoint(self, value: Checkpoint | str | None) -> Checkpoint | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = Checkpoint(value, self.run_config.storage_options)
        if not isinstance(value, Checkpoint):
            raise ConfigurationError(
                "resume_from_checkpoint takes a Checkpoint or a path/URL, got "
                f"{type(value).__name__}")
        fs, path = fsspec.core.url_to_fs(value.path, **value.storage_options)
        if not fs.isdir(path):
            raise ConfigurationError(
                f"resume_from_checkpoint={value.path!r}: no such checkpoint directory. Pass "
                "result.checkpoint of an earlier run, or the path of a checkpoint_* folder")
        return value


def _default_run_name(fn: Callable) -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "_"
                   for c in getattr(fn, "__name__", "train"))
    return f"{name.strip('_') or 'train'}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"

