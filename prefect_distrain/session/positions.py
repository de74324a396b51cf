"""Where each rank is in its training data, so that a resume continues mid-pass.

The training data loader (the first ``pd.torch.prepare_data_loader``, with a
``DistributedSampler``) tells every report where its rank is in the current pass: the epoch,
the batches it consumed, and how the sampler orders the data (dataset size, world size, seed,
shuffle, batch size). The driver keeps every rank's position of a checkpointed iteration in
the manifest (``data_positions``). A run resuming from that checkpoint finds, for the pass of
that epoch, what no rank consumed yet: the sampler's order of the epoch, minus each rank's
consumed batches, dealt over the new world size (the same ranks keep their own order when the
size did not change). That pass iterates exactly those samples; the passes after it are the
sampler's own again.

Exact: which samples each rank consumed (the sampler's order is a pure function of the seed
and the epoch). Approximate: a world size that changed deals the remainder anew, padded (as
``DistributedSampler`` pads) when it does not divide evenly; a loader's own random state
(augmentations, worker processes) is not restored.
"""

from __future__ import annotations

import math
from typing import Any

#: The fields of a position, as reports carry them and manifests keep them.
FIELDS = ("epoch", "batches", "world_size", "batch_size", "size", "seed", "shuffle",
          "drop_last")


def sampler_order(position: dict[str, Any], rank: int) -> list[int]:
    """The indices a ``DistributedSampler`` with these settings gives ``rank`` in the epoch."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(position["size"]), num_replicas=position["world_size"],
                                 rank=rank, shuffle=position["shuffle"], seed=position["seed"],
                                 drop_last=position["drop_last"])
    sampler.set_epoch(position["epoch"])
    return list(sampler)


def dealt(positions: dict[int, dict[str, Any]]) -> dict[int, list[int]]:
    """What each rank of the pass these positions come from had to iterate, in order."""
    first = positions[min(positions)]
    world = first["world_size"]
    base = first.get("base")
    if base:
        return remaining(base, world)
    return {rank: sampler_order(first, rank) for rank in range(world)}


def remaining(positions: dict[int, dict[str, Any]], world_size: int) -> dict[int, list[int]]:
    """What is left of the pass after ``positions``, dealt over ``world_size`` ranks."""
    lists = dealt(positions)
    old_world = len(lists)
    left = {rank: lists[rank][positions[rank]["batches"] * positions[rank]["batch_size"]:]
            for rank in range(old_world)}
    if world_size == old_world:
        return left
    longest = max((len(v) for v in left.values()), default=0)
    merged = [left[rank][j] for j in range(longest) for rank in range(old_world)
              if j < len(left[rank])]
    if not merged:
        return {rank: [] for rank in range(world_size)}
    each = math.ceil(len(merged) / world_size)
    padded = merged + (merged * math.ceil(each * world_size / len(merged)))[
        :each * world_size - len(merged)]
    return {rank: padded[rank::world_size] for rank in range(world_size)}


def usable(positions: Any) -> bool:
    """Whether a manifest's positions cover every rank of the pass they come from."""
    if not isinstance(positions, dict) or not positions:
        return False
    first = positions.get(min(positions))
    return isinstance(first, dict) and set(positions) == set(range(first.get("world_size", -1)))
