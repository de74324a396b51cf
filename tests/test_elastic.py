"""The elastic protocol on a multi-node ``ray.cluster_utils.Cluster``: a node is lost, training
goes on with fewer workers, grows back when the node returns; with no resources at all it waits
with a logged backoff."""

from __future__ import annotations

import logging
import queue
import threading
import time

import pytest
import ray
from conftest import Records, assert_no_train_actors, head_and_node
from fault_loops import deterministic_loop

import prefect_distrain as pd


@pytest.fixture
def cluster():
    """A head and a 2-CPU node; the test changes the nodes while training runs."""
    with head_and_node({"num_cpus": 2}, {"num_cpus": 2}) as both:
        yield both


def wait_for_free_cpus(cpus: float, at_most: bool = False) -> None:
    """Until Ray's view of free CPUs (what the trainer's capacity check reads) has at least
    ``cpus`` (or, ``at_most``, no more than that): node changes reach it asynchronously."""
    deadline = time.monotonic() + 120
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if (free <= cpus) if at_most else (free >= cpus):
            return
        assert time.monotonic() < deadline, f"Ray shows {free} free CPUs, not {cpus}"
        time.sleep(0.1)


class NodeChanges(pd.TrainingCallback):
    """At given report numbers, hands a node change to the test's main thread (Ray's
    cluster_utils adds nodes only from there) and waits until it is made."""

    def __init__(self, changes: dict[int, callable]):
        self.changes = dict(changes)
        self.todo: queue.Queue = queue.Queue()

    def handle_result(self, results, training_iteration, **info):
        change = self.changes.pop(training_iteration, None)
        if change is not None:
            done = threading.Event()
            self.todo.put((change, done))
            done.wait()

    def serve(self, thread: threading.Thread, until=lambda: False) -> None:
        """In the main thread: make the changes asked for while ``thread`` trains."""
        while thread.is_alive() and not until():
            try:
                change, done = self.todo.get(timeout=0.2)
            except queue.Empty:
                continue
            change()
            done.set()


def in_thread(fit) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = fit()
        except BaseException as error:  # noqa: BLE001 - re-raised by the test thread
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def test_lost_node_shrinks_the_group_and_it_grows_back(cluster, tmp_path):
    """With a Ray Dataset: its shards follow the world size of each attempt."""
    cluster, node = cluster
    rows = ray.data.from_items([{"id": i} for i in range(48)])  # blocks in memory: no CPU needed
    removed, added = str(tmp_path / "removed"), str(tmp_path / "added")

    def then_open(change, path):
        change()
        open(path, "w").close()

    # Epoch 1's report (2) removes a node, epoch 3's report (4) adds one back; epochs 2 and 4
    # wait for those changes, so the training cannot outrun them. The gate of epoch 4 opens
    # once Ray shows the new node's CPUs free, so the next commit's capacity check sees them.
    changes = NodeChanges({
        2: lambda: then_open(lambda: cluster.remove_node(node), removed),
        4: lambda: then_open(lambda: (cluster.add_node(num_cpus=2, num_gpus=0),
                                      cluster.wait_for_nodes(), wait_for_free_cpus(2)), added),
    })
    scaling = pd.ScalingConfig(num_workers=4, min_workers=2)
    config = {"epochs": 8, "read_dataset": True, "gates": {2: removed, 4: added}}
    with pd.Trainer(scaling=scaling, run=pd.RunConfig(name="elastic", storage=str(tmp_path)),
                    failure=pd.FailureConfig(max_failures=2)) as trainer:
        thread, outcome = in_thread(lambda: trainer.fit(
            deterministic_loop, config=config, callbacks=[changes], datasets={"train": rows}))
        changes.serve(thread)
        thread.join()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    sizes = [(m["epoch"], m["world_size"]) for m in result.metrics_history]
    assert [e for e, _ in sizes] == list(range(8)), "every epoch reported once, in order"
    assert sizes[0][1] == 4 and sizes[-1][1] == 4
    assert 2 in {w for _, w in sizes}, "trained on the two workers the cluster had left"
    # Data sharding follows the world size: 64 samples split over the workers of the epoch.
    assert all(m["samples"] == 64 // m["world_size"] for m in result.metrics_history)
    # The Ray Dataset too: each epoch's shards are disjoint and together all 48 rows.
    for ranks in result.metrics_history_all_ranks:
        shards = [set(r["shard_ids"]) for r in ranks]
        assert len(shards) == ranks[0]["world_size"]
        assert sum(map(len, shards)) == 48 and set().union(*shards) == set(range(48))
    assert result.world_size == 4 and result.failures == 1
    assert [r["world_size"] for r in result.worker_results] == [4] * 4
    statuses = [a["status"] for a in trainer.checkpoints.attempts()]
    assert statuses == ["failed", "scaled up", "completed"]
    attempts = trainer.checkpoints.attempts()
    assert [a["world_size"] for a in attempts] == [4, 2, 4]
    assert attempts[1]["cause"].startswith("scale up from 2 workers after checkpoint")
    assert_no_train_actors()


def test_no_resources_at_all_backs_off_then_resumes_when_a_node_joins(cluster, tmp_path):
    cluster, node = cluster
    # The head's 2 CPUs are taken, so only `node` can hold workers.
    blocker = ray.remote(num_cpus=2)(lambda: time.sleep(3600)).remote()
    wait_for_free_cpus(2, at_most=True)  # the blocker holds the head's CPUs before training
    logger = logging.getLogger("test-backoff")
    records = Records()
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    changes = NodeChanges({2: lambda: cluster.remove_node(node)})

    def train():
        with pd.Trainer(num_workers=2, run=pd.RunConfig(name="backoff", storage=str(tmp_path)),
                        failure=pd.FailureConfig(max_failures=1), logger=logger) as trainer:
            return trainer.fit(deterministic_loop, config={"epochs": 5}, callbacks=[changes])

    thread, outcome = in_thread(train)
    deadline = time.monotonic() + 120
    changes.serve(thread, until=lambda: sum(
        "Waiting for resources" in m for m in records.messages) >= 2
        or time.monotonic() > deadline)
    assert thread.is_alive(), outcome
    assert time.monotonic() < deadline, records.messages
    cluster.add_node(num_cpus=2, num_gpus=0)
    thread.join(timeout=180)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    waits = [m for m in records.messages if "Waiting for resources" in m]
    assert "can hold 0 of the 2 worker(s) needed; looking again in 1 s" in waits[0]
    assert "looking again in 2 s" in waits[1], "the pause doubles"
    assert [m["epoch"] for m in result.metrics_history] == list(range(5))
    assert result.failures == 1
    ray.cancel(blocker, force=True)
    assert_no_train_actors()
