"""The pipeline -> training handoff through Ray Data: an upstream task writes parquet (on local
disk and on moto S3), each worker streams a disjoint share, TorchMetrics aggregates the
evaluation across workers, and shards are split anew after a restart."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import ray
import torch
from conftest import flow_run_records, load_flow

import prefect_distrain as pd

pytestmark = pytest.mark.usefixtures("ray_cluster")

def test_parquet_from_an_upstream_task_reaches_two_workers_as_disjoint_complete_shards(
        storage_kind, prefect_server):
    import pandas
    from fsspec.core import url_to_fs

    module = load_flow("data_pipeline")
    state = module.data_pipeline(storage=storage_kind["storage"],
                                 storage_options=storage_kind["storage_options"], epochs=4,
                                 return_state=True)
    result = state.result()
    fs, path = url_to_fs(storage_kind["storage"], **storage_kind["storage_options"])
    train = pandas.concat(pandas.read_parquet(fs.open(f, "rb")) for f in
                          sorted(fs.glob(f"{path}/datasets/digits-0/train/*.parquet")))
    test = pandas.concat(pandas.read_parquet(fs.open(f, "rb")) for f in
                         sorted(fs.glob(f"{path}/datasets/digits-0/test/*.parquet")))
    shards = [set(r["train_ids"]) for r in result.worker_results]
    assert len(shards) == 2 and not shards[0] & shards[1], "each row on one worker only"
    assert shards[0] | shards[1] == set(train["id"]), "together, every row of the parquet"
    assert len(shards[0]) == len(shards[1]) == len(train) // 2

    # TorchMetrics over both workers = the accuracy of the final weights on the whole test set.
    final = result.metrics
    sizes = [m["shard_size"] for m in result.metrics_all_ranks]
    assert sizes == [len(test) // 2] * 2
    weighted = sum(m["shard_accuracy"] * m["shard_size"] for m in result.metrics_all_ranks)
    assert weighted / len(test) == pytest.approx(final["test_accuracy"], abs=1e-6)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    checkpoint = pd.Checkpoint(result.checkpoint.path, storage_kind["storage_options"],
                               result.checkpoint.manifest)  # results carry no credentials
    model.load_state_dict(pd.torch.load_state(checkpoint, "auto_state.pt",
                                              map_location="cpu")["models"][0])
    x = torch.tensor(test[module.PIXELS].to_numpy(), dtype=torch.float32)
    with torch.no_grad():
        full = (model(x).argmax(1).numpy() == test["label"].to_numpy()).mean()
    assert final["test_accuracy"] == pytest.approx(full, abs=1e-6)
    assert final["test_accuracy"] > 0.85 and result.metrics_history[0]["loss"] > final["loss"]
    # mode="auto": the loop has no checkpoint code, yet every pass was committed.
    assert result.checkpoint.metrics["_auto_checkpoint_pass"] == 4
    _, artifacts, _ = flow_run_records(state.state_details.flow_run_id)
    assert any(a.type == "progress" for a in artifacts)


def count_loop(config):
    """Reads this rank's share of "train" once per epoch; rank 1 is killed once on attempt 0."""
    ctx = pd.get_context()
    shard = pd.get_dataset_shard("train")
    for epoch in range(config["epochs"]):
        ids = [int(i) for batch in shard.iter_batches(batch_size=8) for i in batch["id"]]
        if ctx.get_attempt() == 0 and epoch == 1 and ctx.get_world_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        pd.report({"epoch": epoch, "ids": ids, "attempt": ctx.get_attempt()})
    return ctx.get_world_size()


def test_shards_are_split_again_after_a_restart(tmp_path):
    rows = ray.data.range(40).map(lambda row: {"id": row["id"]})
    with pd.Trainer(num_workers=2, run=pd.RunConfig(name="resplit", storage=str(tmp_path)),
                    failure=pd.FailureConfig(max_failures=1)) as trainer:
        result = trainer.fit(count_loop, config={"epochs": 3}, datasets={"train": rows})
    assert result.failures == 1
    assert [r[0]["epoch"] for r in result.metrics_history_all_ranks] == [0, 1, 2]
    assert result.metrics_history_all_ranks[-1][0]["attempt"] == 1
    for ranks in result.metrics_history_all_ranks:
        first, second = (set(r["ids"]) for r in ranks)
        assert not first & second and first | second == set(range(40))


