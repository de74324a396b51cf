"""The failures real clusters have: a rank that hangs, a collective that times out, a worker or
a driver preempted by SIGTERM, storage that fails now and then or for good, credentials that
expire mid-run, and a run that must end by a deadline. Real Ray, real moto S3 (behind a wrapper
that fails as S3 does), each fault once, keyed on the attempt."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import ray
from conftest import assert_no_train_actors, live_train_actors
from fault_loops import deterministic_loop, ledger, same_weights, uninterrupted

import prefect_distrain as pd
from prefect_distrain.checkpoints.storage import RunStorage

pytestmark = pytest.mark.usefixtures("ray_cluster")

EPOCHS = 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must match bit for bit."""
    return uninterrupted(tmp_path_factory, EPOCHS)


def test_a_rank_stuck_before_a_collective_is_a_hang_with_every_stack(tmp_path, reference):
    """On attempt 0, rank 1 sleeps for good at the start of epoch 2 while rank 0 waits for it in
    the allreduce of its backward pass: after hang_timeout_s without progress the attempt fails
    as a hang with both stacks in the forensics, the restart resumes from epoch 1's checkpoint,
    and the weights end as an uninterrupted run's."""
    run = pd.RunConfig(name="hang", storage=str(tmp_path))
    failure = pd.FailureConfig(max_failures=1, hang_timeout_s=8)
    with pd.Trainer(num_workers=2, run=run, failure=failure) as trainer:
        result = trainer.fit(deterministic_loop, config={"epochs": EPOCHS, "hang": [2, 1]})
        forensics = trainer.forensics
    assert all(same_weights(r, reference) for r in result.worker_results)
    assert result.failures == 1
    attempts = ledger(str(tmp_path), "hang")
    assert [a["status"] for a in attempts] == ["failed", "completed"]
    assert attempts[0]["cause"].startswith("TrainingHangError: ranks [")
    assert attempts[1]["resumed_from"].endswith("checkpoint_000002-a0")
    written = open(tmp_path / "hang" / "forensics" / "attempt_00000-hang.txt").read()
    assert forensics == [written]
    rank0, rank1 = written.split("== rank 1:")
    assert "== rank 0:" in rank0 and "backward" in rank0, "rank 0 waits in the allreduce"
    assert "time.sleep(3600)  # the peer never comes" in rank1, "rank 1's sleeping line"
    assert_no_train_actors()


def test_a_collective_timeout_is_infrastructure_naming_the_rank(tmp_path, reference):
    """The same stuck peer with hang detection off: torch's own collective timeout (5 s here)
    ends rank 0's allreduce; that is the runtime failing, so the group restarts and resumes."""
    run = pd.RunConfig(name="collective-timeout", storage=str(tmp_path))
    failure = pd.FailureConfig(max_failures=1, hang_timeout_s=None)
    with pd.Trainer(backend=pd.TorchConfig(timeout_s=5), num_workers=2, run=run,
                    failure=failure) as trainer:
        result = trainer.fit(deterministic_loop, config={"epochs": EPOCHS, "hang": [2, 1]})
    assert all(same_weights(r, reference) for r in result.worker_results)
    assert result.failures == 1
    first, second = ledger(str(tmp_path), "collective-timeout")
    assert first["status"] == "failed" and first["failure"]["kind"] == "raised"
    assert "timed out" in first["cause"].lower(), first["cause"]
    assert first["cause"].startswith("RuntimeError: ") and "rank 0 of 2" in first["cause"], \
        first["cause"]
    assert second["resumed_from"].endswith("checkpoint_000002-a0")
    assert_no_train_actors()


