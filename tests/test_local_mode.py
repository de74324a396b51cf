"""Local mode: ``ScalingConfig(num_workers=0)`` runs the loop in this process, with the same
session API, checkpoints, callbacks and artifacts, and no Ray; a loop's unit test in a second."""

from __future__ import annotations

import os
import tempfile

import pytest
import ray
from prefect import flow

import prefect_distrain as pd
from prefect_distrain.session import current_session


def counting_loop(config):
    """Counts from the checkpoint's step on; a checkpoint per step; prints its first step."""
    start = 0
    if (checkpoint := pd.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder, open(os.path.join(folder, "step")) as f:
            start = int(f.read()) + 1
    print(f"starting at step {start}")
    context = pd.get_context()
    for step in range(start, config["steps"]):
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "step"), "w") as f:
                f.write(str(step))
            pd.report({"step": step, "loss": 10.0 - step,
                       "world": (context.get_world_rank(), context.get_world_size())},
                      checkpoint=pd.Checkpoint.from_directory(folder))
    pd.collective.barrier()
    return pd.collective.broadcast_from_rank_zero({"pid": os.getpid()})


def test_local_mode_trains_commits_and_resumes_in_this_process(tmp_path, capsys):
    ray_before = ray.is_initialized()
    run = pd.RunConfig(name="local", storage=str(tmp_path))
    seen = []

    class Seen(pd.TrainingCallback):
        def handle_result(self, results, **info):
            seen.append(results[0]["step"])

    with pd.Trainer(num_workers=0, run=run,
                    checkpoint=pd.CheckpointConfig(num_to_keep=2)) as trainer:
        first = trainer.fit(counting_loop, config={"steps": 3}, callbacks=[Seen()])
    assert first.worker_results == [{"pid": os.getpid()}], "in this very process"
    assert first.world_size == 1 and first.metrics["world"] == (0, 1)
    assert seen == [0, 1, 2]
    assert sorted(c.index for c, _ in first.best_checkpoints) == [2, 3]  # num_to_keep=2
    assert "starting at step 0" in capsys.readouterr().out  # prints stay the caller's own
    assert ray.is_initialized() == ray_before, "no Ray started"
    assert current_session() is None

    with pd.Trainer(num_workers=0, run=run) as trainer:
        second = trainer.fit(counting_loop, config={"steps": 5}, resume_from_checkpoint="latest")
    assert "starting at step 3" in capsys.readouterr().out
    assert [m["step"] for m in second.metrics_history] == [3, 4]
    assert second.checkpoint.index == 5 and second.attempt == 1
    with second.checkpoint.as_directory() as folder:  # verified against its manifest
        assert open(os.path.join(folder, "step")).read() == "4"


def test_local_mode_stops_exactly_and_raises_the_loops_error(tmp_path):
    def failing(config):
        pd.report({"loss": 1.0})
        raise KeyError("missing column")

    run = pd.RunConfig(storage=str(tmp_path))
    with pd.Trainer(num_workers=0, run=run) as trainer:
        stopped = trainer.fit(counting_loop, config={"steps": 20}, callbacks=[
            pd.EarlyStopping(metric="loss", mode="max", patience=2)])
        assert [m["step"] for m in stopped.metrics_history] == [0, 1, 2]
        assert stopped.stopped_early
        with pytest.raises(KeyError, match="missing column"):
            trainer.fit(failing)


def test_local_mode_refuses_what_needs_other_processes(tmp_path):
    with pytest.raises(pd.ConfigurationError, match="drop min_workers and use_gpu"):
        pd.ScalingConfig(num_workers=0, use_gpu=True)
    with pytest.raises(pd.ConfigurationError, match="datasets= needs Ray Data"):
        with pd.Trainer(num_workers=0, run=pd.RunConfig(storage=str(tmp_path))) as trainer:
            trainer.fit(counting_loop, config={"steps": 1}, datasets={"train": [1, 2]})


def test_local_mode_in_a_flow_is_the_train_task(tmp_path, prefect_server):
    @flow(retries=0)
    def debug():
        return pd.train(counting_loop, config={"steps": 2},
                        scaling=pd.ScalingConfig(num_workers=0),
                        run=pd.RunConfig(storage=str(tmp_path)))

    result = debug()
    assert result.metrics["step"] == 1 and result.checkpoint.index == 2
