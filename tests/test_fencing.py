"""Checkpoints that nothing can lose: one writer per run (a lease), tampered or odd manifests,
checkpoint sources that must not be moved, relative storage, resume paths that can't be
verified, and storage that fails under the driver. Real Ray, real moto S3, real processes."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import ray
from conftest import TESTS, assert_no_train_actors

import prefect_distrain as pd
from prefect_distrain.checkpoints.lease import (
    RunInUseError,
    RunLease,
    holder_identity,
    takeover_reason,
)
from prefect_distrain.checkpoints.storage import RunStorage

pytestmark = pytest.mark.usefixtures("ray_cluster")


def every_manifest_verifies(storage: dict, name: str) -> list[int]:
    """Each committed checkpoint of the run: its files are all there and match their hashes.
    Returns the committed indexes."""
    run = RunStorage(storage["storage"], name, storage["storage_options"])
    manifests, problems = run.read_manifests()
    assert not problems, problems
    for manifest in manifests:
        folder = run.checkpoint(manifest).to_directory()  # raises if a file is gone or changed
        assert sorted(os.listdir(folder)) == sorted(manifest.files)
    return [m.index for m in manifests]


# -- one writer per run ----------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import json, os, sys, tempfile, time
    sys.path.insert(0, {tests!r})
    import prefect_distrain as pd

    config = json.loads(sys.argv[1])

    def loop(config):
        for epoch in range(config["epochs"]):
            gate = config["gates"].get(str(epoch))
            while gate and not os.path.exists(gate):
                time.sleep(0.05)
            with tempfile.TemporaryDirectory() as folder:
                with open(os.path.join(folder, "w.txt"), "w") as handle:
                    handle.write(f"{{config['who']}} {{epoch}}")
                pd.report({{"epoch": epoch}}, checkpoint=pd.Checkpoint.from_directory(folder))
        return config["who"]

    run = pd.RunConfig(name="shared", storage=config["storage"],
                       storage_options=config["options"], takeover=config["takeover"])
    try:
        with pd.Trainer(num_workers=1, run=run, ray_address=config["address"]) as trainer:
            result = trainer.fit(loop, config=config)
        outcome = {{"ok": True, "indexes": [c.index for c, _ in result.best_checkpoints]}}
    except Exception as error:
        outcome = {{"ok": False, "type": type(error).__name__, "message": str(error)}}
    print("OUTCOME " + json.dumps({{**outcome, "pid": os.getpid()}}), flush=True)
""").format(tests=TESTS)


def start_writer(tmp_path, storage: dict, who: str, epochs: int = 4, gates: dict | None = None,
                 takeover: bool = False) -> tuple[subprocess.Popen, str]:
    config = {"who": who, "epochs": epochs, "gates": gates or {}, "takeover": takeover,
              "storage": storage["storage"], "options": storage["storage_options"],
              "address": ray.get_runtime_context().gcs_address}
    log = str(tmp_path / f"{who}.log")
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(config)],
                                   stdout=output, stderr=subprocess.STDOUT)
    return process, log


def outcome_of(process: subprocess.Popen, log: str) -> dict:
    process.wait(timeout=300)
    text = open(log).read()
    lines = [x for x in text.splitlines() if x.startswith("OUTCOME ")]
    assert lines, text[-3000:]
    return json.loads(lines[-1][len("OUTCOME "):])


def wait_for(condition, what: str, cap: float = 180) -> None:
    deadline = time.monotonic() + cap
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {cap:g} s"
        time.sleep(0.05)


