"""Fault tolerance on one node: restarts after SIGKILL, Prefect retries that resume, a killed
driver, and the user's bug that is never retried. Each fault happens once, keyed on the attempt.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import ray
from conftest import TESTS, assert_no_train_actors, flow_run_records, live_train_actors
from fault_loops import deterministic_loop, ledger, same_weights, uninterrupted
from prefect import flow

import prefect_distrain as pd

pytestmark = pytest.mark.usefixtures("ray_cluster")

EPOCHS = 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must match bit for bit."""
    return uninterrupted(tmp_path_factory, EPOCHS)


@pytest.mark.parametrize("kills", [
    {0: [2, 3, 1]},
    {0: [1, 5, 1], 1: [3, 0, 0], 2: [4, 7, 1]},
], ids=["one-kill", "three-kills"])
def test_sigkilled_worker_restarts_and_ends_bit_identical(tmp_path, reference, kills):
    run = pd.RunConfig(name="killed", storage=str(tmp_path))
    with pd.Trainer(num_workers=2, run=run, failure=pd.FailureConfig(max_failures=3)) as trainer:
        result = trainer.fit(deterministic_loop, config={"epochs": EPOCHS, "kills": kills})
    assert result.failures == len(kills) and result.attempt == len(kills)
    assert all(same_weights(r, reference) for r in result.worker_results)
    assert [m["epoch"] for m in result.metrics_history] == list(range(EPOCHS))
    attempts = ledger(str(tmp_path), "killed")
    assert [a["status"] for a in attempts] == ["failed"] * len(kills) + ["completed"]
    assert all("WorkerLostError" in a["cause"] for a in attempts[:-1])
    # Killed in epoch e: the restart resumes from the checkpoint of epoch e-1 (index e). It is
    # committed before the kill: rank 0 got past its sync report of epoch e-1 (committed once
    # both ranks' reports were in), and a step of epoch e on rank 1 (step > 0) needed rank 0's
    # gradients of that epoch.
    for attempt, (epoch, _, _) in kills.items():
        resumed = attempts[attempt + 1]["resumed_from"]
        index = int(re.search(r"checkpoint_(\d+)-a(\d+)$", resumed).group(1))
        assert resumed.endswith(f"-a{attempt}") and index == epoch
        assert attempts[attempt + 1]["steps_redone"] == attempts[attempt]["last_reported"] - index
    assert_no_train_actors()


@pytest.mark.timeout(300)
def test_a_lost_worker_restarts_without_waiting_out_the_error_window(
        tmp_path, reference, monkeypatch):
    """A lost worker decides the failure, so the driver does not wait out the error window for
    its peer, which waits for the dead rank (killed at the first step of an epoch: the peer is
    in the epoch's first allreduce or still in its sync report of the last one). With a window
    of an hour the run still restarts, resumes and ends bit-identical (before, it waited the
    hour)."""
    monkeypatch.setenv("PREFECT_DISTRAIN_ERROR_GATHER_TIMEOUT_S", "3600")
    run = pd.RunConfig(name="lost", storage=str(tmp_path))
    with pd.Trainer(num_workers=2, run=run, failure=pd.FailureConfig(max_failures=1)) as trainer:
        result = trainer.fit(deterministic_loop, config={"epochs": EPOCHS,
                                                         "kills": {0: [2, 0, 1]}})
    assert result.failures == 1 and all(same_weights(r, reference) for r in result.worker_results)
    attempts = ledger(str(tmp_path), "lost")
    assert [a["status"] for a in attempts] == ["failed", "completed"]
    assert attempts[0]["cause"].startswith("WorkerLostError: rank 1's worker died")
    assert_no_train_actors()


@pytest.mark.usefixtures("prefect_server")
def test_prefect_retry_resumes_from_the_latest_checkpoint(tmp_path, reference):

    @flow
    def retried():
        return pd.train.with_options(retries=1)(
            deterministic_loop, config={"epochs": EPOCHS, "kills": {0: [3, 2, 1]}},
            scaling=pd.ScalingConfig(num_workers=2), run=pd.RunConfig(storage=str(tmp_path)),
            failure=pd.FailureConfig(max_failures=0))

    state = retried(return_state=True)
    result = state.result()
    assert all(same_weights(r, reference) for r in result.worker_results)
    assert result.attempt == 1 and result.failures == 0
    flow_run_id = state.state_details.flow_run_id
    assert re.fullmatch(f"deterministic_loop-{flow_run_id.hex[:8]}-[0-9a-f]{{6}}", result.run_name)
    attempts = ledger(str(tmp_path), result.run_name)
    assert [a["status"] for a in attempts] == ["failed", "completed"]
    assert attempts[1]["resumed_from"].endswith("checkpoint_000003-a0")
    _, artifacts, train_runs = flow_run_records(flow_run_id)
    ledgers = sorted((a for a in artifacts if a.key.endswith("-attempts")), key=lambda a: a.created)
    rows = json.loads(ledgers[-1].data)
    assert [(r["attempt"], r["status"]) for r in rows] == [(0, "failed"), (1, "completed")]
    assert "WorkerLostError" in rows[0]["cause"]
    assert [t.run_count for t in train_runs] == [2], "one task run, retried once by Prefect"
    assert_no_train_actors()