def test_a_dataset_not_split_reaches_every_worker_whole(tmp_path):
    def loop():
        return sorted(r["id"] for r in pd.get_dataset_shard("val").iter_rows())

    with pd.Trainer(num_workers=2, run=pd.RunConfig(name="whole", storage=str(tmp_path))) as t:
        returns = t.run(loop, datasets={"train": ray.data.range(6), "val": ray.data.range(4)},
                        data_config=pd.DataConfig(datasets_to_split=["train"]))
    assert returns == [[0, 1, 2, 3]] * 2


def test_an_unknown_shard_name_says_which_were_given(tmp_path):
    def loop():
        pd.get_dataset_shard("validation")

    with pd.Trainer(num_workers=1, run=pd.RunConfig(name="unknown", storage=str(tmp_path))) as t:
        with pytest.raises(KeyError, match=r"no dataset 'validation' was given to this run "
                                           r"\(given: 'train'\)"):
            t.run(loop, datasets={"train": ray.data.range(4)})


def test_bad_datasets_fail_before_training(tmp_path):
    run = pd.RunConfig(name="bad", storage=str(tmp_path))
    with pd.Trainer(num_workers=1, run=run) as trainer:
        with pytest.raises(pd.ConfigurationError, match=r"dataset .*/nowhere' does not exist"):
            trainer.fit(lambda: None, datasets={"train": str(tmp_path / "nowhere")})
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "a.txt").write_text("x")
        with pytest.raises(pd.ConfigurationError, match="holds no .parquet or .csv files"):
            trainer.fit(lambda: None, datasets={"train": str(tmp_path / "notes")})
        with pytest.raises(pd.ConfigurationError, match="dataset 'train' is a list: pass a Ray"):
            trainer.fit(lambda: None, datasets={"train": [1, 2]})
        with pytest.raises(pd.ConfigurationError, match=r"datasets_to_split names \['test'\]"):
            trainer.fit(lambda: None, datasets={"train": ray.data.range(2)},
                        data_config=pd.DataConfig(datasets_to_split=["test"]))


def test_csv_files_read_as_a_dataset(tmp_path):
    (tmp_path / "rows.csv").write_text("id,value\n" + "".join(f"{i},{i * i}\n" for i in range(10)))

    def loop():
        return sum(r["value"] for r in pd.get_dataset_shard("train").iter_rows())

    with pd.Trainer(num_workers=2, run=pd.RunConfig(name="csv", storage=str(tmp_path))) as t:
        returns = t.run(loop, datasets={"train": str(tmp_path / "rows.csv")})
    assert sum(returns) == sum(i * i for i in range(10))


def test_parquet_at_a_url_is_listed_once_not_on_every_pass(tmp_path):
    """Ray 2.60's default parquet reader starts 32 footer-reading actors on every pass; a URL
    read by train reads the footers once, and the user's own choice of reader is kept."""
    import pandas
    from ray.util.state import list_actors

    from prefect_distrain.integrations.data import read_dataset

    for i in range(3):
        pandas.DataFrame({"id": range(i * 10, i * 10 + 10)}).to_parquet(tmp_path / f"{i}.parquet")
    def footer_readers() -> int:
        return len(list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000,
                               filters=[("class_name", "=", "FooterReader")]))

    context = ray.data.DataContext.get_current()
    before, readers = context.use_datasource_v2, footer_readers()
    dataset = read_dataset(str(tmp_path))
    assert context.use_datasource_v2 == before
    for _ in range(2):
        assert sorted(row["id"] for row in dataset.iter_rows()) == list(range(30))
    assert footer_readers() == readers
    # A block per file, whatever the cluster's CPU count: a pass splits the same way after a
    # node is lost (Ray's default cuts each file into ceil(2 * CPUs / files) blocks).
    blocks = [e.metadata.num_rows for b in dataset.iter_internal_ref_bundles() for e in b.blocks]
    assert blocks == [10, 10, 10]


