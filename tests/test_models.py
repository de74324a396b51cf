"""Model promotion: aliases written with compare-and-swap, loaded verified, rolled back, and
announced to Prefect. On local disk and on the S3 protocol (moto_server); the race is two real
processes creating the same version at the same moment."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid

import pytest
from conftest import S3_SECRET, flow_run_records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prefect_distrain as pd
from prefect_distrain.checkpoints.manifest import Manifest
from prefect_distrain.checkpoints.storage import RunStorage
from prefect_distrain.models import (
    AliasConflictError,
    AliasCorruptError,
    AliasNotFoundError,
    alias_history,
    load_alias,
    promote,
    rollback,
)


def committed(storage: dict, run_name: str, index: int, files: dict[str, bytes],
              metrics: dict | None = None) -> pd.Checkpoint:
    """A checkpoint committed as the driver commits one: files uploaded, then the manifest."""
    run = RunStorage(storage["storage"], run_name, storage["storage_options"])
    with tempfile.TemporaryDirectory() as source:
        for name, data in files.items():
            path = os.path.join(source, *name.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(data)
        uploaded = run.upload(source, index=index, attempt=0, rank=0)
    manifest = Manifest.new(index, 0, uploaded, metrics=metrics or {"accuracy": 0.5 + index / 100},
                            world_size=1, backend="torch", lease=None)
    run.write_manifest(manifest)
    return run.checkpoint(manifest)


def where(storage: dict) -> dict:
    return {"storage": storage["storage"], "storage_options": storage["storage_options"]}


def alias_folder(storage: dict, model: str, alias: str = "production"):
    fs, root = RunStorage(storage["storage"], "x", storage["storage_options"]).filesystem()
    root = root.rsplit("/", 1)[0]
    return fs, f"{root}/_models/{model}/{alias}"


@pytest.fixture
def local(tmp_path) -> dict:
    return {"storage": str(tmp_path / "runs"), "storage_options": {}}


# -- promote, load -----------------------------------------------------------------------------


def test_promote_then_load_alias_gives_the_same_checkpoint_verified(storage_kind, caplog):
    caplog.set_level(logging.INFO, logger="prefect_distrain")
    checkpoint = committed(storage_kind, "digits-0612", 3,
                           {"model.pt": b"weights" * 300, "extra/vocab.txt": b"a b c"},
                           metrics={"accuracy": 0.97, "_training_iteration": 3})
    entry = promote(checkpoint, model="digits", alias="production", **where(storage_kind),
                    reason="best on the May holdout", expected=None)
    assert (entry.version, entry.action, entry.index) == (1, "promote", 3)
    assert entry.checkpoint == checkpoint.path and entry.metrics["accuracy"] == 0.97
    assert entry.previous is None and entry.reason == "best on the May holdout"
    assert entry.created_by["host"] and entry.created_by["pid"] == os.getpid()
    assert "user" in entry.created_by and "flow_run_id" not in entry.created_by

    loaded = load_alias("digits", "production", **where(storage_kind))
    assert loaded == checkpoint and loaded.manifest == checkpoint.manifest
    with loaded.as_directory() as folder:
        assert open(os.path.join(folder, "model.pt"), "rb").read() == b"weights" * 300
        assert open(os.path.join(folder, "extra", "vocab.txt"), "rb").read() == b"a b c"

    # The record: the manifest's digest, the URL without credentials, no secret anywhere.
    fs, folder = alias_folder(storage_kind, "digits")
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)] == ["v000001.json"]
    record = json.loads(fs.cat_file(f"{folder}/v000001.json"))
    run = RunStorage(storage_kind["storage"], "digits-0612", storage_kind["storage_options"])
    manifest_bytes = fs.cat_file(run.path("_manifests", "checkpoint_000003-a0.json"))
    assert record["checkpoint"]["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert record["checkpoint"]["url"] == checkpoint.path and "@" not in checkpoint.path
    shown = fs.cat_file(f"{folder}/v000001.json").decode() + caplog.text + repr(loaded) \
        + repr(entry)
    assert S3_SECRET not in shown and "test-key" not in shown
    assert "digits:production v1: promote" in caplog.text


def test_storage_may_be_a_block_or_a_run_config(s3_storage):
    """Like RunConfig.storage: the block's secrets reach fsspec only."""
    from prefect_distrain.blocks import CheckpointStorage

    options = dict(s3_storage["storage_options"])
    block = CheckpointStorage(url=s3_storage["storage"],
                              options={"client_kwargs": options["client_kwargs"]},
                              secret_options={"key": options["key"], "secret": options["secret"]})
    checkpoint = committed(s3_storage, "run-a", 1, {"model.pt": b"1"})
    promote(checkpoint.without_credentials(), model="digits", alias="staging", storage=block)
    config = pd.RunConfig(storage=s3_storage["storage"], storage_options=options)
    assert load_alias("digits", "staging", storage=config) == checkpoint
    assert [e.version for e in alias_history("digits", "staging", storage=block)] == [1]
    # Credentials written into a URL never reach the record (the block's options are used).
    with_secret = checkpoint.path.replace("s3://", f"s3://test-key:{S3_SECRET}@")
    entry = promote(with_secret, model="digits", alias="canary", storage=block)
    assert entry.checkpoint == checkpoint.path and S3_SECRET not in repr(entry)
    fs, folder = alias_folder(s3_storage, "digits", "canary")
    assert S3_SECRET.encode() not in fs.cat_file(f"{folder}/v000001.json")


