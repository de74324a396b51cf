"""The RaySGD v2 seeds' samples (shared/seeds 000 and 003), written as the documents write them
with only the imports changed (``ray`` -> ``prefect_distrain.ray``), on synthetic data, 2 workers
and the torch backend; each asserts what the documents say comes out."""

from __future__ import annotations

import ast
import json
import os
from typing import Dict, List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.nn.parallel import DistributedDataParallel

import prefect_distrain as pd
from prefect_distrain.ray import sgd
from prefect_distrain.ray.sgd import Trainer
from prefect_distrain.ray.sgd.callbacks import (
    JsonLoggerCallback,
    SGDCallback,
    TBXLoggerCallback,
)

pytestmark = pytest.mark.usefixtures("ray_cluster")

# torch's first optimizer sets TORCHINDUCTOR_CACHE_DIR, importing tensorboardX sets
# CRC32C_SW_MODE: once, at import, not inside a test (the env_police fixture).
optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
try:
    import tensorboardX
except ImportError:  # the [tensorboard] extra
    tensorboardX = None


@pytest.fixture(autouse=True)
def results_dir(tmp_path, monkeypatch):
    """The samples give no logdir: Trainer's default, <PREFECT_DISTRAIN_STORAGE>/sgd_<time>."""
    monkeypatch.setenv("PREFECT_DISTRAIN_STORAGE", str(tmp_path))
    return tmp_path


# -- 000: Quick Start --------------------------------------------------------------------------

data = [torch.randn(1) for _ in range(4)]  # the sample's `data`: synthetic


class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.fc1 = nn.Linear(1, 128)
        self.fc2 = nn.Linear(128, 1)

    def forward(self, x):
        x = self.fc1(x)
        x = F.relu(x)
        x = self.fc2(x)
        return x


def train_func():
    model = Net()
    for x in data:
        results = model(x)
    return results


def train_simple(config: Dict):

    # N is batch size; D_in is input dimension;
    # H is hidden dimension; D_out is output dimension.
    N, D_in, H, D_out = 8, 5, 5, 5

    # Create random Tensors to hold inputs and outputs
    x = torch.randn(N, D_in)
    y = torch.randn(N, D_out)
    loss_fn = nn.MSELoss()

    # Use the nn package to define our model and loss function.
    model = torch.nn.Sequential(
        torch.nn.Linear(D_in, H),
        torch.nn.ReLU(),
        torch.nn.Linear(H, D_out),
    )
    optimizer = optim.SGD(model.parameters(), lr=0.1)

    model = DistributedDataParallel(model)
    results = []

    for epoch in range(config.get("epochs", 10)):  # noqa: B007 - as the sample has it
        optimizer.zero_grad()
        output = model(x)
        loss = loss_fn(output, y)
        loss.backward()
        results.append(loss.item())
        optimizer.step()
    return results


# 003's models and data (synthetic)

input = torch.randn(16, 4)  # the samples' `input` and `labels`
labels = input.sum(dim=1, keepdim=True)


class NeuralNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x):
        return self.linear(x)


