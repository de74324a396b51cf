"""The horovod backend on 2 workers: gloo rendezvous from the driver, plain ``hvd.init()``."""

from __future__ import annotations

import os
import signal
import tempfile

import numpy as np
import pytest
from conftest import assert_no_train_actors

import prefect_distrain as pd
from prefect_distrain.execution import warm_pool

pytest.importorskip("horovod", reason="run scripts/install_horovod.sh (make test does)")
pytestmark = pytest.mark.usefixtures("ray_cluster")


def allreduce_loop():
    import horovod.torch as hvd
    import torch

    hvd.init()
    total = hvd.allreduce(torch.tensor([hvd.rank() + 1.0]), op=hvd.Sum)
    return {"rank": hvd.rank(), "size": hvd.size(), "local_rank": hvd.local_rank(),
            "local_size": hvd.local_size(), "cross_size": hvd.cross_size(),
            "sum": total.item(), "context_rank": pd.get_context().get_world_rank()}


def test_allreduce_and_ranks_and_a_second_train_in_the_same_process(tmp_path):
    for name in ("first", "second"):  # a fresh rendezvous each time; nothing left over
        trainer = pd.Trainer(backend="horovod", num_workers=2,
                             run=pd.RunConfig(name=name, storage=str(tmp_path)))
        with trainer:
            results = trainer.run(allreduce_loop)
        assert trainer.backend.backend.server is None, "shutdown stops the rendezvous server"
        assert [r["sum"] for r in results] == [3.0, 3.0]
        assert [(r["rank"], r["context_rank"], r["local_rank"]) for r in results] == \
            [(0, 0, 0), (1, 1, 1)]
        assert {(r["size"], r["local_size"], r["cross_size"]) for r in results} == {(2, 2, 1)}
    assert_no_train_actors()


def world_loop():
    """The world a run finds, then something left behind for the next run."""
    import horovod.torch as hvd
    import torch

    joined_before = hvd.is_initialized()
    hvd.init()
    total = hvd.allreduce(torch.tensor([hvd.rank() + 1.0]), op=hvd.Sum)
    found = {"pid": os.getpid(), "joined_before": joined_before, "rank": hvd.rank(),
             "size": hvd.size(), "sum": total.item(),
             "port": os.environ["HOROVOD_GLOO_RENDEZVOUS_PORT"],
             "leak": os.environ.get("HOROVOD_LEAK")}
    os.environ["HOROVOD_LEAK"] = "left by the previous run"
    return found


def test_a_warm_group_joins_a_new_world_in_the_same_processes(tmp_path):
    runs = []
    for name in ("first", "second"):
        with pd.Trainer(backend="horovod", num_workers=2, keep_warm=True,
                        run=pd.RunConfig(name=name, storage=str(tmp_path))) as trainer:
            runs.append(trainer.run(world_loop))
        assert trainer.backend.backend.server is None, "each run's rendezvous server stops"
    assert warm_pool.drain() == 1
    first, second = runs
    assert [r["pid"] for r in second] == [r["pid"] for r in first], "the warm group served"
    for results in runs:
        assert [(r["rank"], r["size"], r["sum"]) for r in results] == [(0, 2, 3.0), (1, 2, 3.0)]
        assert {r["joined_before"] for r in results} == {False}, "hvd.shutdown() between runs"
        assert {r["leak"] for r in results} == {None}
        assert len({r["port"] for r in results}) == 1
    assert first[0]["port"] != second[0]["port"], "a new rendezvous server for the new world"
    assert_no_train_actors()