def test_two_writers_started_together_on_one_run_name(tmp_path, storage_kind):
    """Two processes start ``train`` on the same run within a second: one holds the run, the
    other fails at once naming it; what the first commits all verifies, nothing is lost."""
    gate = str(tmp_path / "open")
    writers = [start_writer(tmp_path, storage_kind, who, gates={"2": gate}) for who in "ab"]
    # Whichever holds the run waits at its gate; the other one must have failed by then.
    while True:
        ended = [(p, log) for p, log in writers if p.poll() is not None]
        if ended:
            break
        time.sleep(0.1)
    assert len(ended) == 1, "both writers ended before the gate opened"
    loser = outcome_of(*ended[0])
    winner_process, winner_log = next(w for w in writers if w[0] is not ended[0][0])
    open(gate, "w").close()
    winner = outcome_of(winner_process, winner_log)
    assert loser["ok"] is False and loser["type"] == "RunInUseError", loser
    assert f"is being written by pid {winner['pid']} on" in loser["message"]
    assert "RunConfig(takeover=True)" in loser["message"]
    assert winner["ok"] is True and winner["indexes"] == [4, 3, 2, 1]
    assert every_manifest_verifies(storage_kind, "shared") == [1, 2, 3, 4]
    assert_no_train_actors()


def test_a_takeover_racing_a_live_writer_fences_it_off(tmp_path):
    """A second writer takes the run over while the first still trains (what a Prefect retry
    of the same task run does): the first commits nothing more and says why; every checkpoint
    either committed verifies, and the second one's attempt number is its own."""
    storage = {"storage": str(tmp_path / "runs"), "storage_options": {}}
    gate = str(tmp_path / "open")
    first, first_log = start_writer(tmp_path, storage, "first", gates={"2": gate})
    manifests = tmp_path / "runs" / "shared" / "_manifests"
    wait_for(lambda: (manifests / "checkpoint_000002-a0.json").exists(), "two commits of first")
    second, second_log = start_writer(tmp_path, storage, "second", takeover=True)
    taken = outcome_of(second, second_log)
    open(gate, "w").close()
    fenced = outcome_of(first, first_log)
    assert taken["ok"] is True and taken["indexes"] == [6, 5, 4, 3, 2, 1]
    assert fenced["ok"] is False and fenced["type"] == "LeaseLostError", fenced
    assert "it commits and deletes nothing more" in fenced["message"]
    assert every_manifest_verifies(storage, "shared") == [1, 2, 3, 4, 5, 6]
    ledger = sorted(os.listdir(tmp_path / "runs" / "shared" / "_attempts"))
    records = [json.load(open(tmp_path / "runs" / "shared" / "_attempts" / n)) for n in ledger]
    assert [(r["attempt"], r["status"], r["lease"]) for r in records] == [
        (0, "failed", 1), (1, "completed", 2)]
    assert records[0]["cause"].startswith("LeaseLostError")
    assert_no_train_actors()


HOLDER = textwrap.dedent("""
    import sys, time
    from prefect_distrain.checkpoints.lease import RunLease, holder_identity
    from prefect_distrain.checkpoints.storage import RunStorage
    identity = holder_identity()
    if sys.argv[2] != "-":
        identity["host"] = sys.argv[2]  # a writer on another machine
    lease = RunLease(RunStorage(sys.argv[1], "leased"), identity, timeout_s=float(sys.argv[3]))
    lease.acquire()
    print("HELD", flush=True)
    time.sleep(3600)
""")


def hold_lease(tmp_path, host: str, timeout_s: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), host,
                               str(timeout_s)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "HELD"
    return holder


def test_a_stale_lease_is_taken_over_and_a_live_one_is_not(tmp_path):
    """A writer on another machine keeps its lease alive by heartbeats, longer than the
    timeout; once it is SIGKILLed the lease is taken over after the timeout, not before."""
    storage = RunStorage(str(tmp_path), "leased")
    timeout = 6.0
    holder = hold_lease(tmp_path, "another-machine", timeout)
    try:
        began = time.monotonic()
        wait_for(lambda: time.monotonic() - began > 1.5 * timeout, "time passing")
        with pytest.raises(RunInUseError, match=f"pid {holder.pid} on another-machine"):
            RunLease(storage, holder_identity(), timeout).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with pytest.raises(RunInUseError, match="last heartbeat"):  # its last beat is recent
        RunLease(storage, holder_identity(), timeout).acquire()
    taken = RunLease(storage, holder_identity(), timeout)

    def acquired() -> bool:
        try:
            taken.acquire()
            return True
        except RunInUseError:
            return False

    wait_for(acquired, "the takeover of an expired lease", cap=60)
    taken.release()
    assert taken.generation == 2