def train_func_ranks(config):
    device = torch.device(f"cuda:{sgd.local_rank()}" if
                          torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    model = DistributedDataParallel(NeuralNetwork().to(device))
    optimizer = optim.SGD(model.parameters(), lr=0.1)
    for idx in range(config["num_epochs"]):  # noqa: B007 - as the sample has it
        optimizer.zero_grad()
        nn.MSELoss()(model(input.to(device)), labels.to(device)).backward()
        optimizer.step()

    if sgd.world_rank() == 0:
        return model.module
    else:
        return None


def test_quick_start_returns_one_result_per_worker(results_dir):
    trainer = Trainer(backend = "torch", num_workers=2)

    trainer.start()
    results = trainer.run(train_func)
    print(results)

    all_results = trainer.run(train_simple)

    # 003, "Return values" with the ranks of "Alternative 2": rank 0 returns the model.
    model_results = trainer.run(train_func_ranks, config={"num_epochs": 50})
    final_model = model_results[0]

    assert trainer.trainer.started, "the workers stay up between runs"
    trainer.shutdown()
    assert len(results) == 2 and all(r.shape == (1,) for r in results)
    assert len(all_results) == 2
    assert all(len(losses) == 10 and all(isinstance(v, float) for v in losses)
               for losses in all_results)
    # Each run is a run of its own in the trainer's logdir, as Ray's run_NNN folders.
    (logdir,) = [p for p in results_dir.iterdir() if p.name.startswith("sgd_")]
    assert trainer.logdir == str(logdir)
    assert {"run_001", "run_002", "run_003"} <= {p.name for p in logdir.iterdir()}
    assert trainer.latest_run_dir == str(logdir / "run_003")
    assert isinstance(final_model, NeuralNetwork) and model_results[1] is None
    loss = nn.MSELoss()(final_model(input), labels).item()
    assert loss < 0.5, loss


# -- 003: Intermediate Reporting (and Ray's logger callbacks) -----------------------------------


class PrintingCallback(SGDCallback):
    def handle_result(self, results: List[Dict], **info):
        print(results)


def train_func_reporting():
    for i in range(3):
        sgd.report(epoch=i)


def test_intermediate_reports_reach_the_callbacks_and_the_json_log(capsys):
    trainer = Trainer(backend="torch", num_workers=2)
    trainer.start()
    result = trainer.run(
        train_func_reporting,
        callbacks=[PrintingCallback()]
    )
    printed = [ast.literal_eval(line) for line in capsys.readouterr().out.splitlines()
               if line.startswith("[{")]
    # [{'epoch': 0, '_timestamp': ..., '_time_this_iter_s': ..., '_training_iteration': 1}, {...}]
    assert result == [None, None]
    assert [[r["epoch"] for r in results] for results in printed] == [[0, 0], [1, 1], [2, 2]]
    assert [[r["_training_iteration"] for r in results] for results in printed] == \
        [[1, 1], [2, 2], [3, 3]]
    assert all(set(r) == {"epoch", "_timestamp", "_time_this_iter_s", "_training_iteration"}
               for results in printed for r in results)

    # Ray's logger callbacks write into the run's folder.
    tbx = [TBXLoggerCallback()] if tensorboardX is not None else []
    trainer.run(train_func_reporting, callbacks=[JsonLoggerCallback(), *tbx])
    trainer.shutdown()
    with open(os.path.join(trainer.latest_run_dir, "results.json")) as handle:
        lines = [json.loads(line) for line in handle]
    assert [[r["epoch"] for r in results] for results in lines] == [[0], [1], [2]]  # rank 0
    assert [results[0]["_training_iteration"] for results in lines] == [1, 2, 3]
    if tbx:
        assert any(name.startswith("events.out.tfevents")
                   for name in os.listdir(os.path.join(trainer.latest_run_dir, "tensorboard")))


# -- 003: Checkpointing, with the v2 training function of "Training Logic" ----------------------

def train_func_distributed(config):
    num_epochs = config["num_epochs"]
    model = NeuralNetwork()
    start = 0
    checkpoint = sgd.load_checkpoint()
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        start = checkpoint["epoch"] + 1
    model = DistributedDataParallel(model)
    loss_fn = nn.MSELoss()
    optimizer = optim.SGD(model.parameters(), lr=0.1)

    for epoch in range(start, num_epochs):
        output = model(input)
        loss = loss_fn(output, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"epoch: {epoch}, loss: {loss.item()}")
        sgd.report(epoch=epoch, loss=loss.item())
        sgd.save_checkpoint(epoch=epoch, model=model.state_dict())
    return {"epochs": list(range(start, num_epochs)), "rank": sgd.world_rank(),
            "world_size": sgd.world_size(), "weights": model.module.state_dict()}


class Seen(SGDCallback):
    def __init__(self):
        self.results = []

    def handle_result(self, results, **info):
        self.results.append(results)


class SeenAll(pd.TrainingCallback):
    def __init__(self):
        self.results = []

    def handle_result(self, results, **info):
        self.results.append(results)


def test_save_checkpoint_and_load_checkpoint_resume_a_run(results_dir):
    trainer = Trainer(backend="torch", num_workers=2)
    trainer.start()
    seen, seen_all = Seen(), SeenAll()
    results = trainer.run(train_func_distributed, config={"num_epochs": 3},
                          callbacks=[seen, seen_all])
    assert [r["epochs"] for r in results] == [[0, 1, 2], [0, 1, 2]]
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 2), (1, 2)]
    # DDP kept the ranks' weights equal; the checkpoint holds them, without DDP's prefix.
    assert all(torch.equal(results[0]["weights"][k], results[1]["weights"][k])
               for k in results[0]["weights"])
    latest = trainer.latest_checkpoint
    assert latest["epoch"] == 2 and list(latest["model"]) == ["linear.weight", "linear.bias"]
    model = NeuralNetwork()
    model.load_state_dict(latest["model"])  # the unwrapped model takes it
    assert torch.equal(model.linear.weight, results[0]["weights"]["linear.weight"])
    # SGD callbacks see the reports only; other callbacks see the checkpoints' reports too.
    assert [[r["epoch"] for r in results] for results in seen.results] == [[0, 0], [1, 1], [2, 2]]
    assert [results[0].get("_sgd_checkpoint", False) for results in seen_all.results] == \
        [False, True] * 3

    # Resume from the latest checkpoint: the run goes on at epoch 3.
    results = trainer.run(train_func_distributed, config={"num_epochs": 5}, checkpoint=latest)
    assert [r["epochs"] for r in results] == [[3, 4], [3, 4]]
    assert trainer.latest_checkpoint["epoch"] == 4
    assert not os.path.exists(f"{trainer.logdir}/run_002_initial_checkpoint"), "removed"
    # Some docs write run(train_func, num_workers=2), which RaySGD never took.
    with pytest.raises(TypeError, match=r"Trainer\(num_workers=...\)"):
        trainer.run(train_func_distributed, num_workers=2)
    trainer.shutdown()
