"""Experiment trackers on real runs: TensorBoard event files on local disk and S3 (moto), MLflow
on file:, sqlite: and a real tracking server, W&B offline runs, and trackers that fail.

Everything written is read back with the tool's own reader: TensorBoard's EventAccumulator,
``MlflowClient``, ``wandb leet inspect --json``.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import S3_SECRET, _free_port, wait_until_serving

import prefect_distrain as pd
from prefect_distrain.checkpoints.fs import redact_url
from prefect_distrain.checkpoints.manifest import Manifest
from prefect_distrain.checkpoints.storage import RunStorage
from prefect_distrain.integrations.trackers import (
    MLflowLogger,
    TensorBoardLogger,
    WandbLogger,
    flatten,
    scalars,
)

pytestmark = pytest.mark.usefixtures("ray_cluster")

BIN = os.path.dirname(sys.executable)
CONFIG = {"optimizer": {"lr": 0.1, "name": "sgd"}, "steps": 4, "api_key": "do-not-log"}
PARAMS = {"optimizer.lr": "0.1", "optimizer.name": "sgd", "steps": "4", "api_key": "<redacted>"}


def tracked_loop(config):
    """Rank r reports loss 1/s + r at step s; rank 0 checkpoints every second step.
    ``config["kill"]`` = [step, rank]: SIGKILL that rank before that step, on attempt 0."""
    ctx = pd.get_context()
    rank = ctx.get_world_rank()
    start = 1
    if (checkpoint := pd.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            start = int(pathlib.Path(folder, "model.txt").read_text().split()[1]) + 1
    for step in range(start, config["steps"] + 1):
        if ctx.get_attempt() == 0 and [step, rank] == config.get("kill"):
            # Rank 0's last checkpoint (of an even step) is committed before the kill.
            last = max(s for s in range(2, step, 2))
            manifest = pathlib.Path(ctx.get_storage(), "_manifests",
                                    f"checkpoint_{last:06d}-a0.json")
            deadline = time.monotonic() + 120
            while not manifest.exists():
                assert time.monotonic() < deadline, f"checkpoint {last} was never committed"
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        metrics = {"loss": 1.0 / step + rank, "acc": step * 0.1, "converged": False,
                   "phase": "train", "grad": {"norm": step * 2.0}}
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0 and step % 2 == 0:
                with open(os.path.join(folder, "model.txt"), "w") as handle:
                    handle.write(f"step {step}")
            pd.report(metrics, checkpoint=pd.Checkpoint.from_directory(folder)
                      if rank == 0 and step % 2 == 0 else None)
    return rank


def expected_loss(step: int, rank: int = 0) -> float:
    return 1.0 / step + rank


@pytest.fixture(autouse=True)
def library_environment():
    """Importing tensorboardX sets CRC32C_SW_MODE, and wandb.init sets WANDB_SERVICE, in the
    driver's os.environ: the libraries' doing, undone after each test for env_police."""
    before = {name: os.environ.get(name) for name in ("CRC32C_SW_MODE", "WANDB_SERVICE")}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class InfoRecorder(pd.TrainingCallback):
    def __init__(self):
        self.info = []

    def start_training(self, logdir, config, **info):
        self.info.append(info)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(self.format(record))


def capturing_logger(name: str) -> tuple[logging.Logger, Records]:
    logger = logging.getLogger(f"test_trackers.{name}")
    logger.setLevel(logging.DEBUG)
    records = Records()
    logger.addHandler(records)
    return logger, records


# -- helpers ---------------------------------------------------------------------------------------


_READ_EVENTS = """
import json, sys, types
# TensorBoard's stand-in for TensorFlow: reading needs none, and importing TF would change
# the environment of the process (and take seconds).
sys.modules["tensorboard.compat.notf"] = types.ModuleType("notf")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
accumulator = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
accumulator.Reload()
print(json.dumps({tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
                  for tag in accumulator.Tags()["scalars"]}))
"""


def read_events(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard log folder, read by TensorBoard's own reader."""
    out = subprocess.run([sys.executable, "-c", _READ_EVENTS, str(folder)], capture_output=True,
                         text=True, timeout=120, check=True)
    return {tag: [tuple(point) for point in points]
            for tag, points in json.loads(out.stdout).items()}


