"""Where each rank is in its training data, so that a resume continues mid-pass.

Two kinds of position, one shape of chain. A torch loader's (below) and a Ray Data shard's
(``{"epoch", "rows", "world_size"}``: the rows this rank's share of a pass consumed; the
shares are the dataset's order split by ``streaming_split(equal=True)`` with
``preserve_order``, the same for the same world size; data.py's ``rest_of_pass``).

The training data loader (the first ``pd.torch.prepare_data_loader``, with a
``DistributedSampler``) tells every report where its rank is in the current pass: the epoch,
the batches it consumed, and how the sampler orders the data (dataset size, world size, seed,
shuffle, drop_last, batch size). The driver keeps the positions of a checkpointed iteration in
its manifest as a chain: ``{"ranks": {rank: position}, "base": <chain>}``, where ``base`` is
only there when the pass itself continued one of another world size.

A run resuming from that checkpoint finds, for the pass of that epoch, what no rank consumed:
each rank's rest of its own sampler order when the world size is the same (recorded again as
a plain position, its batches counted from the start of the pass), or the rest of every rank's
order dealt over the new world size. Exact: which samples were consumed (the order is a pure
function of the seed and the epoch). Approximate: a new world size that does not divide the
rest pads it, as ``DistributedSampler`` pads; the loader's own random state is not restored.
"""

from __future__ import annotations

import math
from typing import Any

from .auto import AUTO_BATCHES_KEY

#: What orders the data: a resume applies positions only to a loader whose sampler matches.
ORDER = ("size", "seed", "shuffle", "drop_last")


def kind(chain: dict[str, Any]) -> str:
    """"rows" (a Ray Data shard's positions) or "sampler" (a torch loader's)."""
    return "rows" if "rows" in chain["ranks"][0] else "sampler"


def own_positions(resume: Any, storage_url: str, wanted: str, auto: bool = False
                  ) -> dict[str, Any] | None:
    """The data positions a run continues from: those of its resume checkpoint if it is the
    run's own (a warm start from another run begins its passes whole), of the ``wanted``
    kind, and, in mode "auto", taken within a pass (one taken between passes replays them)."""
    manifest = getattr(resume, "manifest", None)
    chain = getattr(manifest, "data_positions", None)
    if not chain or kind(chain) != wanted:
        return None
    if resume.path.rstrip("/").rsplit("/", 1)[0] != storage_url.rstrip("/"):
        return None
    if auto and not resume.metrics.get(AUTO_BATCHES_KEY):
        return None
    return chain


def _order(position: dict[str, Any]) -> Any:
    """The whole epoch's order as ``DistributedSampler`` makes it (padded or cut to a
    multiple of the world size), as a tensor: one permutation for every rank."""
    import torch

    size, world = position["size"], position["world_size"]
    if position["shuffle"]:
        generator = torch.Generator()
        generator.manual_seed(position["seed"] + position["epoch"])
        indices = torch.randperm(size, generator=generator)
    else:
        indices = torch.arange(size)
    if position["drop_last"] and size % world:
        total = math.ceil((size - world) / world) * world
        return indices[:total]
    total = math.ceil(size / world) * world
    if total > size:
        indices = torch.cat([indices, indices.repeat(math.ceil((total - size) / size))[
            :total - size]])
    return indices


def sampler_order(position: dict[str, Any], rank: int) -> list[int]:
    """The indices a ``DistributedSampler`` with these settings gives ``rank`` in the epoch."""
    return _order(position)[rank::position["world_size"]].tolist()


def remaining(chain: dict[str, Any], world_size: int, rank: int | None = None
              ) -> dict[int, list[int]]:
    """What is left of the pass after ``chain``, dealt over ``world_size`` ranks (only
    ``rank``'s share when given and the world size is the chain's, without building the
    others)."""
    ranks = chain["ranks"]
    first = ranks[0]
    old_world = first["world_size"]
    if chain.get("base"):
        lists = remaining(chain["base"], old_world)
    else:
        order = _order(first)
        wanted = [rank] if rank is not None and world_size == old_world else range(old_world)
        lists = {r: order[r::old_world].tolist() for r in wanted}
    left = {r: lists[r][ranks[r]["batches"] * ranks[r]["batch_size"]:] for r in lists}
    if world_size == old_world:
        return left
    longest = max((len(v) for v in left.values()), default=0)
    merged = [left[r][j] for j in range(longest) for r in range(old_world) if j < len(left[r])]
    if not merged:
        return {r: [] for r in range(world_size)}
    each = math.ceil(len(merged) / world_size)
    padded = merged + (merged * math.ceil(each * world_size / len(merged)))[
        :each * world_size - len(merged)]
    return {r: padded[r::world_size] for r in range(world_size)}


def same_order(chain: dict[str, Any], order: dict[str, Any]) -> bool:
    """Whether a resumed chain was made for data ordered as ``order`` (size, seed, ...)."""
    first = chain["ranks"][0]
    return all(first.get(k) == order.get(k) for k in ORDER if k in order)
