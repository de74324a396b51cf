"""Horovod quickstart: two Ray workers train a digits classifier with ``horovod.torch``, as one
Prefect task.

    bash scripts/install_horovod.sh      # once: Horovod 0.28.1 with gloo (docs/backends.md)
    python flows/horovod_quickstart.py

The backend runs Horovod's gloo rendezvous on the driver and gives every worker its ranks in
the environment, so the loop is plain Horovod code: ``hvd.init()``, a ``DistributedOptimizer``
that averages gradients, and ``broadcast_parameters`` so every rank starts from rank 0's
weights (also after a restart from a checkpoint).
"""

from __future__ import annotations

import os
import tempfile

from prefect import flow

import prefect_distrain as pd


def train_loop(config):
    import horovod.torch as hvd
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    hvd.init()
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    train_set = torch.utils.data.TensorDataset(x_train, y_train)
    sampler = torch.utils.data.distributed.DistributedSampler(
        train_set, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=config["batch_size"],
                                         sampler=sampler)
    model = nn.Sequential(nn.Linear(64, config["hidden"]), nn.ReLU(),
                          nn.Linear(config["hidden"], 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"] * hvd.size(), momentum=0.9)
    start = 0
    if (checkpoint := pd.get_checkpoint()) is not None:
        state = pd.torch.load_state(checkpoint, "state.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    loss_fn = nn.CrossEntropyLoss()
    accuracy = 0.0
    for epoch in range(start, config["epochs"]):
        sampler.set_epoch(epoch)
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        metrics = {"epoch": epoch, "loss": hvd.allreduce(loss.detach()).item(),
                   "accuracy": accuracy}
        with tempfile.TemporaryDirectory() as folder:
            if hvd.rank() == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch}, os.path.join(folder, "state.pt"))
            pd.report(metrics, checkpoint=pd.Checkpoint.from_directory(folder)
                      if hvd.rank() == 0 else None)
    return {"rank": hvd.rank(), "size": hvd.size(), "accuracy": accuracy,
            "weights": [p.detach().clone() for p in model.parameters()]}


@flow(name="digits-horovod-quickstart", log_prints=True)
def horovod_quickstart(epochs: int = 8, num_workers: int = 2) -> float:
    result = pd.train(
        train_loop,
        backend="horovod",             # or pd.HorovodConfig(timeout_s=..., cycle_time_ms=...)
        config={"epochs": epochs, "lr": 0.025, "batch_size": 32, "hidden": 64},
        scaling=pd.ScalingConfig(num_workers=num_workers),
        run=pd.RunConfig(storage=os.environ.get(
            "QUICKSTART_STORAGE", os.path.join(tempfile.gettempdir(), "prefect-distrain"))),
        checkpoint=pd.CheckpointConfig(num_to_keep=2),
    )
    for metrics in result.metrics_history:
        print(f"epoch {metrics['epoch']}: loss {metrics['loss']:.4f}  "
              f"test accuracy {metrics['accuracy']:.3f}")
    print(f"Final test accuracy: {result.metrics['accuracy']:.3f}")
    return result.metrics["accuracy"]


if __name__ == "__main__":
    horovod_quickstart()
