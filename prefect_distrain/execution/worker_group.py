"""The worker group: one Ray actor per training process, in one placement group.

Built on Ray Core's public API only. Backends act on the group through ``execute`` /
``execute_single``; the controller starts the training function with ``run`` and reads the
workers' outboxes as Ray streaming generators (worker.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .. import settings
from ..collective import set_sync_actor
from ..config import ScalingConfig
from ..exceptions import ConfigurationError, ResourcesUnavailableError
from ..session.context import WorkerInfo
from .cluster import describe
from .sync_actor import start_sync_actor
from .worker import TrainWorker

#: When a group of this process last freed its placement group (time.monotonic()).
last_freed = float("-inf")


@dataclass
class Member:
    actor: Any
    info: WorkerInfo
    metadata: dict[str, Any]


class WorkerGroup:
    """``size`` actors (``num_workers`` unless an elastic group runs smaller), ranked by node so
    that local ranks are contiguous."""

    local = False

    def __init__(self, scaling: ScalingConfig, size: int | None = None,
                 env: dict[str, str] | None = None):
        self.scaling = scaling
        self.size = size or scaling.num_workers
        self.env = dict(env or {})
        self.members: list[Member] = []
        self._placement_group = None
        self._sync_actor = None  # barrier / broadcast_from_rank_zero (collective.py)
        self._resting: list = []  # the workers' rests under way (``rest``)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def started(self) -> bool:
        return bool(self.members)

    def start(self, timeout: float) -> None:
        """Place and start the actors; ResourcesUnavailableError (retryable) if the placement
        group is not ready within ``timeout`` seconds."""
        bundle = self.scaling.worker_resources
        if not bundle:
            raise ConfigurationError(
                "resources_per_worker leaves a worker with no resources at all; Ray needs at "
                "least one (e.g. {'CPU': 1})")
        pg = placement_group([dict(bundle)] * self.size, strategy=self.scaling.placement_strategy)
        self._placement_group = pg
        if not pg.wait(timeout_seconds=timeout):
            self.shutdown()
            raise ResourcesUnavailableError(
                f"{self.size} workers of {describe(bundle)} were not placed within "
                f"{timeout:g} s", requested={k: v * self.size for k, v in bundle.items()},
                retryable=True)
        options: dict[str, Any] = {
            "num_cpus": bundle.get("CPU", 0),
            "num_gpus": bundle.get("GPU", 0),
            "max_concurrency": 2,
        }
        if "memory" in bundle:
            options["memory"] = bundle["memory"]
        extra = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")}
        if extra:
            options["resources"] = extra
        if self.env:  # set at process start, before anything is imported
            options["runtime_env"] = {"env_vars": self.env}
        actor_cls = ray.remote(TrainWorker)
        actors = [
            actor_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=i), **options).remote()
            for i in range(self.size)
        ]
        try:
            metadata = ray.get([a.metadata.remote() for a in actors],
                               timeout=settings.settings().backend_setup_timeout_s)
        except BaseException:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            self.shutdown()
            raise
        self.members = _rank(actors, metadata)
        if self.size > 1:  # the ranks' collectives meet on it; a group of one needs none
            self._sync_actor = start_sync_actor(pg, self.size)
        ray.get([m.actor.set_info.remote(m.info) for m in self.members]
                + [m.actor.execute.remote(set_sync_actor, self._sync_actor)
                   for m in self.members])

    def share(self, blob: bytes) -> Any:
        """The training function, put once into Ray's object store for every worker."""
        return ray.put(blob)

    @staticmethod
    def ready(streams: list, timeout: float) -> list:
        """The workers' streams that have a batch of their outbox ready (within ``timeout``)."""
        ready, _ = ray.wait(streams, num_returns=1, timeout=timeout)
        return ready

    @staticmethod
    def take(stream: Any) -> list:
        """The next batch of a ready stream (StopIteration at its end)."""
        return ray.get(next(stream))

    def execute(self, fn: Callable, *args: Any, timeout: float | None = None) -> list[Any]:
        """Run ``fn(*args)`` on every worker at once; results in rank order."""
        return ray.get([m.actor.execute.remote(fn, *args) for m in self.members], timeout=timeout)

    def execute_single(self, rank: int, fn: Callable, *args: Any,
                       timeout: float | None = None) -> Any:
        return ray.get(self.members[rank].actor.execute.remote(fn, *args), timeout=timeout)

    def judge(self, iteration: int, stop_reason: str | None) -> None:
        """Every worker's report of ``iteration`` may return (or, with a reason, stop there)."""
        for member in self.members:
            member.actor.judge.remote(iteration, stop_reason)

    def stacks(self, timeout: float) -> list[str]:
        """Every rank's Python stacks, in rank order (what a rank could not tell, why)."""
        refs = [m.actor.stacks.remote() for m in self.members]
        found = []
        for rank, ref in enumerate(refs):
            try:
                found.append(ray.get(ref, timeout=timeout))
            except Exception as error:  # noqa: BLE001 - a hang's report must not fail
                found.append(f"(rank {rank} did not answer within {timeout:g} s: "
                             f"{type(error).__name__})")
        return found

    def request_stop(self, reason: str, at: int) -> None:
        """Tell every worker to end its training function at report ``at`` (or its next)."""
        for member in self.members:
            member.actor.request_stop.remote(reason, at)

    def preempt(self, why: str) -> None:
        """The driver was sent SIGTERM: every rank hears of it as if it had been."""
        for member in self.members:
            member.actor.preempt.remote(why)

    def acknowledge_commit(self, index: int, ranks: list[int]) -> None:
        """Tell the ranks that reported files for checkpoint ``index`` that it is committed."""
        for rank in ranks:
            self.members[rank].actor.acknowledge_commit.remote(index)

    def plan_uploads(self, index: int, plan: dict[int, list[str]]) -> None:
        """Tell each rank above 0 that reported checkpoint ``index`` which files to skip."""
        for rank, skip in plan.items():
            self.members[rank].actor.plan_upload.remote(index, skip)

    def run(self, fn_blob: Any, pass_config: bool, config: Any,
            session_args: list[dict[str, Any]]) -> list:
        """Start the training function on every worker; one streaming generator per rank."""
        return [m.actor.run.remote(fn_blob, pass_config, config, args)
                for m, args in zip(self.members, session_args)]

    def rest(self) -> None:
        """Every worker back to its state at start, between two runs (worker.py). It goes on
        in the workers while the flow does what comes next; the next run waits for it
        (``rested``), so a flow that ends after its last run never waits for it at all."""
        self._resting = [m.actor.rest.remote() for m in self.members]

    def rested(self, timeout: float) -> None:
        """Wait for the rest ``rest`` began. Raises if a worker failed it."""
        resting, self._resting = self._resting, []
        ray.get(resting, timeout=timeout)

    def shutdown(self) -> None:
        """Kill every actor and free the placement group. Safe to call twice."""
        for member in self.members:
            try:
                ray.kill(member.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass
        self.members = []
        if self._sync_actor is not None:
            try:
                ray.kill(self._sync_actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass
            self._sync_actor = None
        if self._placement_group is not None:
            global last_freed
            try:
                remove_placement_group(self._placement_group)
            except Exception:  # noqa: BLE001
                pass
            self._placement_group = None
            last_freed = time.monotonic()


def _rank(actors: list, metadata: list[dict]) -> list[Member]:
    """World ranks grouped by node (nodes ordered by IP), so local ranks are contiguous."""
    order = sorted(range(len(actors)), key=lambda i: (metadata[i]["node_ip"],
                                                       metadata[i]["node_id"], i))
    node_ids: list[str] = []
    for i in order:
        if metadata[i]["node_id"] not in node_ids:
            node_ids.append(metadata[i]["node_id"])
    per_node = {nid: [i for i in order if metadata[i]["node_id"] == nid] for nid in node_ids}
    members = []
    for world_rank, i in enumerate(order):
        nid = metadata[i]["node_id"]
        info = WorkerInfo(
            world_rank=world_rank, world_size=len(actors),
            local_rank=per_node[nid].index(i), local_world_size=len(per_node[nid]),
            node_rank=node_ids.index(nid), node_ip=metadata[i]["node_ip"])
        members.append(Member(actors[i], info, metadata[i]))
    return members
