"""Ray Train's and Ray Tune's shapes over the same machinery: ``TorchTrainer(...).fit()`` in
and out of a flow, ``Tuner`` with ``grid_search`` and ``get_best_result``, a swept loop that
reads Ray Data shards, and the seeds' ``tune.run``."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
from prefect import flow

import prefect_distrain as pd
from prefect_distrain.ray import sgd, train, tune
from prefect_distrain.ray.sgd import Trainer
from prefect_distrain.ray.train.torch import TorchTrainer

pytestmark = pytest.mark.usefixtures("ray_cluster")


def quadratic_loop(config):
    """Reports (x - 3)^2 for x = config["x"], with a checkpoint holding x, on every rank."""
    loss = (config["x"] - 3) ** 2
    for step in range(config.get("steps", 2)):
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if train.get_context().get_world_rank() == 0:
                with open(os.path.join(folder, "x.json"), "w") as f:
                    json.dump({"x": config["x"], "step": step}, f)
                checkpoint = train.Checkpoint.from_directory(folder)
            train.report({"loss": loss + step, "step": step}, checkpoint=checkpoint)


def read_x(checkpoint):
    with checkpoint.as_directory() as folder, open(os.path.join(folder, "x.json")) as f:
        return json.load(f)


def test_torch_trainer_fit_outside_a_flow_returns_rays_result(tmp_path):
    trainer = TorchTrainer(
        quadratic_loop, train_loop_config={"x": 5},
        scaling_config=train.ScalingConfig(num_workers=2),
        run_config=train.RunConfig(name="quad", storage_path=str(tmp_path),
                                   checkpoint_config=train.CheckpointConfig(
                                       num_to_keep=1, checkpoint_score_attribute="loss",
                                       checkpoint_score_order="min")))
    result = trainer.fit()
    assert result.error is None and result.world_size == 2
    assert result.metrics["loss"] == 5 and result.metrics["step"] == 1
    assert list(result.metrics_dataframe["loss"]) == [4, 5]
    assert result.path == str(tmp_path / "quad")
    assert read_x(result.checkpoint) == {"x": 5, "step": 1}
    # num_to_keep=1 by the lowest loss keeps step 0 (best) and step 1 (latest)
    assert [read_x(c)["step"] for c, _ in result.best_checkpoints] == [0, 1]


def test_torch_trainer_fit_raises_the_runs_error(tmp_path):
    def failing(config):
        raise ValueError("bad batch")

    trainer = TorchTrainer(failing, scaling_config=pd.ScalingConfig(num_workers=2),
                           run_config=pd.RunConfig(storage=str(tmp_path)))
    with pytest.raises(ValueError, match="bad batch"):
        trainer.fit()


def test_torch_trainer_fit_in_a_flow_is_the_train_task(tmp_path, prefect_server):
    @flow(retries=0)
    def retrain():
        return TorchTrainer(quadratic_loop, train_loop_config={"x": 2},
                            scaling_config=train.ScalingConfig(num_workers=2),
                            run_config=train.RunConfig(storage_path=str(tmp_path))).fit()

    state = retrain(return_state=True)
    result = state.result()
    # The task's stable name: <function>-<flow run id, 8 hex>-<digest>
    assert result.run_name.startswith(f"quadratic_loop-{state.state_details.flow_run_id.hex[:8]}-")
    assert result.metrics["loss"] == 2


def test_bad_trainer_arguments_name_the_fix():
    with pytest.raises(pd.ConfigurationError, match="storage_path='s3://bucket/runs'"):
        train.RunConfig(storage_filesystem=object())
    with pytest.raises(pd.ConfigurationError, match="torch_config"):
        TorchTrainer(quadratic_loop, backend_config=pd.TorchConfig())
    with pytest.raises(pd.ConfigurationError, match="metadata"):
        TorchTrainer(quadratic_loop, metadata={"a": 1})
    with pytest.raises(pd.ConfigurationError, match="train_loop_config"):
        tune.Tuner(TorchTrainer(quadratic_loop),
                   param_space={"scaling_config": {"num_workers": tune.grid_search([1, 2])}})
    with pytest.raises(pd.ConfigurationError, match="search_alg"):
        tune.TuneConfig(search_alg=object())


def test_tuner_grid_search_finds_the_best_config(tmp_path, prefect_server):
    trainer = TorchTrainer(quadratic_loop, train_loop_config={"steps": 1},
                           scaling_config=train.ScalingConfig(num_workers=1))
    tuner = tune.Tuner(trainer,
                       param_space={"train_loop_config": {"x": tune.grid_search([1, 3, 4])}},
                       tune_config=tune.TuneConfig(metric="loss", mode="min",
                                                   max_concurrent_trials=2),
                       run_config=train.RunConfig(storage_path=str(tmp_path)))
    results = tuner.fit()
    assert len(results) == 3 and results.num_errors == 0
    best = results.get_best_result()  # Ray's shape: the config as param_space has it
    assert best.config == {"train_loop_config": {"steps": 1, "x": 3}}
    assert best.metrics["loss"] == 0 and read_x(best.checkpoint) == {"x": 3, "step": 0}
    assert results.get_best_result(metric="loss", mode="max").config["train_loop_config"] == {
        "steps": 1, "x": 1}
    assert sorted(r.config["train_loop_config"]["x"] for r in results) == [1, 3, 4]
    frame = results.get_dataframe()
    assert sorted(frame["config/train_loop_config/x"]) == [1, 3, 4]


def rows_loop(config):
    """Sums this rank's shard of the "train" dataset, scaled by the swept factor."""
    shard = train.get_dataset_shard("train")
    total = sum(row["v"] for batch in shard.iter_batches(batch_size=4) for row in
                [{"v": v} for v in batch["v"]])
    train.report({"total": float(total) * config["factor"]})