def test_a_writer_on_this_host_whose_process_is_gone_is_taken_over_at_once(tmp_path):
    """SIGKILLed on this host (a killed flow run): its pid is gone, no need to wait."""
    storage = RunStorage(str(tmp_path), "leased")
    holder = hold_lease(tmp_path, "-", 3600)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lease = RunLease(storage, holder_identity(), 3600)
    assert lease.acquire() == 2
    lease.release()


def test_who_may_take_a_lease_over():
    """The takeover rule on its own: released, forced, the same Prefect task run, expired, or
    a process on this host that is gone; never a live writer."""
    me = holder_identity(task_run_id="t-2", flow_run_id="f-1")
    now = time.time()
    live = {**holder_identity(task_run_id="t-1"), "heartbeat_at": now, "pid": os.getpid()}
    assert takeover_reason(live, me, now, 60) is None
    assert takeover_reason({**live, "released": True}, me, now, 60) == "it was released"
    assert takeover_reason(live, me, now, 60, force=True) == "takeover=True"
    assert "Prefect retry" in takeover_reason({**live, "task_run_id": "t-2"}, me, now, 60)
    assert "heartbeat is 61 s old" in takeover_reason(live, me, now + 61, 60)
    elsewhere = {**live, "host": "another-machine", "pid": 999999999}
    assert takeover_reason(elsewhere, me, now, 60) is None, "a pid elsewhere says nothing"


# -- "best" with odd scores, agreed by every reader --------------------------------------------


def scored_loop(config):
    """A checkpoint per loss of ``config["losses"]`` (NaN included)."""
    for epoch, loss in enumerate(config["losses"]):
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "epoch.txt"), "w") as handle:
                handle.write(str(epoch))
            pd.report({"epoch": epoch, "val_loss": loss},
                      checkpoint=pd.Checkpoint.from_directory(folder))


@pytest.mark.usefixtures("prefect_server")
def test_nan_scores_never_push_out_the_best_and_every_reader_agrees(tmp_path):
    losses = [math.nan, math.nan, 0.98, 0.09, 0.94]
    config = pd.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_loss",
                                 checkpoint_score_order="min")
    run = pd.RunConfig(name="nan", storage=str(tmp_path))
    with pd.Trainer(num_workers=1, run=run, checkpoint=config) as trainer:
        result = trainer.fit(scored_loop, config={"losses": losses})
    assert [c.index for c, _ in result.best_checkpoints] == [4, 5], "0.09, then the latest"
    assert pd.best_checkpoint(run, "val_loss", "min").index == 4
    assert every_manifest_verifies({"storage": str(tmp_path), "storage_options": {}},
                                   "nan") == [4, 5]
    sweep = pd.tune(scored_loop, search_space={"losses": pd.grid([losses])}, metric="val_loss",
                    mode="min", scope="all", checkpoint=config,
                    run=pd.RunConfig(name="nan-sweep", storage=str(tmp_path)))
    assert sweep.best_checkpoint.path.endswith("trial_000/checkpoint_000004-a0")
    assert sweep.trials[0]["best"] == 0.09


# -- tampered manifests ------------------------------------------------------------------------


def resumed_loop(config):
    """Says which checkpoint it resumed from, then commits one more."""
    checkpoint = pd.get_checkpoint()
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "epoch.txt"), "w") as handle:
            handle.write("next")
        pd.report({"epoch": 9, "val_loss": 0.5}, checkpoint=pd.Checkpoint.from_directory(folder))
    return checkpoint.index if checkpoint else None