def assert_curves(events: dict, prefix: str = "", rank: int = 0, steps=range(1, 5)) -> None:
    assert events[f"{prefix}loss"] == [(s, pytest.approx(expected_loss(s, rank))) for s in steps]
    assert events[f"{prefix}acc"] == [(s, pytest.approx(s * 0.1)) for s in steps]
    assert events[f"{prefix}grad/norm"] == [(s, pytest.approx(s * 2.0)) for s in steps]


def test_flatten_masks_secrets_and_scalars_keep_only_numbers():
    flat = flatten({"opt": {"lr": 0.1}, "storage_options": {"secret": S3_SECRET},
                    "AWS_ACCESS_KEY": "AKIA", "layers": [1, 2], "none": None})
    assert flat == {"opt.lr": 0.1, "storage_options": "<redacted>",
                    "AWS_ACCESS_KEY": "<redacted>", "layers": "[1, 2]", "none": None}
    assert flatten(None) == {} and flatten(3) == {"config": 3}
    import numpy as np
    import torch

    assert scalars({"loss": 1, "ok": True, "_timestamp": 5, "name": "x", "g": {"n": 2.5},
                    "np": np.float32(0.5), "t": torch.tensor(2.0), "flag": np.bool_(True),
                    "vector": torch.ones(3)}) == {"loss": 1.0, "g/n": 2.5, "np": 0.5, "t": 2.0}


def test_a_missing_package_names_the_extra(monkeypatch):
    for module, cls, extra in (("tensorboardX", TensorBoardLogger, "tensorboard"),
                               ("mlflow", MLflowLogger, "mlflow"), ("wandb", WandbLogger, "wandb")):
        monkeypatch.setitem(sys.modules, module, None)
        with pytest.raises(ImportError, match=rf"pip install 'prefect-distrain\[{extra}\]'"):
            cls()


# -- TensorBoard -----------------------------------------------------------------------------------


def needs(*modules: str) -> None:
    """Skip, naming the missing package, where an extra is not installed."""
    for module in modules:
        pytest.importorskip(module, reason=f"{module} is not installed (see pyproject's extras)")


def test_tensorboard_local_run_shows_every_scalar_at_its_step(tmp_path):
    needs("tensorboardX", "tensorboard")
    run = pd.RunConfig(name="tb", storage=str(tmp_path / "runs"))
    with pd.Trainer(num_workers=2, run=run) as trainer:
        result = trainer.fit(tracked_loop, config=CONFIG,
                             callbacks=[TensorBoardLogger(flush_every_s=0)])
    assert [m["_training_iteration"] for m in result.metrics_history] == [1, 2, 3, 4]
    folder = tmp_path / "runs" / "tb" / "tensorboard"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    events = read_events(folder)
    assert set(events) == {"loss", "acc", "grad/norm"}, "no bools, strings or internal keys"
    assert_curves(events)


def test_tensorboard_all_ranks_on_s3(s3_storage, tmp_path):
    import s3fs

    needs("tensorboardX", "tensorboard")
    run = pd.RunConfig(name="tb-s3", **s3_storage)
    recorder = InfoRecorder()
    with pd.Trainer(num_workers=2, run=run) as trainer:
        trainer.fit(tracked_loop, config=CONFIG,
                    callbacks=[recorder, TensorBoardLogger(all_ranks=True)])
    assert "storage" in recorder.info[0], "start_training gets the run's storage"
    fs = s3fs.S3FileSystem(**s3_storage["storage_options"])
    fs.invalidate_cache()
    remote = "models/runs/tb-s3/tensorboard"
    assert fs.ls(remote), "event files uploaded next to the run"
    local = tmp_path / "downloaded"
    fs.get(remote + "/", str(local) + "/", recursive=True)
    events = read_events(local)
    assert set(events) == {f"rank_{r}/{k}" for r in (0, 1) for k in ("loss", "acc", "grad/norm")}
    for rank in (0, 1):
        assert_curves(events, prefix=f"rank_{rank}/", rank=rank)


