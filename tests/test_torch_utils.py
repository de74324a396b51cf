"""The PyTorch helpers: reproducibility, mixed precision, and CheckpointConfig(mode="auto")
surviving a SIGKILL with bit-identical weights and no checkpoint code in the loop."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import prefect_distrain as pd

pytestmark = pytest.mark.usefixtures("ray_cluster")

EPOCHS = 5


def plain_loop(config):
    """No seeds of its own, dropout, a shuffling loader: only enable_reproducibility makes two
    runs agree. No checkpoint code: with mode="auto" the helpers checkpoint. ``config["kill"]``
    = [attempt, epoch, step, rank] SIGKILLs that rank there."""
    ctx = pd.get_context()
    if config.get("seed") is not None:
        pd.torch.enable_reproducibility(config["seed"])
    if config.get("amp"):
        pd.torch.accelerate(amp=True)
    model = pd.torch.prepare_model(torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(32, 1)))
    optimizer = pd.torch.prepare_optimizer(
        torch.optim.SGD(model.parameters(), lr=config.get("lr", 0.05), momentum=0.9))
    dtypes = set()
    layer = model.module[0] if hasattr(model, "module") else model[0]
    layer.register_forward_hook(lambda module, args, out: dtypes.add(str(out.dtype)))
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(1))
    y = x.sum(1, keepdim=True).sin() if config.get("target") != "linear" else \
        x[:, :4].sum(1, keepdim=True) * 0.5
    loader = pd.torch.prepare_data_loader(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True))
    for epoch in range(config["epochs"]):
        total, batches = 0.0, 0
        for step, (xb, yb) in enumerate(loader):
            if config.get("kill") == [ctx.get_attempt(), epoch, step, ctx.get_world_rank()]:
                os.kill(os.getpid(), signal.SIGKILL)
            optimizer.zero_grad()
            output = model(xb)
            loss = torch.nn.functional.mse_loss(output, yb)
            pd.torch.backward(loss)
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        pd.report({"epoch": epoch, "loss": total / max(batches, 1), "output": str(output.dtype)})
    plain = model.module if hasattr(model, "module") else model
    return {"weights": [p.detach().cpu().clone() for p in plain.parameters()],
            "layer_dtypes": sorted(dtypes)}


def fit(tmp_path, name, config, checkpoint=None, failure=None):
    run = pd.RunConfig(name=name, storage=str(tmp_path))
    with pd.Trainer(num_workers=2, run=run, checkpoint=checkpoint, failure=failure) as trainer:
        return trainer.fit(plain_loop, config=config)


def same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a["weights"], b["weights"], strict=True))


def test_enable_reproducibility_gives_identical_weights_twice(tmp_path):
    first = fit(tmp_path, "first", {"epochs": 2, "seed": 0}).worker_results[0]
    second = fit(tmp_path, "second", {"epochs": 2, "seed": 0}).worker_results[0]
    unseeded = fit(tmp_path, "unseeded", {"epochs": 2, "seed": None}).worker_results[0]
    assert same(first, second)
    assert not same(first, unseeded), "without it, each process draws its own initial weights"


def test_amp_on_cpu_trains_in_bfloat16(tmp_path):
    result = fit(tmp_path, "amp", {"epochs": 6, "seed": 0, "amp": True, "target": "linear"})
    losses = [m["loss"] for m in result.metrics_history]
    assert losses[-1] < losses[0] * 0.5, losses
    assert result.worker_results[0]["layer_dtypes"] == ["torch.bfloat16"], "autocast inside"
    assert result.metrics["output"] == "torch.float32", "outputs back in float32 for the loss"


def test_auto_checkpoint_survives_a_sigkill_with_identical_weights(tmp_path):
    auto = pd.CheckpointConfig(mode="auto")
    reference = fit(tmp_path, "reference", {"epochs": EPOCHS, "seed": 0}, auto)
    killed = fit(tmp_path, "killed", {"epochs": EPOCHS, "seed": 0, "kill": [0, 2, 5, 1]}, auto,
                 pd.FailureConfig(max_failures=1))
    assert killed.failures == 1 and killed.attempt == 1
    assert all(same(r, reference.worker_results[0])
               for r in killed.worker_results + reference.worker_results)
    assert [m["epoch"] for m in killed.metrics_history] == list(range(EPOCHS)), \
        "the replayed epochs' reports are not delivered twice"
    assert [m["loss"] for m in killed.metrics_history] == \
        [m["loss"] for m in reference.metrics_history]
    # Before each pass after the first, and once at the end: passes 1..EPOCHS.
    manifests = sorted(os.listdir(tmp_path / "reference" / "_manifests"))
    assert len(manifests) == EPOCHS
    assert reference.checkpoint.metrics["_auto_checkpoint_pass"] == EPOCHS
    attempts = sorted(os.listdir(tmp_path / "killed" / "_attempts"))
    assert len(attempts) == 2
    resumed = killed.best_checkpoints[-1][0]
    assert resumed.metrics["_auto_checkpoint_pass"] >= 1


def test_auto_mode_and_accelerate_misuse_name_the_fix(tmp_path):
    with pytest.raises(pd.ConfigurationError, match="mode='auto' keeps the newest checkpoints"):
        pd.CheckpointConfig(mode="auto", checkpoint_score_attribute="loss")
    with pytest.raises(pd.ConfigurationError, match="mode 'every-epoch': use 'auto'"):
        pd.CheckpointConfig(mode="every-epoch")

    def late():
        pd.torch.prepare_model(torch.nn.Linear(2, 2))
        pd.torch.accelerate(amp=True)

    with pd.Trainer(num_workers=1, run=pd.RunConfig(name="late", storage=str(tmp_path))) as t:
        with pytest.raises(pd.ConfigurationError, match="accelerate.. must come before "
                                                        "prepare_model"):
            t.run(late)