def horovod_torch_loop(config):
    """Digits-like regression with DistributedOptimizer; SIGKILLs a rank once if asked."""
    import horovod.torch as hvd
    import torch

    hvd.init()
    torch.manual_seed(0)
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(1))
    y = x.sum(1, keepdim=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    start = 0
    if (checkpoint := pd.get_checkpoint()) is not None:
        state = pd.torch.load_state(checkpoint, "state.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    shard = x[hvd.rank()::hvd.size()], y[hvd.rank()::hvd.size()]
    ctx = pd.get_context()
    for epoch in range(start, config["epochs"]):
        if [ctx.get_attempt(), epoch, hvd.rank()] == config.get("kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        for i in range(0, len(shard[0]), 8):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(shard[0][i:i + 8]), shard[1][i:i + 8])
            loss.backward()
            optimizer.step()
        with tempfile.TemporaryDirectory() as folder:
            if hvd.rank() == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch}, os.path.join(folder, "state.pt"))
            pd.report({"epoch": epoch, "loss": loss.item()},
                      checkpoint=pd.Checkpoint.from_directory(folder) if hvd.rank() == 0 else None)
    return {"weights": [p.detach().clone() for p in model.parameters()], "started_at": start}


def identical(results) -> bool:
    import torch

    first, second = results
    return all(torch.equal(a, b) for a, b in zip(first["weights"], second["weights"]))


def test_horovod_torch_weights_identical_and_a_killed_worker_resumes(tmp_path):
    with pd.Trainer(backend="horovod", num_workers=2,
                    run=pd.RunConfig(name="hvd-clean", storage=str(tmp_path))) as trainer:
        clean = trainer.fit(horovod_torch_loop, config={"epochs": 4})
    assert identical(clean.worker_results)
    losses = [m["loss"] for m in clean.metrics_history]
    assert losses[-1] < losses[0]

    with pd.Trainer(backend=pd.HorovodConfig(timeout_s=60), num_workers=2,
                    run=pd.RunConfig(name="hvd-killed", storage=str(tmp_path)),
                    failure=pd.FailureConfig(max_failures=1)) as trainer:
        result = trainer.fit(horovod_torch_loop, config={"epochs": 4, "kill": [0, 2, 1]})
    assert result.failures == 1 and result.attempt == 1
    assert identical(result.worker_results)
    assert result.worker_results[0]["started_at"] in (1, 2), "resumed from a committed checkpoint"
    attempts = trainer.checkpoints.attempts()
    assert [a["status"] for a in attempts] == ["failed", "completed"]
    assert [m["epoch"] for m in result.metrics_history] == [0, 1, 2, 3]
    assert_no_train_actors()


def horovod_keras_loop(config):
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    hvd.init()
    tf.keras.utils.set_random_seed(hvd.rank())  # different starts: the broadcast must align them
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x.sum(1) > 0).astype("int64")
    data = tf.data.Dataset.from_tensor_slices((x, y)).shard(hvd.size(), hvd.rank()).batch(16)
    model = tf.keras.Sequential([tf.keras.Input(shape=(8,)),
                                 tf.keras.layers.Dense(16, activation="relu"),
                                 tf.keras.layers.Dense(2)])
    model.compile(optimizer=hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.05)),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(data, epochs=config["epochs"], verbose=0,
              callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                         pd.tensorflow.ReportCheckpointCallback(checkpoint_every=None)])
    return {"weights": model.get_weights(), "keras": tf.keras.Sequential.__module__,
            "layers": [layer.name for layer in model.layers], "pid": os.getpid()}


def test_horovod_tensorflow_keras_weights_identical_and_again_on_a_warm_group(tmp_path):
    """The second run takes the first one's processes (Keras and Horovod already imported):
    it must train exactly as the first did, under the same layer names."""
    results = []
    for name in ("hvd-keras", "hvd-keras-warm"):
        with pd.Trainer(backend="horovod", num_workers=2, keep_warm=True,
                        run=pd.RunConfig(name=name, storage=str(tmp_path))) as trainer:
            results.append(trainer.fit(horovod_keras_loop, config={"epochs": 3}))
    assert warm_pool.drain() == 1
    for result in results:
        first, second = result.worker_results
        assert first["keras"].startswith("tf_keras.")
        assert all(np.array_equal(a, b) for a, b in zip(first["weights"], second["weights"]))
        assert [m["epoch"] for m in result.metrics_history] == [0, 1, 2]
    cold, warm = (result.worker_results for result in results)
    assert [r["pid"] for r in warm] == [r["pid"] for r in cold]
    assert warm[0]["layers"] == cold[0]["layers"] == ["dense", "dense_1"]
    assert all(np.array_equal(a, b) for a, b in zip(cold[0]["weights"], warm[0]["weights"]))
    assert_no_train_actors()


def test_missing_horovod_names_the_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "horovod.runner.http.http_server", None)
    with pytest.raises(ImportError, match="scripts/install_horovod.sh"):
        with pd.Trainer(backend="horovod", num_workers=1,
                        run=pd.RunConfig(name="no-hvd", storage=str(tmp_path))):
            pass
    assert_no_train_actors()
