"""Resuming onto the exact data position: a checkpoint taken mid-pass keeps every rank's place
in its training data, and the restart's pass of that epoch yields only what no rank consumed,
also when the world size changed."""

from __future__ import annotations

import collections
import json
import os
import signal
import tempfile

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


def ids_loop(config):
    """Sample ids 0..95, batches of 4 on each of 2 ranks, shuffled per epoch; every 3 steps a
    checkpoint mid-pass. Each rank logs (attempt, epoch, batch in the attempt's pass, id) of
    what it consumes; rank 1 is SIGKILLed at step 7 of epoch 1 on attempt 0."""
    ctx = pd.get_context()
    rank, attempt = ctx.get_world_rank(), ctx.get_attempt()
    model = pd.torch.prepare_model(torch.nn.Linear(1, 1))  # DDP keeps the ranks in step
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ids = torch.arange(96)
    loader = pd.torch.prepare_data_loader(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(ids), batch_size=4, shuffle=True))
    start = 0
    if (checkpoint := pd.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            start = json.load(open(os.path.join(folder, "state.json")))["epoch"]
    log = open(os.path.join(config["log"], f"rank{rank}-attempt{attempt}.jsonl"), "a")
    for epoch in range(start, config["epochs"]):
        loader.sampler.set_epoch(epoch)
        for step, (batch,) in enumerate(loader):
            if attempt == 0 and [epoch, step, rank] == [1, 7, 1]:
                os.kill(os.getpid(), signal.SIGKILL)
            optimizer.zero_grad()
            model(batch.float().unsqueeze(1)).sum().backward()
            optimizer.step()
            for i in batch.tolist():
                log.write(json.dumps([attempt, epoch, step, i]) + "\n")
            log.flush()
            if (step + 1) % 3 == 0:
                with tempfile.TemporaryDirectory() as folder:
                    json.dump({"epoch": epoch}, open(os.path.join(folder, "state.json"), "w"))
                    pd.report({"epoch": epoch, "step": step},
                              checkpoint=pd.Checkpoint.from_directory(folder)
                              if rank == 0 else None)


@pytest.mark.usefixtures("ray_cluster")
def test_a_mid_epoch_sigkill_resumes_onto_the_exact_data_position(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    run = pd.RunConfig(name="ids", storage=str(tmp_path / "runs"))
    with pd.Trainer(num_workers=2, run=run, failure=pd.FailureConfig(max_failures=1)) as trainer:
        result = trainer.fit(ids_loop, config={"epochs": 3, "log": str(logs)})
    assert result.failures == 1
    manifests = tmp_path / "runs" / "ids" / "_manifests"
    resumed = json.loads(open(manifests / "checkpoint_000006-a0.json").read())
    # Epoch 1's checkpoint after its 6th batch (12 batches a pass, a report every 3: 4 + 2).
    positions = resumed["data_positions"]
    assert {r: p["batches"] for r, p in positions["ranks"].items()} == {"0": 6, "1": 6}
    assert "base" not in positions
    consumed = collections.Counter()
    for name in os.listdir(logs):
        for line in open(logs / name):
            attempt, epoch, step, sample = json.loads(line)
            # What attempt 0 did after the checkpoint it resumed from is done again: not kept.
            if epoch == 1 and attempt == 0 and step >= 6:
                continue
            consumed[(epoch, sample)] += 1
    assert set(consumed) == {(e, i) for e in range(3) for i in range(96)}
    assert set(consumed.values()) == {1}, "a sample of an epoch consumed twice"


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
