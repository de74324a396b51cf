"""PyTorch Lightning in the training function, named as in ``ray.train.lightning``.

```python
import lightning.pytorch as pl
import prefect_distrain as pd
from prefect_distrain.lightning import (RayDDPStrategy, RayLightningEnvironment,
                                        RayTrainReportCallback, prepare_trainer)

def train_loop(config):
    trainer = pl.Trainer(max_epochs=config["epochs"], devices="auto", accelerator="auto",
                         strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()],
                         callbacks=[RayTrainReportCallback()], enable_checkpointing=False)
    trainer = prepare_trainer(trainer)
    if (checkpoint := pd.get_checkpoint()):       # a restart or resume_from_checkpoint
        with checkpoint.as_directory() as folder:
            trainer.fit(model, datamodule=data,
                        ckpt_path=os.path.join(folder, RayTrainReportCallback.CHECKPOINT_NAME))
    else:
        trainer.fit(model, datamodule=data)

pd.train(train_loop, backend="torch", scaling=pd.ScalingConfig(num_workers=2))
```
Lightning runs on the torch backend: the process group is already up when the loop starts (gloo
on CPU, nccl with ``use_gpu``), and these pieces make Lightning use it instead of launching its
own processes: the strategy's device and sampler come from our ranks, the environment tells
Lightning the ranks, and the callback reports every epoch's ``callback_metrics`` with a
checkpoint (rank 0's ``checkpoint.ckpt``; the other ranks report the metrics only).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from .backends.torch import import_torch
from .checkpoints.checkpoint import Checkpoint
from .session import get_context, report

torch = import_torch()


def import_lightning() -> tuple[Any, type]:
    """``lightning.pytorch`` (or the older ``pytorch_lightning``) and its LightningEnvironment."""
    try:
        import lightning.pytorch as pl
        from lightning.pytorch.plugins.environments import LightningEnvironment
    except ImportError:
        try:
            import pytorch_lightning as pl
            from pytorch_lightning.plugins.environments import LightningEnvironment
        except ImportError:
            raise ImportError(
                "prefect_distrain.lightning needs Lightning: pip install "
                "'prefect-distrain[lightning]'") from None
    return pl, LightningEnvironment


pl, LightningEnvironment = import_lightning()

__all__ = ["RayDDPStrategy", "RayLightningEnvironment", "RayTrainReportCallback",
           "prepare_trainer"]


def _device() -> torch.device:
    from .torch import get_device

    return get_device()


class RayDDPStrategy(pl.strategies.DDPStrategy):
    """Lightning's DDP on the group's process group: this rank's device, our ranks' sampler."""

    @property
    def root_device(self) -> torch.device:
        return _device()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}


class RayLightningEnvironment(LightningEnvironment):
    """The ranks Lightning sees are the group's; the processes exist already."""

    @property
    def creates_processes_externally(self) -> bool:
        return True

    def world_size(self) -> int:
        return get_context().get_world_size()

    def global_rank(self) -> int:
        return get_context().get_world_rank()

    def local_rank(self) -> int:
        return get_context().get_local_rank()

    def node_rank(self) -> int:
        return get_context().get_node_rank()

    def set_world_size(self, size: int) -> None:
        """Fixed by the group, not by Lightning."""

    def set_global_rank(self, rank: int) -> None:
        """Fixed by the group, not by Lightning."""

    def teardown(self) -> None:
        """The process group is the backend's to end."""


def prepare_trainer(trainer: Any) -> Any:
    """Checks that ``trainer`` runs on the group (``RayDDPStrategy`` and
    ``RayLightningEnvironment``); a Lightning trainer that would launch processes of its own or
    count ranks itself is refused, naming the fix."""
    strategy = trainer.strategy
    if not isinstance(strategy, RayDDPStrategy):
        raise ValueError(
            f"the Lightning trainer's strategy is {type(strategy).__name__}: pass "
            "strategy=RayDDPStrategy() (from prefect_distrain.lightning) to pl.Trainer")
    environment = getattr(strategy, "cluster_environment", None)
    if not isinstance(environment, RayLightningEnvironment):
        raise ValueError(
            "the Lightning trainer's cluster environment is "
            f"{type(environment).__name__}: pass plugins=[RayLightningEnvironment()] (from "
            "prefect_distrain.lightning) to pl.Trainer")
    return trainer


class RayTrainReportCallback(pl.callbacks.Callback):
    """At the end of every training epoch: report ``trainer.callback_metrics`` (with ``epoch``
    and ``step``) and a checkpoint holding Lightning's ``checkpoint.ckpt`` (written by rank 0;
    the other ranks report the metrics only)."""

    CHECKPOINT_NAME = "checkpoint.ckpt"

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        metrics = {k: v.item() if hasattr(v, "item") else v
                   for k, v in trainer.callback_metrics.items()}
        metrics["epoch"] = trainer.current_epoch
        metrics["step"] = trainer.global_step
        folder = tempfile.mkdtemp(prefix="lightning-checkpoint-")
        try:
            # Collective under DDP: every rank calls it, rank 0 writes the file.
            trainer.save_checkpoint(os.path.join(folder, self.CHECKPOINT_NAME),
                                    weights_only=False)
            checkpoint = Checkpoint.from_directory(folder) if os.listdir(folder) else None
            report(metrics, checkpoint=checkpoint)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
