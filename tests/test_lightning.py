"""Lightning on the torch backend, as ``ray.train.lightning`` runs it: DDP over the group's
process group (both ranks end with the same weights, each saw half the data), a report and a
checkpoint per epoch, a resume that goes on from the checkpoint's epoch, and a trainer that
would launch its own processes refused."""

from __future__ import annotations

import importlib.util
import os

import pytest

import prefect_distrain as pd

# Lightning is imported in the workers only: importing it here would import TensorFlow (through
# TensorBoard) into the test process, which the TensorFlow tests keep out of it.
pytestmark = [pytest.mark.usefixtures("ray_cluster"),
              pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                 reason="pip install 'prefect-distrain[lightning]'")]


def lightning_loop(config):
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from prefect_distrain.lightning import (
        RayDDPStrategy,
        RayLightningEnvironment,
        RayTrainReportCallback,
        prepare_trainer,
    )

    class Linear(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.seen = 0

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen += len(x)
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train_loss", loss, on_epoch=True, on_step=False, sync_dist=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 64).unsqueeze(1)
    data = DataLoader(TensorDataset(x, 2 * x + 1), batch_size=8)
    model = Linear()
    trainer = pl.Trainer(max_epochs=config["epochs"], devices="auto", accelerator="auto",
                         strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()],
                         callbacks=[RayTrainReportCallback()], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, logger=False)
    trainer = prepare_trainer(trainer)
    if (checkpoint := pd.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            trainer.fit(model, train_dataloaders=data,
                        ckpt_path=os.path.join(folder, RayTrainReportCallback.CHECKPOINT_NAME))
    else:
        trainer.fit(model, train_dataloaders=data)
    return {"weight": model.layer.weight.item(), "bias": model.layer.bias.item(),
            "seen": model.seen}


def test_lightning_ddp_reports_checkpoints_and_resumes(tmp_path):
    run = pd.RunConfig(name="lightning", storage=str(tmp_path))
    with pd.Trainer(num_workers=2, run=run) as trainer:
        first = trainer.fit(lightning_loop, config={"epochs": 2})
    rank0, rank1 = first.worker_results
    assert (rank0["weight"], rank0["bias"]) == (rank1["weight"], rank1["bias"]), "DDP in sync"
    assert rank0["seen"] == rank1["seen"] == 2 * 32, "each rank saw its half, twice"
    assert [m["epoch"] for m in first.metrics_history] == [0, 1]
    losses = [m["train_loss"] for m in first.metrics_history]
    assert losses[1] < losses[0]
    assert set(first.checkpoint.manifest.files) == {"checkpoint.ckpt"}
    assert first.checkpoint.manifest.files["checkpoint.ckpt"].rank == 0

    with pd.Trainer(num_workers=2, run=run) as trainer:
        second = trainer.fit(lightning_loop, config={"epochs": 4},
                             resume_from_checkpoint="latest")
    assert [m["epoch"] for m in second.metrics_history] == [2, 3], "went on from epoch 2"
    assert second.worker_results[0]["seen"] == 2 * 32


def plain_trainer_loop():
    import lightning.pytorch as pl

    from prefect_distrain.lightning import prepare_trainer

    prepare_trainer(pl.Trainer(accelerator="cpu", devices=1, logger=False))


def test_a_lightning_trainer_of_its_own_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"pass strategy=RayDDPStrategy\(\)"):
        with pd.Trainer(num_workers=1, run=pd.RunConfig(storage=str(tmp_path))) as trainer:
            trainer.fit(plain_trainer_loop)
