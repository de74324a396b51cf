"""``train`` in flows on prefect-ray's ``RayTaskRunner``: one Ray cluster for the runner's tasks
and the training workers, and the flow's Prefect API (the test server) in every Ray task.

No module-scoped ``ray_cluster`` here: the runner starts its own Ray, or the test starts a
cluster and passes its address. "Exactly one cluster" is counted in processes: the ``gcs_server``
processes below this pytest process while the workers train.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import cloudpickle
import pytest
import ray
from conftest import flow_run_records
from prefect import flow, task

import prefect_distrain as pd
from prefect_distrain.blocks import RayCluster

pytest.importorskip("prefect_ray")

from prefect_distrain.prefect.ray_runner import DistrainRayTaskRunner, flow_api_url  # noqa: E402

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.own_ray]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE_PATH = os.path.join(ROOT, "flows", "ray_pipeline.py")


def _load_pipeline():
    spec = importlib.util.spec_from_file_location("ray_pipeline", PIPELINE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ray_pipeline"] = module
    spec.loader.exec_module(module)
    return module


# Ray workers can import neither flows/ nor tests/. The runner sends the tasks and the functions
# passed to them by value from their own modules; what those reference in another such module
# (here the example's functions) must travel by value too.
pipeline = _load_pipeline()
for _module in (pipeline, sys.modules["digits"], sys.modules[__name__]):
    ray.cloudpickle.register_pickle_by_value(_module)
    cloudpickle.register_pickle_by_value(_module)
scale_digits, split_digits, train_loop = (pipeline.scale_digits, pipeline.split_digits,
                                          pipeline.digits_loop)
TEST_PID = os.getpid()
#: A Prefect API key the test server ignores: it must reach the Ray tasks' settings, never
#: their runtime_env (Ray shows that on its dashboard) nor a log file.
API_KEY = "pnu_never-shown-3c5e"


def processes_below(pid: int) -> dict[str, int]:
    """Ray clusters (GCS servers) and Prefect API servers among ``pid``'s descendants (read
    from /proc: Linux)."""
    parents, commands = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                commands[int(entry)] = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    below, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - below
        below |= frontier
    found = [commands.get(p, "") for p in below]
    return {"gcs_server": sum(1 for c in found if c.split(" ")[0].endswith("/gcs_server")),
            "prefect_server": sum(1 for c in found
                                  if "prefect.server.api.server:create_app" in c)}


def where_am_i() -> dict:
    """This process's Ray cluster and Prefect API, and any Prefect server it started."""
    from prefect.context import TaskRunContext
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

    context = ray.get_runtime_context()
    worker = context.worker.mode == ray.WORKER_MODE
    task_run = TaskRunContext.get()
    return {
        "pid": os.getpid(), "gcs": context.gcs_address, "api_url": PREFECT_API_URL.value(),
        "env_api_url": os.environ.get("PREFECT_API_URL"),
        "has_api_key": PREFECT_API_KEY.value() == API_KEY,
        "runtime_env": json.dumps(context.runtime_env) if worker else None,
        "own_servers": [s.port for s in SubprocessASGIServer._instances.values() if s.running],
        "task_run_id": str(task_run.task_run.id) if task_run else None,
        "held": context.get_assigned_resources() if worker else None,
    }


@task
def scale(storage: str) -> dict:
    return {"url": scale_digits.fn(storage), **where_am_i()}


@task
def split(scaled: dict) -> dict:
    return {"data_uri": split_digits.fn(scaled["url"]), **where_am_i()}


def probed_loop(config):
    """The example's training function; also says where it ran and what ran beside it."""
    train_loop(config)
    return {"gcs": ray.get_runtime_context().gcs_address,
            "below_test": processes_below(config["test_pid"]),
            "block_env": os.environ.get("PD_CLUSTER_MARK")}


