"""Resuming onto the exact data position: a checkpoint taken mid-pass keeps every rank's place
in its training data, and the restart's pass of that epoch yields only what no rank consumed,
also when the world size changed."""

from __future__ import annotations

import collections
import json
import os
import signal
import tempfile
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prefect_distrain as pd
from prefect_distrain.session.positions import remaining, sampler_order


@settings(max_examples=200, deadline=None)
@given(per_rank=st.integers(1, 12), world=st.integers(1, 4), new_world=st.integers(1, 4),
       batch=st.integers(1, 4), epoch=st.integers(0, 3), seed=st.integers(0, 5),
       shuffle=st.booleans(), data=st.data())
def test_what_is_left_of_a_pass_is_every_sample_not_consumed_once(per_rank, world, new_world,
                                                                   batch, epoch, seed, shuffle,
                                                                   data):
    """Over random sizes, world sizes before and after, and consumed batches: the consumed
    samples plus those dealt to the new ranks are the epoch's samples, each exactly once when
    the sizes divide evenly (as a DistributedSampler pads, they may repeat otherwise)."""
    size = per_rank * world * batch
    consumed = data.draw(st.integers(0, per_rank))  # batches, the same on every rank (DDP)
    position = {"epoch": epoch, "world_size": world, "batch_size": batch, "size": size,
                "seed": seed, "shuffle": shuffle, "drop_last": False, "batches": consumed}
    chain = {"ranks": {rank: dict(position) for rank in range(world)}}
    seen = [i for rank in range(world)
            for i in sampler_order(position, rank)[:consumed * batch]]
    left = remaining(chain, new_world)
    assert sorted(left) == list(range(new_world))
    assert len({len(v) for v in left.values()}) == 1, "every new rank gets as many"
    counts = collections.Counter(seen + [i for v in left.values() for i in v])
    assert set(counts) == set(range(size)), "no sample skipped"
    if (size - len(seen)) % new_world == 0:
        assert set(counts.values()) == {1}, "none seen twice"
    if new_world == world:  # the same ranks go on in their own order
        for rank in range(world):
            assert left[rank] == sampler_order(position, rank)[consumed * batch:]
            assert remaining(chain, world, rank)[rank] == left[rank]
    # ... and what the torch sampler itself gives, exactly (padding and drop_last included)
    from torch.utils.data import DistributedSampler

    for drop_last in (False, True):
        for rank in range(world):
            sampler = DistributedSampler(range(size + 1), num_replicas=world, rank=rank,
                                         shuffle=shuffle, seed=seed, drop_last=drop_last)
            sampler.set_epoch(epoch)
            assert sampler_order({**position, "size": size + 1, "drop_last": drop_last},
                                 rank) == list(sampler)


@pytest.mark.usefixtures("ray_cluster")
def test_a_mid_epoch_sigkill_resumes_onto_the_exact_data_position(tmp_path):
    """A shuffling torch loader of ids 0..95 on 2 ranks, a checkpoint every 3 batches, rank 1
    SIGKILLed at epoch 1's 8th batch."""
    logs = tmp_path / "logs"
    logs.mkdir()
    run = pd.RunConfig(name="ids", storage=str(tmp_path / "runs"))
    with pd.Trainer(num_workers=2, run=run, failure=pd.FailureConfig(max_failures=1)) as trainer:
        result = trainer.fit(shard_ids_loop, config={
            "epochs": 3, "log": str(logs), "every": 3, "kill": [1, 7, 1], "source": "loader"})
    assert result.failures == 1
    manifests = tmp_path / "runs" / "ids" / "_manifests"
    resumed = json.loads(open(manifests / "checkpoint_000006-a0.json").read())
    # Epoch 1's checkpoint after its 6th batch (12 batches a pass, a report every 3: 4 + 2).
    positions = resumed["data_positions"]
    assert {r: p["batches"] for r, p in positions["ranks"].items()} == {"0": 6, "1": 6}
    assert "base" not in positions
    consumed_once(logs, resumed)