def test_trackers_driven_directly_on_s3_tolerate_missing_rank0_and_restarts(s3_storage, tmp_path):
    """The hooks as the controller calls them, with ``storage=`` in the info: credentials reach
    the storage, never the tracker; an iteration without rank 0's metrics is skipped."""
    import s3fs

    needs("tensorboardX", "tensorboard", "mlflow")
    from mlflow.tracking import MlflowClient

    storage = RunStorage(s3_storage["storage"], "direct", s3_storage["storage_options"])
    source = tmp_path / "checkpoint"
    source.mkdir()
    (source / "model.txt").write_text("weights")
    files = storage.upload(str(source), index=1, attempt=0, rank=0)
    manifest = Manifest.new(1, 0, files, metrics={"loss": 0.5}, world_size=1, backend="torch",
                            lease=None)
    storage.write_manifest(manifest)
    checkpoint = storage.checkpoint(manifest).without_credentials()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_logger = MLflowLogger(uri, log_checkpoints="artifacts",
                                 artifact_location=str(tmp_path / "artifacts"))
    tensorboard = TensorBoardLogger()
    logdir = redact_url(storage.run_url)
    config = {"lr": 0.1, "storage_options": storage.storage_options}
    for attempt in (0, 1):  # a restart: the same MLflow run, a second event file
        info = {"world_size": 1, "backend": "torch", "run_name": "direct", "attempt": attempt,
                "storage": storage}
        for tracker in (mlflow_logger, tensorboard):
            tracker.start_training(logdir, config, **info)
            tracker.start_training(logdir, config, **info)  # idempotent
            for results in ([], [None], [{}], [{"loss": 0.5}]):
                tracker.handle_result(results, training_iteration=1)
            tracker.handle_result([{"loss": 0.25, "_training_iteration": 2 + attempt}],
                                  training_iteration=2 + attempt)
        mlflow_logger.on_checkpoint_commit(checkpoint, index=1, attempt=attempt)
        for tracker in (mlflow_logger, tensorboard):
            tracker.finish_training(error=attempt == 0)

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("prefect-distrain").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params == {"lr": "0.1", "storage_options": "<redacted>"}
    assert run.data.tags["checkpoint_1"] == checkpoint.path
    assert run.data.tags["prefect_distrain.attempt"] == "1"
    assert S3_SECRET not in json.dumps([run.data.params, run.data.tags])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert {(m.step, m.value) for m in history} == {(1, 0.5), (2, 0.25), (3, 0.25)}
    target = client.download_artifacts(run.info.run_id, "checkpoints/checkpoint_1",
                                       str(tmp_path / "fetched"))
    assert pathlib.Path(target, "model.txt").read_text() == "weights"

    fs = s3fs.S3FileSystem(**s3_storage["storage_options"])
    fs.invalidate_cache()
    fs.get("models/runs/direct/tensorboard/", str(tmp_path / "tb") + "/", recursive=True)
    assert len(os.listdir(tmp_path / "tb")) == 2, "one event file per attempt"
    assert read_events(tmp_path / "tb")["loss"] == [(1, 0.5), (3, 0.25)], \
        "the restart's steps replace the redone ones"


