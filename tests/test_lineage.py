"""A run is a Prefect asset: its model, materialized from the data an upstream @materialize task
wrote and from the run it resumed from; the events are read back from the Prefect API."""

from __future__ import annotations

import os
import time

import pytest
from prefect import flow, task
from prefect.assets import materialize

import prefect_distrain as pd

pytestmark = pytest.mark.usefixtures("ray_cluster", "prefect_server")


def data_loop(config):
    with open(config["data"]) as f:
        rows = [float(line) for line in f]
    pd.report({"mean": sum(rows) / len(rows)})


def asset_events(keys: set[str], expected: int) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=60)
    wanted = EventFilter(event=EventNameFilter(prefix=["prefect.asset."]),
                         resource=EventResourceFilter(id=sorted(keys)))
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            events = client.read_events(wanted, limit=50).events
            if len(events) >= expected or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


def test_the_model_asset_comes_from_the_data_and_the_run_it_resumed(tmp_path):
    data_url = f"file://{tmp_path}/data/rows.txt"
    runs = tmp_path / "runs"

    @materialize(data_url)
    def write_rows() -> str:
        os.makedirs(tmp_path / "data", exist_ok=True)
        (tmp_path / "data" / "rows.txt").write_text("1\n2\n3\n")
        return str(tmp_path / "data" / "rows.txt")

    @task
    def consume(result: pd.TrainResult) -> float:
        return result.metrics["mean"]

    @flow(retries=0)
    def pipeline():
        path = write_rows()
        first = pd.train(data_loop, config={"data": path}, scaling=pd.ScalingConfig(num_workers=1),
                         run=pd.RunConfig(name="first", storage=str(runs)))
        consume(first)
        return first

    assert pipeline().metrics["mean"] == 2.0
    model = f"file://{runs}/first"
    [materialized] = [e for e in asset_events({model}, 1)
                      if e.event == "prefect.asset.materialization.succeeded"]
    related = {(r.id, r.role) for r in materialized.related}
    assert (data_url, "asset") in related, related
    assert ("prefect-distrain", "asset-materialized-by") in related
    payload = materialized.payload
    assert payload["backend"] == "torch" and payload["world_size"] == 1
    assert payload["metrics"] == {"mean": 2.0} and payload["run"] == "first"
    assert len(payload["config_sha256"]) == 64

    # a run resumed from another run's checkpoint has that run upstream
    @flow(retries=0)
    def with_checkpoint():
        return pd.train(checkpoint_loop, scaling=pd.ScalingConfig(num_workers=1),
                        run=pd.RunConfig(name="base", storage=str(runs)))

    base = with_checkpoint()

    @flow(retries=0)
    def fine_tune():
        return pd.train(data_loop, config={"data": str(tmp_path / "data" / "rows.txt")},
                        scaling=pd.ScalingConfig(num_workers=1),
                        run=pd.RunConfig(name="tuned", storage=str(runs)),
                        resume_from_checkpoint=base.checkpoint)

    fine_tune()
    tuned = f"file://{runs}/tuned"
    [event] = [e for e in asset_events({tuned}, 1)
               if e.event == "prefect.asset.materialization.succeeded"]
    assert (f"file://{runs}/base", "asset") in {(r.id, r.role) for r in event.related}


def checkpoint_loop():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "w.txt"), "w") as f:
            f.write("w")
        pd.report({"loss": 1.0}, checkpoint=pd.Checkpoint.from_directory(folder))


def test_the_example_pipelines_asset_graph_goes_from_the_data_to_the_model(tmp_path):
    """flows/pipeline.py: the data set it publishes is an asset with its metadata, and the
    model asset of its run is made from it (with the best validated checkpoint's metrics)."""
    from conftest import load_flow

    score = load_flow("pipeline").pipeline(storage=str(tmp_path), epochs=2, num_workers=1)
    data = f"file://{tmp_path}/datasets/digits-seed0.npz"
    [run] = [p for p in os.listdir(tmp_path) if p != "datasets"]
    model = f"file://{tmp_path}/{run}"
    events = asset_events({data, model}, 3)
    [published] = [e for e in events if e.event == "prefect.asset.materialization.succeeded"
                   and e.resource.id == data]
    assert published.resource.get("prefect.resource.name") == "digits-data"
    assert published.payload == {"seed": 0, "train_rows": 1347, "test_rows": 450}
    assert ("scikit-learn", "asset-materialized-by") in {(r.id, r.role)
                                                         for r in published.related}
    [trained] = [e for e in events if e.event == "prefect.asset.materialization.succeeded"
                 and e.resource.id == model]
    assert (data, "asset") in {(r.id, r.role) for r in trained.related}
    assert trained.payload["run"] == run and 0.8 < trained.payload["metrics"]["val_accuracy"]
    assert score == pytest.approx(trained.payload["metrics"]["val_accuracy"])