class WhereIsTrain(pd.TrainingCallback):
    """Runs in the ``train`` task's process (in a thread of its own): writes where that is."""

    def __init__(self, path: str):
        self.path = path

    def start_training(self, logdir, config, **info):
        if not os.path.exists(self.path):
            with open(self.path, "w") as handle:
                json.dump(where_am_i(), handle)


def train_kwargs(tmp_path, name: str, **config) -> dict:
    return dict(config={"epochs": 2, "lr": 0.05, "hidden": 32, "test_pid": TEST_PID, **config},
                scaling=pd.ScalingConfig(num_workers=2),
                run=pd.RunConfig(name=name, storage=str(tmp_path / "runs"), total=2),
                callbacks=[WhereIsTrain(str(tmp_path / f"{name}-task.json"))])


def records(flow_run_id, run_name: str):
    """Logs, artifacts, task runs and the run's closing event, from the flow's API."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=60)
    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while True:  # the server stores events asynchronously
            events = client.read_events(EventFilter(
                event=EventNameFilter(name=["prefect-distrain.run.completed"]),
                resource=EventResourceFilter(id=[f"prefect-distrain.run.{run_name}"])),
                limit=10).events
            if events or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    return (*flow_run_records(flow_run_id, messages=False), events)


def assert_train_reported_to_its_own_task_run(state, run_name: str) -> str:
    """The ``train`` task run's logs, artifacts and events carry its own id; returns it."""
    logs, artifacts, task_runs, events = records(state.state_details.flow_run_id, run_name)
    trains = [t for t in task_runs if t.name.startswith("train")]
    assert len(trains) == 1 and trains[0].state.is_completed()
    train_id = trains[0].id
    finished = [log for log in logs if log.message.startswith("Training finished")]
    assert finished and all(log.task_run_id == train_id for log in finished)
    # The task engine's last line: sent before the task's result, so not lost when the flow
    # run ends (and a temporary cluster with it) within the log batch interval.
    assert [log for log in logs if log.task_run_id == train_id
            and log.message.startswith("Finished in state Completed")]
    worker_lines = [log for log in logs if log.message.startswith("[rank ")]
    assert all(log.task_run_id == train_id for log in worker_lines)
    ours = {a.key: a for a in artifacts if a.key and a.key.startswith(run_name)}
    assert {f"{run_name}-summary", f"{run_name}-progress"} <= set(ours)
    assert all(a.task_run_id == train_id for a in ours.values())
    assert float(ours[f"{run_name}-progress"].data) == 100.0
    assert events, "the run.completed event reached the flow's API"
    related = {r.id for r in events[0].related}
    assert f"prefect.task-run.{train_id}" in related
    others = {t.id for t in task_runs if not t.name.startswith("train")}
    assert len(others) == 2 and not [log for log in logs if log.task_run_id in others
                                     and "Training" in log.message]
    return str(train_id)


def files_containing(folder: str, text: str) -> list[str]:
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                with open(os.path.join(root, name), "rb") as handle:
                    if text.encode() in handle.read():
                        found.append(os.path.join(root, name))
            except OSError:
                pass
    return found


