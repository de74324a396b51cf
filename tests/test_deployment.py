"""deployments/prefect.yaml, deployed to a real Prefect server process and run twice by a
process worker: the second nightly run warm-starts from the first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import ray
from conftest import flow_run_records

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


@pytest.mark.timeout(900)  # its own limits: 2 x 120 s to deploy, 2 x 300 s per run
def test_the_nightly_deployment_runs_on_a_process_worker_and_warm_starts(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    prefect_cli("work-pool", "create", "local-process", "--type", "process", "--overwrite")
    prefect_cli("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all")
    parameters = {"storage": str(tmp_path), "epochs": 2,
                  "ray_address": ray.get_runtime_context().gcs_address}
    finished = []
    for _ in range(2):
        flow_run = run_deployment("digits-retraining/digits-nightly", parameters=parameters,
                                  timeout=0)
        prefect_cli("worker", "start", "--pool", "local-process", "--run-once", timeout=300)
        with get_client(sync_client=True) as client:
            finished.append(client.read_flow_run(flow_run.id))
        logs = flow_run_records(flow_run.id)[0]
    assert [run.state.type.value for run in finished] == ["COMPLETED", "COMPLETED"]
    assert any("no earlier run: training from scratch" in line for line in logs) is False
    assert any(line.startswith("warm start from digits-") for line in logs), logs
    runs = sorted(p for p in os.listdir(tmp_path) if p.startswith("digits-"))
    assert len(runs) == 2 and all(os.listdir(tmp_path / r / "_manifests") for r in runs)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(finished[0].deployment_id)
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