def test_a_preempted_worker_commits_just_in_time_and_resumes_from_there(tmp_path, reference):
    """SIGTERM to rank 1 in the middle of epoch 2 (attempt 0): every rank hears of it at the
    same step, commits that step's checkpoint and ends; the restart resumes from it (not from
    epoch 1's) without using max_failures=0, and the weights end as an uninterrupted run's."""
    run = pd.RunConfig(name="preempted", storage=str(tmp_path))
    with pd.Trainer(num_workers=2, run=run, failure=pd.FailureConfig(max_failures=0)) as trainer:
        result = trainer.fit(deterministic_loop,
                             config={"epochs": EPOCHS, "preempt": [2, 3, 1]})
    assert all(same_weights(r, reference) for r in result.worker_results)
    assert (result.failures, result.preemptions) == (0, 1)
    first, second = ledger(str(tmp_path), "preempted")
    assert first["status"] == "preempted"
    assert first["cause"].startswith("PreemptionError: SIGTERM to rank 1 (pid "), first["cause"]
    assert second["resumed_from"].endswith("checkpoint_000003-a0"), second["resumed_from"]
    [jit] = [m for m in result.metrics_history if m.get("jit")]
    assert (jit["epoch"], jit["_training_iteration"]) == (2, 3)
    assert jit["step"] >= 3, "the step at which every rank heard of the preemption"
    run_storage = RunStorage(str(tmp_path), "preempted")
    [manifest] = [m for m in run_storage.read_manifests()[0] if m.index == 3]
    state = pd.torch.load_state(run_storage.checkpoint(manifest), "state.pt")
    assert (state["epoch"], state["step"]) == (2, jit["step"])
    assert_no_train_actors()