def test_positions_round_trip_and_tampered_ones_are_dropped_not_fatal():
    from prefect_distrain.checkpoints.manifest import Manifest

    at = {"epoch": 1, "batches": 3, "world_size": 2, "batch_size": 4, "size": 64, "seed": 0,
          "shuffle": True, "drop_last": False}
    base = {"ranks": {r: {**at, "world_size": 4} for r in range(4)}}
    chain = {"ranks": {0: at, 1: at}, "base": base}
    manifest = Manifest.new(2, 0, {}, metrics={}, world_size=2, backend="torch", lease=1,
                            data_positions=chain)
    read = Manifest.from_json(manifest.to_json(), "checkpoint_000002-a0.json")
    assert read.data_positions == chain
    record = json.loads(manifest.to_json())
    for tampered in ({"ranks": {"0": at}},                       # a rank of the world missing
                     {"ranks": {"²": at, "1": at}},              # not a rank number
                     {"ranks": {"0": at, "1": {**at, "seed": 9}}},  # two orders in one world
                     {"ranks": {"0": at, "1": at}, "base": {"ranks": {"0": at}}},
                     {"ranks": {"0": {**at, "batches": -1}, "1": at}}, [1, 2], "x"):
        again = Manifest.from_json(json.dumps({**record, "data_positions": tampered}),
                                   "checkpoint_000002-a0.json")
        assert again.data_positions is None and again.index == 2


def test_auto_checkpoints_within_a_pass_resume_mid_pass_with_identical_weights(tmp_path):
    """``every_n_batches``: a SIGKILL in the middle of a pass resumes from the checkpoint taken
    within it, and the final weights are those of a run that never stopped (dropout and a
    shuffling loader included)."""
    from test_torch_utils import fit, same

    reference = fit(tmp_path, "reference", {"epochs": 3, "seed": 0},
                    pd.CheckpointConfig(mode="auto"))
    every = pd.CheckpointConfig(mode="auto", every_n_batches=3)
    killed = fit(tmp_path, "killed", {"epochs": 3, "seed": 0, "kill": [0, 1, 5, 1]}, every,
                 pd.FailureConfig(max_failures=1))
    assert killed.failures == 1
    assert all(same(r, reference.worker_results[0]) for r in killed.worker_results)
    assert [m["epoch"] for m in killed.metrics_history] == [0, 1, 2]
    # 8 batches a pass: checkpoints within pass 0 after batches 3 and 6 (1, 2), the epoch's
    # report (3), before pass 1 (4), within it after batch 3 (5): the kill at its 6th batch
    # resumed from 5 (the positions say so too).
    attempts = trainer_attempts(tmp_path / "killed")
    assert attempts[1]["resumed_from"].endswith("checkpoint_000005-a0")
    manifest = json.loads(open(tmp_path / "killed" / "_manifests" /
                               "checkpoint_000005-a0.json").read())
    assert manifest["metrics"]["_auto_checkpoint_pass"] == 1
    assert manifest["metrics"]["_auto_checkpoint_batches"] == 3
    assert {p["batches"] for p in manifest["data_positions"]["ranks"].values()} == {3}
    with pytest.raises(pd.ConfigurationError, match="every_n_batches=0: give a whole number"):
        pd.CheckpointConfig(mode="auto", every_n_batches=0)
    with pytest.raises(pd.ConfigurationError, match="with mode='auto'"):
        pd.CheckpointConfig(every_n_batches=5)


def trainer_attempts(run_folder):
    return [json.loads(open(os.path.join(run_folder, "_attempts", name)).read())
            for name in sorted(os.listdir(os.path.join(run_folder, "_attempts")))]


def write_ids(folder, count=96, files=4):
    """Sample ids 0..count-1 as parquet files (sorted names: the dataset's order)."""
    import pandas

    folder.mkdir()
    per = count // files
    for f in range(files):
        pandas.DataFrame({"id": range(f * per, (f + 1) * per)}).to_parquet(
            folder / f"part-{f}.parquet")
    return str(folder)


