"""Sharded state (FSDP2 and torch.distributed.checkpoint): every rank saves and uploads only its
own shards, into one checkpoint; a resume after a SIGKILL, and one on another world size, load
them into exactly the weights of a run that never stopped."""

from __future__ import annotations

import os
import signal
import tempfile

import pytest
import torch

import prefect_distrain as pd

pytestmark = pytest.mark.usefixtures("ray_cluster")


def full_weights(model) -> dict:
    """The whole model's weights on every rank (gathered from the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in full.items()}


def fsdp_loop(config):
    """Every rank trains on the same batches (FSDP averages identical gradients, so 1 and 2
    ranks compute the same steps), checkpointing with save_sharded after every epoch (manual)
    or not at all (``config["auto"]``: mode="auto" does). ``config["kill"]`` = [attempt,
    epoch, step, rank] SIGKILLs that rank there."""
    ctx = pd.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(0)
    model = pd.torch.prepare_model(torch.nn.Sequential(
        torch.nn.Linear(8, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
        torch.nn.Linear(256, 1)), parallel_strategy="fsdp")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    if config.get("auto"):
        optimizer = pd.torch.prepare_optimizer(optimizer)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    y = x.sum(1, keepdim=True).sin()
    batches = pd.torch.prepare_data_loader(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=16), add_dist_sampler=False)
    start = 0
    if not config.get("auto") and (checkpoint := pd.get_checkpoint()) is not None:
        pd.torch.load_sharded(checkpoint, model, optimizer)
        start = checkpoint.metrics["epoch"] + 1
    for epoch in range(start, config["epochs"]):
        for step, (xb, yb) in enumerate(batches):
            if config.get("kill") == [ctx.get_attempt(), epoch, step, rank]:
                os.kill(os.getpid(), signal.SIGKILL)
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            optimizer.step()
        if config.get("auto"):
            pd.report({"epoch": epoch, "loss": loss.item()})
            continue
        with tempfile.TemporaryDirectory() as folder:
            pd.torch.save_sharded(folder, model, optimizer)
            pd.report({"epoch": epoch, "loss": loss.item()},
                      checkpoint=pd.Checkpoint.from_directory(folder))
    return {"weights": full_weights(model), "sharded": type(model).__name__.startswith("FSDP")}


def fit(tmp_path, name, config, workers=2, checkpoint=None, failure=None, resume=None):
    run = pd.RunConfig(name=name, storage=str(tmp_path))
    with pd.Trainer(num_workers=workers, run=run, checkpoint=checkpoint,
                    failure=failure) as trainer:
        return trainer.fit(fsdp_loop, config=config, resume_from_checkpoint=resume)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_rank_uploads_its_own_shards_and_a_sigkill_resumes_them_exactly(tmp_path):
    reference = fit(tmp_path, "reference", {"epochs": 3})
    assert all(r["sharded"] for r in reference.worker_results)
    files = reference.checkpoint.manifest.files
    assert {f for f in files if f.startswith("sharded/")} == {
        "sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"}
    assert [files[f"sharded/__{r}_0.distcp"].rank for r in (0, 1)] == [0, 1]  # its own upload
    shards = [os.path.getsize(os.path.join(reference.checkpoint.path, "sharded", f"__{r}_0.distcp"))
              for r in (0, 1)]
    parameters = sum(v.numel() * 4 for v in reference.worker_results[0]["weights"].values())
    # Each rank holds half of the weights and of Adam's two moments: about 1.5x the parameters.
    assert all(parameters < size < 2.5 * parameters for size in shards), (shards, parameters)

    killed = fit(tmp_path, "killed", {"epochs": 3, "kill": [0, 1, 2, 1]},
                 failure=pd.FailureConfig(max_failures=1))
    assert killed.failures == 1 and killed.attempt == 1
    assert all(same(r["weights"], reference.worker_results[0]["weights"])
               for r in killed.worker_results + reference.worker_results)
    assert [m["epoch"] for m in killed.metrics_history] == [0, 1, 2]

    # One rank, from the 2-rank run's checkpoint of epoch 1: resharded into a whole model.
    epoch_1 = next(c for c, m in reference.best_checkpoints if m["epoch"] == 1)
    alone = fit(tmp_path, "alone", {"epochs": 3}, workers=1, resume=epoch_1)
    assert not alone.worker_results[0]["sharded"]
    assert same(alone.worker_results[0]["weights"], reference.worker_results[0]["weights"])


def test_auto_mode_saves_what_each_rank_owns_and_resumes_it_exactly(tmp_path):
    auto = pd.CheckpointConfig(mode="auto")
    reference = fit(tmp_path, "reference", {"epochs": 3, "auto": True}, checkpoint=auto)
    files = reference.checkpoint.manifest.files
    assert {"auto_sharded/.metadata", "auto_sharded/__0_0.distcp",
            "auto_sharded/__1_0.distcp"} <= set(files)
    killed = fit(tmp_path, "killed", {"epochs": 3, "auto": True, "kill": [0, 1, 2, 0]},
                 checkpoint=auto, failure=pd.FailureConfig(max_failures=1))
    assert killed.failures == 1
    assert all(same(r["weights"], reference.worker_results[0]["weights"])
               for r in killed.worker_results)
    # One worker goes on from the 2-rank run's checkpoint before pass 2: the shards load into
    # its whole model (saved with DCP in a world of one too), with the same weights at the end.
    before_pass_2 = next(c for c in reference.checkpoints
                         if c.metrics["_auto_checkpoint_pass"] == 2)
    alone = fit(tmp_path, "alone", {"epochs": 3, "auto": True}, workers=1, checkpoint=auto,
                resume=before_pass_2)
    assert same(alone.worker_results[0]["weights"], reference.worker_results[0]["weights"])
    assert "auto_sharded/__0_0.distcp" in alone.checkpoint.manifest.files


def test_load_sharded_names_the_fix_when_there_is_nothing_sharded(tmp_path):
    with pytest.raises(FileNotFoundError, match="save it with pd.torch.save_sharded"):
        pd.torch.load_sharded(str(tmp_path), torch.nn.Linear(2, 1))
    with pytest.raises(ValueError, match="use 'ddp', 'fsdp' or None"):
        pd.torch.prepare_model(torch.nn.Linear(2, 1), parallel_strategy="zero3")
