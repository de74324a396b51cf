"""The digits model and its training loop, shared by the pipeline and retraining flows.

The loop reads its data from an fsspec URI (what an upstream task produced), warm-starts from
``pd.get_checkpoint()`` when given one, and commits a checkpoint after every epoch.
"""

from __future__ import annotations

import io
import os
import tempfile

import fsspec

import prefect_distrain as pd


def load_arrays(uri: str, storage_options: dict | None = None):
    import numpy as np

    with fsspec.open(uri, "rb", **(storage_options or {})) as handle:
        data = np.load(io.BytesIO(handle.read()))
        return {name: data[name] for name in data.files}


def build_model(hidden: int):
    from torch import nn

    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def accuracy(model, x, y) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def digits_loop(config):
    """Trains ``config["epochs"]`` epochs on the arrays at ``config["data_uri"]``.

    A checkpoint of this same run (a restart or a Prefect retry) continues its epochs; one of
    another run (a warm start) provides the weights and this run trains its own epochs.
    """
    import torch

    arrays = load_arrays(config["data_uri"], config.get("storage_options"))
    x_train = torch.tensor(arrays["x_train"], dtype=torch.float32)
    y_train = torch.tensor(arrays["y_train"], dtype=torch.long)
    x_test = torch.tensor(arrays["x_test"], dtype=torch.float32)
    y_test = torch.tensor(arrays["y_test"], dtype=torch.long)
    torch.manual_seed(0)
    model = build_model(config["hidden"])
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    run_name = pd.get_context().get_experiment_name()
    start = 0
    if (checkpoint := pd.get_checkpoint()) is not None:
        state = pd.torch.load_state(checkpoint, "state.pt")
        model.load_state_dict(state["model"])
        if state["run"] == run_name:  # our own run: go on where it stopped
            optimizer.load_state_dict(state["optimizer"])
            start = state["epoch"] + 1
        else:
            print(f"warm start from {state['run']} (epoch {state['epoch']}, "
                  f"accuracy {accuracy(model, x_test, y_test):.3f})")
    model = pd.torch.prepare_model(model)
    loader = pd.torch.prepare_data_loader(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=32, shuffle=True))
    loss_fn = torch.nn.CrossEntropyLoss()
    rank = pd.get_context().get_world_rank()
    for epoch in range(start, config["epochs"]):
        if hasattr(loader.sampler, "set_epoch"):  # a DistributedSampler (several workers)
            loader.sampler.set_epoch(epoch)
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
        metrics = {"epoch": epoch, "loss": loss.item(), "accuracy": accuracy(model, x_test, y_test)}
        print(f"epoch {epoch}: accuracy {metrics['accuracy']:.3f}")
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                plain = model.module if hasattr(model, "module") else model
                torch.save({"model": plain.state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch, "run": run_name}, os.path.join(folder, "state.pt"))
            pd.report(metrics,
                      checkpoint=pd.Checkpoint.from_directory(folder) if rank == 0 else None)
