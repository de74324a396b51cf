"""Outgrowing one machine: a Ray cluster of two nodes, each started by `ray start` in a process
of its own (head, then a worker node joining it), with token authentication on, as on two
machines; ``train`` reaches it through a ``RayCluster`` block that holds the token.

The nodes use their own temp dirs and free ports (never the suite's local Ray, never
`ray stop`, which stops every Ray on the machine): each is a `ray start --block` process in a
process group of its own, stopped by its id. The token is a fresh random one (not
``~/.ray/auth_token``), so a process that does not send it is refused.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
import ray
from conftest import flow_run_records, free_ports
from prefect import flow

import prefect_distrain as pd
from prefect_distrain.blocks import CheckpointStorage, RayCluster
from prefect_distrain.exceptions import ConfigurationError
from prefect_distrain.execution.ray_auth import redact_address, reload_ray_auth

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.own_ray]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TOKEN = secrets.token_hex(32)  # as `ray get-auth-token --generate` makes them


def _start_node(args: list[str], log: str, env: dict[str, str]) -> subprocess.Popen:
    """`ray start ... --block` in a process group of its own; returns once the node runs."""
    with open(log, "w") as out:
        node = subprocess.Popen([os.path.join(BIN, "ray"), "start", "--block", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in open(log).read():
        if node.poll() is not None or time.monotonic() > deadline:
            _stop(node)
            raise RuntimeError(f"`ray start {' '.join(args)}` did not start:\n"
                               f"{open(log).read()[-3000:]}")
        time.sleep(0.3)
    return node


def _stop(node: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block`, which stops its node's processes; then its group."""
    if node.poll() is None:
        node.terminate()
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait(timeout=10)
    try:
        os.killpg(node.pid, signal.SIGKILL)  # whatever of this node's group is left
    except (ProcessLookupError, PermissionError):
        pass


def _ports(ports: Iterator[int], *names: str) -> list[str]:
    return [arg for name in names for arg in (f"--{name}", str(next(ports)))]


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    """Alive nodes, counted by a separate driver (this process's Ray stays unconnected)."""
    code = (f"import ray; ray.init(address={address!r}, log_to_driver=False); "
            "print('NODES', sum(1 for n in ray.nodes() if n['Alive']))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    lines = [line for line in done.stdout.splitlines() if line.startswith("NODES")]
    return int(lines[-1].split()[1]) if lines else 0


@pytest.fixture(scope="module", autouse=True)
def ray_auth_as_the_environment_says():
    """After the module: Ray's cached auth settings read again from the environment as the
    tests' monkeypatches left it (a test that removed RAY_AUTH_MODE made Ray cache "disabled";
    the next local Ray of this process, started with the mode a local ray.init had set, would
    then refuse its own driver)."""
    yield
    reload_ray_auth()


@pytest.fixture(scope="module")
def token_cluster():
    """{"address", "token", "dir"} of a 2-node token-auth cluster, 1 CPU per node."""
    assert not ray.is_initialized()
    base = tempfile.mkdtemp(prefix="pdmm", dir="/tmp")  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, RAY_USAGE_STATS_ENABLED="0")
    node_ports = ("node-manager-port", "object-manager-port", "metrics-export-port",
                  "runtime-env-agent-port", "dashboard-agent-listen-port",
                  "dashboard-agent-grpc-port")
    ports = iter(free_ports(3 + 2 * len(node_ports)))  # distinct across both nodes
    port = next(ports)
    common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats"]
    nodes = []
    try:
        nodes.append(_start_node(
            ["--head", "--port", str(port), "--temp-dir", os.path.join(base, "h"),
             "--include-dashboard", "false",
             *_ports(ports, "dashboard-port", "ray-client-server-port", *node_ports), *common],
            os.path.join(base, "head.log"), env))
        address = f"127.0.0.1:{port}"
        nodes.append(_start_node(
            ["--address", address, "--temp-dir", os.path.join(base, "w"),
             *_ports(ports, *node_ports), *common], os.path.join(base, "worker.log"), env))
        deadline = time.monotonic() + 60
        while _alive_nodes(address, env) < 2:
            assert time.monotonic() < deadline, "the worker node did not join the head"
            time.sleep(1)
        yield {"address": address, "token": TOKEN, "dir": base}
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(base, ignore_errors=True)