def test_sigterm_to_the_driver_commits_and_leaves_a_resumable_run(tmp_path, reference):
    """A driver (its own process, on this Ray) gets SIGTERM while its ranks wait at the start
    of epoch 2 (a gate that only the preemption opens): they commit a checkpoint of their
    first step, the attempt is recorded as preempted, the lease is given back and the process
    ends as SIGTERM ends it; a new run resumes from that step at once (no lease to wait for)
    and ends with an uninterrupted run's weights."""
    progress = tmp_path / "progress"
    storage = str(tmp_path / "runs")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import prefect_distrain as pd
        from fault_loops import deterministic_loop

        with pd.Trainer(num_workers=2, ray_address={ray.get_runtime_context().gcs_address!r},
                        run=pd.RunConfig(name="drained", storage={storage!r})) as trainer:
            trainer.fit(deterministic_loop,
                        config={{"epochs": {EPOCHS}, "preempt": None,
                                 "gates": {{2: {str(tmp_path / "never")!r}}},
                                 "progress": {str(progress)!r}}})
    """)
    log = tmp_path / "driver.log"
    with open(log, "wb") as output:
        driver = subprocess.Popen([sys.executable, "-c", script], stdout=output,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not (progress.exists() and progress.read_text() and int(progress.read_text()) >= 1):
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the driver never reached epoch 2"
            time.sleep(0.1)
        assert len(live_train_actors()) == 2
        driver.send_signal(signal.SIGTERM)
        # Ended as SIGTERM ends it: by the signal, or Ray's driver handler's sys.exit(15).
        assert driver.wait(timeout=60) in (-signal.SIGTERM, signal.SIGTERM), \
            log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert_no_train_actors(timeout=30)
    [attempt] = ledger(storage, "drained")
    assert attempt["status"] == "preempted", attempt
    assert attempt["cause"].startswith("PreemptionError: SIGTERM to the driver"), attempt
    with pd.Trainer(num_workers=2, run=pd.RunConfig(name="drained", storage=storage)) as trainer:
        result = trainer.fit(deterministic_loop, config={"epochs": EPOCHS},
                             resume_from_checkpoint="latest")
    assert all(same_weights(r, reference) for r in result.worker_results)
    first, second = ledger(storage, "drained")
    resumed = RunStorage(storage, "drained").read_manifests()[0]
    [jit] = [m for m in resumed if m.metrics.get("jit")]
    assert (jit.index, jit.metrics["epoch"], jit.metrics["step"]) == (3, 2, 0)
    assert second["resumed_from"].endswith("checkpoint_000003-a0"), second
    assert_no_train_actors()


def straggling_loop(config):
    """Rank 1 is quiet until the gate opens; rank 0 steps through a prepared loader meanwhile."""
    import torch

    gate = config["gate"]
    if pd.get_context().get_world_rank() == 1:
        while not os.path.exists(gate):
            time.sleep(0.05)
    else:
        loader = pd.torch.prepare_data_loader(torch.utils.data.DataLoader(range(8)))
        while not os.path.exists(gate):
            for _ in loader:  # each batch is progress
                time.sleep(0.05)
    pd.report({"step": 0})
    return "done"


class OpenOnStraggler(logging.Handler):
    """Opens the gate once the straggler warning is logged."""

    def __init__(self, gate: str):
        super().__init__()
        self.gate, self.messages = gate, []

    def emit(self, record):
        self.messages.append(record.getMessage())
        if "a straggler" in record.getMessage():
            open(self.gate, "w").close()


def test_a_straggler_is_named_before_it_becomes_a_hang(tmp_path):
    """Rank 1 is quiet while rank 0 progresses: at half the hang timeout it is named (which
    opens its gate here), and the run completes."""
    gate = str(tmp_path / "gate")
    handler = OpenOnStraggler(gate)
    logger = logging.getLogger("test-straggler")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    run = pd.RunConfig(name="straggler", storage=str(tmp_path))
    with pd.Trainer(num_workers=2, run=run, logger=logger,
                    failure=pd.FailureConfig(hang_timeout_s=16)) as trainer:
        result = trainer.fit(straggling_loop, config={"gate": gate})
    assert result.worker_results == ["done", "done"]
    [warning] = [m for m in handler.messages if "a straggler" in m]
    assert warning.startswith("Rank 1 has made no progress for ") and "while ranks [0] have" \
        in warning


# -- storage that fails --------------------------------------------------------------------------


def checkpoint_loop(config):
    """A checkpoint of two files per epoch from every rank (each its own names)."""
    rank = pd.get_context().get_world_rank()
    for epoch in range(config["epochs"]):
        with tempfile.TemporaryDirectory() as folder:
            for part in range(2):
                with open(os.path.join(folder, f"rank{rank}-{part}.bin"), "wb") as handle:
                    handle.write(os.urandom(1000) + bytes([epoch]))
            pd.report({"epoch": epoch}, checkpoint=pd.Checkpoint.from_directory(folder))
    return rank


def flaky(s3_storage, **faults) -> dict:
    options = {**s3_storage["storage_options"], **faults}
    return {"storage": "flakys3://models/runs", "storage_options": options}


@pytest.mark.parametrize("upload", ["sync", "async"])
def test_throttled_and_failing_puts_are_retried(s3_storage, upload):
    """Every third file upload of a worker fails with S3's 503 SlowDown (its throttling): each
    is retried on a fresh client, the run completes, every checkpoint verifies, the retries are
    in the ledger."""
    storage = flaky(s3_storage, fail_every=3)
    config = pd.CheckpointConfig(upload=upload, upload_backoff_max_s=0.2)
    with pd.Trainer(num_workers=2, run=pd.RunConfig(name=f"throttled-{upload}", **storage),
                    checkpoint=config) as trainer:
        result = trainer.fit(checkpoint_loop, config={"epochs": 3})
        attempts = trainer.checkpoints.attempts()
    assert result.worker_results == [0, 1] and result.checkpoint.index == 3
    run = RunStorage(storage["storage"], f"throttled-{upload}", storage["storage_options"])
    manifests, problems = run.read_manifests()
    assert not problems and [m.index for m in manifests] == [1, 2, 3]
    for manifest in manifests:
        folder = run.checkpoint(manifest).to_directory()
        assert len(os.listdir(folder)) == 4
    [attempt] = attempts
    assert attempt["status"] == "completed" and attempt["storage_retries"]["uploads"] >= 1


def test_expired_credentials_recover_on_a_fresh_client(s3_storage, tmp_path):
    """The credentials rotate after the first checkpoint: clients made before get
    ExpiredToken, the retry's fresh client has the new ones, and the run goes on."""
    rotated = str(tmp_path / "rotated")
    storage = flaky(s3_storage, expire_after=rotated)

    def rotating_loop(config):
        for epoch in range(3):
            if epoch == 1:
                open(config["rotated"], "w").close()  # the provider hands out new keys
            with tempfile.TemporaryDirectory() as folder:
                open(os.path.join(folder, "w.bin"), "wb").write(bytes([epoch]) * 100)
                pd.report({"epoch": epoch}, checkpoint=pd.Checkpoint.from_directory(folder))

    with pd.Trainer(num_workers=1, run=pd.RunConfig(name="rotating", **storage),
                    checkpoint=pd.CheckpointConfig(upload_backoff_max_s=0.2)) as trainer:
        result = trainer.fit(rotating_loop, config={"rotated": rotated})
        [attempt] = trainer.checkpoints.attempts()
    assert result.checkpoint.index == 3 and attempt["storage_retries"]["uploads"] >= 1


