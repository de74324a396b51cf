"""Real parts only: a local Ray (4 logical CPUs; one for a run of modules that only use it) and
one Prefect test server per session.

Fixtures stop what they start, by handle. The ``env_police`` fixture fails a test that leaves
environment variables changed in the driver (a backend must set MASTER_ADDR & co. on workers).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402
import ray  # noqa: E402
import sklearn  # noqa: E402, F401 - the flows import it; it sets KMP_* variables on first import


def _install_flaky_protocol() -> None:
    """Worker setup: make the test-only ``flaky://`` and ``flakys3://`` protocols known, like
    installed plugins."""
    sys.path.insert(0, TESTS)
    import flaky_fs
    import s3_faults

    flaky_fs.arm(None)
    s3_faults.register()


TESTS = os.path.dirname(os.path.abspath(__file__))
FLOWS = os.path.join(os.path.dirname(TESTS), "flows")


def load_flow(name: str):
    """A module of flows/, loaded from its file as `python flows/<name>.py` would run it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(FLOWS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: Whether a module's Ray was kept for the modules after it.
_kept = {"ray": False}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray per test module (the multi-node modules build their own cluster); ``train``
    must find it and leave it running. A module that left nothing running on it keeps it for
    the next modules that use it (one start, not one a module)."""
    import flaky_fs
    import s3_faults

    flaky_fs.arm(None)
    s3_faults.register()
    assert _kept["ray"] or not ray.is_initialized(), "a Ray no fixture started is connected"
    if not ray.is_initialized():
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # for the setup hook
        ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=True,
                 log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": _install_flaky_protocol})
    yield
    _kept["ray"] = _nothing_left_running()
    if not _kept["ray"]:
        ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _kept_ray_only_where_it_is_used(request):
    """Ends a kept Ray before a module that does not use ``ray_cluster`` or is marked
    ``own_ray`` (it starts its own Ray in this process), and at the end of the session."""
    tests = [item for item in request.session.items if item.module is request.module]
    used = any("ray_cluster" in item.fixturenames for item in tests)
    if _kept["ray"] and (not used or request.node.get_closest_marker("own_ray")):
        ray.shutdown()
        _kept["ray"] = False
    yield
    if _kept["ray"] and tests and tests[-1] is request.session.items[-1]:
        ray.shutdown()
        _kept["ray"] = False


#: Actors Ray Data starts for itself and keeps for the session.
_RAY_DATA_ACTORS = {"_StatsActor", "_AutoscalingCoordinatorActor", "AutoscalingRequester"}


def _nothing_left_running() -> bool:
    """No live actor but Ray Data's own, no task holding a CPU and no placement group left on
    the module's Ray."""
    from ray.util.state import list_actors

    try:
        actors = list_actors(address=ray.get_runtime_context().gcs_address,
                             filters=[("state", "!=", "DEAD")], limit=1000)
    except Exception:  # noqa: BLE001 - unsure: start the next module afresh
        return False
    if any(a.class_name not in _RAY_DATA_ACTORS for a in actors):
        return False
    if ray.available_resources().get("CPU") != ray.cluster_resources().get("CPU"):
        return False  # a task still running
    return all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


@contextlib.contextmanager
def head_and_node(head: dict, node: dict):
    """A multi-node local Ray (``ray.cluster_utils.Cluster``): a head and one more node, with
    this process connected; yields (cluster, node) and shuts both down after."""
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_gpus": 0, **head})
    added = cluster.add_node(num_gpus=0, **node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster, added
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


#: What ``ray.init`` itself sets in the driver's environment (seen with Ray 2.60): a test that
#: connects to Ray changes these, and nothing else may change.
_SET_BY_RAY_INIT = {"RAY_AUTH_MODE", "RAY_CLIENT_MODE", "RAY_USAGE_STATS_ENABLED",
                    "PYTHONBREAKPOINT"}


@pytest.fixture(autouse=True)
def env_police():
    before = dict(os.environ)
    yield
    after = dict(os.environ)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    changed = {k for k in changed if not k.startswith("PYTEST_") and k not in _SET_BY_RAY_INIT}
    assert not changed, f"the test leaked environment variables into the driver: {sorted(changed)}"


class Records(logging.Handler):
    """The messages of a logger passed as ``Trainer(logger=...)``."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def live_train_actors() -> list:
    """TrainWorker actors that are not DEAD, per Ray's state API."""
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", "TrainWorker")], limit=1000)
    return [a for a in actors if a.state != "DEAD"]


def assert_no_train_actors(timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        alive = live_train_actors()
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not alive, f"orphan worker actors: {[(a.actor_id, a.state) for a in alive]}"
    assert not [pg for pg in ray.util.placement_group_table().values()
                if pg["state"] not in ("REMOVED",)], "a placement group was left behind"


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free now: held open together while picked (ports picked one
    after the other may repeat, and a Ray node refuses two components on one port)."""
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _free_port() -> int:
    return free_ports(1)[0]


def wait_until_serving(url: str, server, timeout: float) -> None:
    """Until ``url`` answers; RuntimeError if the server process ends or time runs out."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"the server for {url} did not start") from None
            time.sleep(0.2)


@pytest.fixture(scope="session")
def moto_endpoint():
    """An S3 endpoint: ``moto_server`` in its own process on 127.0.0.1, stopped by handle."""
    import subprocess
    import sys

    port = _free_port()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
         "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(endpoint + "/moto-api/", server, timeout=30)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


#: Fake credentials: moto accepts any; tests check this never reaches a log or an artifact.
S3_SECRET = "s3cr3t-never-logged-7f3a"


@pytest.fixture
def s3_storage(moto_endpoint):
    """A fresh moto state with one bucket, and the RunConfig pieces that reach it."""
    import urllib.request

    import s3fs

    urllib.request.urlopen(urllib.request.Request(moto_endpoint + "/moto-api/reset",
                                                  method="POST"), timeout=10)
    options = {"key": "test-key", "secret": S3_SECRET,
               "client_kwargs": {"endpoint_url": moto_endpoint, "region_name": "eu-west-1"}}
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(**options).mkdir("models")
    return {"storage": "s3://models/runs", "storage_options": options}


@pytest.fixture(params=["local", "s3"])
def storage_kind(request, tmp_path):
    """The same test on local disk and on the S3 protocol."""
    if request.param == "local":
        return {"storage": str(tmp_path / "runs"), "storage_options": {}}
    return request.getfixturevalue("s3_storage")


def flow_run_records(flow_run_id, messages: bool = True) -> tuple[list, list, list]:
    """(log messages, or the logs themselves, artifacts, task runs) of one flow run, filtered
    by the Prefect server: a session's tests make more of each than one unfiltered page holds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=60)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run_id])))
    return [log.message for log in logs] if messages else logs, artifacts, task_runs
