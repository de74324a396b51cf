"""prefect-distrain: distributed deep-learning training as one Prefect task, on Ray.

```python
from prefect import flow
import prefect_distrain as pd

def train_loop(config):                       # runs on every worker
    model = pd.torch.prepare_model(Net())
    for epoch in range(config["epochs"]):
        ...
        pd.report({"epoch": epoch, "loss": loss})

@flow
def retrain():
    return pd.train(train_loop, config={"epochs": 3}, scaling=pd.ScalingConfig(num_workers=2))
```
Importing this package imports neither Prefect nor any framework: workers import it too, and
they start faster without them. ``pd.train`` (Prefect) and ``pd.torch`` load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import callbacks, collective
from .backends import Backend, BackendConfig, available_backends
from .callbacks import EarlyStopping, PrintingCallback, TrainingCallback
from .checkpoints.checkpoint import Checkpoint
from .checkpoints.lease import LeaseLostError, RunInUseError
from .checkpoints.manager import best_checkpoint, latest_checkpoint
from .collective import CollectiveTimeoutError
from .config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, Validation
from .exceptions import (
    CheckpointCorruptError,
    CheckpointUploadError,
    ConfigurationError,
    DataChangedError,
    DistrainError,
    PreemptionError,
    RemoteTraceback,
    ResourcesUnavailableError,
    RunTimeoutError,
    StopTraining,
    StorageError,
    TrainingHangError,
    UnequalReportsError,
    UnsafeCheckpointError,
    WorkerError,
    WorkerLostError,
)
from .execution.trainer import Trainer
from .integrations.data import DataConfig, read_dataset
from .integrations.schedulers import ASHAScheduler, MedianStoppingRule, TrialScheduler
from .integrations.tune import (
    TrialResult,
    TuneConfig,
    Tuner,
    TuneResult,
    choice,
    grid,
    loguniform,
    tune,
    uniform,
)
from .models import (
    AliasConflictError,
    AliasCorruptError,
    AliasEntry,
    AliasNotFoundError,
    alias_history,
    load_alias,
    promote,
    rollback,
)
from .result import TrainResult
from .session import TrainContext, get_checkpoint, get_context, get_dataset_shard, report
from .trainers import DataParallelTrainer, HorovodTrainer, TensorflowTrainer, TorchTrainer

if TYPE_CHECKING:
    from . import lightning, tensorflow, torch
    from .backends.horovod import HorovodConfig
    from .backends.tensorflow import TensorflowConfig
    from .backends.torch import TorchConfig
    from .prefect.ray_runner import ray_task_runner
    from .prefect.tasks import retry_on_infrastructure, train

__version__ = "0.1.0"

_LAZY = {
    "train": ("prefect_distrain.prefect.tasks", "train"),
    "retry_on_infrastructure": ("prefect_distrain.prefect.tasks", "retry_on_infrastructure"),
    "ray_task_runner": ("prefect_distrain.prefect.ray_runner", "ray_task_runner"),
    "TorchConfig": ("prefect_distrain.backends.torch", "TorchConfig"),
    "TensorflowConfig": ("prefect_distrain.backends.tensorflow", "TensorflowConfig"),
    "HorovodConfig": ("prefect_distrain.backends.horovod", "HorovodConfig"),
    "torch": ("prefect_distrain.torch", None),
    "lightning": ("prefect_distrain.lightning", None),
    "tensorflow": ("prefect_distrain.tensorflow", None),
}

__all__ = [
    "ASHAScheduler", "AliasConflictError", "AliasCorruptError", "AliasEntry", "AliasNotFoundError",
    "Backend", "BackendConfig", "Checkpoint", "CheckpointConfig", "CheckpointCorruptError",
    "CheckpointUploadError", "CollectiveTimeoutError", "ConfigurationError", "DataChangedError",
    "DataConfig",
    "DataParallelTrainer", "DistrainError", "EarlyStopping", "FailureConfig", "HorovodConfig",
    "HorovodTrainer", "LeaseLostError", "MedianStoppingRule", "PreemptionError",
    "PrintingCallback", "RemoteTraceback", "ResourcesUnavailableError", "RunConfig",
    "RunInUseError", "RunTimeoutError", "ScalingConfig", "StopTraining", "StorageError",
    "TensorflowConfig", "TensorflowTrainer", "TorchConfig", "TorchTrainer", "TrainContext",
    "TrainResult", "Trainer", "TrainingCallback", "TrainingHangError", "TrialResult",
    "TrialScheduler", "TuneConfig", "TuneResult", "Tuner", "UnequalReportsError",
    "UnsafeCheckpointError", "Validation", "WorkerError", "WorkerLostError", "alias_history",
    "available_backends", "best_checkpoint", "callbacks", "choice", "collective", "get_checkpoint",
    "get_context", "get_dataset_shard", "grid", "latest_checkpoint", "lightning", "load_alias",
    "loguniform", "promote", "ray_task_runner", "read_dataset", "report",
    "retry_on_infrastructure", "rollback", "tensorflow", "torch", "train", "tune", "uniform",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'prefect_distrain' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value
