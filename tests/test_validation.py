"""Validation off the training path (``pd.Validation``): every committed checkpoint is
validated on its own Ray task (a thread in local mode) while training goes on; its metrics land
in a record beside the manifest, scores and retention use them, a failure is recorded and never
fails training, and what a failed run left validating is validated again by the next."""

from __future__ import annotations

import json
import os
import tempfile
import time

import pytest
from conftest import flow_run_records
from prefect import flow

import prefect_distrain as pd
from prefect_distrain.checkpoints.manager import committed_checkpoints
from prefect_distrain.checkpoints.storage import MANIFESTS, VALIDATIONS

#: What each epoch's checkpoint scores when validated.
ACCURACY = [0.5, 0.9, 0.7, 0.6]


def saving_loop(config):
    """Rank 0 saves its epoch; every rank reports; ``validate`` maps an epoch to report's flag;
    attempt 0 fails on every rank after epoch ``fail_after`` when it is set."""
    rank = pd.get_context().get_world_rank()
    start = pd.get_checkpoint()
    first = 0
    if start is not None:
        with start.as_directory() as folder:
            first = json.load(open(os.path.join(folder, "state.json")))["epoch"] + 1
    for epoch in range(first, config["epochs"]):
        with tempfile.TemporaryDirectory() as folder:
            json.dump({"epoch": epoch}, open(os.path.join(folder, "state.json"), "w"))
            checkpoint = pd.Checkpoint.from_directory(folder) if rank == 0 else None
            pd.report({"epoch": epoch, "loss": 1.0 / (epoch + 1)}, checkpoint=checkpoint,
                      validate=config.get("validate", {}).get(epoch))
        if epoch == config.get("fail_after") and pd.get_context().get_attempt() == 0:
            raise RuntimeError(f"a bug at epoch {epoch}")


def accuracy_of(checkpoint, config):
    """The validation: reads the checkpoint's epoch (a real read of its files, verified)."""
    time.sleep(config.get("sleep", 0.0))
    with checkpoint.as_directory() as folder:
        epoch = json.load(open(os.path.join(folder, "state.json")))["epoch"]
    if epoch in config.get("raise_at", ()):
        raise RuntimeError(f"no labels for epoch {epoch}")
    if epoch in config.get("wrong_at", ()):
        return f"accuracy {ACCURACY[epoch]}"
    return {"val_accuracy": ACCURACY[epoch], "val_epoch": epoch}


def records(storage: str, run: str, folder: str) -> dict[str, dict]:
    path = os.path.join(storage, run, folder)
    return {name[:-len(".json")]: json.load(open(os.path.join(path, name)))
            for name in sorted(os.listdir(path))} if os.path.isdir(path) else {}


@pytest.mark.usefixtures("ray_cluster")
def test_every_checkpoint_is_validated_off_the_training_path_and_scored_by_it(storage_kind):
    validation = pd.Validation(accuracy_of, config={"sleep": 0.5})
    with pd.Trainer(num_workers=2, run=pd.RunConfig(name="validated", **storage_kind),
                    checkpoint=pd.CheckpointConfig(
                        validate=validation, num_to_keep=1,
                        checkpoint_score_attribute="val_accuracy")) as trainer:
        result = trainer.fit(saving_loop, config={"epochs": 3})

    # Retention scored by the validation's metric: the best (epoch 1) and the latest stay.
    assert [(c.index, c.status) for c in result.checkpoints] == [(2, "validated"),
                                                                  (3, "validated")]
    assert [c.metrics["val_accuracy"] for c in result.checkpoints] == [0.9, 0.7]
    assert result.checkpoints[0].metrics["loss"] == 0.5, "the reported metrics stay"
    best, metrics = result.best_checkpoints[0]
    assert best.index == 2 and metrics["val_accuracy"] == 0.9 and metrics["val_epoch"] == 1
    # In storage: the manifests as committed (no validation metric), a record beside each.
    if storage_kind["storage_options"]:
        import s3fs

        fs = s3fs.S3FileSystem(**storage_kind["storage_options"])
        fs.invalidate_cache()

        def read(folder):
            return {p.rsplit("/", 1)[-1][:-len(".json")]: json.loads(fs.cat_file(p))
                    for p in fs.ls(f"models/runs/validated/{folder}", detail=False)}
    else:
        def read(folder):
            return records(storage_kind["storage"], "validated", folder)
    manifests, validations = read(MANIFESTS), read(VALIDATIONS)
    assert sorted(manifests) == sorted(validations) == ["checkpoint_000002-a0",
                                                        "checkpoint_000003-a0"]
    assert all("val_accuracy" not in m["metrics"] for m in manifests.values())
    assert validations["checkpoint_000003-a0"]["status"] == "validated"
    assert validations["checkpoint_000003-a0"]["metrics"] == {"val_accuracy": 0.7,
                                                              "val_epoch": 2}
    # Read back from outside the run, with the same statuses and scores.
    again = pd.best_checkpoint(pd.RunConfig(name="validated", **storage_kind), "val_accuracy",
                               "max")
    assert again.index == 2 and again.status == "validated"


