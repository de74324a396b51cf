"""``ray.train`` over prefect_distrain: ``from ray import train`` becomes
``from prefect_distrain.ray import train``; the names are ours (one code path), Ray's shapes
where they differ (``RunConfig`` with ``storage_path`` and the policies inside)."""

from ...checkpoints.checkpoint import Checkpoint
from ...config import CheckpointConfig, FailureConfig, ScalingConfig
from ...integrations.data import DataConfig
from ...result import TrainResult as Result
from ...session import get_checkpoint, get_context, get_dataset_shard, report
from ...trainers import DataParallelTrainer
from ...trainers import RayRunConfig as RunConfig

__all__ = ["Checkpoint", "CheckpointConfig", "DataConfig", "DataParallelTrainer",
           "FailureConfig", "Result", "RunConfig", "ScalingConfig", "get_checkpoint",
           "get_context", "get_dataset_shard", "report"]
