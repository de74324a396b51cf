"""deployments/prefect.yaml, deployed to a real Prefect server process and run by a process
worker: the nightly retraining once, then the event-driven chain -- a new data set materialized
starts a retraining (warm-started from the nightly run's production model), and that run's
completed event starts the promotion gate."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import ray
from conftest import flow_run_records, load_flow

pytestmark = pytest.mark.usefixtures("ray_cluster", "prefect_server")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFECT = os.path.join(os.path.dirname(sys.executable), "prefect")


def prefect_cli(*args: str, timeout: float = 120) -> str:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    done = subprocess.run([PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, \
        f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def triggered_run(client, deployment_id, timeout: float = 120):
    """The flow run an automation created for a deployment (waits for it)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout
    while True:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployment_id])))
        if runs or time.monotonic() > deadline:
            assert runs, "the deployment's trigger created no flow run"
            return runs[0]
        time.sleep(1)


@pytest.mark.timeout(1200)  # its own limits: 120 s to deploy, 3 x 300 s per run
def test_nightly_then_event_driven_retraining_and_promotion_on_a_process_worker(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.deployments import run_deployment

    import prefect_distrain as pd

    prefect_cli("work-pool", "create", "local-process", "--type", "process", "--overwrite")
    prefect_cli("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all")
    where = {"storage": str(tmp_path), "ray_address": ray.get_runtime_context().gcs_address}

    def work() -> None:
        prefect_cli("worker", "start", "--pool", "local-process", "--run-once", timeout=300)

    # The nightly deployment: trains from scratch and becomes production.
    nightly = run_deployment("digits-retraining/digits-nightly",
                             parameters={**where, "epochs": 2}, timeout=0)
    work()
    with get_client(sync_client=True) as client:
        nightly = client.read_flow_run(nightly.id)
        deployment = client.read_deployment(nightly.deployment_id)
        on_data = client.read_deployment_by_name("digits-retraining/digits-on-new-data")
        promotion = client.read_deployment_by_name("digits-promotion/digits-promotion")
        # What a user edits in prefect.yaml: where runs are kept, the Ray cluster.
        client.update_deployment(on_data.id, DeploymentUpdate(
            parameters={**on_data.parameters, **where, "epochs": 2}))
        client.update_deployment(promotion.id, DeploymentUpdate(
            parameters={**promotion.parameters, "storage": str(tmp_path)}))
    assert nightly.state.type.value == "COMPLETED"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    first = pd.load_alias("digits", storage=str(tmp_path))

    # A new data set, published by the data flow (here, in this process): its asset event
    # starts the retraining, which warm-starts from production and leaves the promotion to the
    # next deployment.
    data_uri = load_flow("pipeline").digits_data(storage=str(tmp_path), seed=7)
    with get_client(sync_client=True) as client:
        retraining = triggered_run(client, on_data.id)
    assert retraining.parameters["data_uri"] == f"file://{data_uri}"
    work()
    with get_client(sync_client=True) as client:
        retraining = client.read_flow_run(retraining.id)
    assert retraining.state.type.value == "COMPLETED"
    logs = flow_run_records(retraining.id)[0]
    assert any(line.startswith("warm start from digits-") and "(the production model)" in line
               for line in logs), logs
    runs = sorted(p for p in os.listdir(tmp_path) if p.startswith("digits-"))
    assert len(runs) == 2 and all(os.listdir(tmp_path / r / "_manifests") for r in runs)
    assert pd.load_alias("digits", storage=str(tmp_path)).path == first.path, "not promoted yet"

    # The run's completed event starts the promotion gate for exactly that run.
    with get_client(sync_client=True) as client:
        gating = triggered_run(client, promotion.id)
    assert gating.parameters["run"] == runs[1]
    work()
    with get_client(sync_client=True) as client:
        gating = client.read_flow_run(gating.id)
    assert gating.state.type.value == "COMPLETED"
    [gate] = [a for a in flow_run_records(gating.id)[1] if a.key == "digits-production-gate"]
    production = pd.load_alias("digits", storage=str(tmp_path))
    if "the challenger wins" in gate.data:
        assert production.path.rstrip("/").rsplit("/", 2)[-2] == runs[1]
    else:
        assert "the champion wins" in gate.data and production.path == first.path