@pytest.mark.usefixtures("ray_cluster")
def test_a_validation_past_its_timeout_is_cancelled_and_recorded(tmp_path):
    validation = pd.Validation(accuracy_of, config={"sleep": 60}, timeout_s=1)
    with pd.Trainer(num_workers=1, run=pd.RunConfig(name="slow", storage=str(tmp_path)),
                    checkpoint=pd.CheckpointConfig(validate=validation)) as trainer:
        result = trainer.fit(saving_loop, config={"epochs": 1})
    [checkpoint] = result.checkpoints
    assert checkpoint.status == "validation failed"
    assert checkpoint.validation.error == ("timed out after 1 s (Validation(timeout_s=...)); it "
                                           "was cancelled")
    assert checkpoint.metrics == {k: v for k, v in checkpoint.manifest.metrics.items()}


@pytest.mark.usefixtures("ray_cluster")
def test_a_validation_that_can_never_start_is_refused_at_once(tmp_path):
    validation = pd.Validation(accuracy_of, resources={"CPU": 3})
    trainer = pd.Trainer(num_workers=2, run=pd.RunConfig(name="starved", storage=str(tmp_path)),
                         checkpoint=pd.CheckpointConfig(validate=validation))
    with pytest.raises(pd.ResourcesUnavailableError) as refused:
        trainer.fit(saving_loop, config={"epochs": 1})
    trainer.shutdown()
    assert "Validation asks for CPU 3 per validation, but beside the 2 workers" in str(
        refused.value)
    assert "pd.Validation(fn, resources={'CPU': 0.5})" in str(refused.value)
    assert not os.path.exists(tmp_path / "starved" / "checkpoint_000001-a0"), "nothing trained"


def test_failures_are_recorded_and_never_fail_training_in_local_mode(tmp_path):
    """validate=True on epochs 0-2 only (every=False); epoch 1's validation raises, epoch 2's
    returns a string: training completes, and each status says what happened."""
    validation = pd.Validation(accuracy_of, every=False,
                               config={"raise_at": [1], "wrong_at": [2]})
    with pd.Trainer(num_workers=0, run=pd.RunConfig(name="local", storage=str(tmp_path)),
                    checkpoint=pd.CheckpointConfig(validate=validation)) as trainer:
        result = trainer.fit(saving_loop, config={"epochs": 4,
                                                  "validate": {0: True, 1: True, 2: True}})
    assert [c.status for c in result.checkpoints] == [
        "validated", "validation failed", "validation failed", "committed"]
    errors = [c.validation.error if c.validation else None for c in result.checkpoints]
    assert errors[:2] == [None, "RuntimeError: no labels for epoch 1"]
    assert errors[2] == ("TypeError: the validation function returned str, not a dict of metric "
                         "name -> value: return e.g. {'val_accuracy': 0.93}")
    assert result.checkpoints[0].metrics["val_accuracy"] == 0.5
    assert sorted(records(str(tmp_path), "local", VALIDATIONS)) == [
        "checkpoint_000001-a0", "checkpoint_000002-a0", "checkpoint_000003-a0"]
    # A promotion keeps the metric it was promoted on; the alias reads the status back.
    entry = pd.promote(result.checkpoints[0], "local", storage=str(tmp_path))
    assert entry.metrics["val_accuracy"] == 0.5 and entry.metrics["loss"] == 1.0
    production = pd.load_alias("local", storage=str(tmp_path))
    assert production.status == "validated" and production.metrics["val_epoch"] == 0


def test_validations_a_failed_run_left_are_run_again_by_its_retry(tmp_path):
    """Attempt 0 fails (a bug on every rank) while checkpoint 1 is being validated: its record
    stays "validating"; the retry validates it again and goes on."""
    run = pd.RunConfig(name="retried", storage=str(tmp_path))
    checkpoints = pd.CheckpointConfig(validate=pd.Validation(accuracy_of, config={"sleep": 3}))
    with pd.Trainer(num_workers=0, run=run, checkpoint=checkpoints) as trainer:
        with pytest.raises(RuntimeError, match="a bug at epoch 0"):
            trainer.fit(saving_loop, config={"epochs": 2, "fail_after": 0})
    left = records(str(tmp_path), "retried", VALIDATIONS)
    assert {k: v["status"] for k, v in left.items()} == {"checkpoint_000001-a0": "validating"}

    with pd.Trainer(num_workers=0, run=run, checkpoint=checkpoints) as trainer:
        result = trainer.fit(saving_loop, config={"epochs": 2}, resume_from_checkpoint="latest")
    assert [(c.index, c.status, c.metrics.get("val_epoch")) for c in result.checkpoints] == [
        (1, "validated", 0), (2, "validated", 1)]