def test_a_swept_loop_reads_its_dataset_shards(tmp_path, prefect_server):
    import ray.data

    data = ray.data.from_items([{"v": i} for i in range(10)])
    result = tune.Tuner(
        pd.DataParallelTrainer(rows_loop, scaling_config=pd.ScalingConfig(num_workers=1),
                               datasets={"train": data}),
        param_space={"train_loop_config": {"factor": tune.grid_search([1, 2])}},
        tune_config=tune.TuneConfig(metric="total", mode="max"),
        run_config=pd.RunConfig(storage=str(tmp_path))).fit()
    assert sorted(r.metrics["total"] for r in result) == [45.0, 90.0]
    assert result.get_best_config() == {"train_loop_config": {"factor": 2}}


def square_loop(config):
    pd.report({"square": config["x"] ** 2})


def test_a_tuner_over_a_plain_function_searches_its_config(tmp_path, prefect_server):
    """Tune's function API: param_space is the function's config, one worker per trial."""
    results = tune.Tuner(square_loop, param_space={"x": tune.grid_search([-3, 2])},
                         tune_config=tune.TuneConfig(metric="square", mode="min"),
                         run_config=pd.RunConfig(storage=str(tmp_path))).fit()
    assert results.get_best_result().config == {"x": 2}
    assert sorted(r.metrics["square"] for r in results) == [4, 9]


def seed_train_func(config):
    # In this example, nothing is expected to change over epochs,
    # and the output metric is equivalent to the input value.
    for _ in range(config["num_epochs"]):
        sgd.report(output=config["input"])


def test_the_seeds_tune_sample_with_only_its_imports_changed(tmp_path, prefect_server):
    """The seeds' (003) "Hyperparameter Tuning with Ray Tune" sample, SGD v2."""
    trainer = Trainer(backend="torch", num_workers=2, logdir=str(tmp_path))
    trainable = trainer.to_tune_trainable(seed_train_func)
    analysis = tune.run(trainable, config={
        "num_epochs": 2,
        "input": tune.grid_search([1, 2, 3])
    })
    assert analysis.get_best_config(metric="output", mode="max") == {"num_epochs": 2,
                                                                     "input": 3}
    assert analysis.best_config is None  # no metric given to the sweep: no ranking of its own
    assert len(analysis) == 3 and analysis.num_errors == 0
