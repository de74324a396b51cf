"""Driver-side callbacks: early stopping ends a run cleanly at the workers' next report, and a
slow callback never slows the training loop."""

from __future__ import annotations

import os
import tempfile
import time

import pytest

import prefect_distrain as pd

pytestmark = pytest.mark.usefixtures("ray_cluster")


def plateau_loop(config):
    """``val_loss`` falls until epoch 4, then stays flat; a checkpoint every epoch."""
    rank = pd.get_context().get_world_rank()
    for epoch in range(config["epochs"]):
        time.sleep(config.get("epoch_s", 0.2))
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                with open(os.path.join(folder, "epoch.txt"), "w") as handle:
                    handle.write(str(epoch))
            pd.report({"epoch": epoch, "val_loss": 1.0 / (1 + min(epoch, 4))},
                      checkpoint=pd.Checkpoint.from_directory(folder) if rank == 0 else None)
    return "ran every epoch"


def test_early_stopping_ends_a_plateaued_run_cleanly(tmp_path):
    stopper = pd.callbacks.EarlyStopping(metric="val_loss", mode="min", patience=3)
    run = pd.RunConfig(name="plateau", storage=str(tmp_path))
    with pd.Trainer(num_workers=2, run=run, failure=pd.FailureConfig(max_failures=2)) as t:
        result = t.fit(plateau_loop, config={"epochs": 20}, callbacks=[stopper])
        attempts = t.storage.read_attempts()
    epochs = [m["epoch"] for m in result.metrics_history]
    assert epochs == list(range(len(epochs))) and epochs[-1] <= 8, epochs
    assert result.stopped_early.startswith("early stopping: val_loss did not improve by more "
                                           "than 0 for 3 reports (best 0.2 at iteration 5)")
    assert result.failures == 0 and result.worker_results == [None, None]
    assert [a["status"] for a in attempts] == ["stopped"]
    # The checkpoint of the last epoch reported is committed (a sync report waits for it).
    assert result.checkpoint.index == epochs[-1] + 1
    with result.checkpoint.as_directory() as folder:
        assert open(os.path.join(folder, "epoch.txt")).read() == str(epochs[-1])


class Sleepy(pd.TrainingCallback):
    def __init__(self):
        self.seen = []

    def handle_result(self, results, **info):
        time.sleep(2)
        self.seen.append(info["training_iteration"])


def step_loop(config):
    times = []
    for step in range(config["steps"]):
        began = time.monotonic()
        time.sleep(0.05)  # the step's own work
        pd.report({"step": step})
        times.append(time.monotonic() - began)
    return times


def test_a_callback_sleeping_2_s_per_call_does_not_slow_the_steps(tmp_path):
    sleepy = Sleepy()
    run = pd.RunConfig(name="sleepy", storage=str(tmp_path))
    with pd.Trainer(num_workers=2, run=run) as t:
        result = t.fit(step_loop, config={"steps": 6}, callbacks=[sleepy])
    for times in result.worker_results:
        assert max(times) < 1.0, times  # each step's 0.05 s, not the callback's 2 s
    assert sleepy.seen == [1, 2, 3, 4, 5, 6], "the callback still saw every result, in order"


class Broken(pd.TrainingCallback):
    def handle_result(self, results, **info):
        raise RuntimeError("tracker down")


class BrokenFatal(Broken):
    fatal_errors = True


def test_a_callback_error_is_logged_unless_fatal(tmp_path, caplog):
    run = pd.RunConfig(name="broken", storage=str(tmp_path))
    with pd.Trainer(num_workers=1, run=run) as t:
        result = t.fit(step_loop, config={"steps": 3}, callbacks=[Broken()])
        assert len(result.metrics_history) == 3
        assert "Callback Broken.handle_result failed; training goes on" in caplog.text
        with pytest.raises(RuntimeError, match="tracker down"):
            t.fit(step_loop, config={"steps": 50}, callbacks=[BrokenFatal()])
