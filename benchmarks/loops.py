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


def _returned(train, value: dict) -> dict:
    """The loop's figures: returned (ours) and, under Ray Train (which gives no return values
    back; its result's metrics are those of its latest checkpoint), reported with a last tiny
    checkpoint of rank 0's."""
    if train.__name__ == "ray.train":
        import shutil

        folder = tempfile.mkdtemp()
        with open(os.path.join(folder, "figures.txt"), "w") as handle:
            handle.write(str(value))
        rank = train.get_context().get_world_rank()
        train.report({"returned": value},
                     checkpoint=train.Checkpoint.from_directory(folder) if rank == 0 else None)
        shutil.rmtree(folder, ignore_errors=True)
    return value


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
    """Median DDP step time without reports, then with ``report`` every step, same processes
    (``config["api"]``: "pd" or "ray")."""
    import torch

    import prefect_distrain as pd

    train, train_torch = _api(config.get("api", "pd"))
    model = train_torch.prepare_model(_model(config.get("hidden", 0)))
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
    for round_ in range(config["rounds"]):  # interleaved, so drift hits both alike,
        for kind in kinds[::-1] if round_ % 2 else kinds:  # and each goes first as often
            tracked = session.data_loader if session is not None else None
            if kind == "untracked":
                session.data_loader = None
            for i in range(config["steps"]):
                began = time.perf_counter()
                step()
                if kind != "plain":
                    train.report({"step": i, "round": round_})
                timings[kind].append(time.perf_counter() - began)
            if session is not None:
                session.data_loader = tracked
    return _returned(train, {kind: statistics.median(values) for kind, values in timings.items()})


def checkpoint_stall_loop(config):
    """How long ``report(checkpoint=...)`` blocks the loop, per checkpoint of ``mb`` MB of
    state (rank 0's), with ``gap_s`` of 'training' between checkpoints. With
    ``config["api"] == "ray"``: Ray Train's report, its upload mode ``config["upload"]``."""
    import shutil

    import torch

    train, _ = _api(config.get("api", "pd"))
    options = {}
    if config.get("api") == "ray":
        from ray.train import CheckpointUploadMode

        options["checkpoint_upload_mode"] = CheckpointUploadMode.ASYNC \
            if config.get("upload") == "async" else CheckpointUploadMode.SYNC
    rank = train.get_context().get_world_rank()
    state = {"weights": torch.randn(config["mb"] * 1024 * 1024 // 4)}
    blocked = []
    for index in range(config["checkpoints"]):
        state["weights"][0] = index
        folder = tempfile.mkdtemp()
        if rank == 0:
            torch.save(state, os.path.join(folder, "state.pt"))
        began = time.perf_counter()
        train.report({"index": index},
                     checkpoint=train.Checkpoint.from_directory(folder) if rank == 0 else None,
                     **options)
        blocked.append(time.perf_counter() - began)
        if rank != 0 or not (config.get("api") == "ray" and config.get("upload") == "async"):
            shutil.rmtree(folder, ignore_errors=True)  # (Ray's async upload deletes its own)
        time.sleep(config["gap_s"])
    return _returned(train, {"blocked": blocked})


def sharded_upload_loop(config):
    """Every rank saves its own shard (``mb`` / world size MB) into one sync checkpoint per
    round; how long each report blocked (the upload of every rank's shard and the commit)."""
    import torch

    import prefect_distrain as pd

    ctx = pd.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    shard = torch.randn(config["mb"] * 1024 * 1024 // 4 // world)
    blocked = []
    for index in range(config["checkpoints"]):
        shard[0] = index
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"shard": shard}, os.path.join(folder, f"shard_{rank}.pt"))
            began = time.perf_counter()
            pd.report({"index": index}, checkpoint=pd.Checkpoint.from_directory(folder))
            blocked.append(time.perf_counter() - began)
    return {"blocked": blocked, "bytes": shard.numel() * 4}


def memory_loop(config):
    """Rank 0's peak RSS while a checkpoint of ``mb`` MB of state persists (sync: during the
    report; async: during the report and the upload after it), less its RSS just before, with
    the state in memory and saved to a file: the extra memory the persistence holds."""
    import shutil
    import threading

    import psutil
    import torch

    import prefect_distrain as pd
    from prefect_distrain.session import current_session

    rank = pd.get_context().get_world_rank()
    state = torch.randn(config["mb"] * 1024 * 1024 // 4)
    folder = tempfile.mkdtemp()
    if rank == 0:
        torch.save({"weights": state}, os.path.join(folder, "state.pt"))
    process = psutil.Process()
    before = process.memory_info().rss
    peak, done = [before], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        pd.report({"mb": config["mb"]},
                  checkpoint=pd.Checkpoint.from_directory(folder) if rank == 0 else None)
        current_session().uploader.wait()  # an async upload goes on after the report
    finally:
        done.set()
        sampler.join()
        shutil.rmtree(folder, ignore_errors=True)
    return {"extra_mb": (peak[0] - before) / 2**20, "state_mb": state.numel() * 4 / 2**20}


def recovery_loop(config):
    """Rank 1 is SIGKILLed at its first step of epoch 1 of the first attempt (writing the time
    to ``kill_file`` first; the file marks the later attempts, the same way under both APIs);
    every attempt returns when its first step ended."""
    import torch

    train, train_torch = _api(config["api"])
    rank = train.get_context().get_world_rank()
    first_attempt = not os.path.exists(config["kill_file"])
    model = train_torch.prepare_model(_model(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    start = 0
    if (checkpoint := train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            start = torch.load(os.path.join(folder, "state.pt"))["epoch"] + 1
    first_step = None
    for epoch in range(start, config["epochs"]):
        for _ in range(config["steps"]):
            if first_attempt and (epoch, rank) == (1, 1):
                with open(config["kill_file"], "w") as handle:
                    handle.write(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            first_step = first_step or time.time()
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                torch.save({"epoch": epoch}, os.path.join(folder, "state.pt"))
            train.report({"epoch": epoch},
                         checkpoint=train.Checkpoint.from_directory(folder) if rank == 0 else None)
    return _returned(train, {"first_step": first_step, "first_attempt": first_attempt})


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