def test_without_ray_data_the_error_names_the_extra(monkeypatch):
    from prefect_distrain.integrations.data import import_ray_data

    monkeypatch.setitem(sys.modules, "ray.data", None)  # as if ray[data] were not installed
    with pytest.raises(ImportError, match=r"pip install 'prefect-distrain\[data\]'"):
        import_ray_data()


def rows_loop(config):
    """Counts its shard's rows and commits a checkpoint of the count."""
    import json
    import tempfile

    rows = sum(len(batch["x"]) for batch in pd.get_dataset_shard("train").iter_batches())
    with tempfile.TemporaryDirectory() as folder:
        json.dump({"rows": rows}, open(os.path.join(folder, "rows.json"), "w"))
        pd.report({"rows": rows}, checkpoint=pd.Checkpoint.from_directory(folder))


def test_a_warm_start_onto_changed_data_warns_or_fails_as_configured(tmp_path, prefect_server):
    """A run's checkpoint remembers the files it was trained on; a warm start after one file
    was rewritten and one added says which, in the log and the summary, or fails at once."""
    import pandas
    from prefect import flow

    data = tmp_path / "features"
    data.mkdir()
    for part in (0, 1):
        pandas.DataFrame({"x": range(10)}).to_parquet(data / f"part-{part}.parquet")
    storage = str(tmp_path / "runs")
    with pd.Trainer(num_workers=1, run=pd.RunConfig(name="base", storage=storage)) as trainer:
        base = trainer.fit(rows_loop, datasets={"train": str(data)})
    assert base.metrics["rows"] == 20

    # The same data: nothing to say.
    with pd.Trainer(num_workers=1, run=pd.RunConfig(name="same", storage=storage)) as trainer:
        trainer.fit(rows_loop, datasets={"train": str(data)},
                    resume_from_checkpoint=base.checkpoint,
                    data_config=pd.DataConfig(on_data_change="fail"))
        assert trainer.data_changes == []

    pandas.DataFrame({"x": range(15)}).to_parquet(data / "part-1.parquet")
    pandas.DataFrame({"x": range(5)}).to_parquet(data / "part-2.parquet")
    with pd.Trainer(num_workers=1,
                    run=pd.RunConfig(name="strict", storage=storage)) as trainer:
        with pytest.raises(pd.DataChangedError) as refused:
            trainer.fit(rows_loop, datasets={"train": str(data)},
                        resume_from_checkpoint=base.checkpoint,
                        data_config=pd.DataConfig(on_data_change="fail"))
    message = str(refused.value)
    assert f"resuming from checkpoint 1 ({storage}/base/checkpoint_000001-a0) onto data other " \
           "than it was trained on: dataset 'train': part-2.parquet added, part-1.parquet " \
           "rewritten (size " in message
    assert "DataConfig(on_data_change='warn')" in message
    assert not os.path.exists(os.path.join(storage, "strict", "checkpoint_000001-a0"))

    @flow
    def warm_start():
        return pd.train(rows_loop, datasets={"train": str(data)},
                        scaling=pd.ScalingConfig(num_workers=1),
                        run=pd.RunConfig(name="lenient", storage=storage),
                        resume_from_checkpoint=base.checkpoint)

    state = warm_start(return_state=True)
    assert state.result().metrics["rows"] == 30, "trained on the new data"
    logs, artifacts, _ = flow_run_records(state.state_details.flow_run_id)
    assert any("onto data other than it was trained on: dataset 'train': part-2.parquet added"
               in line for line in logs)
    summary = [a for a in artifacts if a.key == "lenient-summary"][0].data
    assert "## Trained on other data than its checkpoint" in summary
    assert "part-2.parquet added, part-1.parquet rewritten" in summary