def harness_api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def test_a_flow_on_a_temporary_ray_cluster_trains_on_that_cluster(tmp_path):
    """The runner starts a local Ray; two preprocessing tasks, then ``train.submit`` with 2
    workers, all on it; everything talks to the test server."""
    assert not ray.is_initialized()
    before = processes_below(TEST_PID)
    sessions = []

    @flow(task_runner=pd.ray_task_runner(init_kwargs={"num_cpus": 4,
                                                      "include_dashboard": False}))
    def on_ray():
        flow_gcs = ray.get_runtime_context().gcs_address
        sessions.append(ray._private.worker._global_node.get_session_dir_path())
        scaled = scale.submit(str(tmp_path / "data"))
        split_ = split.submit(scaled)
        data_uri = split_.result()["data_uri"]
        result = pd.train.submit(probed_loop, **train_kwargs(tmp_path, "on-runner",
                                                              data_uri=data_uri))
        return flow_gcs, scaled.result(), split_.result(), result.result()

    from prefect.settings import PREFECT_API_KEY, temporary_settings

    with temporary_settings(updates={PREFECT_API_KEY: API_KEY}):
        state = on_ray(return_state=True)
    flow_gcs, scaled, split_, result = state.result()
    assert result.metrics["epoch"] == 1 and result.metrics["accuracy"] > 0.5
    train_task = json.loads((tmp_path / "on-runner-task.json").read_text())

    # One Ray cluster: the runner's, seen by the flow, both Ray tasks, the train task and the
    # workers; and one GCS below this process while they trained.
    assert {flow_gcs, scaled["gcs"], split_["gcs"], train_task["gcs"],
            *(w["gcs"] for w in result.worker_results)} == {flow_gcs}
    assert all(w["below_test"]["gcs_server"] == before["gcs_server"] + 1
               for w in result.worker_results)
    assert train_task["pid"] != os.getpid(), "train ran as a Ray task"
    assert train_task["held"] == {}, "the train task holds no CPU of its own"

    # The flow's API in every Ray task; no Prefect server started by any of them.
    url = harness_api_url()
    for where in (scaled, split_, train_task):
        assert where["api_url"] == where["env_api_url"] == url
        assert where["own_servers"] == []
        assert where["has_api_key"] and API_KEY not in where["runtime_env"]
    assert json.loads(scaled["runtime_env"])["env_vars"] == {"PREFECT_API_URL": url}
    assert all(w["below_test"]["prefect_server"] == before["prefect_server"]
               for w in result.worker_results)
    assert_train_reported_to_its_own_task_run(state, "on-runner")
    assert not files_containing(sessions[0], API_KEY), "the API key is in Ray's logs"

    assert not ray.is_initialized(), "the runner shut down the Ray it started"
    deadline = time.monotonic() + 30
    while processes_below(TEST_PID)["gcs_server"] > before["gcs_server"]:
        assert time.monotonic() < deadline, "the temporary cluster did not stop"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def existing_cluster():
    """A running Ray cluster the tests pass by address; they must leave it running."""
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0,
                                                            "include_dashboard": False})
    try:
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def assert_still_running(cluster) -> None:
    assert not ray.is_initialized()
    ray.init(address=cluster.address)
    try:
        assert [n for n in ray.nodes() if n["Alive"]]
        assert ray.get(ray.remote(lambda: 42).remote()) == 42
    finally:
        ray.shutdown()


def wait_for_manifest(run_folder: str, name: str) -> None:
    """On a worker: until the checkpoint ``name`` of a run on local disk is committed."""
    path = os.path.join(run_folder, "_manifests", f"{name}.json")
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{name} was never committed"
        time.sleep(0.05)


def resumable_loop(config):
    """Checkpoints every epoch; on attempt 0, rank 1 is SIGKILLed in epoch 1."""
    import signal
    import tempfile

    ctx = pd.get_context()
    start = 0
    if (checkpoint := pd.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder, open(os.path.join(folder, "epoch")) as handle:
            start = int(handle.read()) + 1
    for epoch in range(start, config["epochs"]):
        if (ctx.get_attempt(), epoch, ctx.get_world_rank()) == (0, 1, 1):
            wait_for_manifest(ctx.get_storage(), "checkpoint_000001-a0")  # epoch 0 committed
            os.kill(os.getpid(), signal.SIGKILL)
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "epoch"), "w") as handle:
                handle.write(str(epoch))
            pd.report({"epoch": epoch}, checkpoint=pd.Checkpoint.from_directory(folder)
                      if ctx.get_world_rank() == 0 else None)
    return {"gcs": ray.get_runtime_context().gcs_address,
            "below_test": processes_below(config["test_pid"]),
            "block_env": os.environ.get("PD_CLUSTER_MARK")}


