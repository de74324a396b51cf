"""Training functions for the benchmarks. ``bench_loop`` is the same code for prefect-distrain
and for Ray Train: only the module it takes ``report`` / ``Checkpoint`` / ``prepare_model``
from differs (``config["api"]``), which is how a Ray Train loop ports."""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
import time


def _api(name: str):
    if name == "ray":
        import ray.train as train
        import ray.train.torch as train_torch
    else:
        import prefect_distrain as train
        train_torch = train.torch
    return train, train_torch


def _model(hidden: int):
    import torch

    if hidden <= 0:
        return torch.nn.Linear(32, 1)
    return torch.nn.Sequential(torch.nn.Linear(32, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 1))


def bench_loop(config):
    """A tiny DDP job: ``epochs`` x ``steps`` steps, a checkpoint (rank 0) after every epoch.
    Returns when its first step ended, for time-to-first-step."""
    import torch

    train, train_torch = _api(config["api"])
    rank = train.get_context().get_world_rank()
    torch.manual_seed(0)
    model = train_torch.prepare_model(_model(config.get("hidden", 0)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    first_step = None
    for epoch in range(config["epochs"]):
        for _ in range(config["steps"]):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            first_step = first_step or time.time()
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                torch.save(model.state_dict(), os.path.join(folder, "model.pt"))
            train.report({"epoch": epoch},
                         checkpoint=train.Checkpoint.from_directory(folder) if rank == 0 else None)
    return {"first_step": first_step}


def step_overhead_loop(config):
    """Median DDP step time without reports, then with ``report`` every step, same processes."""
    import torch

    import prefect_distrain as pd

    model = pd.torch.prepare_model(_model(config.get("hidden", 0)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    # With "loader": each step takes its batch from a prepared loader (counted as progress;
    # its position goes with every report).
    batches = None
    if config.get("loader"):
        data = torch.utils.data.TensorDataset(x.repeat(64, 1), y.repeat(64, 1))
        loader = pd.torch.prepare_data_loader(torch.utils.data.DataLoader(data, batch_size=64))

        def forever():
            while True:
                yield from loader

        batches = forever()

    def step():
        xb, yb = next(batches) if batches is not None else (x, y)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(xb), yb).backward()
        optimizer.step()

    for _ in range(config["warmup"]):
        step()
    # With "positions": reports with the loader's position / the same reports without it.
    kinds = ("untracked", "report") if config.get("positions") else ("plain", "report")
    from prefect_distrain.session import current_session

    session = current_session()
    timings: dict[str, list[float]] = {kind: [] for kind in kinds}
    for round_ in range(config["rounds"]):  # interleaved, so drift hits both alike
        for kind in kinds:
            tracked = session.data_loader
            if kind == "untracked":
                session.data_loader = None
            for i in range(config["steps"]):
                began = time.perf_counter()
                step()
                if kind != "plain":
                    pd.report({"step": i, "round": round_})
                timings[kind].append(time.perf_counter() - began)
            session.data_loader = tracked
    return {kind: statistics.median(values) for kind, values in timings.items()}


def checkpoint_stall_loop(config):
    """How long ``report(checkpoint=...)`` blocks the loop, per checkpoint of ``mb`` MB of
    state (rank 0's), with ``gap_s`` of 'training' between checkpoints."""
    import torch

    import prefect_distrain as pd

    rank = pd.get_context().get_world_rank()
    state = {"weights": torch.randn(config["mb"] * 1024 * 1024 // 4)}
    blocked = []
    for index in range(config["checkpoints"]):
        state["weights"][0] = index
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                torch.save(state, os.path.join(folder, "state.pt"))
            began = time.perf_counter()
            pd.report({"index": index},
                      checkpoint=pd.Checkpoint.from_directory(folder) if rank == 0 else None)
            blocked.append(time.perf_counter() - began)
        time.sleep(config["gap_s"])
    return {"blocked": blocked}


def recovery_loop(config):
    """Rank 1 is SIGKILLed at its first step of epoch 1 on attempt 0 (writing the time first);
    every attempt returns when its first step ended."""
    import torch

    import prefect_distrain as pd

    ctx = pd.get_context()
    model = pd.torch.prepare_model(_model(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    start = 0
    if (checkpoint := pd.get_checkpoint()) is not None:
        start = pd.torch.load_state(checkpoint, "state.pt")["epoch"] + 1
    first_step = None
    for epoch in range(start, config["epochs"]):
        for _ in range(config["steps"]):
            if (ctx.get_attempt(), epoch, ctx.get_world_rank()) == (0, 1, 1):
                with open(config["kill_file"], "w") as handle:
                    handle.write(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            first_step = first_step or time.time()
        with tempfile.TemporaryDirectory() as folder:
            if ctx.get_world_rank() == 0:
                torch.save({"epoch": epoch}, os.path.join(folder, "state.pt"))
            pd.report({"epoch": epoch}, checkpoint=pd.Checkpoint.from_directory(folder)
                      if ctx.get_world_rank() == 0 else None)
    return {"first_step": first_step, "attempt": ctx.get_attempt()}


def scaling_loop(config):
    """Median step time of a DDP step for this world size and model size."""
    import torch

    import prefect_distrain as pd

    model = pd.torch.prepare_model(_model(config["hidden"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    timings = []
    for i in range(config["warmup"] + config["steps"]):
        began = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if i >= config["warmup"]:
            timings.append(time.perf_counter() - began)
    return statistics.median(timings)


def validated_steps_loop(config):
    """Median step time (a step, plus a checkpoint report every ``every`` steps) of a small
    DDP job: the same with and without a validation of each checkpoint shows its cost."""
    import torch

    import prefect_distrain as pd

    rank = pd.get_context().get_world_rank()
    model = pd.torch.prepare_model(_model(config.get("hidden", 256)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    times = []
    for i in range(config["steps"]):
        began = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if (i + 1) % config["every"] == 0:
            with tempfile.TemporaryDirectory() as folder:
                if rank == 0:
                    torch.save(model.state_dict(), os.path.join(folder, "model.pt"))
                pd.report({"step": i}, checkpoint=pd.Checkpoint.from_directory(folder)
                          if rank == 0 else None)
        times.append(time.perf_counter() - began)
    return {"step": statistics.median(times), "mean": statistics.fmean(times)}


def sleepy_validation(checkpoint, config):
    """A validation that takes ``config["sleep"]`` seconds and reads the checkpoint."""
    time.sleep(config["sleep"])
    with checkpoint.as_directory() as folder:
        return {"val_files": len(os.listdir(folder))}