def where_loop(config):
    """Reports once; returns where this worker ran."""
    pd.report({"epoch": 0, "loss": 1.0})
    context = pd.get_context()
    return {"rank": context.get_world_rank(), "node_rank": context.get_node_rank(),
            "node_id": ray.get_runtime_context().get_node_id()}


def _events_of(run_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=60)
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:  # the server stores events asynchronously
            events = client.read_events(EventFilter(
                resource=EventResourceFilter(id_prefix=[f"prefect-distrain.run.{run_name}"]),
                event=EventNameFilter(name=["prefect-distrain.run.completed"])), limit=10).events
            if events or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


def _assert_secret_nowhere(secret: str, flow_run_id, *texts: str) -> None:
    """Not in the flow run's logs, artifacts, task runs, nor in ``texts``, nor in this
    process's environment."""
    logs, artifacts, task_runs = flow_run_records(flow_run_id, messages=False)
    for record in [*logs, *artifacts, *task_runs]:
        assert secret not in record.model_dump_json(), record
    for text in texts:
        assert secret not in text
    assert not [k for k, v in os.environ.items() if secret in v], "the token stayed in os.environ"


def test_a_token_block_trains_two_workers_on_two_nodes(token_cluster, tmp_path):
    RayCluster(address=token_cluster["address"], auth_token=token_cluster["token"]
               ).save("mm-cluster", overwrite=True)

    @flow
    def on_the_cluster():
        return pd.train(where_loop, scaling=pd.ScalingConfig(
                            num_workers=2, placement_strategy="STRICT_SPREAD"),
                        run=pd.RunConfig(name="mm-spread", storage=str(tmp_path)),
                        ray_cluster=RayCluster.load("mm-cluster"))

    state = on_the_cluster(return_state=True)
    result = state.result()
    workers = result.worker_results
    assert len({w["node_id"] for w in workers}) == 2, workers   # one worker per node
    assert sorted(w["node_rank"] for w in workers) == [0, 1]
    assert not ray.is_initialized()  # the connection train made is closed again
    events = _events_of("mm-spread")
    assert events, "no prefect-distrain.run.completed event"
    _assert_secret_nowhere(token_cluster["token"], state.state_details.flow_run_id,
                           *(e.model_dump_json() for e in events))
    for folder, _dirs, files in os.walk(token_cluster["dir"]):  # the driver's Ray logs
        for name in files:
            if name.startswith(("python-core-driver", "driver")):
                with open(os.path.join(folder, name), errors="replace") as log:
                    assert token_cluster["token"] not in log.read(), name


def test_ray_address_and_token_exported_by_the_user_still_work(token_cluster, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", token_cluster["address"])
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token_cluster["token"])

    @flow
    def from_the_environment():
        return pd.train(where_loop, scaling=pd.ScalingConfig(num_workers=1),
                        run=pd.RunConfig(name="mm-env", storage=str(tmp_path)))

    result = from_the_environment()
    assert len(result.worker_results) == 1 and not ray.is_initialized()


def test_the_ray_task_runner_connects_with_the_blocks_token(token_cluster, tmp_path):
    """prefect-ray's runner through pd.ray_task_runner: tasks and train on the token cluster,
    the token in the environment only while connecting."""
    from prefect import task

    RayCluster(address=token_cluster["address"], auth_token=token_cluster["token"]
               ).save("mm-runner", overwrite=True)

    @task
    def node() -> str:
        return ray.get_runtime_context().get_node_id()

    @flow(task_runner=pd.ray_task_runner("mm-runner"))
    def on_the_runner():
        where = node.submit().result()
        result = pd.train(where_loop, scaling=pd.ScalingConfig(num_workers=2),
                          run=pd.RunConfig(name="mm-runner", storage=str(tmp_path)))
        return where, result.worker_results

    where, workers = on_the_runner()
    assert len(workers) == 2 and where
    assert not ray.is_initialized()
    assert not [k for k, v in os.environ.items() if token_cluster["token"] in v]


