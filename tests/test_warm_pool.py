"""Worker groups kept warm between runs (warm_pool.py): a flow's second ``train`` with the same
backend and scaling takes the first one's workers, with a new process group, no session and
none of the first run's environment; anything else starts its own, and the flow's end (or the
idle timeout) ends them."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
import weakref

import pytest
from conftest import Records, assert_no_train_actors, live_train_actors
from prefect import flow

import prefect_distrain as pd
from prefect_distrain.execution import warm_pool

pytestmark = pytest.mark.usefixtures("ray_cluster", "prefect_server")


def state_loop(config):
    """What a run finds in its worker process, then leaves something behind for the next."""
    import torch
    import torch.distributed as dist

    class Cycle:
        pass

    ctx = pd.get_context()
    deterministic = torch.are_deterministic_algorithms_enabled()
    earlier = getattr(sys, "_warm_pool_cycle", None)  # the last run's garbage: collected
    pd.torch.enable_reproducibility(0)  # an earlier run's choices would refuse these
    pd.torch.accelerate(amp=False)
    pd.torch.prepare_model(torch.nn.Linear(2, 1))
    total = torch.tensor([float(ctx.get_world_rank() + 1)])
    dist.all_reduce(total)
    found = {"pid": os.getpid(), "leak": os.environ.get("WARM_POOL_LEAK"),
             "master_port": os.environ["MASTER_PORT"], "world": dist.get_world_size(),
             "rank": dist.get_rank(), "sum": total.item(), "rank_env": os.environ["RANK"],
             "checkpoint": pd.get_checkpoint() is not None, "deterministic": deterministic,
             "cycle_alive": earlier is not None and earlier() is not None,
             "cycle_before": earlier is not None, "frozen": gc.get_freeze_count() > 0}
    cycle = Cycle()
    cycle.me = cycle
    sys._warm_pool_cycle = weakref.ref(cycle)
    pd.report({"step": 1})
    os.environ["WARM_POOL_LEAK"] = "left by the previous run"
    if config.get("fail"):
        raise ValueError("this run fails")
    return found


def test_a_second_train_in_a_flow_takes_the_first_ones_workers_clean(tmp_path):
    run = {"storage": str(tmp_path)}

    @flow
    def two_trains():
        first = pd.train(state_loop, config={}, scaling=pd.ScalingConfig(num_workers=2),
                         run=pd.RunConfig(name="first", **run))
        left = warm_pool.idle_groups()
        second = pd.train(state_loop, config={}, scaling=pd.ScalingConfig(num_workers=2),
                          run=pd.RunConfig(name="second", **run))
        other = pd.train(state_loop, config={}, scaling=pd.ScalingConfig(num_workers=3),
                         run=pd.RunConfig(name="three", **run))
        return first.worker_results, left, second.worker_results, other.worker_results, \
            warm_pool.idle_groups()

    first, left, second, other, idle_at_end = two_trains()
    assert left == 1
    assert [r["pid"] for r in second] == [r["pid"] for r in first]  # the same processes
    for run in (first, second):
        assert [r["rank"] for r in run] == [0, 1] and [r["rank_env"] for r in run] == ["0", "1"]
        assert [r["sum"] for r in run] == [3.0, 3.0] and {r["world"] for r in run} == {2}
        assert [r["leak"] for r in run] == [None, None]  # the first run's variable is gone
        assert not any(r["checkpoint"] for r in run)
        assert not any(r["deterministic"] for r in run)  # nor the first's torch settings
        # What the workers held after their first setup is frozen; the runs' garbage is not.
        assert all(r["frozen"] for r in run) and not any(r["cycle_alive"] for r in run)
    assert all(r["cycle_before"] for r in second)
    assert {r["master_port"] for r in second} != {r["master_port"] for r in first}
    # Another scaling starts its own group; the idle one gave way (4 CPUs hold 2 + 3 no more).
    assert not {r["pid"] for r in other} & {r["pid"] for r in first}
    assert [r["sum"] for r in other] == [6.0] * 3
    assert idle_at_end == 1  # the 3-worker group, until the flow ends
    assert warm_pool.idle_groups() == 0
    assert_no_train_actors()


def test_a_failed_run_leaves_no_group_and_a_trainer_outside_flows_keeps_none(tmp_path):
    @flow
    def failing_then_ok():
        failed = pd.train(state_loop, config={"fail": True},
                          scaling=pd.ScalingConfig(num_workers=2),
                          run=pd.RunConfig(name="fails", storage=str(tmp_path)),
                          return_state=True)
        left = warm_pool.idle_groups()
        ok = pd.train(state_loop, config={}, scaling=pd.ScalingConfig(num_workers=2),
                      run=pd.RunConfig(name="ok", storage=str(tmp_path)))
        return failed.is_failed(), left, ok.worker_results

    failed, left, ok = failing_then_ok()
    assert failed and left == 0
    assert [r["leak"] for r in ok] == [None, None]
    assert_no_train_actors()

    # Outside a flow, train keeps nothing warm.
    pd.train(state_loop, config={}, scaling=pd.ScalingConfig(num_workers=2),
             run=pd.RunConfig(name="bare", storage=str(tmp_path)))
    assert warm_pool.idle_groups() == 0
    assert_no_train_actors()


def test_only_the_same_backend_config_takes_a_group_and_idle_groups_end(tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("PREFECT_DISTRAIN_WARM_POOL_IDLE_S", "5")

    def pids(backend, name):
        with pd.Trainer(backend, num_workers=2, keep_warm=True,
                        run=pd.RunConfig(name=name, storage=str(tmp_path))) as trainer:
            return [r["pid"] for r in trainer.run(state_loop, config={})]

    first = pids("torch", "a")
    other = pids(pd.TorchConfig(timeout_s=600), "b")  # another backend config: its own group
    assert not set(first) & set(other)
    again = pids(pd.TorchConfig(timeout_s=600), "c")
    assert again == other
    assert warm_pool.idle_groups() >= 1  # 4 CPUs hold both: each waits out its idle time
    deadline = time.monotonic() + 30
    while warm_pool.idle_groups() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert warm_pool.idle_groups() == 0
    assert_no_train_actors()
    assert live_train_actors() == []


def test_a_warm_group_that_lost_a_worker_is_not_taken(tmp_path):
    """A worker killed while its group rests after its run: the next run's wait for the rest
    fails, so it ends that group and starts its own, which trains."""
    logger = logging.getLogger("test_warm_pool.lost_worker")
    records = Records()
    logger.handlers[:] = [records]
    logger.setLevel(logging.INFO)

    def run(name):
        with pd.Trainer(num_workers=2, keep_warm=True, logger=logger,
                        run=pd.RunConfig(name=name, storage=str(tmp_path))) as trainer:
            return trainer.run(state_loop, config={}), trainer._warm_key()

    first, key = run("a")
    warm = warm_pool.take(key)
    warm.group.rested(30.0)  # the first run's rest is done: the next one is the one under test
    os.kill(first[1]["pid"], signal.SIGKILL)
    warm.group.rest()  # a rest one worker cannot finish: it is gone
    warm_pool.give(warm, idle_s=60.0)
    second, _ = run("b")
    assert not {r["pid"] for r in second} & {r["pid"] for r in first}
    assert [r["sum"] for r in second] == [3.0, 3.0] and [r["leak"] for r in second] == [None] * 2
    assert any(m.startswith("A warm worker group could not be reused (ActorDiedError")
               for m in records.messages), records.messages
    assert warm_pool.drain() == 1  # the second run's group; the first one's ended
    assert_no_train_actors()


def _slow_rest_mark() -> None:
    time.sleep(2.0)
    os.environ["WARM_POOL_LEAK"] = "set at the end of a slow rest"


def test_the_next_run_waits_for_the_workers_rest(tmp_path):
    """The rest of a warm group goes on after its run returned; a run that takes the group
    starts on it only once the rest is over (here a rest that takes 2 s and marks the
    workers at its end: the next run's function sees the mark on every rank)."""
    def run(name):
        with pd.Trainer(num_workers=2, keep_warm=True,
                        run=pd.RunConfig(name=name, storage=str(tmp_path))) as trainer:
            return trainer.run(state_loop, config={}), trainer._warm_key()

    first, key = run("a")
    warm = warm_pool.take(key)
    warm.group.rested(30.0)
    warm.group._resting = [m.actor.execute.remote(_slow_rest_mark) for m in warm.group.members]
    warm_pool.give(warm, idle_s=60.0)
    second, _ = run("b")
    assert [r["pid"] for r in second] == [r["pid"] for r in first]
    assert [r["leak"] for r in second] == ["set at the end of a slow rest"] * 2
    assert warm_pool.drain() == 1
    assert_no_train_actors()
