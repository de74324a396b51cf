"""The worker group, the torch backend and the session API, through ``Trainer`` on a real Ray."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time

import pytest
import torch
from conftest import assert_no_train_actors

import prefect_distrain as pd

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture
def storage(tmp_path):
    return pd.RunConfig(name="run", storage=str(tmp_path / "runs"))


def ddp_loop(config):
    """Trains a linear model on this rank's share of 64 samples; returns what it saw."""
    torch.manual_seed(1234 + pd.get_context().get_world_rank())  # differing initial weights:
    model = pd.torch.prepare_model(torch.nn.Linear(4, 1))       # DDP must broadcast rank 0's
    initial = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    xs = torch.arange(64 * 4, dtype=torch.float32).reshape(64, 4) / 100
    ys = xs.sum(1, keepdim=True)
    indices = torch.arange(64)
    dataset = torch.utils.data.TensorDataset(xs, ys, indices)
    loader = pd.torch.prepare_data_loader(
        torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []
    for epoch in range(config["epochs"]):
        for x, y, idx in loader:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            seen.extend(idx.tolist())
        pd.report({"epoch": epoch})
    final = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"initial": initial.tolist(), "final": final.tolist(), "seen": seen,
            "prefect_imported": "prefect" in sys.modules, "env_rank": os.environ["RANK"],
            "world_size": torch.distributed.get_world_size()}


def test_ddp_keeps_parameters_identical_on_every_rank(storage):
    with pd.Trainer(backend="torch", num_workers=2, run=storage) as trainer:
        rank0, rank1 = trainer.run(ddp_loop, config={"epochs": 2})
    assert rank0["final"] == rank1["final"]
    assert rank0["initial"] == rank1["initial"], "DDP broadcasts rank 0's initial weights"
    assert rank0["final"] != rank0["initial"], "the model was trained"
    # Each epoch the ranks see disjoint halves that together cover the data set.
    per_epoch = 32
    for epoch in range(2):
        a = set(rank0["seen"][epoch * per_epoch:(epoch + 1) * per_epoch])
        b = set(rank1["seen"][epoch * per_epoch:(epoch + 1) * per_epoch])
        assert not a & b and a | b == set(range(64))
    assert rank0["seen"][:per_epoch] != rank0["seen"][per_epoch:], "set_epoch reshuffles"
    assert (rank0["env_rank"], rank1["env_rank"]) == ("0", "1")
    assert rank0["world_size"] == 2
    assert rank0["prefect_imported"] is False, "workers must not import Prefect"
    assert_no_train_actors()


class Recorder(pd.TrainingCallback):
    def __init__(self):
        self.results, self.info, self.started, self.finished = [], [], [], []

    def start_training(self, logdir, config, **info):
        self.started.append((logdir, config))

    def handle_result(self, results, **info):
        self.results.append(results)
        self.info.append(info)

    def finish_training(self, error=False, **info):
        self.finished.append(error)


def reporting_loop(config):
    rank = pd.get_context().get_world_rank()
    for step in range(config["steps"]):
        pd.report({"step": step, "rank": rank, "value": step * 10 + rank})
    return rank * 100


def test_reports_arrive_in_order_with_added_keys(storage):
    recorder = Recorder()
    with pd.Trainer(backend="torch", num_workers=2, run=storage) as trainer:
        result = trainer.fit(reporting_loop, config={"steps": 5}, callbacks=[recorder])
    assert [[r["step"] for r in results] for results in recorder.results] == \
        [[s, s] for s in range(5)]
    assert [[r["rank"] for r in results] for results in recorder.results] == [[0, 1]] * 5
    for iteration, results in enumerate(recorder.results, start=1):
        for r in results:
            assert r["_training_iteration"] == iteration
            assert abs(r["_timestamp"] - time.time()) < 600
            assert r["_time_this_iter_s"] >= 0
    assert [i["training_iteration"] for i in recorder.info] == [1, 2, 3, 4, 5]
    assert recorder.started == [(result.path, {"steps": 5})] and recorder.finished == [False]
    assert [m["value"] for m in result.metrics_history] == [0, 10, 20, 30, 40]
    assert result.metrics["value"] == 40
    assert result.worker_results == [0, 100]


def unbalanced_loop(config):
    """Rank 1 starts late; rank 0 reports three times and notes when report() let it go."""
    rank = pd.get_context().get_world_rank()
    if rank == 1:
        time.sleep(2)
    started = time.time()
    for step in range(3):
        pd.report({"step": step})
    return {"started": started, "reports_done": time.time()}


