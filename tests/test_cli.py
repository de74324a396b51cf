"""``prefect-distrain``, the command line over a run's storage: on a run that real training
wrote (local disk and moto S3), with a torn folder and a tampered file as storage holds them
after a crash or a careless hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
from conftest import S3_SECRET
from typer.testing import CliRunner

import prefect_distrain as pd
from prefect_distrain.checkpoints.lease import holder_identity
from prefect_distrain.checkpoints.manager import CheckpointManager
from prefect_distrain.checkpoints.storage import RunStorage
from prefect_distrain.cli import app

pytestmark = pytest.mark.usefixtures("ray_cluster")

LOSSES = [0.9, 0.2, 0.5]


def loss_loop(config):
    for epoch, loss in enumerate(config["losses"]):
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "weights.bin"), "wb") as handle:
                handle.write(bytes([epoch]) * 1000)
            pd.report({"loss": loss, "epoch": epoch},
                      checkpoint=pd.Checkpoint.from_directory(folder))


def train_a_run(storage: str, options: dict) -> None:
    run = pd.RunConfig(name="digits", storage=storage, storage_options=options)
    with pd.Trainer(num_workers=1, run=run) as trainer:
        trainer.fit(loss_loop, config={"losses": LOSSES})


def cli(*args: str) -> tuple[int, str]:
    done = CliRunner().invoke(app, list(args))
    return done.exit_code, done.output


def as_json(*args: str):
    code, output = cli(*args, "--json")
    assert code == 0, output
    return json.loads(output)


def test_a_local_run_listed_verified_ranked_and_tidied(tmp_path):
    storage = str(tmp_path / "runs")
    train_a_run(storage, {})
    run = f"{storage}/digits"
    # A torn folder of an attempt that is over (its writer died mid-upload).
    os.makedirs(f"{run}/checkpoint_000004-a7")
    open(f"{run}/checkpoint_000004-a7/weights.bin", "wb").write(b"half")

    [listed] = as_json("runs", "ls", storage)
    assert listed == {"run": "digits", "checkpoints": 3, "latest": 3, "attempts": 1,
                      "last attempt": "completed", "bad manifests": None}
    rows = as_json("checkpoints", "ls", run, "--verify")
    assert [(r["index"], r["status"]) for r in rows] == [
        (1, "verified"), (2, "verified"), (3, "verified"),
        (4, "torn (no manifest: never used)")]
    assert rows[0]["files"] == 1 and rows[0]["size"] == 1000
    assert json.loads(rows[1]["metrics"])["loss"] == 0.2

    assert cli("best", run, "--metric", "loss", "--mode", "min") == (
        0, f"{run}/checkpoint_000002-a0\n")
    assert cli("best", run, "--metric", "loss", "--mode", "max")[1].endswith("000001-a0\n")
    code, output = cli("best", run, "--metric", "accuracy")
    assert code == 1 and "no committed checkpoint has a value of 'accuracy'" in output

    [attempt] = as_json("attempts", run)
    assert attempt["status"] == "completed" and attempt["world_size"] == 1

    assert as_json("gc", run, "--dry-run") == [
        {"folder": "checkpoint_000004-a7", "action": "would remove"}]
    assert os.path.isdir(f"{run}/checkpoint_000004-a7")
    assert as_json("gc", run) == [{"folder": "checkpoint_000004-a7", "action": "removed"}]
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint_")) == [
        "checkpoint_000001-a0", "checkpoint_000002-a0", "checkpoint_000003-a0"]

    # A committed file changed by hand: verify says which, and fails.
    open(f"{run}/checkpoint_000002-a0/weights.bin", "wb").write(b"\x00" * 1000)
    code, output = cli("verify", run, "2", "--json")
    assert code == 1
    [row] = json.loads(output)
    assert row["verified"] is False and "'weights.bin' does not match its manifest" in \
        row["problem"]
    assert cli("verify", run, "3")[0] == 0


def test_gc_leaves_a_run_in_use_alone(tmp_path):
    storage = str(tmp_path / "runs")
    train_a_run(storage, {})
    writer = CheckpointManager(RunStorage(storage, "digits"))
    writer.open(holder_identity(), timeout_s=60)  # a live writer holds the run
    try:
        code, output = cli("gc", f"{storage}/digits")
    finally:
        writer.close()
    assert code == 2 and "RunInUseError" not in output and "in use" in output.lower(), output


def test_an_s3_run_with_credentials_that_are_never_printed(s3_storage):
    options = s3_storage["storage_options"]
    train_a_run(s3_storage["storage"], options)
    given = ("--storage-options", json.dumps(options))
    [listed] = as_json("runs", "ls", s3_storage["storage"], *given)
    assert (listed["run"], listed["checkpoints"]) == ("digits", 3)
    code, output = cli("checkpoints", "ls", "s3://models/runs/digits", "--verify", *given)
    assert code == 0 and output.count("verified") == 3 and S3_SECRET not in output


def test_bad_input_names_the_fix(tmp_path):
    code, output = cli("checkpoints", "ls", str(tmp_path))
    assert code == 2 and "is not a prefect-distrain run" in output
    assert "prefect-distrain runs ls" in output
    code, output = cli("attempts", str(tmp_path / "x"), "--storage-options", "{key: 1}")
    assert code == 2 and "--storage-options is not JSON" in output
    code, output = cli("best", str(tmp_path / "x"), "--metric", "loss", "--mode", "lowest")
    assert code == 2 and "--mode 'lowest': use min or max" in output
    done = subprocess.run([sys.executable, "-m", "prefect_distrain", "runs", "ls",
                           str(tmp_path / "nowhere")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "does not exist" in done.stderr
