"""``pd.collective``: barrier and broadcast_from_rank_zero on a real local Ray, through
``Trainer``. Orderings are checked with the workers' own timestamps, never with thresholds."""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch
from conftest import assert_no_train_actors

import prefect_distrain as pd
from prefect_distrain import collective
from prefect_distrain.collective import CollectiveTimeoutError

pytestmark = pytest.mark.usefixtures("ray_cluster")

#: Short, so that a rank waiting in a barrier longer than this would be called a hang if the
#: wait did not tell the driver it is busy.
HANG_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def trainer(ray_cluster, tmp_path_factory):
    """One group of two workers for the module: a run after a failed one starts a new one."""
    storage = tmp_path_factory.mktemp("collective")
    trainer = pd.Trainer(num_workers=2, run=pd.RunConfig(name="collective", storage=str(storage)),
                         failure=pd.FailureConfig(hang_timeout_s=HANG_TIMEOUT_S))
    trainer.start()
    yield trainer
    trainer.shutdown()
    assert_no_train_actors()
    deadline = time.monotonic() + 20
    while (alive := live_sync_actors()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive, "the groups' synchronization actors outlived them"


def live_sync_actors() -> list:
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", "SyncActor")], limit=1000)
    return [a for a in actors if a.state != "DEAD"]


def slow_rank_loop():
    """Rank 1 works (steps through a prepared loader) longer than the hang timeout before the
    barrier; rank 0 waits in it all that time."""
    rank = pd.get_context().get_world_rank()
    if rank == 1:
        data = torch.utils.data.TensorDataset(torch.arange(80.0))
        loader = pd.torch.prepare_data_loader(torch.utils.data.DataLoader(data, batch_size=1))
        worked = time.monotonic()
        for _ in loader:
            time.sleep(0.1)
        assert time.monotonic() - worked > HANG_TIMEOUT_S, "the test's premise"
    arrived = time.time()
    collective.barrier()
    return {"arrived": arrived, "left": time.time()}


def test_barrier_waits_for_the_slowest_rank_and_waiting_is_no_hang(trainer):
    rank0, rank1 = trainer.run(slow_rank_loop)
    assert rank0["left"] >= rank1["arrived"], "rank 0 left the barrier before rank 1 came"
    assert rank0["arrived"] < rank1["arrived"]


def broadcast_loop():
    rank = pd.get_context().get_world_rank()
    mine = {"seed": 1234, "paths": ["a", "b"], "nested": {"x": [1.5, None]}} if rank == 0 \
        else None
    got = collective.broadcast_from_rank_zero(mine)
    return {"got": got, "own_object": got is mine}


def test_broadcast_from_rank_zero_gives_every_rank_rank_zeros_object(trainer):
    rank0, rank1 = trainer.run(broadcast_loop)
    expected = {"seed": 1234, "paths": ["a", "b"], "nested": {"x": [1.5, None]}}
    assert rank0["got"] == rank1["got"] == expected
    assert rank0["own_object"] and not rank1["own_object"], "rank 0 gets its own object back"


def repeated_loop():
    """Ten barriers in a row, a broadcast between each two: the N-th calls meet."""
    rank = pd.get_context().get_world_rank()
    entered, left, got = [], [], []
    for i in range(10):
        if rank == i % 2:  # the other rank is ahead each time
            time.sleep(0.05)
        entered.append(time.time())
        collective.barrier(timeout_s=60)
        left.append(time.time())
        got.append(collective.broadcast_from_rank_zero((rank, i), timeout_s=60))
    return {"entered": entered, "left": left, "got": got}


def test_repeated_barriers_stay_matched_and_a_second_run_counts_afresh(trainer):
    for _ in range(2):  # the same group again: the calls of a new run count from 1
        rank0, rank1 = trainer.run(repeated_loop)
        for i in range(10):
            assert max(rank0["entered"][i], rank1["entered"][i]) \
                <= min(rank0["left"][i], rank1["left"][i]), f"barrier {i} let a rank through early"
        assert rank0["got"] == rank1["got"] == [(0, i) for i in range(10)]
    assert len(live_sync_actors()) == 1, "one synchronization actor per group"


def missing_rank_loop():
    if pd.get_context().get_world_rank() == 0:
        collective.barrier(timeout_s=1)
    return "returned without the barrier"


def test_a_rank_that_never_comes_times_out_naming_it(trainer):
    with pytest.raises(CollectiveTimeoutError,
                       match=r"barrier\(\) timed out after 1 s on rank 0 .*ranks \[0\] arrived, "
                             r"ranks \[1\] did not.*same number of times.*raise timeout_s"
                       ) as caught:
        trainer.run(missing_rank_loop)
    error = caught.value
    assert isinstance(error, TimeoutError) and isinstance(error, pd.DistrainError)
    assert (error.arrived, error.missing, error.call) == ([0], [1], 1)
    assert error.retryable is False, "the loop's bug: no restart, no retry"


def unpicklable_loop():
    rank = pd.get_context().get_world_rank()
    return collective.broadcast_from_rank_zero(threading.Lock() if rank == 0 else None)


def test_an_unpicklable_object_is_a_type_error_on_every_rank(trainer):
    with pytest.raises(TypeError, match=r"rank 0's data \(_thread\.lock\) cannot be pickled"
                       ) as caught:
        trainer.run(unpicklable_loop)
    assert caught.value.ranks == [0, 1], "every rank raises it: the user's bug, not restarted"


def test_outside_a_training_function_names_the_fix():
    with pytest.raises(RuntimeError, match=r"collective\.barrier\(\) was called outside a "
                                           r"training function.*Trainer\.run"):
        collective.barrier()
    with pytest.raises(RuntimeError, match="broadcast_from_rank_zero.*outside"):
        collective.broadcast_from_rank_zero({"a": 1})


def single_worker_loop():
    assert collective._sync_actor is None, "a group of one has no synchronization actor"
    collective.barrier(timeout_s=0.001)
    got = collective.broadcast_from_rank_zero([1, 2], timeout_s=0.001)
    with pytest.raises(TypeError, match="cannot be pickled"):
        collective.broadcast_from_rank_zero(threading.Lock())
    with pytest.raises(ValueError, match="timeout_s"):
        collective.barrier(timeout_s=0)
    return got


def test_a_group_of_one_returns_at_once(tmp_path):
    with pd.Trainer(num_workers=1, run=pd.RunConfig(name="one", storage=str(tmp_path))) as one:
        assert one.run(single_worker_loop) == [[1, 2]]