@pytest.mark.parametrize("sent", ["no token", "a wrong token", "an unreadable token file"])
def test_a_refused_token_is_a_configuration_error_naming_the_fix(token_cluster, tmp_path,
                                                                  monkeypatch, sent):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # as in a fresh process
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    wrong = "wrong-" + secrets.token_hex(16)
    block = RayCluster(address=token_cluster["address"])
    if sent == "a wrong token":
        block = RayCluster(address=token_cluster["address"], auth_token=wrong)
    elif sent == "an unreadable token file":  # Ray itself would abort the process on this
        block = RayCluster(address=token_cluster["address"], auth_mode="token")
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-such-token"))
    expected = {"no token": "sent no token (RAY_AUTH_MODE is not set here",
                "a wrong token": "the RayCluster block's auth_token is not its token",
                "an unreadable token file": "RAY_AUTH_MODE is 'token' here but Ray finds no "
                                            "token"}[sent]

    @flow
    def refused():
        return pd.train(where_loop, scaling=pd.ScalingConfig(num_workers=1),
                        run=pd.RunConfig(name="mm-refused", storage=str(tmp_path)),
                        ray_cluster=block)

    began = time.monotonic()
    state = refused(return_state=True)
    with pytest.raises(ConfigurationError) as caught:
        state.result()
    assert time.monotonic() - began < 30, "refused at once, not after Ray's 20 s of retries"
    message = str(caught.value)
    assert f"Ray cluster at {token_cluster['address']}" in message and expected in message
    assert "Fix: set the RayCluster block's auth_token" in message
    assert "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token>" in message
    assert "~/.ray/auth_token of the user who ran `ray start --head`" in message
    assert not ray.is_initialized()
    _assert_secret_nowhere(token_cluster["token"], state.state_details.flow_run_id, message)
    _assert_secret_nowhere(wrong, state.state_details.flow_run_id, message)


def test_addresses_are_shown_without_credentials():
    assert redact_address("ray://alice:s3cr3t@head:10001") == "ray://***@head:10001"
    assert redact_address("alice:s3cr3t@10.0.0.5:6379") == "***@10.0.0.5:6379"
    assert redact_address("ray://head:10001/?token=s3cr3t") == "ray://head:10001/?token=***"
    assert redact_address("10.0.0.5:6379") == "10.0.0.5:6379"
    assert "s3cr3t" not in repr(RayCluster(address="h:1", auth_token="s3cr3t"))
    assert "s3cr3t" not in repr(RayCluster(address="h:1", auth_token="s3cr3t")
                                .ray_init_arguments())


def prefect_cli(*args: str, timeout: float = 120) -> str:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([os.path.join(BIN, "prefect"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, \
        f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.mark.timeout(400)  # its own limits: 2 x 120 s for the CLI, 150 s for the run
def test_the_cluster_deployment_runs_on_a_process_worker(token_cluster, tmp_path):
    """deployments/cluster.yaml, deployed to the Prefect server and run by a real `prefect
    worker` process: its flow loads the blocks by name and spreads 2 workers over the nodes."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    RayCluster(address=token_cluster["address"], auth_token=token_cluster["token"]
               ).save("mm-deploy-cluster", overwrite=True)
    CheckpointStorage(url=str(tmp_path / "runs")).save("mm-deploy-storage", overwrite=True)
    prefect_cli("work-pool", "create", "cluster-process", "--type", "process", "--overwrite")
    prefect_cli("--no-prompt", "deploy", "--prefect-file", "deployments/cluster.yaml", "--all")
    flow_run = run_deployment("digits-on-cluster/digits-cluster", timeout=0, parameters={
        "cluster": "mm-deploy-cluster", "storage": "mm-deploy-storage", "epochs": 1,
        "placement_strategy": "STRICT_SPREAD"})
    worker_output = prefect_cli("worker", "start", "--pool", "cluster-process", "--run-once",
                                timeout=150)
    with get_client(sync_client=True) as client:
        finished = client.read_flow_run(flow_run.id)
    logs = flow_run_records(flow_run.id)[0]
    assert finished.state.type.value == "COMPLETED", "\n".join(logs[-30:])
    assert any(line.startswith("2 workers on 2 node(s)") for line in logs), logs
    runs = os.listdir(tmp_path / "runs")
    assert len(runs) == 1 and os.listdir(tmp_path / "runs" / runs[0] / "_manifests")
    assert token_cluster["token"] not in worker_output
    _assert_secret_nowhere(token_cluster["token"], flow_run.id,
                           json.dumps(finished.parameters))
