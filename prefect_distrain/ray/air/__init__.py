"""``ray.air`` (Ray 2.0-2.6's home of the configs and the session) over our names."""

from ...checkpoints.checkpoint import Checkpoint
from ...config import CheckpointConfig, FailureConfig, ScalingConfig
from ...trainers import RayRunConfig as RunConfig
from . import session

__all__ = ["Checkpoint", "CheckpointConfig", "FailureConfig", "RunConfig", "ScalingConfig",
           "session"]
