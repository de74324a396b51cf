"""The worker group's synchronization actor: where the ranks' ``barrier`` and
``broadcast_from_rank_zero`` calls (``prefect_distrain.collective``) meet.

One per group of two or more workers, started by ``WorkerGroup.start`` and killed by its
``shutdown``. It holds no CPU (the workers' CPUs stay theirs) and sits in bundle 0 of the
group's placement group, so it also goes when the placement group goes. An asyncio actor, like
Ray Train's ``SynchronizationActor``: a waiting rank is a suspended coroutine, not a thread.

Calls meet by number: the N-th collective call of every rank is meeting N. It completes when
every rank waits in it; a rank that waited ``timeout_s`` in vain leaves it and learns who came.
A meeting keeps no state once nobody waits in it, so a group that finished a run cleanly holds
none for the next.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@dataclass
class _Meeting:
    arrived: set[int] = field(default_factory=set)   # ranks that called it (waiting or gone)
    waiting: set[int] = field(default_factory=set)
    blob: bytes | None = None                        # rank 0's pickled object
    poison: str | None = None                        # rank 0's object could not be pickled
    done: asyncio.Event = field(default_factory=asyncio.Event)


class SyncActor:
    """The meetings of one worker group's ranks."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._meetings: dict[int, _Meeting] = {}

    async def meet(self, call: int, rank: int, blob: bytes | None, timeout_s: float | None,
                   poison: str | None = None) -> tuple[str, Any]:
        """``rank``'s call number ``call``: ("ok", rank 0's blob) once every rank came,
        ("timeout", {"arrived": [...], "missing": [...]}) after ``timeout_s`` in vain, or
        ("poisoned", message) when rank 0 could not send its object (``poison``: rank 0
        says so, and returns at once)."""
        meeting = self._meetings.setdefault(call, _Meeting())
        meeting.arrived.add(rank)
        if poison is not None:
            meeting.poison = poison
            meeting.done.set()
        if meeting.poison is not None:
            self._forget(call, meeting)
            return "poisoned", meeting.poison
        if rank == 0:
            meeting.blob = blob
        meeting.waiting.add(rank)
        if len(meeting.waiting) == self.world_size:
            meeting.done.set()
        else:
            try:
                await asyncio.wait_for(meeting.done.wait(), timeout_s)
            except asyncio.TimeoutError:
                if not meeting.done.is_set():  # else it completed just as time ran out
                    meeting.waiting.discard(rank)
                    arrived = sorted(meeting.arrived)
                    missing = sorted(set(range(self.world_size)) - meeting.arrived)
                    self._forget(call, meeting)
                    return "timeout", {"arrived": arrived, "missing": missing}
        meeting.waiting.discard(rank)
        self._forget(call, meeting)
        if meeting.poison is not None:
            return "poisoned", meeting.poison
        return "ok", meeting.blob

    def pending(self) -> dict[int, list[int]]:
        """Meetings still held, with the ranks waiting in each (for tests and forensics)."""
        return {call: sorted(m.waiting) for call, m in self._meetings.items()}

    def _forget(self, call: int, meeting: _Meeting) -> None:
        """Drop a meeting nobody waits in; a poisoned one only once every rank has heard."""
        if meeting.waiting or (meeting.poison is not None
                               and len(meeting.arrived) < self.world_size):
            return
        if self._meetings.get(call) is meeting:
            del self._meetings[call]


def start_sync_actor(placement_group: Any, world_size: int) -> Any:
    """The group's actor (not waited for: the first call waits for it to start)."""
    return ray.remote(SyncActor).options(
        num_cpus=0, max_concurrency=max(1000, 2 * world_size),
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group, placement_group_bundle_index=0),
    ).remote(world_size)