# -- MLflow ----------------------------------------------------------------------------------------


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on sqlite, in its own process group, stopped by handle."""
    needs("mlflow")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [os.path.join(BIN, "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=tmp_path, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url + "/health", server, timeout=120)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def test_mlflow_params_metrics_and_checkpoints_across_a_restart(tmp_path, monkeypatch,
                                                                mlflow_server):
    needs("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 deprecates file: stores
    stores = {
        "file": (f"file:{tmp_path / 'mlruns'}", {"log_checkpoints": "uri"}),
        "sqlite": (f"sqlite:///{tmp_path / 'mlflow.db'}",
                   {"log_checkpoints": "artifacts", "run_name": "custom",
                    "artifact_location": str(tmp_path / "artifacts"), "tags": {"team": "ml"}}),
        "server": (mlflow_server, {"log_checkpoints": "artifacts"}),
    }
    loggers = {k: MLflowLogger(uri, experiment="exp", **kw) for k, (uri, kw) in stores.items()}
    run = pd.RunConfig(name="ml", storage=str(tmp_path / "runs"))
    with pd.Trainer(num_workers=2, run=run, failure=pd.FailureConfig(max_failures=1)) as trainer:
        result = trainer.fit(tracked_loop, config={**CONFIG, "kill": [3, 1]},
                             callbacks=list(loggers.values()))
        assert result.failures == 1
        # A new logger (a new process, a Prefect retry) finds the same MLflow run by its URL.
        again = MLflowLogger(stores["file"][0], experiment="exp")
        resumed = trainer.fit(tracked_loop, config={**CONFIG, "steps": 6},
                              resume_from_checkpoint="latest", callbacks=[again])
    assert [m["_training_iteration"] for m in resumed.metrics_history] == [5, 6]
    checkpoints = {c.index: c.path for c, _ in result.best_checkpoints}
    assert sorted(checkpoints) == [2, 4]

    for kind, (uri, kw) in stores.items():
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
        assert len(runs) == 1, f"{kind}: one MLflow run for the run and its restart"
        mlrun = runs[0]
        assert mlrun.info.status == "FINISHED"
        assert mlrun.info.run_name == ("custom" if kind == "sqlite" else "ml")
        assert mlrun.data.params == {**PARAMS, "kill": "[3, 1]"}
        assert mlrun.data.tags["prefect_distrain.run_url"] == result.path
        assert mlrun.data.tags["prefect_distrain.attempt"] == ("2" if kind == "file" else "1")
        assert mlrun.data.tags.get("team") == ("ml" if kind == "sqlite" else None)
        last = 6 if kind == "file" else 4
        assert mlrun.data.tags["latest_checkpoint"] == (
            checkpoints[4] if kind != "file" else resumed.checkpoint.path)
        for index, path in checkpoints.items():
            assert mlrun.data.tags[f"checkpoint_{index}"] == path
        history = {}
        for metric in ("loss", "acc", "grad/norm"):
            for m in client.get_metric_history(mlrun.info.run_id, metric):
                history.setdefault(metric, set()).add((m.step, round(m.value, 6)))
        assert history["loss"] == {(s, round(expected_loss(s), 6)) for s in range(1, last + 1)}
        assert history["grad/norm"] == {(s, s * 2.0) for s in range(1, last + 1)}
        assert set(mlrun.data.metrics) == {"loss", "acc", "grad/norm"}
        if kw["log_checkpoints"] == "artifacts":
            for index in checkpoints:
                folder = client.download_artifacts(mlrun.info.run_id,
                                                   f"checkpoints/checkpoint_{index}",
                                                   str(tmp_path / f"{kind}-{index}"))
                assert pathlib.Path(folder, "model.txt").read_text() == f"step {index}"
        else:
            assert client.list_artifacts(mlrun.info.run_id) == []


def test_a_failing_tracker_does_not_stop_training(tmp_path, monkeypatch):
    """A tracking server down from the start, and one that goes away mid-run: training ends
    complete; each failure is logged once, then the tracker stays off for the attempt."""
    needs("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail in seconds, not minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    dead = "http://127.0.0.1:9"

    class ServerGoesAway(MLflowLogger):
        def handle_result(self, results, **info):
            if info["training_iteration"] == 2:
                self._client = MlflowClient(dead)
            super().handle_result(results, **info)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    goes_away = ServerGoesAway(uri, artifact_location=str(tmp_path / "artifacts"))
    logger, records = capturing_logger("failing")
    run = pd.RunConfig(name="failing", storage=str(tmp_path / "runs"))
    with pd.Trainer(num_workers=2, run=run, logger=logger) as trainer:
        result = trainer.fit(tracked_loop, config=CONFIG,
                             callbacks=[MLflowLogger(dead), goes_away])
    assert [m["_training_iteration"] for m in result.metrics_history] == [1, 2, 3, 4]
    assert result.worker_results == [0, 1] and result.checkpoint.index == 4
    failed = [m for m in records.messages if "failed; training goes on" in m]
    assert [m.splitlines()[0] for m in failed] == [
        "Callback MLflowLogger.start_training failed; training goes on",
        "Callback ServerGoesAway.handle_result failed; training goes on"]
    assert "127.0.0.1" in failed[0], "the traceback says which server"
    client = MlflowClient(uri)
    history = client.get_metric_history(goes_away.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0)]
    assert client.get_run(goes_away.run_id).info.status == "RUNNING", "no call to a dead server"


# -- Weights & Biases ------------------------------------------------------------------------------


def read_wandb_offline(folder, runs: int = 1) -> list[dict]:
    """The records of the offline runs under ``folder`` (oldest first), by wandb's reader."""
    found = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(found) == runs, found
    records = []
    for run in found:
        out = subprocess.run([os.path.join(BIN, "wandb"), "leet", "inspect", "--json", str(run)],
                             capture_output=True, text=True, timeout=120, check=True)
        records += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return records


