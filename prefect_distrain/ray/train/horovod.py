"""``ray.train.horovod``: the Horovod trainer and its settings."""

from ...backends.horovod import HorovodConfig
from ...trainers import HorovodTrainer

__all__ = ["HorovodConfig", "HorovodTrainer"]
