"""The rules of docs/checkpoints.md and docs/failures.md ("What happens", "Failures"), one
test (or a few) per rule, each checking the outcome: files in storage, the error's type and
message, the ledger, log lines, what the workers saw.

Real parts only: the module's local Ray (``ray_cluster``, 4 logical CPUs), a two-node
``ray.cluster_utils.Cluster`` for visibility, Prefect's test server, moto_server for S3. Faults
are real: a worker SIGKILLs itself, a collective times out, the ``flaky://`` storage fails or
holds an upload, ``nodelocal://`` gives each Ray node a disk of its own. Each fault happens once,
keyed on ``pd.get_context().get_attempt()``; the tests wait on events, gate files and
conditions (with generous caps), never on the clock.

The two-node test comes first: it needs this process free of Ray, and ``ray_cluster`` (module
scope) keeps the module's Ray connected from the first test that asks for it to the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from urllib.parse import quote

import flaky_fs
import node_local_fs
import pytest
import ray
import torch
from conftest import Records, _free_port, assert_no_train_actors, flow_run_records
from hypothesis import example, given, settings
from hypothesis import strategies as st
from ray.cluster_utils import Cluster

import prefect_distrain as pd
from prefect_distrain.checkpoints.fs import redact_url
from prefect_distrain.checkpoints.manager import upload_plan

pytestmark = pytest.mark.own_ray  # a Ray of two nodes of its own, in this process

#: The variables the torch backend sets on every worker, as torchrun would.
TORCHRUN_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                      "LOCAL_WORLD_SIZE", "NODE_RANK")


def wait_for(condition, what: str, cap_s: float = 120.0, every_s: float = 0.05) -> None:
    """Until ``condition()`` is true; AssertionError naming ``what`` once ``cap_s`` passed."""
    deadline = time.monotonic() + cap_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up after {cap_s:g} s waiting for {what}"
        time.sleep(every_s)


def ledger(run_folder) -> list[dict]:
    """The attempt ledger of a run, straight from its files."""
    folder = os.path.join(run_folder, "_attempts")
    records = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as handle:
            records.append(json.load(handle))
    return records


def listing(run_folder) -> tuple[list[str], list[str]]:
    """(checkpoint folders, manifests) of a run on local disk."""
    folders = sorted(n for n in os.listdir(run_folder) if n.startswith("checkpoint_"))
    manifests_dir = os.path.join(run_folder, "_manifests")
    manifests = sorted(os.listdir(manifests_dir)) if os.path.isdir(manifests_dir) else []
    return folders, manifests


class Recorder(pd.TrainingCallback):
    """Keeps every ``handle_result`` call: (results, info)."""

    def __init__(self):
        self.calls: list[tuple[list[dict], dict]] = []

    def handle_result(self, results, **info):
        self.calls.append((results, info))


def logger_with_records(name: str) -> tuple[logging.Logger, Records]:
    logger = logging.getLogger(name)
    records = Records()
    logger.handlers[:] = [records]
    logger.setLevel(logging.INFO)
    return logger, records


def write(folder, name: str, data: bytes) -> None:
    with open(os.path.join(folder, name), "wb") as handle:
        handle.write(data)


def read(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


# -- Visibility: a path some node cannot see (a two-node cluster, before the module's Ray) ----


@pytest.fixture
def two_nodes(tmp_path):
    """A head and a second node with 1 CPU each, on one machine; ``nodelocal://`` gives each
    node a disk of its own (folders under the returned root), in the driver and every worker."""
    assert not ray.is_initialized(), (
        "this test needs a process free of Ray: keep it before the tests that use ray_cluster")
    root = str(tmp_path / "node-disks")
    # A port of its own for the dashboard (the state API behind assert_no_train_actors): 8265
    # may be another Ray's on this machine.
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "dashboard_port": _free_port()})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address,
                 runtime_env={"worker_process_setup_hook": node_local_fs.setup_hook(root)})
        node_local_fs.install(root)
        yield root
    finally:
        ray.shutdown()
        cluster.shutdown()


def touch_loop(config):
    """Leaves a file in a folder every node shares: proof that the function ran."""
    open(os.path.join(config["ran"], f"rank-{pd.get_context().get_world_rank()}"), "w").close()
    pd.report({"step": 0})


def test_a_path_some_node_cannot_see_is_refused_before_training(two_nodes, tmp_path):
    """Visibility: the driver's marker is on the head node's disk; the worker on the other
    node can't see it, so the run is refused, naming that rank and its node and the fix, before
    the attempt ledger is written and before the function runs."""
    root = two_nodes
    ran = tmp_path / "ran"
    ran.mkdir()
    head = ray.get_runtime_context().get_node_id()
    other = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != head]
    assert len(other) == 1
    scaling = pd.ScalingConfig(num_workers=2, placement_strategy="STRICT_SPREAD")
    run = pd.RunConfig(name="private", storage="nodelocal://runs")
    with pytest.raises(pd.ConfigurationError) as caught:
        with pd.Trainer(scaling=scaling, run=run) as trainer:
            trainer.fit(touch_loop, config={"ran": str(ran)})
    message = str(caught.value)
    assert message.startswith("storage 'nodelocal://runs/private' is not visible from rank ")
    blind = re.findall(r"rank (\d) on ([^ ]+) \(the driver's marker file is not there\)", message)
    assert len(blind) == 1, f"exactly the rank on the other node is named: {message}"
    assert blind[0][1] == other[0]["NodeManagerAddress"], message
    assert "Use storage every worker can reach" in message
    assert os.listdir(ran) == [], "the training function ran"
    # On any node's disk: no ledger, no checkpoint, and the driver's marker removed again.
    for node in os.listdir(root):
        run_folder = os.path.join(root, node, "runs", "private")
        left = os.listdir(run_folder) if os.path.isdir(run_folder) else []
        assert "_attempts" not in left, f"the ledger was written on node {node}"
        assert not [n for n in left if n.startswith(("checkpoint_", "_manifests", ".visible"))], \
            f"left on node {node}: {left}"
    assert head in os.listdir(root), "the driver wrote its marker on its own node's disk"
    assert_no_train_actors()


# -- URLs are shown without credentials or query strings ---------------------------------------

#: A marker in every generated secret: it must never be shown.
SECRET = "Zq9SECRET"
_SECRET_CHARS = string.ascii_letters + string.digits + " !$&'()*+,;=:@/?#[]%~-._"
_PATH_CHARS = string.ascii_lowercase + string.digits + "-._~!$&'()*+,;=:@%"


def _encoded(text: str) -> str:
    return quote(SECRET + text, safe="")


_hosts = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,12}(\.[a-z][a-z0-9-]{0,8}){0,3}", fullmatch=True),
    st.ip_addresses(v=4).map(str))
_userinfo = st.one_of(
    st.text(_SECRET_CHARS, max_size=12).map(lambda u: f"{_encoded(u)}@"),
    st.tuples(st.text(_SECRET_CHARS, max_size=12), st.text(_SECRET_CHARS, max_size=12)).map(
        lambda up: f"{_encoded(up[0])}:{_encoded(up[1])}@"),
    st.text(_SECRET_CHARS, max_size=12).map(lambda p: f":{_encoded(p)}@"))
_query = st.lists(st.tuples(st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,10}", fullmatch=True),
                            st.text(_SECRET_CHARS, max_size=16)), min_size=1, max_size=3).map(
    lambda pairs: "?" + "&".join(f"{k}={_encoded(v)}" for k, v in pairs))
_fragment = st.text(_SECRET_CHARS, max_size=16).map(lambda f: "#" + _encoded(f))


@st.composite
def secret_urls(draw):
    """(a URL with credentials and/or a query and/or a fragment, what must be shown of it)."""
    # (abfs and az are below: their user part is a container's name, not a credential.)
    scheme = draw(st.sampled_from(["s3", "s3a", "gs", "gcs", "http", "https", "hdfs", "sftp",
                                   "webdav+https"]))
    host = draw(_hosts)
    port = draw(st.none() | st.integers(1, 65535))
    path = "".join("/" + segment for segment in draw(st.lists(
        st.text(_PATH_CHARS, min_size=1, max_size=10), max_size=4)))
    userinfo, query, fragment = draw(st.tuples(st.none() | _userinfo, st.none() | _query,
                                               st.none() | _fragment).filter(any))
    where = f"{host}:{port}" if port is not None else host
    url = f"{scheme}://{userinfo or ''}{where}{path}{query or ''}{fragment or ''}"
    return url, f"{scheme}://{where}{path}"


@settings(max_examples=400, deadline=None, database=None)
@given(secret_urls())
def test_redact_url_hides_credentials_and_queries_and_keeps_the_rest(case):
    """Any URL with user:password (percent-encoded), a query or a fragment: none of them is
    shown; scheme, host, port and path are, unchanged."""
    url, kept = case
    shown = redact_url(url)
    assert SECRET not in shown and quote(SECRET) not in shown
    assert shown == kept


def test_redact_url_keeps_an_azure_container_and_hides_the_rest():
    """``abfs://container@account``: the container stays; a password or a SAS token goes."""
    assert redact_url("abfs://models@acct.dfs.core.windows.net/runs?sv=x&sig=" + SECRET) == \
        "abfs://models@acct.dfs.core.windows.net/runs"
    assert redact_url(f"az://models:{SECRET}@acct/runs") == "az://acct/runs"


