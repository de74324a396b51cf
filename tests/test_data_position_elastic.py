"""Data position resume across an elastic resize: a node is lost in the middle of a pass, the
group goes on with 2 workers of 4, and every sample of that pass is consumed exactly once (a
shuffling torch loader, and Ray Data shards from parquet)."""

from __future__ import annotations

import json

import pytest
from conftest import head_and_node
from test_data_position import consumed_once, shard_ids_loop, trainer_attempts, write_ids
from test_elastic import NodeChanges, in_thread

import prefect_distrain as pd


@pytest.fixture
def cluster():
    """A head and a node with two worker slots each (a spare CPU on the head for Ray Data)."""
    with head_and_node({"num_cpus": 3, "resources": {"slot": 2}},
                       {"num_cpus": 2, "resources": {"slot": 2}}) as both:
        yield both


class AfterCommit(NodeChanges):
    """NodeChanges keyed on the index of a committed checkpoint, not on a report."""

    def handle_result(self, results, training_iteration, **info):
        pass

    def on_checkpoint_commit(self, checkpoint, **info):
        NodeChanges.handle_result(self, [], info["index"])


@pytest.mark.parametrize("source", ["loader", "ray"])
def test_a_node_lost_mid_pass_goes_on_with_fewer_workers_from_the_exact_position(
        cluster, tmp_path, source):
    cluster, node = cluster
    logs, opened = tmp_path / "logs", tmp_path / "node-removed"
    logs.mkdir()

    def remove_node():
        cluster.remove_node(node)
        opened.touch()

    # 96 ids, 4 ranks, batches of 4: 6 batches a pass, a checkpoint every 2. Checkpoint 4 is
    # pass 1's after its 2nd batch; once it is committed (rank 0 may be on the node that goes)
    # the node goes, while the ranks wait before their next batch.
    changes = AfterCommit({4: remove_node})
    epochs = 3 if source == "loader" else 2  # the pass after the resumed one, on 2 workers
    config = {"epochs": epochs, "log": str(logs), "every": 2, "source": source,
              "gate": [1, 2, str(opened)]}
    scaling = pd.ScalingConfig(num_workers=4, min_workers=2,
                               resources_per_worker={"CPU": 1, "slot": 1})
    datasets = {"train": write_ids(tmp_path / "ids")} if source == "ray" else None
    with pd.Trainer(scaling=scaling, run=pd.RunConfig(name="resize", storage=str(tmp_path)),
                    failure=pd.FailureConfig(max_failures=1)) as trainer:
        thread, outcome = in_thread(lambda: trainer.fit(
            shard_ids_loop, config=config, callbacks=[changes], datasets=datasets))
        changes.serve(thread)
        thread.join()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].world_size == 2
    attempts = trainer_attempts(tmp_path / "resize")
    assert [a["world_size"] for a in attempts] == [4, 2]
    assert attempts[1]["resumed_from"].endswith("checkpoint_000004-a0")
    manifests = tmp_path / "resize" / "_manifests"
    resumed = json.loads(open(manifests / "checkpoint_000004-a0.json").read())
    counted = "rows" if source == "ray" else "batches"
    done = 8 if source == "ray" else 2
    assert {p[counted] for p in resumed["data_positions"]["ranks"].values()} == {done}
    assert len(resumed["data_positions"]["ranks"]) == 4
    # The next checkpoint, in the continued pass on 2 workers, continues that chain.
    after = json.loads(open(manifests / "checkpoint_000005-a1.json").read())
    assert after["data_positions"]["base"] == resumed["data_positions"]
    assert len(after["data_positions"]["ranks"]) == 2
    consumed_once(logs, resumed, epochs=epochs)