def test_an_existing_cluster_serves_runner_and_train_and_keeps_running(existing_cluster,
                                                                      tmp_path):
    """One RayCluster block for the runner and ``train``; train is called directly once and
    submitted once with a Prefect retry after a lost worker, which resumes."""
    from prefect_distrain.prefect.tasks import train

    before = processes_below(TEST_PID)
    block = RayCluster(address=existing_cluster.address,
                       runtime_env={"env_vars": {"PD_CLUSTER_MARK": "from-the-block"}})

    @flow(task_runner=pd.ray_task_runner(block))
    def on_cluster():
        data_uri = split.submit(scale.submit(str(tmp_path / "data"))).result()["data_uri"]
        direct = train(probed_loop, ray_cluster=block,
                       **train_kwargs(tmp_path, "direct", data_uri=data_uri))
        retried = train.with_options(retries=1).submit(
            resumable_loop, backend=pd.BackendConfig(), ray_cluster=block,
            failure=pd.FailureConfig(max_failures=0), **train_kwargs(tmp_path, "retried"))
        return direct, retried.result()

    state = on_cluster(return_state=True)
    direct, retried = state.result()
    assert direct.metrics["epoch"] == retried.metrics["epoch"] == 1
    everywhere = direct.worker_results + retried.worker_results
    assert {w["gcs"] for w in everywhere} == {existing_cluster.gcs_address}
    assert all(w["below_test"]["gcs_server"] == before["gcs_server"] for w in everywhere), \
        "no second cluster"
    assert all(w["block_env"] == "from-the-block" for w in everywhere), "the block's runtime_env"
    direct_task = json.loads((tmp_path / "direct-task.json").read_text())
    assert direct_task["pid"] == os.getpid(), "called directly: train ran in the flow"
    retried_task = json.loads((tmp_path / "retried-task.json").read_text())
    assert retried_task["pid"] != os.getpid() and retried_task["held"] == {}
    assert retried_task["api_url"] == harness_api_url()

    # The Prefect retry ran in the Ray task and resumed from the latest checkpoint.
    assert retried.attempt == 1
    _, artifacts, task_runs, _ = records(state.state_details.flow_run_id, "retried")
    retried_id = next(a.task_run_id for a in artifacts if a.key == "retried-summary")
    direct_id = next(a.task_run_id for a in artifacts if a.key == "direct-summary")
    runs = {t.id: t for t in task_runs}
    assert retried_id != direct_id
    assert runs[retried_id].run_count == 2 and runs[direct_id].run_count == 1
    ledgers = [a for a in artifacts if a.key == "retried-attempts"]
    assert {a.task_run_id for a in ledgers} == {retried_id}
    rows = json.loads(max(ledgers, key=lambda a: a.created).data)
    assert [(r["attempt"], r["status"]) for r in rows] == [(0, "failed"), (1, "completed")]
    assert "WorkerLostError" in rows[0]["cause"]
    assert rows[1]["resumed from"].endswith("checkpoint_000001-a0"), "from epoch 0's checkpoint"

    assert_still_running(existing_cluster)


def test_a_train_task_that_holds_a_cpu_fails_at_once_naming_the_fix(existing_cluster,
                                                                   tmp_path):
    """On a plain RayTaskRunner, ``train.submit`` holds 1 of the 4 CPUs: 4 workers of 1 CPU
    can never fit beside it. It fails in seconds, not after the placement timeout; the same
    group fits on ``pd.ray_task_runner`` (the train task holds no CPU)."""
    from prefect_ray import RayTaskRunner

    def tiny(config):
        pd.report({"epoch": 0})
        return ray.get_runtime_context().gcs_address

    def four_workers():
        return pd.train.submit(tiny, backend=pd.BackendConfig(),
                               scaling=pd.ScalingConfig(num_workers=4),
                               run=pd.RunConfig(storage=str(tmp_path))).result()

    plain = flow(four_workers, name="plain-runner",
                 task_runner=RayTaskRunner(address=existing_cluster.address))
    state = plain(return_state=True)
    assert state.is_failed()
    with pytest.raises(pd.ResourcesUnavailableError) as caught:
        state.result()
    # The capacity check's message (at once), not the placement timeout's ("waited N s").
    message = str(caught.value)
    assert "waited" not in message and not caught.value.retryable
    assert "holds CPU 1 itself" in message and "remote_options(num_cpus=0)" in message
    assert "pd.ray_task_runner" in message

    ours = flow(four_workers, name="distrain-runner",
                task_runner=pd.ray_task_runner(address=existing_cluster.address))
    result = ours()
    assert result.world_size == 4
    assert set(result.worker_results) == {existing_cluster.gcs_address}
    assert_still_running(existing_cluster)