def test_report_is_not_a_barrier(storage):
    """Documented in session.py: report() never waits for the other ranks or the driver."""
    with pd.Trainer(num_workers=2, run=storage) as trainer:
        result = trainer.fit(unbalanced_loop)
    rank0, rank1 = result.worker_results
    assert rank0["reports_done"] < rank1["started"]
    assert [m["step"] for m in result.metrics_history] == [0, 1, 2]


def committed_on_return_loop(config):
    """Rank 1 reports late; rank 0's checkpoint report returns only once it is committed."""
    rank = pd.get_context().get_world_rank()
    if rank == 1:
        time.sleep(2)
        reported = time.time()
        pd.report({"step": 0})
        return {"reported": reported}
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "weights.bin"), "wb") as handle:
            handle.write(b"w" * 100)
        pd.report({"step": 0}, checkpoint=pd.Checkpoint.from_directory(folder))
    manifest = os.path.join(pd.get_context().get_storage(), "_manifests",
                            "checkpoint_000001-a0.json")
    return {"returned": time.time(), "manifest_there": os.path.exists(manifest)}


def test_a_sync_checkpoint_report_returns_once_committed(storage):
    with pd.Trainer(num_workers=2, run=storage) as trainer:
        rank0, rank1 = trainer.run(committed_on_return_loop)
    assert rank0["manifest_there"], "report(checkpoint=...) returned before the commit"
    assert rank0["returned"] >= rank1["reported"], "the commit needs every rank's report"


def test_trainer_reuses_started_workers_between_runs(storage):
    def pid_loop():
        return os.getpid()

    with pd.Trainer(num_workers=2, run=storage) as trainer:
        first = trainer.run(pid_loop)
        second = trainer.run(pid_loop)
    assert first == second and len(set(first)) == 2


def failing_loop(config):
    rank = pd.get_context().get_world_rank()
    if rank == config["bad_rank"]:
        raise ValueError(f"bad batch on purpose (rank {rank})")
    time.sleep(60)  # stuck like a rank waiting in a collective; the driver must kill it


def test_worker_exception_names_rank_keeps_type_and_leaves_no_actors(storage):
    with pd.Trainer(num_workers=2, run=storage) as trainer:
        with pytest.raises(ValueError, match=r"bad batch on purpose \(rank 1\)") as caught:
            trainer.run(failing_loop, config={"bad_rank": 1})
    error = caught.value
    assert error.rank == 1
    assert isinstance(error.__cause__, pd.RemoteTraceback)
    assert "rank 1 of 2" in str(error.__cause__)
    assert "in failing_loop" in str(error.__cause__)
    assert any("rank 1 of 2" in note for note in error.__notes__)
    assert_no_train_actors()


def local_exception_loop():
    class DatasetCorrupt(Exception):  # defined only inside the worker's function
        pass

    raise DatasetCorrupt("shard 3 is truncated")


def unpicklable_exception_loop():
    raise RuntimeError("lost the lock", threading.Lock())


def test_worker_only_and_unpicklable_exception_types(storage):
    with pd.Trainer(num_workers=1, run=storage) as trainer:
        with pytest.raises(Exception, match="shard 3 is truncated") as caught:
            trainer.run(local_exception_loop)
        assert type(caught.value).__name__ == "DatasetCorrupt"
        with pytest.raises(pd.WorkerError, match="RuntimeError: .*lost the lock") as caught:
            trainer.run(unpicklable_exception_loop)
    assert caught.value.exc_type == "builtins.RuntimeError"
    assert caught.value.rank == 0
    assert "in unpicklable_exception_loop" in caught.value.traceback
    assert_no_train_actors()


def test_impossible_scaling_fails_fast_with_what_was_asked(storage):
    with pytest.raises(pd.ResourcesUnavailableError,
                       match=r"asks for 9 workers of CPU 1 each .* can hold at most 4") as caught:
        pd.Trainer(num_workers=9, run=storage).start()
    assert caught.value.requested == {"CPU": 9.0} and caught.value.available["CPU"] == 4.0
    assert not caught.value.retryable
    with pytest.raises(pd.ResourcesUnavailableError, match="can hold at most 0"):
        pd.Trainer(scaling=pd.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 16}),
                   run=storage).start()
    assert_no_train_actors()


def test_use_gpu_without_gpus_in_the_cluster(storage):
    with pytest.raises(pd.ResourcesUnavailableError,
                       match="use_gpu=True but the Ray cluster has no GPUs.*use_gpu=False"):
        pd.Trainer(num_workers=1, use_gpu=True, run=storage).start()