TAMPERED = {
    "checkpoint_000004-a0": lambda m: {**m, "files": {"../../escape.txt": m["files"]["epoch.txt"]}},
    "checkpoint_000005-a0": lambda m: {**m, "directory": "../../victim"},
    "checkpoint_000006-a0": lambda m: {**m, "files": {"/etc/hostname": m["files"]["epoch.txt"]}},
    "checkpoint_000007-a0": None,  # truncated
    "checkpoint_000008-a0": lambda m: {**m, "schema_version": 99},
}


def test_tampered_manifests_are_skipped_and_nothing_outside_is_touched(storage_kind, caplog):
    """Manifests 4-8 are tampered with (path traversal in a file name and in the folder, an
    absolute name, truncated JSON, a newer schema): each is reported and skipped, the run
    resumes from 3 (the last valid one), retention deletes none of them nor anything outside
    the run, and resuming from one of them by path is refused with the reason."""
    run = pd.RunConfig(name="tampered", **storage_kind)
    with pd.Trainer(num_workers=1, run=run) as trainer:
        trainer.fit(scored_loop, config={"losses": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]})
    storage = RunStorage(storage_kind["storage"], "tampered", storage_kind["storage_options"])
    fs, root = storage.filesystem()
    victim = root.rsplit("/", 1)[0] + "/victim/keep.txt"
    fs.makedirs(victim.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(victim, b"not yours")
    for folder, change in TAMPERED.items():
        path = f"{root}/_manifests/{folder}.json"
        original = json.loads(fs.cat_file(path))
        fs.pipe_file(path, fs.cat_file(path)[:40] if change is None
                     else json.dumps(change(original)).encode())
    keep_one = pd.CheckpointConfig(num_to_keep=1)
    with pd.Trainer(num_workers=1, run=run, checkpoint=keep_one) as trainer:
        result = trainer.fit(resumed_loop, resume_from_checkpoint="latest")
    assert result.worker_results == [3], "resumed from the last valid checkpoint"
    assert fs.cat_file(victim) == b"not yours"
    # Kept: the tampered ones (never deleted by us), the resume point 3 and the new latest,
    # numbered after 3 by the second attempt.
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/_manifests", detail=False))
    assert names == sorted([f"{f}.json" for f in TAMPERED] + [
        "checkpoint_000003-a0.json", "checkpoint_000004-a1.json"])
    for folder in TAMPERED:  # their files are left for a person to look at
        assert fs.exists(f"{root}/{folder}/epoch.txt")
    assert "file name '../../escape.txt' has an empty, '.' or '..' part" in caplog.text
    assert "its folder '../../victim' is not 'checkpoint_000005-a0'" in caplog.text
    assert "file name '/etc/hostname' is absolute" in caplog.text
    assert "checkpoint_000007-a0.json: not valid JSON" in caplog.text
    assert "schema version 99 was written by a newer prefect-distrain" in caplog.text
    with pytest.raises(pd.ConfigurationError, match="'../../escape.txt' has an empty"):
        with pd.Trainer(num_workers=1, run=run) as trainer:
            trainer.fit(resumed_loop, resume_from_checkpoint=f"{storage.run_url}/"
                                                            "checkpoint_000004-a0")
    assert_no_train_actors()


# -- what report() is given ----------------------------------------------------------------------


def report_source_loop(config):
    """Reports the checkpoint ``config["source"]`` names: a missing folder, an empty one, or
    the checkpoint it resumed from."""
    source = config["source"]
    if source == "missing":
        checkpoint = pd.Checkpoint("/definitely/not/here")
    elif source == "empty":
        checkpoint = pd.Checkpoint.from_directory(tempfile.mkdtemp())
    else:
        checkpoint = pd.get_checkpoint()
    pd.report({"epoch": 1}, checkpoint=checkpoint)
    return checkpoint.path


@pytest.mark.parametrize("upload", ["sync", "async"])
def test_bad_and_borrowed_checkpoint_sources(storage_kind, upload):
    """A missing folder and an empty one are refused naming the fix; the resumed checkpoint
    reported back is copied (never moved): source and copy both verify."""
    run = pd.RunConfig(name=f"sources-{upload}", **storage_kind)
    config = pd.CheckpointConfig(upload=upload)
    with pd.Trainer(num_workers=1, run=run, checkpoint=config) as trainer:
        with pytest.raises(pd.ConfigurationError, match="is not a directory. Write the files"):
            trainer.fit(report_source_loop, config={"source": "missing"})
        with pytest.raises(pd.ConfigurationError, match="checkpoint 1 has no files"):
            trainer.fit(report_source_loop, config={"source": "empty"})
        trainer.fit(scored_loop, config={"losses": [0.5]})
        first = trainer.checkpoints.latest()
        result = trainer.fit(report_source_loop, config={"source": "resumed"},
                             resume_from_checkpoint="latest")
    assert result.worker_results == [first.path]
    assert every_manifest_verifies(storage_kind, f"sources-{upload}") == [1, 2]
    copy = pd.Checkpoint(result.checkpoint.path, storage_kind["storage_options"],
                         result.checkpoint.manifest)
    with copy.as_directory() as folder:
        assert open(os.path.join(folder, "epoch.txt")).read() == "0"


def writes_into_its_checkpoint(config):
    """Writes into the folder as_directory() hands out."""
    with pd.get_checkpoint().as_directory() as folder:
        with open(os.path.join(folder, "epoch.txt"), "w") as handle:
            handle.write("scribbled")


def test_as_directory_never_hands_out_the_committed_folder(tmp_path):
    run = pd.RunConfig(name="scribble", storage=str(tmp_path))
    with pd.Trainer(num_workers=1, run=run) as trainer:
        trainer.fit(scored_loop, config={"losses": [0.5]})
        trainer.fit(writes_into_its_checkpoint, resume_from_checkpoint="latest")
    assert every_manifest_verifies({"storage": str(tmp_path), "storage_options": {}},
                                   "scribble") == [1]


# -- where the run lives, and what it resumes from -------------------------------------------


def where_loop(config):
    with tempfile.TemporaryDirectory() as folder:
        open(os.path.join(folder, "w.txt"), "w").write("x")
        pd.report({"epoch": 0}, checkpoint=pd.Checkpoint.from_directory(folder))
    return [pd.get_context().get_storage(), os.getcwd()]


def test_relative_storage_is_resolved_once_on_the_driver(tmp_path, monkeypatch):
    """The driver's working directory, not each worker's: manifests and files in one folder."""
    (tmp_path / "driver").mkdir()
    monkeypatch.chdir(tmp_path / "driver")
    with pd.Trainer(num_workers=1, run=pd.RunConfig(name="rel", storage="runs")) as trainer:
        result = trainer.fit(where_loop)
    [(storage, cwd)] = result.worker_results
    assert cwd != str(tmp_path / "driver"), "the worker runs elsewhere"
    assert storage == str(tmp_path / "driver" / "runs" / "rel")
    assert result.checkpoint.path == storage + "/checkpoint_000001-a0"
    assert every_manifest_verifies({"storage": str(tmp_path / "driver" / "runs"),
                                    "storage_options": {}}, "rel") == [1]


def test_resume_paths_that_cannot_be_verified_are_refused(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="prefect_distrain")
    run = pd.RunConfig(name="paths", storage=str(tmp_path))
    with pd.Trainer(num_workers=1, run=run) as trainer:
        trainer.fit(scored_loop, config={"losses": [0.5, 0.4]})
        with pytest.raises(pd.ConfigurationError, match="names no checkpoint: pass None"):
            trainer.fit(resumed_loop, resume_from_checkpoint="")
        os.remove(tmp_path / "paths" / "_manifests" / "checkpoint_000001-a0.json")
        with pytest.raises(pd.ConfigurationError,
                           match="no manifest: it was never committed .* can't be verified"):
            trainer.fit(resumed_loop, resume_from_checkpoint=str(
                tmp_path / "paths" / "checkpoint_000001-a0"))
        empty = tmp_path / "empty"
        empty.mkdir()
        with pytest.raises(pd.ConfigurationError, match="is an empty folder"):
            trainer.fit(resumed_loop, resume_from_checkpoint=str(empty))
        # A folder of your own (not a run's checkpoint) is used as it is, and says so.
        own = tmp_path / "pretrained"
        own.mkdir()
        (own / "epoch.txt").write_text("pretrained")
        assert trainer.run(resumed_loop, resume_from_checkpoint=str(own)) == [None]
    assert "a folder with no manifest: its files are used as they are, unverified" in caplog.text


# -- the driver's storage fails ----------------------------------------------------------------


class UnblockOnFailure(pd.TrainingCallback):
    """Runs ``fix`` when an attempt ends in an error: the fault happens once."""

    def __init__(self, fix):
        self.fix = fix

    def finish_training(self, error=False, **info):
        if error:
            self.fix()


@pytest.fixture
def manifests_folder_fault(tmp_path, request):
    """``_manifests`` of run "faulty" as a full tmpfs (disk full) or an immutable folder
    (permission denied, even for root); the returned function lifts the fault."""
    manifests = tmp_path / "faulty" / "_manifests"
    manifests.mkdir(parents=True)
    if request.param == "disk-full":
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(manifests)],
                          capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs needs CAP_SYS_ADMIN")
        filler = os.open(manifests / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, b"\0" * 4096):
                pass
        except OSError as error:
            assert error.errno == errno.ENOSPC
        finally:
            os.close(filler)
        lift = lambda: os.remove(manifests / "filler")  # noqa: E731
        expected = errno.ENOSPC
    else:
        if subprocess.run(["chattr", "+i", str(manifests)], capture_output=True).returncode:
            pytest.skip("chattr +i is not supported on this filesystem")
        lift = lambda: subprocess.run(["chattr", "-i", str(manifests)], check=True)  # noqa: E731
        expected = errno.EPERM
    try:
        yield lift, expected
    finally:
        subprocess.run(["chattr", "-i", str(manifests)], capture_output=True)
        if request.param == "disk-full":
            subprocess.run(["umount", str(manifests)], check=True)


