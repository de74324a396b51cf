"""The Prefect task ``train`` inside flows, on the Prefect test server and a real Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import ray
from conftest import assert_no_train_actors
from prefect import flow, unmapped
from prefect.serializers import PickleSerializer

import prefect_distrain as pd

pytestmark = pytest.mark.usefixtures("ray_cluster", "prefect_server")


def rank_loop(config):
    ctx = pd.get_context()
    for epoch in range(config["epochs"]):
        pd.report({"epoch": epoch, "scale": config.get("scale", 1) * epoch})
    return {"rank": ctx.get_world_rank(), "world": ctx.get_world_size()}


def test_train_in_a_flow_returns_a_result_prefect_can_persist(tmp_path):
    @flow
    def my_flow():
        return pd.train(rank_loop, backend="torch", config={"epochs": 3},
                        scaling=pd.ScalingConfig(num_workers=2),
                        run=pd.RunConfig(name="in-flow", storage=str(tmp_path)))

    result = my_flow()
    assert result.metrics["epoch"] == 2
    assert [m["epoch"] for m in result.metrics_history] == [0, 1, 2]
    assert result.worker_results == [{"rank": 0, "world": 2}, {"rank": 1, "world": 2}]
    assert result.run_name == "in-flow" and result.world_size == 2
    restored = PickleSerializer().loads(PickleSerializer().dumps(result))
    assert restored == result
    assert ray.is_initialized(), "a Ray started by someone else is left running"
    assert ray.get(ray.remote(lambda: 42).remote()) == 42
    assert_no_train_actors()


def test_submit_map_and_with_options(tmp_path):
    @flow
    def sweep():
        submitted = pd.train.submit(rank_loop, config={"epochs": 2},
                                    scaling=pd.ScalingConfig(num_workers=2),
                                    run=pd.RunConfig(name="submitted", storage=str(tmp_path)))
        mapped = pd.train.map(rank_loop, config=[{"epochs": 2, "scale": 1},
                                                 {"epochs": 2, "scale": 5}],
                              scaling=unmapped(pd.ScalingConfig(num_workers=1)),
                              run=unmapped(pd.RunConfig(storage=str(tmp_path))))
        done = submitted.result(), [f.result() for f in mapped]
        # After the others: the four workers above fill the 4 CPUs, and this one would wait.
        renamed = pd.train.with_options(name="train-renamed", retries=0)(
            rank_loop, config={"epochs": 1},
            run=pd.RunConfig(name="renamed", storage=str(tmp_path)))
        return (*done, renamed)

    submitted, mapped, renamed = sweep()
    assert submitted.worker_results == [{"rank": 0, "world": 2}, {"rank": 1, "world": 2}]
    assert [m.metrics["scale"] for m in mapped] == [1, 5]
    assert renamed.metrics == {**renamed.metrics, "epoch": 0}
    assert_no_train_actors()


def test_a_failing_worker_fails_the_task_with_its_own_error(tmp_path):
    def broken(config):
        if pd.get_context().get_world_rank() == 1:
            raise KeyError("missing column 'label'")

    @flow
    def failing():
        return pd.train(broken, scaling=pd.ScalingConfig(num_workers=2),
                        run=pd.RunConfig(name="broken", storage=str(tmp_path)))

    state = failing(return_state=True)
    assert state.is_failed()
    with pytest.raises(KeyError, match="missing column 'label'"):
        state.result()
    assert_no_train_actors()


def test_train_starts_its_own_ray_and_stops_only_that(tmp_path):
    """No Ray running: ``Trainer`` starts one and shuts it down; here in a fresh process."""
    script = textwrap.dedent(f"""
        import ray, prefect_distrain as pd
        assert not ray.is_initialized()
        def loop():
            pd.report({{"ok": 1}})
            return pd.get_context().get_world_size()
        trainer = pd.Trainer(num_workers=2, run=pd.RunConfig(name="own", storage={str(tmp_path)!r}),
                             ray_init_kwargs={{"num_cpus": 2, "include_dashboard": False}})
        print("RESULT", trainer.run(loop))
        trainer.shutdown()
        print("RAY_AFTER", ray.is_initialized())
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT [2, 2]" in done.stdout
    assert "RAY_AFTER False" in done.stdout
