"""Ray's module paths over prefect_distrain: replace ``ray`` by ``prefect_distrain.ray`` in a
script's imports (``from prefect_distrain.ray import train, tune``,
``from prefect_distrain.ray.train.torch import TorchTrainer``, the seeds'
``from prefect_distrain.ray import sgd``). Every name here is one of ours, re-exported."""

from . import train, tune

__all__ = ["train", "tune"]