_segment = st.text(st.characters(blacklist_characters="/\\\x00",
                                 blacklist_categories=("Cs",)), min_size=1, max_size=12)
_local_paths = st.one_of(
    st.lists(_segment, min_size=1, max_size=5).map(lambda s: "/" + "/".join(s)),
    st.tuples(st.sampled_from(["./", "../", "~/"]), st.lists(_segment, min_size=1, max_size=4))
    .map(lambda t: t[0] + "/".join(t[1])),
    st.tuples(st.sampled_from(string.ascii_letters), st.sampled_from([":\\", ":/", ":"]),
              st.sampled_from(["\\", "/"]), st.lists(_segment, max_size=4))
    .map(lambda t: t[0] + t[1] + t[2].join(t[3])),
    st.lists(_segment, min_size=2, max_size=4).map(lambda s: "\\\\" + "\\".join(s)))


@settings(max_examples=400, deadline=None, database=None)
@given(_local_paths)
@example("/data/user:pa55@host/runs?token=x#frag")
@example("C:\\Users\\me\\runs?x=1#y")
@example("c:/data/runs")
@example("\\\\server\\share\\runs")
@example("~/prefect_distrain_results")
def test_redact_url_leaves_local_paths_unchanged(path):
    """Absolute and relative paths (any characters, '@', '?', '#' and ':' too) and Windows
    drives and shares are not URLs: shown as they are."""
    assert redact_url(path) == path


def test_redact_url_leaves_a_relative_path_with_a_colon_unchanged():
    assert redact_url("exp-3:final/runs#2") == "exp-3:final/runs#2"


def test_redact_url_keeps_an_ipv6_host():
    assert redact_url("http://user:pw@[fd00::7]:9000/runs?sig=x") == "http://[fd00::7]:9000/runs"


# -- Imports ------------------------------------------------------------------------------------


