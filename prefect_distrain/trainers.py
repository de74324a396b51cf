"""Ray Train's trainer classes over ``train``: a Ray Train script ports by changing its imports.

```python
from prefect_distrain import CheckpointConfig, RunConfig, ScalingConfig
from prefect_distrain.torch import TorchTrainer

trainer = TorchTrainer(train_loop_per_worker, train_loop_config={"lr": 1e-3},
                       scaling_config=ScalingConfig(num_workers=2),
                       run_config=RunConfig(name="digits", storage="s3://bucket/runs"))
result = trainer.fit()            # result.metrics, .checkpoint, .best_checkpoints, .path
```
``fit()`` inside a Prefect flow is the ``train`` task (artifacts, events, retries that resume);
outside one it is a ``Trainer`` run in this process, with no Prefect API involved. Either way
the same machinery runs: these classes only translate Ray's keywords. ``run_config`` takes
ours or Ray's shape (``prefect_distrain.ray.train.RunConfig``, with ``storage_path``,
``checkpoint_config``, ``failure_config`` and ``callbacks`` inside). Like Ray's, ``fit()``
raises the run's error; the result it returns has ``error`` None.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

from .backends import BackendConfig
from .callbacks import TrainingCallback, callback_list
from .checkpoints.checkpoint import Checkpoint
from .config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from .exceptions import ConfigurationError
from .integrations.data import DataConfig
from .result import TrainResult


@dataclass(frozen=True)
class RayRunConfig:
    """Ray Train's ``RunConfig`` (exported as ``prefect_distrain.ray.train.RunConfig``): the
    run's name and storage with its checkpoint and failure policies and callbacks inside.
    ``storage_path`` is any fsspec URL (``storage_options`` for its credentials); Ray's
    ``storage_filesystem`` (a pyarrow filesystem) has no counterpart."""

    name: str | None = None
    storage_path: str | None = None
    storage_filesystem: Any = None
    checkpoint_config: CheckpointConfig | None = None
    failure_config: FailureConfig | None = None
    callbacks: list[TrainingCallback] | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    verbose: int | None = None  # Ray's console verbosity; our logs go through logging

    def __post_init__(self) -> None:
        if self.storage_filesystem is not None:
            raise ConfigurationError(
                "RunConfig(storage_filesystem=...) takes a pyarrow filesystem in Ray; here "
                "storage is an fsspec URL: give storage_path='s3://bucket/runs' and the "
                "credentials in storage_options={...}")

    def split(self) -> tuple[RunConfig, CheckpointConfig | None, FailureConfig | None,
                             list[TrainingCallback]]:
        """Our RunConfig and the policies Ray keeps inside its RunConfig."""
        run = RunConfig(name=self.name, storage_options=self.storage_options) \
            if self.storage_path is None else \
            RunConfig(name=self.name, storage=self.storage_path,
                      storage_options=self.storage_options)
        return run, self.checkpoint_config, self.failure_config, callback_list(self.callbacks)


class DataParallelTrainer:
    """Ray Train's ``DataParallelTrainer``: ``train_loop_per_worker`` on every worker of the
    group, with the backend of ``backend_config`` (a ``BackendConfig`` or a backend's name)."""

    def __init__(
        self,
        train_loop_per_worker: Callable,
        *,
        train_loop_config: dict[str, Any] | None = None,
        backend_config: BackendConfig | str | None = None,
        scaling_config: ScalingConfig | None = None,
        run_config: RunConfig | RayRunConfig | None = None,
        datasets: dict[str, Any] | None = None,
        dataset_config: DataConfig | None = None,
        resume_from_checkpoint: Checkpoint | str | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        if not callable(train_loop_per_worker):
            raise ConfigurationError(
                f"train_loop_per_worker must be a function, got "
                f"{type(train_loop_per_worker).__name__}")
        if metadata:
            raise ConfigurationError(
                "metadata= is not supported: report it with the metrics, or write it into the "
                "checkpoint's folder")
        if run_config is not None and not isinstance(run_config, (RunConfig, RayRunConfig)):
            raise ConfigurationError(
                f"run_config must be a RunConfig, got {type(run_config).__name__}")
        self.train_loop_per_worker = train_loop_per_worker
        self.train_loop_config = train_loop_config
        self.backend_config = backend_config if backend_config is not None else "torch"
        self.scaling_config = scaling_config or ScalingConfig()
        self.run_config = run_config or RunConfig()
        self.datasets = datasets
        self.dataset_config = dataset_config
        self.resume_from_checkpoint = resume_from_checkpoint

    def train_arguments(self) -> dict[str, Any]:
        """The keywords of ``train`` / ``Trainer.fit`` this trainer stands for."""
        run, checkpoint, failure, callbacks = (
            self.run_config.split() if isinstance(self.run_config, RayRunConfig)
            else (self.run_config, None, None, []))
        return {"backend": self.backend_config, "config": self.train_loop_config,
                "scaling": self.scaling_config, "run": run, "checkpoint": checkpoint,
                "failure": failure, "callbacks": callbacks, "datasets": self.datasets,
                "data_config": self.dataset_config,
                "resume_from_checkpoint": self.resume_from_checkpoint}

    def fit(self) -> TrainResult:
        """Train; the result, or the run's error raised (as Ray's ``fit`` does)."""
        arguments = self.train_arguments()
        if _in_flow():
            from .prefect.tasks import train

            return train(self.train_loop_per_worker, **arguments)
        from .execution.trainer import Trainer

        trainer = Trainer(arguments.pop("backend"), scaling=arguments.pop("scaling"),
                          run=arguments.pop("run"), checkpoint=arguments.pop("checkpoint"),
                          failure=arguments.pop("failure"))
        with trainer:
            return trainer.fit(self.train_loop_per_worker, **arguments)

    def replace(self, **changes: Any) -> DataParallelTrainer:
        """The same trainer with some of its settings changed (a Tuner's ``run_config``)."""
        other = copy.copy(self)
        for name, value in changes.items():
            if name not in self.__dict__:
                raise TypeError(f"{type(self).__name__} has no setting {name!r}")
            setattr(other, name, value)
        return other


class TorchTrainer(DataParallelTrainer):
    """Ray Train's ``TorchTrainer``: ``torch_config`` is a ``TorchConfig`` (default gloo on
    CPU, nccl on GPU)."""

    def __init__(self, train_loop_per_worker: Callable, *, torch_config: Any = None,
                 **kwargs: Any):
        _no_backend_config(kwargs, "torch_config")
        super().__init__(train_loop_per_worker, backend_config=torch_config or "torch", **kwargs)


class TensorflowTrainer(DataParallelTrainer):
    """Ray Train's ``TensorflowTrainer``: ``tensorflow_config`` is a ``TensorflowConfig``."""

    def __init__(self, train_loop_per_worker: Callable, *, tensorflow_config: Any = None,
                 **kwargs: Any):
        _no_backend_config(kwargs, "tensorflow_config")
        super().__init__(train_loop_per_worker,
                         backend_config=tensorflow_config or "tensorflow", **kwargs)


class HorovodTrainer(DataParallelTrainer):
    """Ray Train's ``HorovodTrainer``: ``horovod_config`` is a ``HorovodConfig``."""

    def __init__(self, train_loop_per_worker: Callable, *, horovod_config: Any = None,
                 **kwargs: Any):
        _no_backend_config(kwargs, "horovod_config")
        super().__init__(train_loop_per_worker, backend_config=horovod_config or "horovod",
                         **kwargs)


def _no_backend_config(kwargs: dict[str, Any], ours: str) -> None:
    if "backend_config" in kwargs:
        raise ConfigurationError(f"give the backend's settings as {ours}=..., not backend_config")


def _in_flow() -> bool:
    try:
        from prefect.context import FlowRunContext
    except ImportError:
        return False
    return FlowRunContext.get() is not None