def test_wandb_restart_resumes_the_same_run_and_skips_missing_rank0(tmp_path):
    needs("wandb")
    import wandb

    logger = WandbLogger(project="tests", dir=str(tmp_path))
    try:
        for attempt, steps in ((0, (1, 2, 3)), (1, (3, 4))):
            logger.start_training("/runs/restarted", {"lr": 0.1}, world_size=2, backend="torch",
                                  run_name="restarted", attempt=attempt)
            logger.start_training("/runs/restarted", {"lr": 0.1}, world_size=2, backend="torch",
                                  run_name="restarted", attempt=attempt)  # idempotent
            for results in ([], [None], [{}], [{"_training_iteration": 9}]):
                logger.handle_result(results, training_iteration=9)
            for step in steps:
                logger.handle_result([{"loss": step + attempt, "_training_iteration": step}],
                                     training_iteration=step)
            logger.finish_training(error=attempt == 0)
            time.sleep(1.1)  # offline folders are named by the second (a real restart is slower)
    finally:
        wandb.teardown()
    records = read_wandb_offline(tmp_path, runs=2)
    assert {r["run"]["run_id"] for r in records if r["type"] == "run"} == {logger.run_id}
    assert [(r["history"]["item"]["_step"], r["history"]["item"]["loss"])
            for r in records if r["type"] == "history"] == [(1, 1), (2, 2), (3, 3), (3, 4), (4, 5)]
    assert [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"] == [1, 0]


def test_wandb_offline_run_holds_config_history_and_checkpoints(tmp_path):
    needs("wandb")
    import wandb

    folders = {"path": tmp_path / "wandb-path", "reference": tmp_path / "wandb-reference"}
    for folder in folders.values():
        folder.mkdir()
    loggers = [WandbLogger(project="tests", dir=str(folder), log_checkpoints=kind)
               for kind, folder in folders.items()]
    run = pd.RunConfig(name="wb", storage=str(tmp_path / "runs"))
    try:
        with pd.Trainer(num_workers=2, run=run) as trainer:
            result = trainer.fit(tracked_loop, config=CONFIG, callbacks=loggers)
    finally:
        wandb.teardown()  # stops the wandb-core process wandb.init started
    checkpoints = {c.index: c.path for c, _ in result.best_checkpoints}
    for kind, folder in folders.items():
        records = read_wandb_offline(folder)
        by_type: dict[str, list] = {}
        for record in records:
            by_type.setdefault(record["type"], []).append(record[record["type"]])
        (run_record,) = by_type["run"]
        assert run_record["display_name"] == "wb" and run_record["project"] == "tests"
        config = {k: v for k, v in run_record["config"]["update"].items() if k != "_wandb"}
        assert config == {"optimizer.lr": 0.1, "optimizer.name": "sgd", "steps": 4,
                          "api_key": "<redacted>"}
        history = [h["item"] for h in by_type["history"]]
        assert [(h["_step"], h["loss"]) for h in history] == \
            [(s, pytest.approx(expected_loss(s))) for s in range(1, 5)]
        assert all(set(h) - {"_step", "_runtime", "_timestamp"} == {"loss", "acc", "grad/norm"}
                   for h in history)
        summary = {}
        for update in by_type["summary"]:
            summary.update(update.get("update", {}))
        assert summary["latest_checkpoint"] == checkpoints[4]
        assert summary["checkpoint_2"] == checkpoints[2]
        assert by_type["exit"][-1].get("exit_code", 0) == 0
        artifacts = by_type.get("artifact", [])
        if kind == "reference":
            assert [a["type"] for a in artifacts] == ["model", "model"]
            assert checkpoints[2] in json.dumps(artifacts[0])
            assert checkpoints[4] in json.dumps(artifacts[1])
        else:
            assert artifacts == []