def test_importing_the_package_imports_neither_prefect_nor_torch():
    """In a fresh interpreter: ``import prefect_distrain`` loads no Prefect and no torch module;
    ``pd.train`` and ``pd.torch`` load them on first use."""
    script = textwrap.dedent("""
        import sys
        import prefect_distrain as pd

        def loaded(name):
            return sorted(m for m in sys.modules if m == name or m.startswith(name + "."))

        print("IMPORT", loaded("prefect")[:3], loaded("torch")[:3])
        print("TRAIN", type(pd.train).__module__, pd.train.name, bool(loaded("prefect")))
        print("TORCH", pd.torch.prepare_model.__name__, bool(loaded("torch")))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["IMPORT"] == "[] []", lines["IMPORT"]
    assert lines["TRAIN"] == "prefect.tasks train True"
    assert lines["TORCH"] == "prepare_model True"


# -- Ray: RAY_ADDRESS ---------------------------------------------------------------------------


@pytest.mark.usefixtures("ray_cluster")
def test_ray_address_from_the_environment_is_used_and_left_running(tmp_path):
    """No Ray in the process, ``RAY_ADDRESS`` set: the Trainer connects there (its workers run
    on that cluster) and, leaving, disconnects without stopping it."""
    address = ray.get_runtime_context().gcs_address
    script = textwrap.dedent(f"""
        import ray, prefect_distrain as pd
        assert not ray.is_initialized()

        def loop():
            import ray
            pd.report({{"ok": 1}})
            return ray.get_runtime_context().gcs_address

        with pd.Trainer(num_workers=2, run=pd.RunConfig(name="env", storage={str(tmp_path)!r})
                        ) as trainer:
            print("WORKERS", ",".join(trainer.run(loop)))
            print("DRIVER", ray.get_runtime_context().gcs_address)
        print("CONNECTED_AFTER", ray.is_initialized())
    """)
    env = {**os.environ, "RAY_ADDRESS": address}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["WORKERS"] == f"{address},{address}"
    assert lines["DRIVER"] == address
    assert lines["CONNECTED_AFTER"] == "False", "the Trainer closes the connection it made"
    # The cluster it connected to still runs.
    assert ray.get(ray.remote(lambda: 42).remote(), timeout=60) == 42
    assert all(n["Alive"] for n in ray.nodes())
    assert_no_train_actors()


# -- Workers: one bundle each, in one placement group with the strategy asked for --------------


def placement_loop():
    pg = ray.util.get_current_placement_group()
    table = ray.util.placement_group_table(pg)
    return {"placement_group": pg.id.hex(), "bundles": table["bundles"],
            "strategy": table["strategy"],
            "held": ray.get_runtime_context().get_assigned_resources()}


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("num_workers,strategy,resources,bundle", [
    (2, "SPREAD", None, {"CPU": 1.0}),
    (2, "STRICT_PACK", {"CPU": 0.5}, {"CPU": 0.5}),
], ids=["spread-1cpu", "strict-pack-half-cpu"])
def test_one_placement_group_with_one_bundle_per_worker(tmp_path, num_workers, strategy,
                                                        resources, bundle):
    """While the function runs, the group's placement group (as the workers see it) has one
    bundle per worker, each the worker's resources, with the strategy asked for."""
    scaling = pd.ScalingConfig(num_workers=num_workers, placement_strategy=strategy,
                               resources_per_worker=resources)
    with pd.Trainer(scaling=scaling, run=pd.RunConfig(name="pg", storage=str(tmp_path))) as t:
        seen = t.run(placement_loop)
    assert len({s["placement_group"] for s in seen}) == 1, "one placement group"
    for s in seen:
        assert s["bundles"] == {i: bundle for i in range(num_workers)}
        assert s["strategy"] == strategy
        assert s["held"] == bundle, "each worker holds exactly one bundle's resources"
    assert_no_train_actors()


# -- Torch backend: torchrun's variables on the workers, none in the driver --------------------


def torchrun_env_loop():
    return {name: os.environ.get(name) for name in TORCHRUN_VARIABLES}


@pytest.mark.usefixtures("ray_cluster")
def test_workers_get_torchrun_variables_and_the_driver_none(tmp_path):
    """Three workers on one node get what torchrun would give them; the driver gets nothing."""
    before = {name: os.environ.get(name) for name in TORCHRUN_VARIABLES}
    with pd.Trainer(backend="torch", num_workers=3,
                    run=pd.RunConfig(name="env", storage=str(tmp_path))) as trainer:
        seen = trainer.run(torchrun_env_loop)
        during = {name: os.environ.get(name) for name in TORCHRUN_VARIABLES}
    assert [(s["RANK"], s["LOCAL_RANK"]) for s in seen] == [("0", "0"), ("1", "1"), ("2", "2")]
    assert {s["WORLD_SIZE"] for s in seen} == {"3"}
    assert {s["LOCAL_WORLD_SIZE"] for s in seen} == {"3"}
    assert {s["NODE_RANK"] for s in seen} == {"0"}
    assert len({s["MASTER_ADDR"] for s in seen}) == 1 and seen[0]["MASTER_ADDR"]
    ports = {s["MASTER_PORT"] for s in seen}
    assert len(ports) == 1 and 0 < int(ports.pop()) < 65536, "one MASTER_PORT for all"
    assert during == before == {name: None for name in TORCHRUN_VARIABLES}, \
        "the driver's environment is left alone"
    assert {name: os.environ.get(name) for name in TORCHRUN_VARIABLES} == before


# -- report(): every rank the same number of times ----------------------------------------------


def uneven_loop():
    rank = pd.get_context().get_world_rank()
    for step in range(3 if rank == 0 else 2):
        pd.report({"step": step, "rank": rank})
    return rank


@pytest.mark.usefixtures("ray_cluster")
def test_uneven_plain_reports_complete_with_a_warning_and_a_partial_iteration(tmp_path, caplog):
    """Rank 0 reports 3 times, rank 1 twice, no checkpoint and no stop: the run completes, the
    unpaired iteration is logged as a misuse and handed to callbacks once, marked partial, and
    kept out of the history."""
    recorder = Recorder()
    caplog.set_level(logging.INFO, logger="prefect_distrain")
    with pd.Trainer(num_workers=2, run=pd.RunConfig(name="uneven", storage=str(tmp_path))) as t:
        result = t.fit(uneven_loop, callbacks=[recorder])
    assert result.worker_results == [0, 1]
    assert "Iteration 3 was reported by some ranks but not by ranks [1]: every rank must call " \
           "report() the same number of times" in caplog.text
    warnings = [r for r in caplog.records if "was reported by some ranks" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert [info for _, info in recorder.calls] == [
        {"training_iteration": 1}, {"training_iteration": 2},
        {"training_iteration": 3, "partial": True, "missing_ranks": [1]}]
    results, _ = recorder.calls[-1]
    assert results[1] == {}
    assert {k: v for k, v in results[0].items() if not k.startswith("_")} == \
        {"step": 2, "rank": 0}
    assert results[0]["_training_iteration"] == 3
    assert [m["_training_iteration"] for m in result.metrics_history] == [1, 2]
    assert [m["step"] for m in result.metrics_history] == [0, 1]


# -- Async upload: report returns at once, one upload in flight, the folder is yours again ----


def gated_async_loop(config):
    """Each upload waits at a gate file that this function opens only after the report that
    started it returned, and after it deleted (then changed) the folder it reported."""
    flaky = flaky_fs.probe_uploads(gates=config["gates"])
    seen = {}
    folder = tempfile.mkdtemp()
    write(folder, "model.bin", b"first weights")
    pd.report({"step": 0}, checkpoint=pd.Checkpoint.from_directory(folder))
    seen["uploads_done_after_report_1"] = flaky.puts_done
    shutil.rmtree(folder)  # deleted as soon as report returned
    open(os.path.join(config["gates"], "1"), "w").close()
    folder = tempfile.mkdtemp()
    write(folder, "model.bin", b"second weights")
    pd.report({"step": 1}, checkpoint=pd.Checkpoint.from_directory(folder))
    seen["uploads_done_after_report_2"] = flaky.puts_done
    write(folder, "model.bin", b"changed after the report")  # changed as soon as it returned
    write(folder, "extra.bin", b"added after the report")
    open(os.path.join(config["gates"], "2"), "w").close()
    shutil.rmtree(folder)
    return seen


@pytest.mark.usefixtures("ray_cluster")
def test_async_report_returns_before_its_upload_and_the_folder_may_go(tmp_path):
    """``upload="async"``: ``report`` returns while the upload is still held at its gate (had
    it waited for the upload, the gate would never open and the upload fails after 60 s);
    the files committed are those reported, although the folder was deleted or changed
    right after."""
    gates = tmp_path / "gates"
    gates.mkdir()
    run = pd.RunConfig(name="gated", storage=f"flaky://{tmp_path}/runs")
    with pd.Trainer(num_workers=1, run=run,
                    checkpoint=pd.CheckpointConfig(upload="async")) as trainer:
        result = trainer.fit(gated_async_loop, config={"gates": str(gates)})
    seen = result.worker_results[0]
    assert seen["uploads_done_after_report_1"] == 0, "report 1 returned after its upload"
    assert seen["uploads_done_after_report_2"] <= 1, "report 2 returned after its upload"
    run_folder = tmp_path / "runs" / "gated"
    assert listing(run_folder) == (["checkpoint_000001-a0", "checkpoint_000002-a0"],
                                   ["checkpoint_000001-a0.json", "checkpoint_000002-a0.json"])
    assert os.listdir(run_folder / "checkpoint_000002-a0") == ["model.bin"]
    assert read(run_folder / "checkpoint_000001-a0" / "model.bin") == b"first weights"
    assert read(run_folder / "checkpoint_000002-a0" / "model.bin") == b"second weights"
    for checkpoint, _ in result.best_checkpoints:  # and they match their manifests
        checkpoint.to_directory(str(tmp_path / f"verified-{checkpoint.index}"))
    assert_no_train_actors()


def _joins_me(thread_id: int) -> bool:
    """Whether that thread is blocked in ``join`` of the calling thread: waiting for it to end.
    (An upload runs in a thread of its own; a report that waits for the upload before it
    joins that thread.)"""
    me = threading.current_thread()
    frame = sys._current_frames().get(thread_id)
    while frame is not None and os.path.basename(frame.f_code.co_filename) == "threading.py":
        if frame.f_code.co_name == "join" and frame.f_locals.get("self") is me:
            return True
        frame = frame.f_back
    return False


def one_in_flight_loop(config):
    """Each upload is held until the training thread waits for it to end (the next report, or
    the end of the function) or until a second upload starts beside it, which the maximum
    then counts. Never released early: an upload running beside another is always seen."""
    me = threading.get_ident()
    flaky = flaky_fs.probe_uploads(hold_until=lambda: _joins_me(me))
    for step in range(config["checkpoints"]):
        with tempfile.TemporaryDirectory() as folder:
            write(folder, "model.bin", b"x" * 1000 * (step + 1))
            pd.report({"step": step}, checkpoint=pd.Checkpoint.from_directory(folder))
    deadline = time.monotonic() + 60
    while flaky.puts_started < config["checkpoints"]:  # the last upload has begun
        assert time.monotonic() < deadline, "the last upload never started"
        time.sleep(0.02)
    return {"max_in_flight": flaky.max_in_flight, "uploads": flaky.puts_started}


@pytest.mark.usefixtures("ray_cluster")
def test_async_upload_keeps_one_upload_in_flight_per_rank(tmp_path):
    """Three async checkpoints from one rank: never two uploads at once."""
    run = pd.RunConfig(name="one-in-flight", storage=f"flaky://{tmp_path}/runs")
    with pd.Trainer(num_workers=1, run=run,
                    checkpoint=pd.CheckpointConfig(upload="async")) as trainer:
        result = trainer.fit(one_in_flight_loop, config={"checkpoints": 3})
    assert result.worker_results == [{"max_in_flight": 1, "uploads": 3}]
    assert sorted(c.index for c, _ in result.best_checkpoints) == [1, 2, 3]
    for checkpoint, metrics in result.best_checkpoints:
        folder = checkpoint.to_directory(str(tmp_path / f"verified-{checkpoint.index}"))
        assert read(os.path.join(folder, "model.bin")) == b"x" * 1000 * (metrics["step"] + 1)


# -- Two ranks, one file name, one checkpoint ---------------------------------------------------


def same_name_loop(config):
    """Every rank writes model.pt (the same bytes unless ``differ``) and a shard of its own."""
    rank = pd.get_context().get_world_rank()
    for step in range(config.get("steps", 1)):
        with tempfile.TemporaryDirectory() as folder:
            model = {"step": step, "rank": rank if config.get("differ") else 0}
            torch.save(model, os.path.join(folder, "model.pt"))
            with open(os.path.join(folder, f"shard_{rank}.bin"), "wb") as f:
                f.write(bytes([rank]) * 100)
            pd.report({"step": step}, checkpoint=pd.Checkpoint.from_directory(folder))


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("upload", ["sync", "async"])
def test_every_rank_reporting_the_same_file_names_stores_each_once(tmp_path, upload):
    """Ray's examples report the same files from every rank: each name goes up once (the
    lowest rank's), each rank's own names go up from that rank."""
    with pd.Trainer(num_workers=3, run=pd.RunConfig(name="same", storage=str(tmp_path)),
                    checkpoint=pd.CheckpointConfig(upload=upload)) as trainer:
        result = trainer.fit(same_name_loop, config={"steps": 2})
    manifest = result.checkpoint.manifest
    assert {name: entry.rank for name, entry in manifest.files.items()} == {
        "model.pt": 0, "shard_0.bin": 0, "shard_1.bin": 1, "shard_2.bin": 2}
    folder = result.checkpoint.to_directory(str(tmp_path / "restored"))  # verified
    assert torch.load(os.path.join(folder, "model.pt")) == {"step": 1, "rank": 0}
    assert read(os.path.join(folder, "shard_2.bin")) == bytes([2]) * 100


@pytest.mark.usefixtures("ray_cluster")
def test_different_contents_under_one_name_keep_rank_0s_copy_with_a_warning(tmp_path, caplog):
    with pd.Trainer(num_workers=2, run=pd.RunConfig(name="differ", storage=str(tmp_path))) \
            as trainer:
        result = trainer.fit(same_name_loop, config={"differ": True})
    folder = result.checkpoint.to_directory(str(tmp_path / "restored"))
    assert torch.load(os.path.join(folder, "model.pt")) == {"step": 0, "rank": 0}
    assert "checkpoint 1: ranks wrote files of the same name with different contents " \
           "('model.pt' from ranks [0, 1])" in caplog.text
    assert "kept the lowest rank's copy" in caplog.text


@pytest.mark.usefixtures("ray_cluster")
def test_different_contents_under_one_name_fail_the_run_when_strict(tmp_path):
    """A bug, named, not restarted: nothing is committed."""
    with pytest.raises(pd.ConfigurationError,
                       match=r"'model.pt' from ranks \[0, 1\]\). Give each rank's files their "
                             "own names") as caught:
        with pd.Trainer(num_workers=2, run=pd.RunConfig(name="clash", storage=str(tmp_path)),
                        checkpoint=pd.CheckpointConfig(rank_conflicts="fail"),
                        failure=pd.FailureConfig(max_failures=2)) as trainer:
            trainer.fit(same_name_loop, config={"differ": True})
    assert "report them from one rank only" in str(caught.value)
    run_folder = tmp_path / "clash"
    assert listing(run_folder)[1] == [], "nothing was committed"
    assert [a["status"] for a in ledger(run_folder)] == ["failed"], "a bug: no restart"
    assert_no_train_actors()


@given(st.dictionaries(st.integers(0, 5), st.lists(st.sampled_from("abcdef"), unique=True),
                       min_size=1))
def test_each_name_is_uploaded_by_the_lowest_rank_that_wrote_it(names_by_rank):
    plan = upload_plan(names_by_rank)
    assert set(plan) == {r for r in names_by_rank if r > 0}
    uploaded: dict[str, list[int]] = {}
    for rank, names in names_by_rank.items():
        for name in set(names) - set(plan.get(rank, [])):
            uploaded.setdefault(name, []).append(rank)
    assert {name: ranks for name, ranks in uploaded.items()} == {
        name: [min(r for r, names in names_by_rank.items() if name in names)]
        for name in {n for names in names_by_rank.values() for n in names}}


# -- Retention ----------------------------------------------------------------------------------


def checkpoint_loop(config):
    """A checkpoint every report (rank 0's files), with ``config["losses"]`` as val_loss; the
    first report's number and what the resume checkpoint held are returned."""
    ctx = pd.get_context()
    resumed = None
    if (checkpoint := pd.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            resumed = {"path": redact_url(checkpoint.path), "index": checkpoint.index,
                       "files": {n: read(os.path.join(folder, n)).decode()
                                 for n in sorted(os.listdir(folder))}}
    for step, loss in enumerate(config["losses"]):
        with tempfile.TemporaryDirectory() as folder:
            if ctx.get_world_rank() == 0:
                write(folder, "state.txt", f"{config.get('tag', 'run')} step {step}".encode())
            pd.report({"step": step, "val_loss": loss},
                      checkpoint=pd.Checkpoint.from_directory(folder))
    return {"resumed": resumed, "attempt": ctx.get_attempt()}


@pytest.mark.usefixtures("ray_cluster")
def test_retention_removes_the_manifest_before_the_files(tmp_path):
    """num_to_keep=1 over 3 checkpoints: 1 and 2 are deleted, each manifest before its folder
    (so no reader ever finds a manifest whose files are gone)."""
    removals = flaky_fs.record_removals()  # the driver deletes: recorded in this process
    try:
        run = pd.RunConfig(name="order", storage=f"flaky://{tmp_path}/runs")
        with pd.Trainer(num_workers=1, run=run,
                        checkpoint=pd.CheckpointConfig(num_to_keep=1)) as trainer:
            result = trainer.fit(checkpoint_loop, config={"losses": [3.0, 2.0, 1.0]})
    finally:
        flaky_fs.stop_recording()
    run_folder = f"{tmp_path}/runs/order"
    paths = [path.rstrip("/") for _, path in removals]

    def first_removal(of) -> int:
        return next((i for i, path in enumerate(paths) if of(path)), len(paths))

    for name in ("checkpoint_000001-a0", "checkpoint_000002-a0"):
        manifest = first_removal(lambda p, n=name: p == f"{run_folder}/_manifests/{n}.json")
        files = first_removal(lambda p, n=name: p == f"{run_folder}/{n}"
                              or p.startswith(f"{run_folder}/{n}/"))
        assert manifest < len(paths) and files < len(paths), f"{name} was not removed: {removals}"
        assert manifest < files, f"{name}: its files went before its manifest: {removals}"
    assert listing(run_folder) == (["checkpoint_000003-a0"], ["checkpoint_000003-a0.json"])
    assert result.checkpoint.index == 3


@pytest.mark.usefixtures("ray_cluster")
def test_retention_keeps_the_checkpoint_a_resume_started_from(tmp_path):
    """Run B resumes from A's checkpoint 2 (worst val_loss, not the latest) in the same run,
    keeping one by val_loss: 2 stays to the end, with the best and the latest."""
    run = pd.RunConfig(name="kept", storage=str(tmp_path))
    run_folder = tmp_path / "kept"
    with pd.Trainer(num_workers=1, run=run) as trainer:
        trainer.fit(checkpoint_loop, config={"losses": [1.0, 5.0, 3.0], "tag": "A"})
    start = str(run_folder / "checkpoint_000002-a0")
    keep_best = pd.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_loss",
                                    checkpoint_score_order="min")
    with pd.Trainer(num_workers=1, run=run, checkpoint=keep_best) as trainer:
        result = trainer.fit(checkpoint_loop, config={"losses": [0.5, 0.7], "tag": "B"},
                             resume_from_checkpoint=start)
    resumed = result.worker_results[0]["resumed"]
    assert resumed == {"path": start, "index": 2, "files": {"state.txt": "A step 1"}}
    assert listing(run_folder) == (
        ["checkpoint_000002-a0", "checkpoint_000004-a1", "checkpoint_000005-a1"],
        ["checkpoint_000002-a0.json", "checkpoint_000004-a1.json", "checkpoint_000005-a1.json"])
    assert read(run_folder / "checkpoint_000002-a0" / "state.txt") == b"A step 1"
    assert [c.index for c, _ in result.best_checkpoints] == [4, 5, 2]
    assert result.checkpoint.index == 5


# -- resume_from_checkpoint as a string ---------------------------------------------------------


@pytest.mark.usefixtures("ray_cluster")
def test_a_resume_path_given_as_a_string(storage_kind):
    """On local disk and on S3 (the s3:// URL; the options come from the RunConfig)."""
    with pd.Trainer(num_workers=1, run=pd.RunConfig(name="source", **storage_kind)) as trainer:
        trainer.fit(checkpoint_loop, config={"losses": [3.0, 2.0, 1.0], "tag": "source"})
    start = f"{storage_kind['storage']}/source/checkpoint_000002-a0"  # an absolute path or URL
    with pd.Trainer(num_workers=1, run=pd.RunConfig(name="warm", **storage_kind)) as trainer:
        result = trainer.fit(checkpoint_loop, config={"losses": [0.9, 0.8], "tag": "warm"},
                             resume_from_checkpoint=start)
    assert result.worker_results[0]["resumed"] == {
        "path": start, "index": 2, "files": {"state.txt": "source step 1"}}
    assert [m["_training_iteration"] for m in result.metrics_history] == [3, 4]
    assert [c.index for c, _ in result.best_checkpoints] == [4, 3]
    assert_no_train_actors()


# -- A failed upload restarts the group ---------------------------------------------------------


def upload_fails_once_loop(config):
    """Attempt 0: the second checkpoint's file fails to upload (sync)."""
    ctx = pd.get_context()
    flaky_fs.arm(fail_after=1 if ctx.get_attempt() == 0 else None)
    start = 0
    if (checkpoint := pd.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            start = int(read(os.path.join(folder, "step.txt"))) + 1
    for step in range(start, 3):
        with tempfile.TemporaryDirectory() as folder:
            write(folder, "step.txt", str(step).encode())
            pd.report({"step": step}, checkpoint=pd.Checkpoint.from_directory(folder))
    return {"attempt": ctx.get_attempt(), "started_at": start}


@pytest.mark.usefixtures("ray_cluster")
def test_a_failed_upload_restarts_from_the_last_commit(tmp_path):
    """Checkpoint 2 of attempt 0 fails to upload: infrastructure, so the group restarts (one
    restart allowed) from checkpoint 1; checkpoint 2 of attempt 0 never existed."""
    run = pd.RunConfig(name="upload", storage=f"flaky://{tmp_path}/runs")
    with pd.Trainer(num_workers=1, run=run, failure=pd.FailureConfig(max_failures=1)) as trainer:
        result = trainer.fit(upload_fails_once_loop)
    assert result.failures == 1 and result.attempt == 1
    assert result.worker_results == [{"attempt": 1, "started_at": 1}]
    run_folder = tmp_path / "runs" / "upload"
    folders, manifests = listing(run_folder)
    assert "checkpoint_000002-a0.json" not in manifests, "the failed checkpoint was committed"
    assert manifests == ["checkpoint_000001-a0.json", "checkpoint_000002-a1.json",
                         "checkpoint_000003-a1.json"]
    assert folders == [m[:-len(".json")] for m in manifests], "the torn folder was removed"
    attempts = ledger(run_folder)
    assert [a["status"] for a in attempts] == ["failed", "completed"]
    assert attempts[0]["cause"].startswith(
        "CheckpointUploadError: uploading checkpoint 2 from rank 0")
    assert attempts[1]["resumed_from"] == f"flaky://{run_folder}/checkpoint_000001-a0"
    assert_no_train_actors()


# -- In-task restarts: max_failures=-1 and giving up --------------------------------------------


def dies_loop(config):
    """Reports once, then SIGKILLs its own process on attempts before ``config["until"]``."""
    attempt = pd.get_context().get_attempt()
    pd.report({"attempt": attempt})
    if attempt < config["until"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return attempt


@pytest.mark.usefixtures("ray_cluster")
def test_max_failures_minus_one_restarts_without_limit(tmp_path):
    """The worker dies on attempts 0, 1 and 2; with no limit, attempt 3 completes."""
    run = pd.RunConfig(name="unlimited", storage=str(tmp_path))
    with pd.Trainer(num_workers=1, run=run, failure=pd.FailureConfig(max_failures=-1)) as t:
        result = t.fit(dies_loop, config={"until": 3})
    assert result.failures == 3 and result.attempt == 3
    assert result.worker_results == [3]
    attempts = ledger(tmp_path / "unlimited")
    assert [a["status"] for a in attempts] == ["failed", "failed", "failed", "completed"]
    assert all(a["cause"].startswith("WorkerLostError: rank 0's worker died")
               for a in attempts[:3])
    assert_no_train_actors()


@pytest.mark.usefixtures("ray_cluster")
def test_max_failures_gives_up_after_that_many_restarts(tmp_path, caplog):
    """The worker dies on every attempt: two restarts, then the loss is raised and logged."""
    caplog.set_level(logging.INFO, logger="prefect_distrain")
    run = pd.RunConfig(name="doomed", storage=str(tmp_path))
    with pytest.raises(pd.WorkerLostError, match="rank 0's worker died") as caught:
        with pd.Trainer(num_workers=1, run=run,
                        failure=pd.FailureConfig(max_failures=2)) as trainer:
            trainer.fit(dies_loop, config={"until": 10 ** 6})
    assert caught.value.retryable
    attempts = ledger(tmp_path / "doomed")
    assert [(a["attempt"], a["status"]) for a in attempts] == [
        (0, "failed"), (1, "failed"), (2, "failed")]
    giving_up = [r for r in caplog.records if r.getMessage().startswith("Giving up after")]
    assert [r.getMessage().split(":")[0] for r in giving_up] == ["Giving up after 2 restart(s)"]
    assert giving_up[0].levelno == logging.ERROR
    assert_no_train_actors()


# -- Failure classes: a collective timeout is infrastructure ------------------------------------


def collective_timeout_loop(config):
    """Attempt 0: rank 0 enters an all_reduce at once and times out; rank 1 enters it only
    after that (a gate file rank 0 writes when its collective failed), so every rank fails
    in the collective. Attempt 1: the all_reduce goes through."""
    ctx = pd.get_context()
    rank = ctx.get_world_rank()
    value = torch.ones(1)
    if ctx.get_attempt() == 0:
        gate = config["gate"]
        deadline = time.monotonic() + 120
        while rank == 1 and not os.path.exists(gate):
            assert time.monotonic() < deadline, "rank 0's collective never failed"
            time.sleep(0.05)
        try:
            torch.distributed.all_reduce(value)
        except BaseException:
            if rank == 0:
                open(gate, "w").close()
            raise
        raise AssertionError("the all_reduce of attempt 0 went through")
    torch.distributed.all_reduce(value)
    return value.item()


@pytest.mark.usefixtures("ray_cluster")
def test_a_collective_timeout_on_every_rank_restarts_the_group(tmp_path, monkeypatch):
    """A torch collective error is infrastructure, even when every rank raised it."""
    # Long enough that rank 1's error is gathered too: the classification must not depend on
    # which ranks' errors happened to arrive within the window.
    monkeypatch.setenv("PREFECT_DISTRAIN_ERROR_GATHER_TIMEOUT_S", "60")
    run = pd.RunConfig(name="timeout", storage=str(tmp_path))
    with pd.Trainer(backend=pd.TorchConfig(timeout_s=5), num_workers=2, run=run,
                    failure=pd.FailureConfig(max_failures=1)) as trainer:
        result = trainer.fit(collective_timeout_loop, config={"gate": str(tmp_path / "gate")})
    assert result.failures == 1 and result.worker_results == [2.0, 2.0]
    attempts = ledger(tmp_path / "timeout")
    assert [a["status"] for a in attempts] == ["failed", "completed"]
    assert "Timed out waiting 5000ms" in attempts[0]["cause"]
    assert_no_train_actors()


# -- A busy cluster: the placement timeout, the backoff cap, a Prefect retry --------------------


@ray.remote(num_cpus=3)
class CpuHolder:
    """Other work on the cluster: holds 3 of its 4 CPUs while it lives."""

    def ready(self) -> bool:
        return True


def free_cpus() -> float:
    return ray.available_resources().get("CPU", 0.0)


@pytest.fixture
def busy_cluster(ray_cluster):
    """Three of the four CPUs held by another actor; killed by its handle at the end."""
    wait_for(lambda: free_cpus() == 4.0, "the cluster to be idle")
    holder = CpuHolder.remote()
    assert ray.get(holder.ready.remote(), timeout=120)
    wait_for(lambda: free_cpus() == 1.0, "the holder's CPUs to be taken")
    yield holder
    ray.kill(holder)
    wait_for(lambda: free_cpus() == 4.0, "the holder's CPUs to come back")


def test_a_busy_cluster_is_waited_for_with_capped_backoff_then_refused(tmp_path, busy_cluster,
                                                                       monkeypatch):
    """One CPU free, two workers asked: looks again after 1 s, 2 s, then never more than the
    cap, and gives up after the placement timeout with a retryable error naming the setting."""
    monkeypatch.setenv("PREFECT_DISTRAIN_BACKOFF_MAX_S", "2")
    monkeypatch.setenv("PREFECT_DISTRAIN_PLACEMENT_GROUP_TIMEOUT_S", "7")
    logger, records = logger_with_records("test-rules-backoff")
    with pytest.raises(pd.ResourcesUnavailableError) as caught:
        with pd.Trainer(num_workers=2, run=pd.RunConfig(name="busy", storage=str(tmp_path)),
                        logger=logger):
            pass
    error = caught.value
    assert error.retryable is True
    assert str(error).startswith("waited 7 s for the cluster to hold 2 worker(s)")
    assert "PREFECT_DISTRAIN_PLACEMENT_GROUP_TIMEOUT_S" in str(error)
    waits = [m for m in records.messages if m.startswith("Waiting for resources")]
    pauses = [int(re.search(r"looking again in (\d+) s$", m).group(1)) for m in waits]
    assert all("can hold 1 of the 2 worker(s) needed" in m for m in waits), waits
    assert pauses[:2] == [1, 2], "the pause starts at 1 s and doubles"
    assert len(pauses) >= 3 and max(pauses) == 2, f"capped at 2 s: {pauses}"
    assert_no_train_actors()


def report_loop(config):
    for step in range(config.get("steps", 2)):
        pd.report({"step": step})
    return pd.get_context().get_attempt()


@pytest.mark.usefixtures("prefect_server")
def test_a_busy_cluster_is_retried_by_prefect_and_the_retry_completes(tmp_path, busy_cluster,
                                                                      monkeypatch):
    """A busy cluster is infrastructure: retry_on_infrastructure says retry; the retry condition
    then ends the other work, and the retry trains."""
    from prefect import flow

    monkeypatch.setenv("PREFECT_DISTRAIN_PLACEMENT_GROUP_TIMEOUT_S", "3")
    decided = []

    def retry_and_free_the_cluster(task, task_run, state):
        retry = pd.retry_on_infrastructure(task, task_run, state)
        error = state.result(raise_on_failure=False)
        decided.append((type(error).__name__, getattr(error, "retryable", None), retry))
        if retry:  # the other work ends: the retry finds the CPUs free
            ray.kill(busy_cluster)
            wait_for(lambda: free_cpus() >= 2.0, "the holder's CPUs to come back")
        return retry

    @flow
    def busy():
        return pd.train.with_options(retries=1, retry_condition_fn=retry_and_free_the_cluster)(
            report_loop, scaling=pd.ScalingConfig(num_workers=2),
            run=pd.RunConfig(name="busy-retried", storage=str(tmp_path)))

    state = busy(return_state=True)
    result = state.result()
    assert decided == [("ResourcesUnavailableError", True, True)]
    assert [m["step"] for m in result.metrics_history] == [0, 1]
    assert [a["status"] for a in ledger(tmp_path / "busy-retried")] == ["completed"]
    _, _, task_runs = flow_run_records(state.state_details.flow_run_id)
    assert [t.run_count for t in task_runs] == [2], "one task run, retried once by Prefect"
    assert_no_train_actors()


# -- The default run name: -N for the N-th identical call ---------------------------------------


def named_loop(config):
    pd.report({"step": 0})


@pytest.mark.usefixtures("ray_cluster", "prefect_server")
def test_identical_calls_in_one_flow_get_their_own_runs(tmp_path):
    """Two identical calls in one flow run: the second run name ends in -1, in its own folder."""
    from prefect import flow

    @flow
    def twice():
        first = pd.train(named_loop, scaling=pd.ScalingConfig(num_workers=1),
                         run=pd.RunConfig(storage=str(tmp_path)))
        second = pd.train(named_loop, scaling=pd.ScalingConfig(num_workers=1),
                          run=pd.RunConfig(storage=str(tmp_path)))
        return first, second

    state = twice(return_state=True)
    first, second = state.result()
    prefix = f"named_loop-{state.state_details.flow_run_id.hex[:8]}-"
    assert re.fullmatch(re.escape(prefix) + "[0-9a-f]{6}", first.run_name), first.run_name
    assert second.run_name == first.run_name + "-1"
    assert first.path != second.path
    assert sorted(os.listdir(tmp_path)) == sorted([first.run_name, second.run_name])
    for result in (first, second):
        assert [a["status"] for a in ledger(tmp_path / result.run_name)] == ["completed"]
    assert_no_train_actors()


# -- A callback's stop: not retried; a stuck rank is ended after the grace ----------------------


class StopAtFirstReport(pd.TrainingCallback):
    def handle_result(self, results, training_iteration, **info):
        if training_iteration == 1:
            self.stop_training = "enough"


def stuck_rank_loop(config):
    """Rank 1 never reaches a second report (stuck, like a rank in a collective whose peer
    stopped); rank 0 reports on until the stop ends it at a report."""
    rank = pd.get_context().get_world_rank()
    pd.report({"step": 0})
    if rank == 1:
        threading.Event().wait()
    for step in range(1, 2400):
        time.sleep(0.05)  # a training step
        pd.report({"step": step})
    raise AssertionError("the stop never reached rank 0")


@pytest.mark.usefixtures("ray_cluster", "prefect_server")
def test_a_stopped_run_is_complete_not_retried_and_a_stuck_rank_is_ended(tmp_path,
                                                                         monkeypatch):
    """A callback stops the run at iteration 1; rank 1 never reports again and is ended after
    PREFECT_DISTRAIN_STOP_GRACE_S: the task completes, stopped, once, with no actors left."""
    from prefect import flow

    monkeypatch.setenv("PREFECT_DISTRAIN_STOP_GRACE_S", "2")

    @flow
    def stopped():
        return pd.train.with_options(retries=2)(
            stuck_rank_loop, scaling=pd.ScalingConfig(num_workers=2),
            run=pd.RunConfig(name="stopped", storage=str(tmp_path)),
            callbacks=[StopAtFirstReport()])

    state = stopped(return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result.stopped_early == "enough"
    assert result.worker_results == [None, None], "rank 0 stopped at a report, rank 1 was ended"
    assert result.metrics_history[0]["step"] == 0
    attempts = ledger(tmp_path / "stopped")
    assert [(a["status"], a["cause"]) for a in attempts] == [("stopped", "enough")]
    logs, _, task_runs = flow_run_records(state.state_details.flow_run_id)
    assert [t.run_count for t in task_runs] == [1], "a stop is not retried"
    assert any(m.startswith("Ranks [1] did not stop within 2 s of the stop; ending them")
               for m in logs), logs
    assert_no_train_actors()