@pytest.mark.usefixtures("prefect_server")
def test_the_same_error_on_every_rank_is_a_bug_never_retried(tmp_path, monkeypatch):
    # Both ranks' errors must reach the driver before it decides: a window no loaded machine
    # outlasts (it ends as soon as every rank has failed).
    monkeypatch.setenv("PREFECT_DISTRAIN_ERROR_GATHER_TIMEOUT_S", "120")

    def buggy(config):
        pd.report({"step": 0})
        raise ValueError(f"labels out of range on rank {pd.get_context().get_world_rank()}")

    @flow
    def buggy_flow():
        return pd.train.with_options(retries=2)(
            buggy, scaling=pd.ScalingConfig(num_workers=2),
            run=pd.RunConfig(name="buggy", storage=str(tmp_path)),
            failure=pd.FailureConfig(max_failures=3))

    state = buggy_flow(return_state=True)
    with pytest.raises(ValueError, match="labels out of range on rank 0") as caught:
        state.result()
    assert caught.value.ranks == [0, 1] and caught.value.retryable is False
    assert "ranks [0, 1] raised" in "".join(caught.value.__notes__)
    assert [a["status"] for a in ledger(str(tmp_path), "buggy")] == ["failed"], "no restart"
    _, _, runs = flow_run_records(state.state_details.flow_run_id)
    assert [t.run_count for t in runs] == [1], "no Prefect retry"
    assert_no_train_actors()


def test_an_error_marked_fatal_is_not_restarted_even_on_one_rank(tmp_path):
    def one_rank(config):
        if pd.get_context().get_world_rank() == 1:
            raise KeyError("bad record")
        time.sleep(30)

    with pytest.raises(KeyError, match="bad record") as caught:
        with pd.Trainer(num_workers=2, run=pd.RunConfig(name="fatal", storage=str(tmp_path)),
                        failure=pd.FailureConfig(max_failures=2, fatal_exceptions=(KeyError,))
                        ) as trainer:
            trainer.fit(one_rank)
    assert caught.value.retryable is False
    assert [a["status"] for a in ledger(str(tmp_path), "fatal")] == ["failed"]


@pytest.mark.usefixtures("prefect_server")
def test_a_killed_driver_leaves_no_workers_and_a_new_flow_run_finishes_the_job(
        tmp_path, reference):
    """The flow runs in its own process on this Ray; it is SIGKILLed half-way."""
    from prefect.settings import PREFECT_API_URL

    progress = tmp_path / "progress"
    storage = str(tmp_path / "runs")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        from prefect import flow
        import prefect_distrain as pd
        from fault_loops import deterministic_loop

        @flow
        def doomed():
            pd.train(deterministic_loop, scaling=pd.ScalingConfig(num_workers=2),
                     config={{"epochs": {EPOCHS}, "epoch_sleep": 1.0,
                              "progress": {str(progress)!r}}},
                     run=pd.RunConfig(name="orphaned", storage={storage!r}),
                     ray_address={ray.get_runtime_context().gcs_address!r})
        doomed()
    """)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = tmp_path / "driver.log"  # a file, not a pipe nobody reads while the driver runs
    with open(log, "wb") as output:
        driver = subprocess.Popen([sys.executable, "-c", script], env=env,
                                  stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not (progress.exists() and progress.read_text() and int(progress.read_text()) >= 2):
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the driver never got half-way"
            time.sleep(0.2)
        assert len(live_train_actors()) == 2
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert_no_train_actors(timeout=30)

    @flow
    def rescue():
        return pd.train(deterministic_loop, config={"epochs": EPOCHS},
                        scaling=pd.ScalingConfig(num_workers=2),
                        run=pd.RunConfig(name="orphaned", storage=storage),
                        resume_from_checkpoint="latest")

    result = rescue()
    assert all(same_weights(r, reference) for r in result.worker_results)
    attempts = ledger(storage, "orphaned")
    assert attempts[0]["status"] == "running", "the killed driver never recorded an outcome"
    assert attempts[1]["restarted_because"] == "the driver was lost (no outcome recorded)"
    assert attempts[1]["resumed_from"] is not None
    assert_no_train_actors()


def one_rank_bug(config):
    """Rank 1 hits a bad record after its first report, every time; rank 0 waits."""
    pd.report({"step": 0})
    if pd.get_context().get_world_rank() == 1:
        raise ValueError("row 17 has no label")
    time.sleep(60)


def test_a_bug_on_one_rank_that_repeats_after_a_restart_is_not_restarted_again(tmp_path):
    """Raised on some ranks only, it looks like infrastructure once; the same error at the same
    report iteration after the restart is the user's bug: no third attempt, no Prefect retry."""
    run = pd.RunConfig(name="repeats", storage=str(tmp_path))
    with pd.Trainer(num_workers=2, run=run, failure=pd.FailureConfig(max_failures=5)) as t:
        with pytest.raises(ValueError, match="row 17 has no label") as caught:
            t.fit(one_rank_bug)
    assert caught.value.retryable is False and caught.value.ranks == [1]
    assert any("it repeated after a restart: ValueError at report iteration 1 again" in note
               for note in caught.value.__notes__)
    attempts = ledger(str(tmp_path), "repeats")
    assert [a["status"] for a in attempts] == ["failed", "failed"]
    assert attempts[1]["failure"] == {"kind": "raised", "type": "builtins.ValueError",
                                      "message": "row 17 has no label", "iteration": 1}
    assert_no_train_actors()
