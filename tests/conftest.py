"""Real parts only: one local Ray (4 logical CPUs) and one Prefect test server per session.

Fixtures stop what they start, by handle. The ``env_police`` fixture fails a test that leaves
environment variables changed in the driver (a backend must set MASTER_ADDR & co. on workers).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402
import ray  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray for the whole session; ``train`` must find it and leave it running."""
    assert not ray.is_initialized()
    ray.init(num_cpus=4, include_dashboard=True, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def env_police():
    before = dict(os.environ)
    yield
    after = dict(os.environ)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    changed = {k for k in changed if not k.startswith(("PREFECT_", "RAY_", "PYTEST_"))}
    assert not changed, f"the test leaked environment variables into the driver: {sorted(changed)}"


def live_train_actors() -> list:
    """TrainWorker actors that are not DEAD, per Ray's state API."""
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("class_name", "=", "TrainWorker")], limit=1000)
            if a.state != "DEAD"]


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