def test_the_ephemeral_api_url_is_found_and_sent_on(monkeypatch):
    """Without PREFECT_API_URL the flow talks to its process's own ephemeral server (here the
    harness's, registered as the default one): that is the URL the Ray tasks get."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    harness = SubprocessASGIServer._instances[None]
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert PREFECT_API_URL.value() is None
        assert flow_api_url(start=False) == harness.api_url
    assert flow_api_url() == harness_api_url()


def test_the_runner_copies_with_its_settings_and_takes_a_block_or_its_name():
    runner = pd.ray_task_runner(RayCluster(address="ray://head:10001",
                                           runtime_env={"pip": ["scikit-learn"]},
                                           init_options={"log_to_driver": False}))
    assert runner.address == "ray://head:10001"
    assert runner.init_kwargs == {"runtime_env": {"pip": ["scikit-learn"]},
                                  "log_to_driver": False, "namespace": "prefect"}
    copy = runner.duplicate()
    assert isinstance(copy, DistrainRayTaskRunner) and copy == runner
    assert pd.ray_task_runner(train_num_cpus=1) != pd.ray_task_runner()
    by_name = pd.ray_task_runner("prod")
    assert by_name.cluster_block == "prod" and by_name.duplicate().cluster_block == "prod"
    with pytest.raises(pd.ConfigurationError, match="either cluster"):
        pd.ray_task_runner("prod", address="auto")


def test_the_users_own_modules_travel_by_value_installed_ones_by_reference():
    from prefect_distrain.execution.pickling import user_modules

    def _own_modules(task, parameters):  # as the runner asks, for a task and its parameters
        return user_modules([getattr(task, "fn", None), *parameters.values()])

    # ... and those of the helpers they use from other such modules (scale -> scale_digits)
    assert _own_modules(scale, {"storage": "x"}) == [sys.modules[__name__],
                                                     sys.modules["ray_pipeline"]]
    assert _own_modules(pd.train, {"train_loop": train_loop, "config": {}}) == \
        [sys.modules["digits"]]
    assert _own_modules(pd.train, {"train_loop": json.dumps}) == []


def test_the_example_pipeline_runs_on_the_ephemeral_api_with_one_prefect_server(tmp_path):
    """``python flows/ray_pipeline.py`` as a user runs it: Prefect's ephemeral API (no server
    URL), a temporary local Ray. Only the flow's process starts a Prefect server."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k != "RAY_ADDRESS"}
    # A fresh database is migrated first: on 2 busy cores that outlasts the 20 s default wait
    # (the CI run of 2026-12-03 timed out here), as `make quickstart` knows too.
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               PIPELINE_STORAGE=str(tmp_path / "runs"), RAY_DEDUP_LOGS="0")
    began = time.monotonic()
    done = subprocess.run([sys.executable, PIPELINE_PATH], capture_output=True, text=True,
                          timeout=280, env=env, cwd=str(tmp_path), check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    accuracy = float(output.split("Final test accuracy: ")[1].split()[0])
    assert accuracy > 0.9
    assert output.count("Starting temporary server") == 1, output[-4000:]
    assert "Task run 'train-torch' - Training finished" in output
    assert "Retry 1/1" not in output, "the flow's train task needed its Prefect retry"
    print(f"example flow on the ephemeral API: {time.monotonic() - began:.1f} s")