def shard_ids_loop(config):
    """ids_loop over the "train" dataset's shard (Ray Data from parquet), or with
    ``config["source"] == "loader"`` a shuffling torch loader of ids 0..95: batches of 4, a
    checkpoint every ``config["every"]`` batches; ``config["kill"]``: [epoch, step, rank] on
    attempt 0; ``config["gate"]``: [epoch, step, path]: on attempt 0, wait there for the file."""
    ctx = pd.get_context()
    rank, attempt = ctx.get_world_rank(), ctx.get_attempt()
    model = pd.torch.prepare_model(torch.nn.Linear(1, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    if config.get("source") == "loader":
        loader = pd.torch.prepare_data_loader(torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.arange(96)), batch_size=4, shuffle=True))
    else:  # one iterable for every pass, as with Ray's: each iteration over it is a pass
        passes = pd.get_dataset_shard("train").iter_torch_batches(batch_size=4)
    start = 0
    if (checkpoint := pd.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            start = json.load(open(os.path.join(folder, "state.json")))["epoch"]
    log = open(os.path.join(config["log"], f"rank{rank}-attempt{attempt}.jsonl"), "a")
    for epoch in range(start, config["epochs"]):
        if config.get("source") == "loader":
            loader.sampler.set_epoch(epoch)
            batches = ({"id": ids} for (ids,) in loader)
        else:
            batches = passes
        for step, batch in enumerate(batches):
            if attempt == 0 and config.get("kill") == [epoch, step, rank]:
                os.kill(os.getpid(), signal.SIGKILL)
            if attempt == 0 and config.get("gate", [None, None])[:2] == [epoch, step]:
                while not os.path.exists(config["gate"][2]):
                    time.sleep(0.05)
            optimizer.zero_grad()
            model(batch["id"].float().unsqueeze(1)).sum().backward()
            optimizer.step()
            for i in batch["id"].tolist():
                log.write(json.dumps([attempt, epoch, step, i]) + "\n")
            log.flush()
            if (step + 1) % config["every"] == 0:
                with tempfile.TemporaryDirectory() as folder:
                    json.dump({"epoch": epoch}, open(os.path.join(folder, "state.json"), "w"))
                    pd.report({"epoch": epoch, "step": step},
                              checkpoint=pd.Checkpoint.from_directory(folder)
                              if rank == 0 else None)


def consumed_once(logs, resumed_manifest, count=96, epochs=3):
    """Every id of every epoch consumed exactly once, not counting what attempt 0 did after
    the checkpoint it was resumed from (done again)."""
    epoch, step = resumed_manifest["metrics"]["epoch"], resumed_manifest["metrics"]["step"]
    consumed = collections.Counter()
    for name in os.listdir(logs):
        for line in open(logs / name):
            attempt, e, s, sample = json.loads(line)
            if attempt == 0 and (e, s) > (epoch, step):
                continue
            consumed[(e, sample)] += 1
    assert set(consumed) == {(e, i) for e in range(epochs) for i in range(count)}
    assert set(consumed.values()) == {1}, "a sample of an epoch consumed twice"


@pytest.mark.usefixtures("ray_cluster")
def test_a_mid_epoch_sigkill_resumes_ray_data_shards_onto_their_position(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    data = write_ids(tmp_path / "ids")
    run = pd.RunConfig(name="shards", storage=str(tmp_path / "runs"))
    with pd.Trainer(num_workers=2, run=run, failure=pd.FailureConfig(max_failures=1)) as trainer:
        result = trainer.fit(shard_ids_loop, datasets={"train": data},
                             config={"epochs": 2, "log": str(logs), "every": 3,
                                     "kill": [1, 7, 1]})
    assert result.failures == 1
    manifest = json.loads(open(tmp_path / "runs" / "shards" / "_manifests" /
                               "checkpoint_000006-a0.json").read())
    assert manifest["data_positions"] == {"ranks": {
        "0": {"epoch": 1, "rows": 24, "world_size": 2},
        "1": {"epoch": 1, "rows": 24, "world_size": 2}}}
    consumed_once(logs, manifest, epochs=2)


def test_rows_are_counted_in_every_batch_format_and_bad_counts_read_as_none():
    import numpy
    import pandas
    import pyarrow

    from prefect_distrain.session.auto import _count
    from prefect_distrain.session.shard import _rows, _tail

    batches = [{"id": numpy.arange(5), "x": numpy.zeros((5, 3))},
               pandas.DataFrame({"id": range(5)}), pyarrow.table({"id": range(5)}),
               (torch.arange(5), torch.zeros(5, 2)), [torch.arange(5)]]
    for batch in batches:
        assert _rows(batch) == 5
        assert _rows(_tail(batch, 2)) == 3
    assert _rows(torch.tensor(1.0)) is None and _rows(()) is None
    # A tampered automatic checkpoint's counts resume as 0 (its pass from the beginning).
    assert [_count(v) for v in (3, "3", None, -1, True, 2.5)] == [3, 0, 0, 0, 0, 0]