def test_storage_down_for_good_fails_naming_the_url_without_credentials(s3_storage):
    """After its retries the upload fails as infrastructure, naming the run's URL (no
    credentials, no query)."""
    from conftest import S3_SECRET

    storage = flaky(s3_storage, down=True)
    config = pd.CheckpointConfig(upload_retries=2, upload_backoff_max_s=0.1)
    with pd.Trainer(num_workers=1, run=pd.RunConfig(name="down", **storage),
                    checkpoint=config) as trainer:
        with pytest.raises(pd.CheckpointUploadError,
                           match=r"uploading checkpoint 1 from rank 0 to flakys3://models/runs/"
                                 r"down failed: EndpointConnectionError") as caught:
            trainer.fit(checkpoint_loop, config={"epochs": 1})
    assert caught.value.retryable is True
    assert S3_SECRET not in str(caught.value) and S3_SECRET not in str(caught.value.__cause__)
    assert_no_train_actors()


# -- a deadline ------------------------------------------------------------------------------------


def silent_loop(config):
    time.sleep(600)  # never reports


def steady_loop(config):
    for step in range(10_000):
        time.sleep(0.2)
        with tempfile.TemporaryDirectory() as folder:
            open(os.path.join(folder, "step.txt"), "w").write(str(step))
            pd.report({"step": step}, checkpoint=pd.Checkpoint.from_directory(folder))


def test_a_deadline_ends_a_silent_run_and_a_reporting_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_DISTRAIN_STOP_GRACE_S", "2")
    silent = pd.RunConfig(name="silent", storage=str(tmp_path), timeout_s=3)
    with pd.Trainer(num_workers=1, run=silent) as trainer:
        with pytest.raises(pd.RunTimeoutError,
                           match=r"deadline of 3 s .* passed: every rank was stopped, ranks "
                                 r"\[0\] after the grace period") as caught:
            trainer.fit(silent_loop)
    assert caught.value.retryable is False
    assert [a["status"] for a in ledger(str(tmp_path), "silent")] == ["failed"]

    steady = pd.RunConfig(name="steady", storage=str(tmp_path), timeout_s=3)
    with pd.Trainer(num_workers=1, run=steady) as trainer:
        with pytest.raises(pd.RunTimeoutError, match="stopped at its next report"):
            trainer.fit(steady_loop)
        latest = trainer.checkpoints.latest()
    # Stopped cleanly: the report the stop ended committed its checkpoint first.
    with latest.as_directory() as folder:
        assert open(os.path.join(folder, "step.txt")).read() == str(latest.index - 1)
    assert_no_train_actors()


# -- a busy shared cluster ---------------------------------------------------------------------


def timed_loop(config):
    """When this rank trained (wall clock), around one report."""
    began = time.time()
    pd.report({"x": 1})
    time.sleep(config["hold_s"])
    return [began, time.time()]


@pytest.mark.usefixtures("prefect_server")
def test_flows_that_share_a_cluster_queue_on_a_concurrency_limit(tmp_path):
    """Two trains of 2 workers each on a limit of 2 slots: the second trains only after the
    first gave its slots back (on the 4-CPU cluster both would fit at once); a limit that does
    not exist is refused naming the command that creates it."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(
            name="test-workers", limit=2))
    scaling = pd.ScalingConfig(num_workers=2, concurrency_limit="test-workers")

    @flow
    def two_trains():
        futures = [pd.train.submit(timed_loop, config={"hold_s": 2, "who": who},
                                   scaling=scaling,
                                   run=pd.RunConfig(name=f"queued-{who}", storage=str(tmp_path)))
                   for who in ("a", "b")]
        return [f.result() for f in futures]

    spans = sorted((min(r[0] for r in res.worker_results), max(r[1] for r in res.worker_results))
                   for res in two_trains())
    assert spans[0][1] <= spans[1][0], f"the two runs overlapped: {spans}"

    @flow
    def unknown_limit():
        return pd.train(timed_loop, config={"hold_s": 0},
                        scaling=pd.ScalingConfig(concurrency_limit="no-such-limit"),
                        run=pd.RunConfig(name="unlimited", storage=str(tmp_path)))

    with pytest.raises(pd.ConfigurationError, match="prefect gcl create no-such-limit"):
        unknown_limit()