# -- compare-and-swap --------------------------------------------------------------------------

RACER = textwrap.dedent("""
    import json, os, sys, time
    args = json.loads(sys.argv[1])
    import prefect_distrain.models as models

    real = models.create_exclusive

    def gated(fs, path, data):
        # Both promoters have read the same highest version: now both create the next one.
        open(os.path.join(args["gate"], f"ready-{os.getpid()}"), "w").close()
        deadline = time.monotonic() + 60
        while len(os.listdir(args["gate"])) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        return real(fs, path, data)

    models.create_exclusive = gated
    try:
        entry = models.promote(args["checkpoint"], model="digits", alias="production",
                               storage=args["storage"], storage_options=args["options"],
                               reason=f"racer {os.getpid()}")
        print("WON", entry.version, entry.checkpoint)
    except models.AliasConflictError as error:
        print("CONFLICT", error)
    print("PREFECT_IMPORTED", "prefect" in sys.modules)
""")


def test_two_processes_promoting_at_once_exactly_one_wins(storage_kind, tmp_path):
    first = committed(storage_kind, "run", 1, {"model.pt": b"one"})
    mine, theirs = (committed(storage_kind, "run", i, {"model.pt": f"{i}".encode()})
                    for i in (2, 3))
    promote(first, "digits", **where(storage_kind))
    gate = tmp_path / "gate"
    gate.mkdir()
    racers = [subprocess.Popen(
        [sys.executable, "-c", RACER, json.dumps({
            "checkpoint": c.path, "storage": storage_kind["storage"],
            "options": storage_kind["storage_options"], "gate": str(gate)})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in (mine, theirs)]
    outputs = [r.communicate(timeout=120) for r in racers]
    assert all(r.returncode == 0 for r in racers), [err[-2000:] for _, err in outputs]
    lines = [out.splitlines() for out, _ in outputs]
    won = [ls[0] for ls in lines if ls[0].startswith("WON")]
    lost = [ls[0] for ls in lines if ls[0].startswith("CONFLICT")]
    assert len(won) == 1 and len(lost) == 1, lines
    assert all(ls[1] == "PREFECT_IMPORTED False" for ls in lines), "Prefect imported outside a run"
    _, version, winner = won[0].split(" ")
    assert version == "2"
    assert "another writer created v2 first" in lost[0] and winner in lost[0]
    assert "Load the alias again" in lost[0] and "expected=" in lost[0]
    assert not any(S3_SECRET in out + err for out, err in outputs)
    history = alias_history("digits", "production", **where(storage_kind))
    assert [e.version for e in history] == [2, 1] and history[0].checkpoint == winner
    assert load_alias("digits", **where(storage_kind)).path == winner


def test_threads_promoting_with_the_same_expected_value_one_wins(local):
    base = committed(local, "run", 1, {"model.pt": b"base"})
    candidates = [committed(local, "run", i, {"model.pt": bytes([i])}) for i in range(2, 8)]
    promote(base, "digits", **local)
    start = threading.Barrier(len(candidates))
    outcomes: list = []

    def promoter(checkpoint):
        start.wait()
        try:
            outcomes.append(promote(checkpoint, "digits", **local, expected=base))
        except AliasConflictError as error:
            outcomes.append(error)

    threads = [threading.Thread(target=promoter, args=(c,)) for c in candidates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    winners = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(outcomes) == len(candidates) and len(winners) == 1
    assert all(o.current is None or o.current.version == 2 for o in outcomes
               if isinstance(o, AliasConflictError))
    assert [e.version for e in alias_history("digits", **local)] == [2, 1]


def test_s3s_conflict_while_another_write_is_in_flight_is_a_lost_race(local, monkeypatch):
    """S3 answers 409 ConditionalRequestConflict to a conditional PUT while another of the same
    key is in flight: that writer is about to win, so this one lost (it is not retried)."""
    from botocore.exceptions import ClientError

    import prefect_distrain.models as models

    a, b = (committed(local, "run", i, {"model.pt": bytes([i])}) for i in (1, 2))
    promote(a, "digits", **local)
    tries = []

    def in_flight(fs, path, data):
        tries.append(path)
        error = OSError(5, "conflict")
        error.__cause__ = ClientError({"Error": {"Code": "ConditionalRequestConflict"},
                                       "ResponseMetadata": {"HTTPStatusCode": 409}}, "PutObject")
        raise error

    monkeypatch.setattr(models, "create_exclusive", in_flight)
    monkeypatch.setattr(models, "_WINNER_WAIT_S", 0.3)
    with pytest.raises(AliasConflictError, match="another writer was creating v2 at the same"):
        promote(b, "digits", **local)
    assert len(tries) == 1 and tries[0].endswith("/v000002.json")
    assert [e.version for e in alias_history("digits", **local)] == [1]


def test_expected_must_name_the_current_value(local):
    a, b, c = (committed(local, "run", i, {"model.pt": bytes([i])}) for i in (1, 2, 3))
    first = promote(a, "digits", **local, expected=None)
    with pytest.raises(AliasConflictError) as refused:
        promote(b, "digits", **local, expected=None)
    message = str(refused.value)
    assert "is not no value as expected: it is v1 = " in message and a.path in message
    assert "promoted by" in message and "retry with expected=" in message
    assert refused.value.current == first
    assert pickle.loads(pickle.dumps(refused.value)).current == first, "crosses processes"
    for wrong in (b, b.path, 2, first.version + 5):
        with pytest.raises(AliasConflictError):
            promote(c, "digits", **local, expected=wrong)
    assert [e.version for e in alias_history("digits", **local)] == [1], "nothing was written"
    second = promote(b, "digits", **local, expected=first)            # an AliasEntry: its version
    third = promote(c, "digits", **local, expected=b.path + "/")      # a URL: its value
    assert (second.version, third.version) == (2, 3)
    with pytest.raises(pd.ConfigurationError, match="expected takes"):
        promote(a, "digits", **local, expected=3.0)
    again = promote(c, "digits", **local, reason="same again")  # already the value: a no-op
    assert again == third and len(alias_history("digits", **local)) == 3
    assert promote(c, "digits", **local, expected=a) == third, "a retry finds its own done"
    with pytest.raises(AliasConflictError):
        rollback("digits", **local, expected=a)
    with pytest.raises(AliasNotFoundError, match="has no value"):
        load_alias("digits", "canary", **local)


# -- verification ------------------------------------------------------------------------------


def test_a_file_changed_after_promotion_fails_its_download(storage_kind):
    checkpoint = committed(storage_kind, "run", 1, {"model.pt": b"good weights"})
    promote(checkpoint, "digits", **where(storage_kind))
    fs, root = RunStorage(storage_kind["storage"], "run",
                          storage_kind["storage_options"]).filesystem()
    fs.pipe_file(f"{root}/checkpoint_000001-a0/model.pt", b"evil weights")  # same size
    loaded = load_alias("digits", **where(storage_kind))
    with pytest.raises(pd.CheckpointCorruptError, match="'model.pt' does not match its manifest"):
        with loaded.as_directory():
            pass
    # A replaced manifest is caught by its digest, before any download.
    manifest_path = f"{root}/_manifests/checkpoint_000001-a0.json"
    fs.pipe_file(manifest_path, fs.cat_file(manifest_path).replace(b'"backend"', b'"backend" '))
    with pytest.raises(pd.CheckpointCorruptError, match="not the one promoted"):
        load_alias("digits", **where(storage_kind))
    fs.rm_file(manifest_path)
    with pytest.raises(pd.CheckpointCorruptError, match="has no manifest any more"):
        load_alias("digits", **where(storage_kind))


def edit(path, change) -> None:
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(change(data))


def test_a_damaged_alias_record_is_refused_never_skipped(local):
    a, b = (committed(local, "run", i, {"model.pt": bytes([i])}) for i in (1, 2))
    promote(a, "digits", **local)
    promote(b, "digits", **local)
    _, folder = alias_folder(local, "digits")
    head, older = os.path.join(folder, "v000002.json"), os.path.join(folder, "v000001.json")
    saved = {p: open(p, "rb").read() for p in (head, older)}

    def refused(error=AliasCorruptError, match=None):
        for call in (lambda: load_alias("digits", **local),
                     lambda: promote(a, "digits", **local),
                     lambda: rollback("digits", **local)):
            with pytest.raises(error, match=match):
                call()
        for path, data in saved.items():  # put it back
            with open(path, "wb") as handle:
                handle.write(data)
        assert load_alias("digits", **local) == b

    edit(head, lambda d: d[: len(d) // 2])
    refused(match="v000002.json: not valid JSON")
    edit(head, lambda d: d.replace(b'"version": 2', b'"version": 3'))
    refused(match="not the record of its own file")
    edit(older, lambda d: d.replace(b'"reason": ""', b'"reason": "rewritten"'))
    refused(match="v000001.json is not the record that v000002.json was written after")
    os.unlink(older)
    refused(match="v000001.json is missing")
    assert [e.version for e in alias_history("digits", **local)] == [2, 1]
    # The head pointed at another committed checkpoint: its manifest digest gives it away.
    edit(head, lambda d: d.replace(b"checkpoint_000002-a0", b"checkpoint_000001-a0"))
    with pytest.raises(pd.CheckpointCorruptError, match="not the one promoted"):
        load_alias("digits", **local)


def test_an_uncommitted_or_incomplete_checkpoint_is_never_promoted(local, tmp_path):
    run = RunStorage(local["storage"], "run")
    source = tmp_path / "src"
    source.mkdir()
    (source / "model.pt").write_bytes(b"torn")
    run.upload(str(source), index=1, attempt=0, rank=0)  # uploaded, never committed
    with pytest.raises(pd.ConfigurationError, match="it was never committed"):
        promote(f"{local['storage']}/run/checkpoint_000001-a0", "digits", **local)
    with pytest.raises(pd.ConfigurationError, match="not a run's checkpoint folder"):
        promote(pd.Checkpoint.from_directory(str(source)), "digits", **local)
    with pytest.raises(pd.ConfigurationError, match="no valid manifest"):
        promote(str(source), "digits", **local)
    broken = committed(local, "run", 2, {"model.pt": b"x", "opt.pt": b"y"})
    os.unlink(os.path.join(broken.path, "opt.pt"))
    with pytest.raises(pd.CheckpointCorruptError, match="'opt.pt' of its manifest is missing"):
        promote(broken, "digits", **local)
    changed = committed(local, "run", 3, {"model.pt": b"12345"})
    with open(os.path.join(changed.path, "model.pt"), "wb") as handle:
        handle.write(b"12345 and more")
    with pytest.raises(pd.CheckpointCorruptError, match="changed after the commit"):
        promote(changed, "digits", **local)
    same_size = committed(local, "run", 4, {"model.pt": b"12345"})
    with open(os.path.join(same_size.path, "model.pt"), "wb") as handle:
        handle.write(b"54321")
    with pytest.raises(pd.CheckpointCorruptError, match="does not match its manifest"):
        promote(same_size, "digits", **local, verify_hashes=True)
    assert alias_history("digits", **local) == [], "nothing was written"


@pytest.mark.parametrize("model,alias", [
    ("../escape", "production"), ("digits", "../../etc"), ("a/b", "production"),
    ("digits", ".."), (".hidden", "production"), ("", "production"), ("digits", ""),
    ("with space", "production"), ("digits", "back\\slash"), ("x" * 129, "production"),
    (None, "production"), ("digits", 7)])
def test_bad_model_and_alias_names_are_refused(local, tmp_path, model, alias):
    checkpoint = committed(local, "run", 1, {"model.pt": b"1"})
    calls = [lambda: promote(checkpoint, model=model, alias=alias, **local),
             lambda: load_alias(model, alias, **local),
             lambda: rollback(model, alias, **local),
             lambda: alias_history(model, alias, **local)]
    for call in calls:
        with pytest.raises(pd.ConfigurationError, match="name .* is not usable"):
            call()
    assert sorted(os.listdir(local["storage"])) == ["run"]
    assert sorted(os.listdir(tmp_path)) == ["runs"]


# -- rollback ----------------------------------------------------------------------------------


def test_rollback_restores_the_previous_value_and_history_keeps_every_entry(storage_kind):
    a, b = (committed(storage_kind, "run", i, {"model.pt": bytes([i])}) for i in (1, 2))
    promote(a, "digits", **where(storage_kind), reason="baseline")
    promote(b, "digits", **where(storage_kind), reason="better accuracy")
    undone = rollback("digits", **where(storage_kind), reason="latency regression")
    assert (undone.version, undone.action, undone.restores) == (3, "rollback", 1)
    assert load_alias("digits", **where(storage_kind)) == a
    history = alias_history("digits", **where(storage_kind))
    assert [(e.version, e.action, e.checkpoint, e.previous, e.reason) for e in history] == [
        (3, "rollback", a.path, b.path, "latency regression"),
        (2, "promote", b.path, a.path, "better accuracy"),
        (1, "promote", a.path, None, "baseline")]
    assert history[0].previous_manifest_sha256 == history[1].manifest_sha256
    assert [e.version for e in alias_history("digits", **where(storage_kind), limit=2)] == [3, 2]
    with pytest.raises(pd.ConfigurationError, match="nothing earlier to roll back to"):
        rollback("digits", **where(storage_kind))
    # Back to v2 on purpose; a checkpoint removed since (retention) can't be rolled back to.
    assert rollback("digits", **where(storage_kind), to_version=2).checkpoint == b.path
    RunStorage(storage_kind["storage"], "run",
               storage_kind["storage_options"]).delete_checkpoint(a.manifest)
    with pytest.raises(pd.CheckpointCorruptError, match="has no manifest any more"):
        rollback("digits", **where(storage_kind))
    assert len(alias_history("digits", **where(storage_kind))) == 4


# -- Prefect -----------------------------------------------------------------------------------


def test_a_promotion_in_a_flow_emits_its_event_and_shows_the_checkpoint(local, prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    model = f"digits-{uuid.uuid4().hex[:8]}"
    a = committed(local, "run", 1, {"model.pt": b"a"}, metrics={"accuracy": 0.91})
    b = committed(local, "run", 2, {"model.pt": b"b"}, metrics={"accuracy": 0.95})
    promote(a, model=model, **local)  # outside a run: no event, no artifact

    @flow
    def release():
        promoted = promote(b, model=model, **local, reason="beats 0.91", expected=a)
        return promoted, rollback(model, **local, reason="p99 latency doubled")

    state = release(return_state=True)
    entry, undone = state.result()
    flow_run_id = state.state_details.flow_run_id
    assert entry.created_by["flow_run_id"] == str(flow_run_id)
    assert entry.created_by["flow_run_name"] and "task_run_id" not in entry.created_by

    EventsWorker.drain_all(timeout=60)
    resource = f"prefect-distrain.model.{model}.production"
    ours = EventFilter(resource=EventResourceFilter(id=[resource]))
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            events = client.read_events(ours, limit=50).events
            if len(events) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    names = sorted(e.event for e in events)
    assert names == ["prefect-distrain.model.promoted", "prefect-distrain.model.rolled-back"], \
        "one each, in the flow; none for the promotion outside it"
    event = next(e for e in events if e.event.endswith("promoted"))
    assert event.payload["version"] == 2 and event.payload["reason"] == "beats 0.91"
    assert event.payload["checkpoint"] == b.path and event.payload["previous"] == a.path
    assert event.payload["metrics"] == {"accuracy": 0.95}
    assert event.resource.id == resource and event.resource["prefect-distrain.version"] == "2"
    related = {r.id: r.role for r in event.related}
    assert related["prefect-distrain.checkpoint.run.2"] == "checkpoint"
    assert related["prefect-distrain.run.run"] == "run"
    assert related[f"prefect.flow-run.{flow_run_id}"] == "flow-run"
    back = next(e for e in events if e.event.endswith("rolled-back"))
    assert (back.payload["version"], back.payload["restores"]) == (3, 1) == (undone.version,
                                                                            undone.restores)
    assert back.payload["checkpoint"] == a.path and back.payload["previous"] == b.path

    _, artifacts, _ = flow_run_records(flow_run_id)
    # A local path opens nothing in a browser: shown as text to copy, as checkpoints are.
    shown = sorted((x for x in artifacts if x.key == f"{model}-production"),
                   key=lambda x: x.created)
    assert len(shown) == 2 and f"`{b.path}`" in shown[0].data and f"`{a.path}`" in shown[1].data
    assert "beats 0.91" in shown[0].description and "accuracy=0.95" in shown[0].description
    assert "p99 latency doubled" in shown[1].description


# -- the history stays append-only -------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.tuples(st.just("promote"), st.integers(0, 3)),
                          st.tuples(st.just("rollback"), st.none())), min_size=1, max_size=12))
def test_promotions_and_rollbacks_keep_an_append_only_history(steps):
    """Against a model of the alias: an undo stack over the values. Every step leaves the
    versions before it byte for byte as they were, and the current value as expected."""
    root = tempfile.mkdtemp(prefix="aliases-")
    try:
        storage = {"storage": root, "storage_options": {}}
        checkpoints = [committed(storage, "run", i + 1, {"model.pt": bytes([i])})
                       for i in range(4)]
        _, folder = alias_folder(storage, "digits")
        values: list[tuple[int, int | None]] = []  # (checkpoint, version a rollback restores)
        for action, which in steps:
            before = {n: open(os.path.join(folder, n), "rb").read()
                      for n in (os.listdir(folder) if os.path.isdir(folder) else [])}
            if action == "promote":
                if values and values[-1][0] == which:
                    expected_change = False
                else:
                    values.append((which, len(values) or None))
                    expected_change = True
                promote(checkpoints[which], "digits", **storage)
            elif not values:
                expected_change = False
                with pytest.raises(AliasNotFoundError):
                    rollback("digits", **storage)
            elif values[-1][1] is None:
                expected_change = False
                with pytest.raises(pd.ConfigurationError, match="nothing earlier"):
                    rollback("digits", **storage)
            else:
                target = values[values[-1][1] - 1]
                values.append(target)
                expected_change = True
                assert rollback("digits", **storage).checkpoint == checkpoints[target[0]].path
            after = {n: open(os.path.join(folder, n), "rb").read()
                     for n in (os.listdir(folder) if os.path.isdir(folder) else [])}
            assert {n: after[n] for n in before} == before, "an earlier version changed"
            assert len(after) == len(before) + expected_change
            history = alias_history("digits", **storage)
            assert [e.version for e in history] == list(range(len(values), 0, -1))
            if values:
                assert load_alias("digits", **storage) == checkpoints[values[-1][0]]
                assert [e.checkpoint for e in reversed(history)] == [
                    checkpoints[v].path for v, _ in values]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_retention_keeps_every_checkpoint_an_alias_pointed_at(storage_kind):
    """num_to_keep=1 keeps the best and the latest, and every promoted checkpoint: the alias's
    value and the one a rollback goes back to stay loadable."""
    from prefect_distrain.checkpoints.manager import CheckpointManager

    run = RunStorage(storage_kind["storage"], "kept", storage_kind["storage_options"])
    manager = CheckpointManager(run, pd.CheckpointConfig(num_to_keep=1))
    manager.open({"pid": os.getpid()}, timeout_s=60)
    try:
        def commit(index: int) -> pd.Checkpoint:
            with tempfile.TemporaryDirectory() as source:
                with open(os.path.join(source, "model.bin"), "wb") as handle:
                    handle.write(bytes([index]) * 10)
                files = run.upload(source, index=index, attempt=0, rank=0)
            return manager.checkpoint(manager.commit(index, 0, {0: files}, {"step": index},
                                                     world_size=1, backend="torch"))

        first = commit(1)
        pd.promote(first, "digits", storage=run.run_url.rsplit("/", 1)[0],
                   storage_options=storage_kind["storage_options"])
        second = commit(2)
        pd.promote(second, "digits", storage=run.run_url.rsplit("/", 1)[0],
                   storage_options=storage_kind["storage_options"])
        commit(3)
        commit(4)
    finally:
        manager.close()
    assert sorted(m.index for m in run.read_manifests()[0]) == [1, 2, 4]
    where_ = {"storage": run.run_url.rsplit("/", 1)[0],
              "storage_options": storage_kind["storage_options"]}
    pd.rollback("digits", **where_)
    with pd.load_alias("digits", **where_).as_directory() as folder:
        assert open(os.path.join(folder, "model.bin"), "rb").read() == bytes([1]) * 10
