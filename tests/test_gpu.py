"""The GPU path end to end: nccl process group, one device per worker, AMP in fp16 with a
gradient scaler, automatic checkpoints across a SIGKILL, background checkpoints of GPU state,
and the quickstart with use_gpu=True.
Skipped on machines without a CUDA GPU (CI has none)."""

from __future__ import annotations

import pytest
import torch

import prefect_distrain as pd

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
    pytest.mark.usefixtures("ray_cluster"),
]


def gpu_loop(config):
    import torch.distributed as dist

    pd.torch.accelerate(amp=config.get("amp", False))
    device = pd.torch.get_device()
    model = pd.torch.prepare_model(torch.nn.Sequential(
        torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)))
    optimizer = pd.torch.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.05))
    dtypes = set()
    first = model.module[0] if hasattr(model, "module") else model[0]
    first.register_forward_hook(lambda module, args, out: dtypes.add(str(out.dtype)))
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))
    loader = pd.torch.prepare_data_loader(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x[:, :4].sum(1, keepdim=True)), batch_size=32))
    total = torch.ones(1, device=device)
    dist.all_reduce(total)
    for _ in range(config["epochs"]):
        losses = []
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            pd.torch.backward(loss)
            optimizer.step()
            losses.append(loss.item())
        pd.report({"loss": sum(losses) / len(losses)})
    return {"backend": dist.get_backend(), "device": str(device), "batch_device": str(xb.device),
            "allreduce": total.item(), "dtypes": sorted(dtypes),
            "param_device": str(next(model.parameters()).device),
            "scaler": type(optimizer).__name__}


def test_nccl_and_fp16_amp_on_the_gpu(tmp_path):
    scaling = pd.ScalingConfig(num_workers=1, use_gpu=True)
    with pd.Trainer(scaling=scaling, run=pd.RunConfig(name="gpu", storage=str(tmp_path))) as t:
        result = t.fit(gpu_loop, config={"epochs": 5, "amp": True})
    info = result.worker_results[0]
    assert info["backend"] == "nccl" and info["device"] == "cuda:0"
    assert info["batch_device"] == info["param_device"] == "cuda:0"
    assert info["allreduce"] == 1.0
    assert info["dtypes"] == ["torch.float16"] and info["scaler"] == "_ScaledOptimizer"
    losses = [m["loss"] for m in result.metrics_history]
    assert losses[-1] < losses[0] * 0.5, losses


def test_auto_checkpoint_on_the_gpu_survives_a_sigkill(tmp_path):
    from test_torch_utils import plain_loop, same

    auto = pd.CheckpointConfig(mode="auto")
    scaling = pd.ScalingConfig(num_workers=1, use_gpu=True)
    results = []
    for name, kill in (("reference", None), ("killed", [0, 2, 5, 0])):
        with pd.Trainer(scaling=scaling, run=pd.RunConfig(name=name, storage=str(tmp_path)),
                        checkpoint=auto, failure=pd.FailureConfig(max_failures=1)) as t:
            results.append(t.fit(plain_loop, config={"epochs": 4, "seed": 0, "kill": kill}))
    assert results[1].failures == 1
    assert same(results[0].worker_results[0], results[1].worker_results[0])


def test_quickstart_on_the_gpu(tmp_path, monkeypatch, prefect_server):
    from conftest import load_flow

    module = load_flow("quickstart")
    monkeypatch.setenv("QUICKSTART_STORAGE", str(tmp_path))
    assert module.quickstart(epochs=8, num_workers=1, use_gpu=True) > 0.9


def background_gpu_loop(config):
    """A 1 GB state on the GPU, checkpointed in the background, then changed at once by kernels
    on the same stream (the copies queued before them must land first)."""
    device = pd.torch.get_device()
    state = {"w": torch.empty(1 << 28, device=device), "step": torch.zeros(1, device=device)}
    for epoch in range(3):
        state["w"].fill_(float(epoch))
        state["step"].fill_(float(epoch))
        checkpoint = pd.Checkpoint.from_dict(state, background=True)
        state["w"].mul_(-1.0).sub_(100.0)  # queued behind the copies, not before them
        state["step"].fill_(-1.0)
        pd.report({"epoch": epoch}, checkpoint=checkpoint)
    return str(device)


def test_a_background_checkpoint_of_gpu_state_holds_it_as_it_was_when_taken(tmp_path):
    scaling = pd.ScalingConfig(num_workers=1, use_gpu=True)
    with pd.Trainer(scaling=scaling, run=pd.RunConfig(name="bg", storage=str(tmp_path)),
                    checkpoint=pd.CheckpointConfig(upload="async", num_to_keep=3)) as t:
        result = t.fit(background_gpu_loop)
    assert result.worker_results == ["cuda:0"]
    assert sorted(c.index for c, _ in result.best_checkpoints) == [1, 2, 3]
    for checkpoint, metrics in result.best_checkpoints:
        back = checkpoint.to_dict()
        assert back["w"].device.type == "cpu" and back["w"].numel() == 1 << 28
        assert bool((back["w"] == float(metrics["epoch"])).all())
        assert back["step"].item() == float(metrics["epoch"])