@pytest.mark.parametrize("manifests_folder_fault", ["disk-full", "permission-denied"],
                         indirect=True)
def test_a_manifest_write_that_fails_is_infrastructure(tmp_path, manifests_folder_fault):
    """The commit's write fails on the driver: a StorageError (retried) whose cause is the
    OSError; with a restart allowed the run completes once the storage is fixed, and the
    ledger says what happened."""
    lift, expected = manifests_folder_fault
    run = pd.RunConfig(name="faulty", storage=str(tmp_path))
    with pd.Trainer(num_workers=1, run=run) as trainer:
        with pytest.raises(pd.StorageError, match="committing checkpoint 1 .* failed") as caught:
            trainer.fit(scored_loop, config={"losses": [0.5]})
        assert caught.value.retryable is True
        assert isinstance(caught.value.__cause__, OSError)
        assert caught.value.__cause__.errno == expected
        trainer.failure_config = pd.FailureConfig(max_failures=1)
        result = trainer.fit(scored_loop, config={"losses": [0.5, 0.4]},
                             callbacks=[UnblockOnFailure(lift)])
        attempts = trainer.checkpoints.attempts()
    assert result.failures == 1 and result.checkpoint.index == 2
    assert [a["status"] for a in attempts] == ["failed", "failed", "completed"]
    assert attempts[1]["cause"].startswith("StorageError: committing checkpoint 1")
    assert os.strerror(expected) in attempts[1]["cause"]
    assert every_manifest_verifies({"storage": str(tmp_path), "storage_options": {}},
                                   "faulty") == [1, 2]