def test_bad_validation_inputs_are_refused_with_the_fix(tmp_path):
    with pytest.raises(pd.ConfigurationError, match=r"takes a function fn\(checkpoint, config"):
        pd.Validation("accuracy")
    with pytest.raises(pd.ConfigurationError, match=r"takes a pd.Validation\(fn, ...\), got "
                                                     "function"):
        pd.CheckpointConfig(validate=accuracy_of)
    with pytest.raises(pd.ConfigurationError, match="max_in_flight=0"):
        pd.Validation(accuracy_of, max_in_flight=0)
    with pytest.raises(pd.ConfigurationError, match=r"resources=\{'CPU': -1\}"):
        pd.Validation(accuracy_of, resources={"CPU": -1})
    with pytest.raises(pd.ConfigurationError, match="timeout_s=0"):
        pd.Validation(accuracy_of, timeout_s=0)
    # validate=True with no validation function: refused at that report, not ignored
    with pd.Trainer(num_workers=0,
                    run=pd.RunConfig(name="no-fn", storage=str(tmp_path))) as trainer:
        with pytest.raises(pd.ConfigurationError, match=r"report\(\.\.\., validate=True\) but "
                                                        "the run has no validation function"):
            trainer.fit(saving_loop, config={"epochs": 1, "validate": {0: True}})


@pytest.mark.usefixtures("ray_cluster", "prefect_server")
def test_statuses_reach_prefect_as_events_and_the_checkpoint_table(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    @flow
    def validated_flow():
        return pd.train(saving_loop, config={"epochs": 2, "validate": {1: False}},
                        scaling=pd.ScalingConfig(num_workers=2),
                        run=pd.RunConfig(name="shown", storage=str(tmp_path)),
                        checkpoint=pd.CheckpointConfig(
                            validate=pd.Validation(accuracy_of, config={"raise_at": [0]})))

    state = validated_flow(return_state=True)
    result = state.result()
    assert [c.status for c in result.checkpoints] == ["validation failed", "committed"]
    _, artifacts, _ = flow_run_records(state.state_details.flow_run_id)
    [table] = [a for a in artifacts if a.key == "shown-checkpoints"]
    assert sorted((row["index"], row["status"]) for row in json.loads(table.data)) == [
        (1, "validation failed"), (2, "committed")]
    EventsWorker.drain_all(timeout=60)
    wanted = EventFilter(event=EventNameFilter(name=["prefect-distrain.checkpoint.validated"]),
                         resource=EventResourceFilter(id_prefix=["prefect-distrain.checkpoint."
                                                                 "shown."]))
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while not (events := client.read_events(wanted, limit=10).events) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
    [event] = events
    assert event.payload["index"] == 1 and event.payload["status"] == "validation failed"
    assert event.payload["error"] == "RuntimeError: no labels for epoch 0"


def epoch_of(checkpoint):
    """A validation that takes the checkpoint only."""
    with checkpoint.as_directory() as folder:
        return {"val_epoch": json.load(open(os.path.join(folder, "state.json")))["epoch"]}


def test_a_one_argument_validation_and_records_that_are_not_its_own(tmp_path):
    """fn(checkpoint) works as fn(checkpoint, config) does; a record that is not one, or was
    made for another commit of the same folder, is never read as the checkpoint's."""
    run = pd.RunConfig(name="own", storage=str(tmp_path))
    with pd.Trainer(num_workers=0, run=run, checkpoint=pd.CheckpointConfig(
            validate=pd.Validation(epoch_of))) as trainer:
        result = trainer.fit(saving_loop, config={"epochs": 2})
    assert [(c.status, c.metrics["val_epoch"]) for c in result.checkpoints] == [
        ("validated", 0), ("validated", 1)]
    folder = tmp_path / "own" / VALIDATIONS
    first, second = (folder / "checkpoint_000001-a0.json", folder / "checkpoint_000002-a0.json")
    stale = json.loads(first.read_text())
    first.write_text(json.dumps({**stale, "committed_at": "2020-01-01T00:00:00+00:00"}))
    second.write_text(json.dumps({**json.loads(second.read_text()),
                                  "metrics": {"_auto_checkpoint_pass": 99}}))
    read = committed_checkpoints(run)
    assert [(c.index, c.status, c.metrics.get("_auto_checkpoint_pass")) for c in read] == [
        (1, "committed", None), (2, "committed", None)]