def test_bad_input_gets_errors_that_name_the_fix(storage):
    with pytest.raises(pd.ConfigurationError,
                       match=r"unknown backend 'jax': choose one of .*'torch'"):
        pd.Trainer(backend="jax")
    with pytest.raises(pd.ConfigurationError,
                       match=r"num_workers must be an integer of at least 1, or 0 to run "
                             r"the function in this process \(got -1\)"):
        pd.ScalingConfig(num_workers=-1)
    with pytest.raises(pd.ConfigurationError, match="either scaling=ScalingConfig"):
        pd.Trainer(num_workers=2, scaling=pd.ScalingConfig())
    with pytest.raises(pd.ConfigurationError, match="not usable as a folder name"):
        pd.RunConfig(name="../escape")
    lock = threading.Lock()

    def captures_a_lock():
        with lock:
            pass

    # Refused before anything starts: no workers, nothing written to storage.
    trainer = pd.Trainer(num_workers=1, run=storage)
    with pytest.raises(pd.ConfigurationError,
                       match=r"can't be pickled .* captures variable 'lock' \(_thread\.lock\)"):
        trainer.run(captures_a_lock)
    with pytest.raises(pd.ConfigurationError, match="must be callable"):
        trainer.run(captures_a_lock())
    assert not trainer.started and not os.path.exists(storage.storage)
    assert_no_train_actors()
    with trainer:
        with pytest.raises(pd.ConfigurationError, match="no such checkpoint directory"):
            trainer.run(reporting_loop, resume_from_checkpoint=str(storage.storage) + "/nope")
    with pytest.raises(pd.ConfigurationError, match="no such directory"):
        pd.Checkpoint.from_directory("/definitely/not/here")
    with pytest.raises(RuntimeError, match=r"report\(\) was called outside a training function"):
        pd.report({"loss": 1.0})
    assert_no_train_actors()


def checkpointing_loop(config):
    start = 0
    checkpoint = pd.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            start = torch.load(os.path.join(folder, "state.pt"), weights_only=True)["step"] + 1
    seen = []
    for step in range(start, config["steps"]):
        seen.append(step)
        if pd.get_context().get_world_rank() == 0:
            with tempfile.TemporaryDirectory() as folder:
                torch.save({"step": step}, os.path.join(folder, "state.pt"))
                pd.report({"step": step}, checkpoint=pd.Checkpoint.from_directory(folder))
        else:
            pd.report({"step": step})
    return seen


def test_checkpoints_are_persisted_and_a_fresh_run_resumes_from_one(tmp_path):
    first = pd.RunConfig(name="first", storage=str(tmp_path))
    with pd.Trainer(num_workers=2, run=first) as trainer:
        result = trainer.fit(checkpointing_loop, config={"steps": 3})
    assert result.checkpoint.path == str(tmp_path / "first" / "checkpoint_000003-a0")
    assert sorted(os.listdir(tmp_path / "first")) == [
        "_attempts", "_lease", "_manifests", "checkpoint_000001-a0", "checkpoint_000002-a0",
        "checkpoint_000003-a0"]
    assert torch.load(tmp_path / "first" / "checkpoint_000002-a0" / "state.pt",
                      weights_only=True) == {"step": 1}
    middle = pd.Checkpoint(str(tmp_path / "first" / "checkpoint_000002-a0"))
    second = pd.RunConfig(name="second", storage=str(tmp_path))
    with pd.Trainer(num_workers=2, run=second) as trainer:
        resumed = trainer.fit(checkpointing_loop, config={"steps": 5},
                              resume_from_checkpoint=middle)
    assert resumed.worker_results == [[2, 3, 4], [2, 3, 4]]
    assert [m["step"] for m in resumed.metrics_history] == [2, 3, 4]
    # Report numbers go on after the checkpoint resumed from (2): this run's are 3, 4, 5.
    assert [m["_training_iteration"] for m in resumed.metrics_history] == [3, 4, 5]
    assert resumed.checkpoint.path.endswith("second/checkpoint_000005-a0")


def test_worker_context_matches_the_group(storage):
    def context_loop():
        ctx = pd.get_context()
        return (ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(),
                ctx.get_local_world_size(), ctx.get_node_rank(), ctx.get_attempt(),
                ctx.get_experiment_name(), str(pd.torch.get_device()))

    with pd.Trainer(num_workers=3, run=storage) as trainer:
        contexts = trainer.run(context_loop)
    assert contexts == [(r, 3, r, 3, 0, 0, "run", "cpu") for r in range(3)]


def test_a_ray_address_that_cannot_be_used_is_named(storage, caplog):
    """Already connected (as under a task runner): the given address is not used, and says so."""
    with pd.Trainer(num_workers=1, run=storage, ray_address="10.255.0.1:6379") as trainer:
        assert trainer.run(lambda: 7) == [7]
    assert "ray_address='10.255.0.1:6379' is not used: this process is already connected to " \
           "the Ray cluster at" in caplog.text
