"""The checkpoint store: atomic commits, retention, async upload, safe loading, artifacts.

Runs on local disk and on the S3 protocol (moto_server in its own process, reached by s3fs from
the Ray workers); the store's own suite also runs on memory://.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile

import cloudpickle
import flaky_fs
import pytest
import torch
from conftest import S3_SECRET, assert_no_train_actors, flow_run_records
from hypothesis import given, settings
from hypothesis import strategies as st

import prefect_distrain as pd
from prefect_distrain.checkpoints.lease import holder_identity
from prefect_distrain.checkpoints.ledger import AttemptLedger
from prefect_distrain.checkpoints.manager import CheckpointManager, best_first, retained, score
from prefect_distrain.checkpoints.manifest import FileEntry, Manifest
from prefect_distrain.checkpoints.storage import RunStorage
from prefect_distrain.execution.preflight import storage_preflight


def listing(storage: dict, name: str) -> tuple[list[str], list[str]]:
    """(checkpoint folders, manifests) of a run, straight from the filesystem."""
    run = RunStorage(storage["storage"], name, storage["storage_options"])
    fs, root = run.filesystem()
    folders = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)
                     if "checkpoint_" in p)
    try:
        manifests = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root + "/_manifests", detail=False))
    except FileNotFoundError:
        manifests = []
    return folders, manifests


# -- the store on its own, on local disk, memory:// and S3 -------------------------------------


@pytest.fixture(params=["local", "memory", "s3", "dir"])
def any_storage(request, tmp_path):
    """Local disk, memory://, S3 (moto), and dir:// (a store with no atomic rename-free write
    and no exclusive create: records go to a temp name, are read back, then renamed)."""
    if request.param == "local":
        return {"storage": str(tmp_path / "runs"), "storage_options": {}}
    if request.param == "dir":
        (tmp_path / "dir-root").mkdir()
        return {"storage": "dir://runs", "storage_options": {
            "path": str(tmp_path / "dir-root"), "target_protocol": "file"}}
    if request.param == "memory":
        return {"storage": f"memory://runs-{os.getpid()}-{id(tmp_path)}", "storage_options": {}}
    return request.getfixturevalue("s3_storage")


def write_files(folder: str, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
    return folder


def test_store_commit_protocol(any_storage, tmp_path):
    run = RunStorage(any_storage["storage"], "store", any_storage["storage_options"])
    with storage_preflight(run):  # the driver's check: the run's folder is writable
        pass
    manager = CheckpointManager(run)
    manager.open(holder_identity(), timeout_s=60)
    try:
        source = write_files(str(tmp_path / "src"), {"model.pt": b"weights" * 1000,
                                                     "opt/state.bin": b"\x00\x01" * 10})
        ledger = AttemptLedger(run, lease=manager.lease.generation)
        first = ledger.begin(world_size=2, resumed_from=None, restart_cause=None)
        assert first["attempt"] == 0 and first["lease"] == 1 and first["status"] == "running"
        files = run.upload(source, index=1, attempt=0, rank=0)
        assert files["model.pt"].size == 7000 and files["opt/state.bin"].rank == 0
        # Hashed while uploading: the same entries as hashing each file first.
        assert files == {name: FileEntry(len(data), hashlib.sha256(data).hexdigest(), 0)
                         for name, data in (("model.pt", b"weights" * 1000),
                                            ("opt/state.bin", b"\x00\x01" * 10))}
        assert run.read_manifests() == ([], []), "uploaded but not committed: not a checkpoint"
        manifest = manager.commit(1, 0, {0: files}, {"loss": 0.5}, world_size=2,
                                  backend="torch")
        assert run.read_manifests() == ([manifest], [])
        assert manifest.schema_version == 2 and manifest.ranks == [0] and manifest.lease == 1
        assert manifest.directory == "checkpoint_000001-a0"
        assert manifest.committed_at and manifest.world_size == 2 and manifest.backend == "torch"
        checkpoint = run.checkpoint(manifest)
        restored = checkpoint.to_directory(str(tmp_path / "restored"))
        with open(os.path.join(restored, "opt", "state.bin"), "rb") as handle:
            assert handle.read() == b"\x00\x01" * 10

        # A file changed after the commit is caught by its hash.
        fs, root = run.filesystem()
        fs.pipe_file(f"{root}/checkpoint_000001-a0/model.pt", b"tampered" * 875)
        with pytest.raises(pd.CheckpointCorruptError,
                           match="'model.pt' does not match its manifest"):
            checkpoint.to_directory(str(tmp_path / "again"))

        # Torn staging of attempt 0 (no manifest) is invisible; once attempt 0 has ended, the
        # first commit of attempt 1 removes it.
        run.upload(source, index=2, attempt=0, rank=0)
        ledger.end(first, "failed", "killed", last_reported=2)
        second_attempt = ledger.begin(world_size=2, resumed_from=checkpoint,
                                      restart_cause="killed")
        assert second_attempt["attempt"] == 1 and second_attempt["steps_redone"] == 1
        files3 = run.upload(source, index=2, attempt=1, rank=0)
        manager.commit(2, 1, {0: files3}, {"loss": 0.4}, world_size=2, backend="torch")
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        assert names == ["_attempts", "_lease", "_manifests", "checkpoint_000001-a0",
                         "checkpoint_000002-a1"]

        # Retention deletes the manifest, then the files.
        run.delete_checkpoint(manifest)
        assert [m.index for m in run.read_manifests()[0]] == [2]
        assert not fs.exists(f"{root}/checkpoint_000001-a0")
    finally:
        manager.close()


def manifests_scored(values, attribute="val") -> list[Manifest]:
    return [Manifest(index=i, attempt=0, files={}, metrics={} if v is None else {attribute: v})
            for i, v in enumerate(values, start=1)]


def test_an_upload_to_s3_holds_at_most_its_memory_budget_of_file_bytes(s3_storage, tmp_path):
    """Large files go up in 16 MiB parts, a few at once; small ones whole, as many as fit: the
    bytes sent at once stay within the budget (s3fs's defaults sent 138 MiB of these files at
    once), and every object is the file it came from."""
    import asyncio
    import threading

    from s3fs import S3FileSystem

    from prefect_distrain.checkpoints.fs import put_files

    class Metered(S3FileSystem):
        """Counts the body bytes of the requests in flight."""

        in_flight = peak = 0
        lock = threading.Lock()

        async def _call_s3(self, method, *args, **kwargs):
            size = len(kwargs.get("Body") or b"")
            with self.lock:
                type(self).in_flight += size
                type(self).peak = max(type(self).peak, type(self).in_flight)
            try:
                await asyncio.sleep(0.01)  # let every request the batch starts begin
                return await super()._call_s3(method, *args, **kwargs)
            finally:
                with self.lock:
                    type(self).in_flight -= size

    sizes = [40 * 2**20] * 3 + [3 * 2**20] * 6 + [10]
    local, remote = [], []
    for i, size in enumerate(sizes):
        path = tmp_path / f"f{i}"
        path.write_bytes(os.urandom(size))
        local.append(str(path))
        remote.append(f"models/metered/f{i}")
    fs = Metered(**s3_storage["storage_options"], skip_instance_cache=True)
    put_files(fs, local, remote, memory_bytes=64 * 2**20)
    assert 0 < Metered.peak <= 64 * 2**20
    for path, key in zip(local, remote):
        assert fs.cat_file(key) == open(path, "rb").read()


def test_retention_keeps_n_best_plus_latest_and_protected():
    manifests = manifests_scored([5, 1, 4, 2, 3])
    keep = lambda *a, **k: [m.index for m in retained(manifests, *a, **k)]  # noqa: E731
    assert keep(2, "val", "min") == [2, 4, 5]
    assert keep(2, "val", "max") == [1, 3, 5]
    assert keep(2, None, "max") == [4, 5]
    assert keep(1, "val", "min", protected={"checkpoint_000003-a0"}) == [2, 3, 5]
    assert keep(None, "val", "min") == [1, 2, 3, 4, 5]
    # NaN, missing and non-numeric scores are never best: 0.09 stays.
    odd = manifests_scored([float("nan"), float("nan"), 0.98, 0.09, 0.94, None, "x"])
    assert [m.index for m in retained(odd, 1, "val", "min")] == [4, 7]


scores = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5),
                   st.none(), st.just("n/a"))


@settings(max_examples=300, deadline=None)
@given(values=st.lists(scores, min_size=1, max_size=12), keep=st.integers(1, 5),
       order=st.sampled_from(["min", "max"]))
def test_retention_never_lets_an_odd_score_push_out_a_real_one(values, keep, order):
    """Over random score sequences: the kept checkpoints are the ``keep`` best real scores
    (or all of them), the latest, and unscored ones only where real ones ran out; the best
    checkpoint of every reader is the best real score."""
    manifests = manifests_scored(values)
    kept = {m.index for m in retained(manifests, keep, "val", order)}
    real = [m for m in manifests if score(m.metrics, "val") is not None]
    rank = sorted(real, key=lambda m: (score(m.metrics, "val") * (-1 if order == "max" else 1),
                                       -m.index))
    assert {m.index for m in rank[:keep]} <= kept, "a real score among the best was deleted"
    assert len(manifests) in kept, "the latest is always kept"
    unscored_kept = kept - {m.index for m in real} - {len(manifests)}
    assert not unscored_kept or len(real) < keep
    ordered = [m.index for m in best_first(manifests, "val", order)]
    assert ordered[:len(real)] == [m.index for m in rank]
    assert ordered[len(real):] == sorted(set(ordered) - {m.index for m in real}, reverse=True)


@settings(max_examples=200, deadline=None)
@given(reported=st.lists(scores, min_size=1, max_size=10),
       validated=st.lists(st.one_of(st.none(), scores), min_size=10, max_size=10),
       keep=st.integers(1, 4), order=st.sampled_from(["min", "max"]))
def test_retention_scores_by_the_validated_value_where_there_is_one(reported, validated, keep,
                                                                     order):
    """A validation's metric replaces the reported one of the same name (as in Ray Train):
    retention over (reported, validation records) is retention over the merged metrics."""
    from prefect_distrain.checkpoints.validation import ValidationRecord

    manifests = manifests_scored(reported)
    records = {m.directory: ValidationRecord("validated", {"val": v})
               for m, v in zip(manifests, validated) if v is not None}
    merged = [Manifest(index=m.index, attempt=0, files={}, metrics={
        **m.metrics, **(records[m.directory].metrics if m.directory in records else {})})
        for m in manifests]
    assert [m.index for m in retained(manifests, keep, "val", order, validations=records)] == \
        [m.index for m in retained(merged, keep, "val", order)]


# -- through Ray and Prefect -------------------------------------------------------------------


def scored_loop(config):
    """Reports val_loss 5, 1, 4, 2, 3 with a checkpoint (of rank 0) every epoch."""
    rank = pd.get_context().get_world_rank()
    for epoch, val_loss in enumerate(config["losses"]):
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                torch.save({"epoch": epoch}, os.path.join(folder, "model.pt"))
            else:  # sharded state: every rank adds its own file
                torch.save({"rank": rank}, os.path.join(folder, f"shard_{rank}.pt"))
            pd.report({"epoch": epoch, "val_loss": val_loss},
                      checkpoint=pd.Checkpoint.from_directory(folder))


@pytest.mark.usefixtures("ray_cluster", "prefect_server")
@pytest.mark.parametrize("upload", ["sync", "async"])
def test_train_commits_keeps_the_best_and_shows_artifacts(storage_kind, upload):
    from prefect import flow

    run_name = f"scored-{upload}"

    @flow
    def scored():
        return pd.train(
            scored_loop, config={"losses": [5.0, 1.0, 4.0, 2.0, 3.0]},
            scaling=pd.ScalingConfig(num_workers=2),
            run=pd.RunConfig(name=run_name, **storage_kind),
            checkpoint=pd.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_loss",
                                           checkpoint_score_order="min", upload=upload))

    state = scored(return_state=True)
    result = state.result()
    assert [c.index for c, _ in result.best_checkpoints] == [2, 4, 5]
    assert [m["val_loss"] for _, m in result.best_checkpoints] == [1.0, 2.0, 3.0]
    assert result.checkpoint.index == 5
    folders, manifests = listing(storage_kind, run_name)
    assert folders == ["checkpoint_000002-a0", "checkpoint_000004-a0", "checkpoint_000005-a0"]
    assert manifests == [f + ".json" for f in folders]
    assert sorted(result.checkpoint.manifest.files) == ["model.pt", "shard_1.pt"]
    assert result.checkpoint.manifest.ranks == [0, 1]
    best = pd.Checkpoint(result.best_checkpoints[0][0].path, storage_kind["storage_options"],
                         result.best_checkpoints[0][0].manifest)
    assert pd.torch.load_state(best, "model.pt") == {"epoch": 1}

    logs, artifacts, _ = flow_run_records(state.state_details.flow_run_id)
    mine = artifacts
    links = [a for a in mine if a.key == f"{run_name}-checkpoint"]
    assert len(links) == 5, "one link artifact per committed checkpoint"
    table = [a for a in mine if a.key == f"{run_name}-checkpoints"]
    assert len(table) == 1 and [row["index"] for row in json.loads(table[0].data)] == [2, 4, 5]
    shown = json.dumps([a.model_dump(mode="json") for a in artifacts]) + "".join(logs)
    assert "Committed checkpoint 5" in shown
    assert S3_SECRET not in shown, "credentials reached a log or an artifact"
    assert S3_SECRET.encode() not in cloudpickle.dumps(result), "credentials in the result"
    assert_no_train_actors()


def mutating_loop(config):
    """Saves weights, reports them async, then at once changes both the model and the file."""
    model = torch.nn.Linear(3, 1, bias=False)
    saved = []
    with tempfile.TemporaryDirectory() as folder:
        for step in range(3):
            with torch.no_grad():
                model.weight.fill_(float(step))
            torch.save(model.state_dict(), os.path.join(folder, "model.pt"))
            pd.report({"step": step}, checkpoint=pd.Checkpoint.from_directory(folder))
            saved.append(float(step))
            with torch.no_grad():
                model.weight.fill_(-99.0)
            torch.save(model.state_dict(), os.path.join(folder, "model.pt"))
    return saved


@pytest.mark.usefixtures("ray_cluster")
def test_async_upload_saves_what_was_reported_not_what_came_after(storage_kind):
    run = pd.RunConfig(name="mutating", **storage_kind)
    with pd.Trainer(num_workers=1, run=run,
                    checkpoint=pd.CheckpointConfig(upload="async")) as trainer:
        result = trainer.fit(mutating_loop)
    for checkpoint, metrics in result.best_checkpoints:
        full = pd.Checkpoint(checkpoint.path, storage_kind["storage_options"], checkpoint.manifest)
        weight = pd.torch.load_state(full, "model.pt")["weight"]
        assert torch.equal(weight, torch.full((1, 3), float(metrics["step"])))
    assert sorted(c.index for c, _ in result.best_checkpoints) == [1, 2, 3]


def failing_upload_loop(config):
    """Arms the flaky storage so that checkpoint ``config['fail_at']`` fails to upload."""
    flaky_fs.arm(fail_after=config["fail_at"] - 1)
    for step in range(config["steps"]):
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "state.txt"), "w") as handle:
                handle.write(str(step))
            pd.report({"step": step}, checkpoint=pd.Checkpoint.from_directory(folder))
        if step + 1 == config["fail_at"] and step + 1 < config["steps"]:
            assert flaky_fs.FlakyFileSystem.failed.wait(30)  # the background upload has failed
    return "finished"


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("fail_at,steps", [(2, 4), (3, 3)], ids=["next-report", "at-the-end"])
def test_a_failed_async_upload_is_raised_never_lost(tmp_path, fail_at, steps):
    storage = {"storage": f"flaky://{tmp_path}/runs", "storage_options": {}}
    with pd.Trainer(num_workers=1, run=pd.RunConfig(name="flaky", **storage),
                    checkpoint=pd.CheckpointConfig(upload="async")) as trainer:
        with pytest.raises(pd.CheckpointUploadError,
                           match=f"uploading checkpoint {fail_at} from rank 0 .* injected "
                                 "storage failure") as caught:
            trainer.fit(failing_upload_loop, config={"fail_at": fail_at, "steps": steps})
    assert caught.value.index == fail_at and caught.value.retryable
    if fail_at == 2:
        assert "in report" in str(caught.value.__cause__), "raised by the next report()"
    folders, manifests = listing(storage, "flaky")
    assert manifests == [f"checkpoint_{i:06d}-a0.json" for i in range(1, fail_at)]
    assert_no_train_actors()


def torn_loop(config):
    """Checkpoint 2 has three files; on attempt 0 the worker is SIGKILLed after the first."""
    attempt = pd.get_context().get_attempt()
    flaky_fs.arm(fail_after=2 if attempt == 0 else None, mode="kill")  # 1 file, then 1 of 3
    start = 0
    if (checkpoint := pd.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            with open(os.path.join(folder, "a.txt")) as handle:
                start = int(handle.read()) + 1
    for step in range(start, 3):
        with tempfile.TemporaryDirectory() as folder:
            for name in ("a.txt", "b.txt", "c.txt") if step else ("a.txt",):
                with open(os.path.join(folder, name), "w") as handle:
                    handle.write(str(step))
            pd.report({"step": step}, checkpoint=pd.Checkpoint.from_directory(folder))
    return {"attempt": attempt, "started_at": start}


@pytest.mark.usefixtures("ray_cluster")
def test_a_worker_killed_mid_upload_leaves_a_torn_folder_that_is_never_used(tmp_path):
    storage = {"storage": f"flaky://{tmp_path}/runs", "storage_options": {}}
    run = pd.RunConfig(name="torn", **storage)
    with pytest.raises(pd.WorkerLostError, match="rank 0's worker died"):
        with pd.Trainer(num_workers=1, run=run) as trainer:
            trainer.fit(torn_loop)
    folders, manifests = listing(storage, "torn")
    assert manifests == ["checkpoint_000001-a0.json"], "the torn checkpoint was not committed"
    assert folders == ["checkpoint_000001-a0", "checkpoint_000002-a0"]
    torn = tmp_path / "runs" / "torn" / "checkpoint_000002-a0"
    assert sorted(os.listdir(torn)) == ["a.txt"], "killed after one of three files"

    with pd.Trainer(num_workers=1, run=run) as trainer:  # what a Prefect retry does
        result = trainer.fit(torn_loop, resume_from_checkpoint="latest")
    assert result.worker_results == [{"attempt": 1, "started_at": 1}]
    assert result.attempt == 1
    folders, manifests = listing(storage, "torn")
    assert folders == ["checkpoint_000001-a0", "checkpoint_000002-a1", "checkpoint_000003-a1"]
    assert not torn.exists(), "the next successful commit removed the torn staging"
    assert_no_train_actors()


def late_file_loop(config):
    """Rank 1's folder gains a file after its report listed the files, while it waits for the
    driver's plan (which needs rank 0's report: rank 0 reports only once the file is there)."""
    import threading
    import time

    from prefect_distrain.session import current_session

    rank = pd.get_context().get_world_rank()
    flag = os.path.join(config["shared"], "late-file-written")
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, f"shard_{rank}.pt"), "w") as handle:
            handle.write(str(rank))
        if rank == 1:
            session = current_session()

            def write_late() -> None:
                while session.busy != "uploading checkpoint 1":  # its files are listed
                    time.sleep(0.01)
                with open(os.path.join(folder, "late.txt"), "w") as handle:
                    handle.write("written after the report")
                open(flag, "w").close()

            threading.Thread(target=write_late, daemon=True).start()
        else:
            while not os.path.exists(flag):
                time.sleep(0.01)
        pd.report({"step": 0}, checkpoint=pd.Checkpoint.from_directory(folder))


@pytest.mark.usefixtures("ray_cluster")
def test_a_folder_that_changed_after_its_report_is_never_committed(tmp_path):
    run = pd.RunConfig(name="late", storage=str(tmp_path / "runs"))
    with pytest.raises(pd.ConfigurationError,
                       match=r"checkpoint 1: rank 1's folder changed between its report and its "
                             r"upload \(gone: \[\], new: \['late.txt'\]\); it was not committed"):
        with pd.Trainer(num_workers=2, run=run) as trainer:
            trainer.fit(late_file_loop, config={"shared": str(tmp_path)})
    assert listing({"storage": str(tmp_path / "runs"), "storage_options": {}}, "late")[1] == []
    assert_no_train_actors()


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    payload = RunsCode()
    payload.marker = marker
    folder = tmp_path / "evil"
    folder.mkdir()
    with open(folder / "model.pt", "wb") as handle:
        pickle.dump(payload, handle, protocol=2)  # torch.load reads plain pickles too
    with pytest.raises(pd.UnsafeCheckpointError, match="refused to load 'model.pt'.*weights_only"):
        pd.torch.load_state(pd.Checkpoint.from_directory(folder), "model.pt")
    assert not marker.exists(), "the pickle's code ran"


@pytest.mark.usefixtures("ray_cluster")
def test_bad_storage_input_names_the_fix(tmp_path, s3_storage, monkeypatch):
    def loop():
        pd.report({"loss": 1.0})

    def fit(**run):
        with pd.Trainer(num_workers=1, run=pd.RunConfig(name="bad", **run)) as trainer:
            return trainer.fit(loop)

    with pytest.raises(pd.ConfigurationError, match="unknown protocol. Use a local path"):
        fit(storage="nosuchproto://bucket/runs")
    options = s3_storage["storage_options"]
    with pytest.raises(pd.ConfigurationError,
                       match="'s3://missing-bucket/runs/bad' does not exist: create the bucket"):
        fit(storage="s3://missing-bucket/runs", storage_options=options)
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                     "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                     "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(variable, raising=False)
    # On a cloud runner the instance role would supply credentials: not here.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(pd.ConfigurationError, match="no credentials to write to storage"):
        fit(storage="s3://models/runs",
            storage_options={"client_kwargs": options["client_kwargs"],
                             "skip_instance_cache": True})
    with pytest.raises(pd.ConfigurationError, match="not visible from rank 0 .* memory://"):
        fit(storage="memory://private")
    with pytest.raises(pd.ConfigurationError, match="num_to_keep must be at least 1"):
        pd.CheckpointConfig(num_to_keep=0)

    def unscored(config):
        with tempfile.TemporaryDirectory() as folder:
            pd.report({"loss": 1.0}, checkpoint=pd.Checkpoint.from_directory(folder))

    with pytest.raises(pd.ConfigurationError,
                       match="checkpoint_score_attribute 'val_loss' is not in the metrics .* "
                             r"\(reported: loss\)"):
        with pd.Trainer(num_workers=1, run=pd.RunConfig(name="unscored", storage=str(tmp_path)),
                        checkpoint=pd.CheckpointConfig(checkpoint_score_attribute="val_loss")
                        ) as trainer:
            trainer.fit(unscored)
    assert_no_train_actors()


@pytest.mark.usefixtures("ray_cluster", "prefect_server")
def test_credentials_from_a_storage_block(s3_storage):
    from prefect import flow

    from prefect_distrain.blocks import CheckpointStorage

    options = dict(s3_storage["storage_options"])
    secrets = {"key": options.pop("key"), "secret": options.pop("secret")}
    CheckpointStorage(url="s3://models/block-runs", options=options,
                      secret_options=secrets).save("test-models", overwrite=True)
    block = CheckpointStorage.load("test-models")
    assert S3_SECRET not in repr(block) and S3_SECRET not in block.model_dump_json()

    @flow
    def from_block():
        return pd.train(scored_loop, config={"losses": [1.0]},
                        run=pd.RunConfig(name="from-block", storage=block))

    state = from_block(return_state=True)
    result = state.result()
    assert result.checkpoint.path == "s3://models/block-runs/from-block/checkpoint_000001-a0"
    logs, artifacts, _ = flow_run_records(state.state_details.flow_run_id)
    shown = json.dumps([a.model_dump(mode="json") for a in artifacts]) + "".join(logs)
    assert "from-block-summary" in shown and S3_SECRET not in shown
    assert listing({"storage": "s3://models/block-runs", "storage_options": s3_storage[
        "storage_options"]}, "from-block")[1] == ["checkpoint_000001-a0.json"]
