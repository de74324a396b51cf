"""Training functions for the fault tests: deterministic, so a run that was killed and resumed
must end with exactly the weights of one that never stopped."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time

import torch

import prefect_distrain as pd


def deterministic_loop(config):
    """A tiny MLP, seeded weights and data, DistributedSampler epochs set explicitly, a
    checkpoint (model + optimizer + epoch) after every epoch.

    ``config["kills"]``: {attempt: [epoch, step, rank]}: SIGKILL that rank there, on that
    attempt only. ``config["progress"]``: a file rank 0 writes the finished epoch to.
    With a ``"train"`` dataset, each epoch also reads this rank's shard of it (``shard_ids``).
    ``config["gates"]``: {epoch: path}: before that epoch, wait until the file exists (so a
    test can change the cluster at a known point without racing the training); a preemption
    opens it too.
    ``config["hang"]``: [epoch, rank]: on attempt 0 that rank sleeps for good at the start of
    that epoch, while its peer waits for it in the backward pass's allreduce.
    ``config["preempt"]``: [epoch, step, rank]: on attempt 0 that rank is sent SIGTERM there.
    With it, every step asks ``preemption_requested()`` and, once it is, commits a checkpoint
    of that step (``"step"`` in its state, ``"jit"`` in its metrics), which ends the function;
    a resume from it goes on with the next step: the prepared loader continues that pass
    where the checkpoint left it (its position is in the manifest).
    """
    ctx = pd.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(0)
    model = pd.torch.prepare_model(torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=generator)
    y = x.sum(1, keepdim=True).sin()
    loader = pd.torch.prepare_data_loader(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True))
    start = 0
    if (checkpoint := pd.get_checkpoint()) is not None:
        state = pd.torch.load_state(checkpoint, "state.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
        if state.get("step") is not None:  # mid-epoch: the loader yields the rest of the pass
            start = state["epoch"]
    kill = config.get("kills", {}).get(ctx.get_attempt())
    preempt = config.get("preempt") if ctx.get_attempt() == 0 else None
    seen = 0
    for epoch in range(start, config["epochs"]):
        gate = config.get("gates", {}).get(epoch)
        while gate is not None and not os.path.exists(gate):
            if "preempt" in config and ctx.preemption_requested():
                break  # its first step takes the checkpoint
            time.sleep(0.1)
        loader.sampler.set_epoch(epoch)
        if ctx.get_attempt() == 0 and [epoch, rank] == config.get("hang"):
            time.sleep(3600)  # the peer never comes
        for step, (xb, yb) in enumerate(loader):
            if kill is not None and [epoch, step, rank] == list(kill):
                os.kill(os.getpid(), signal.SIGKILL)
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            optimizer.step()
            seen += len(yb)
            if preempt is not None and [epoch, step, rank] == list(preempt):
                os.kill(os.getpid(), signal.SIGTERM)  # a spot reclaim
                time.sleep(1.0)  # its handler runs before the next step asks (a loaded CI)
            if "preempt" in config and ctx.preemption_requested():
                _checkpoint_now(model, optimizer, epoch, step, rank)
        time.sleep(config.get("epoch_sleep", 0))
        shard_ids = []
        if config.get("read_dataset"):
            for batch in pd.get_dataset_shard("train").iter_batches(batch_size=16):
                shard_ids.extend(int(i) for i in batch["id"])
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch}, os.path.join(folder, "state.pt"))
            pd.report({"epoch": epoch, "loss": loss.item(), "world_size": ctx.get_world_size(),
                       "samples": seen, "shard_ids": shard_ids},
                      checkpoint=pd.Checkpoint.from_directory(folder) if rank == 0 else None)
        if rank == 0 and config.get("progress"):
            with open(config["progress"], "w") as handle:
                handle.write(str(epoch))
        seen = 0
    return {"weights": [p.detach().clone() for p in model.parameters()],
            "attempt": ctx.get_attempt(), "world_size": ctx.get_world_size()}


def _checkpoint_now(model, optimizer, epoch, step, rank):
    """A just-in-time checkpoint of this step; its report ends the function."""
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "epoch": epoch, "step": step}, os.path.join(folder, "state.pt"))
        pd.report({"epoch": epoch, "step": step, "jit": True},
                  checkpoint=pd.Checkpoint.from_directory(folder) if rank == 0 else None)
    raise AssertionError("the report after a preemption ends the function")


def uninterrupted(tmp_path_factory, epochs: int) -> dict:
    """What ``deterministic_loop`` returns on rank 0 of a run of 2 workers that never stopped:
    every interrupted run must match it bit for bit."""
    run = pd.RunConfig(name="reference", storage=str(tmp_path_factory.mktemp("reference")))
    with pd.Trainer(num_workers=2, run=run) as trainer:
        result = trainer.fit(deterministic_loop, config={"epochs": epochs})
    assert result.failures == 0
    return result.worker_results[0]


def ledger(storage: str, name: str) -> list[dict]:
    """The attempt records of run ``name``, straight from its files."""
    folder = os.path.join(storage, name, "_attempts")
    return [json.load(open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))]


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a["weights"], b["weights"], strict=True))
