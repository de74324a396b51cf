"""Quickstart: two Ray workers train a digits classifier with PyTorch DDP, as one Prefect task.

    python flows/quickstart.py

Runs on a local Ray that the task starts (or the one at RAY_ADDRESS) and on Prefect's
ephemeral API. The data set is scikit-learn's bundled 8x8 digits, so nothing is downloaded.
Each worker trains on its half of the training set (DistributedSampler); the global batch is
batch_size x world size. Rank 0 evaluates on the held-out set after every epoch.
"""

from __future__ import annotations

import os
import tempfile

from prefect import flow

import prefect_distrain as pd


def load_digits_split():
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    return (torch.utils.data.TensorDataset(x_train, y_train),
            torch.utils.data.TensorDataset(x_test, y_test))


def train_loop(config):
    import torch
    from torch import nn

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    train_set, test_set = load_digits_split()
    model = pd.torch.prepare_model(
        nn.Sequential(nn.Linear(64, config["hidden"]), nn.ReLU(), nn.Linear(config["hidden"], 10)))
    loader = pd.torch.prepare_data_loader(
        torch.utils.data.DataLoader(train_set, batch_size=config["batch_size"], shuffle=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    x_test, y_test = (t.to(pd.torch.get_device()) for t in test_set.tensors)

    start_epoch = 0
    checkpoint = pd.get_checkpoint()
    if checkpoint:  # resume_from_checkpoint=... was given: go on from there
        state = pd.torch.load_state(checkpoint, "state.pt")  # weights_only=True, hash-checked
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1

    for epoch in range(start_epoch, config["epochs"]):
        model.train()
        total, count = 0.0, 0
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(y), count + len(y)
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        metrics = {"epoch": epoch, "loss": total / count, "accuracy": accuracy}
        if pd.get_context().get_world_rank() == 0:
            with tempfile.TemporaryDirectory() as folder:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch}, os.path.join(folder, "state.pt"))
                pd.report(metrics, checkpoint=pd.Checkpoint.from_directory(folder))
        else:
            pd.report(metrics)
    return {"rank": pd.get_context().get_world_rank(), "accuracy": accuracy}


@flow(name="digits-quickstart", log_prints=True)
def quickstart(epochs: int = 8, num_workers: int = 2, use_gpu: bool = False) -> float:
    result = pd.train(
        train_loop,
        backend="torch",
        config={"epochs": epochs, "lr": 0.05, "batch_size": 32, "hidden": 64},
        scaling=pd.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run=pd.RunConfig(storage=os.environ.get(
            "QUICKSTART_STORAGE", os.path.join(tempfile.gettempdir(), "prefect-distrain"))),
        checkpoint=pd.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="accuracy",
                                       checkpoint_score_order="max"),
    )
    for metrics in result.metrics_history:
        print(f"epoch {metrics['epoch']}: loss {metrics['loss']:.4f}  "
              f"test accuracy {metrics['accuracy']:.3f}")
    best, best_metrics = result.best_checkpoints[0]
    print(f"Best checkpoint: {best.path} (accuracy {best_metrics['accuracy']:.3f})")
    print(f"Final test accuracy: {result.metrics['accuracy']:.3f}")
    return result.metrics["accuracy"]


if __name__ == "__main__":
    quickstart()
