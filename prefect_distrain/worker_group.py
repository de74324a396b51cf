"""The worker group: one Ray actor per training process, in one placement group.

Built on Ray Core's public API only. Backends act on the group through ``execute`` /
``execute_single``; the controller starts the training function with ``run`` and reads the
workers' outboxes as Ray streaming generators, so reports reach the driver while training runs
without any polling.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import cloudpickle
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from . import settings
from .config import ScalingConfig
from .exceptions import ConfigurationError, ResourcesUnavailableError, StopTraining
from .logs import capture
from .session import WorkerInfo, _Session, _set_session
from .storage import RunStorage

logger = logging.getLogger("prefect_distrain")

_worker_info: WorkerInfo | None = None


def get_worker_info() -> WorkerInfo:
    """The calling worker's ranks (for backend hooks that run on the worker)."""
    if _worker_info is None:
        raise RuntimeError("get_worker_info() runs only on a worker of a started worker group")
    return _worker_info


class TrainWorker:
    """The actor behind each rank. Holds no training state between runs but its ranks."""

    def metadata(self) -> dict[str, Any]:
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def set_info(self, info: WorkerInfo) -> None:
        global _worker_info
        _worker_info = info

    def execute(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def acknowledge_commit(self, index: int) -> None:
        """Runs beside ``run`` (the actor has two threads): wakes a waiting sync report."""
        self.session.acknowledge_commit(index)

    def judge(self, iteration: int, stop_reason: str | None) -> None:
        """Runs beside ``run``: the verdict on ``iteration`` that its report waits for."""
        self.session.judge(iteration, stop_reason)

    def request_stop(self, reason: str, at: int) -> None:
        """Runs beside ``run``: the training function ends at report ``at`` (or its next)."""
        self.session.request_stop(reason, at)

    def run(self, fn_blob: bytes, pass_config: bool, config: Any,
            session_args: dict[str, Any]) -> Iterator:
        """Run the training function in a thread and yield its outbox: reports, log lines and
        finished uploads, then one ``("done", value)`` or ``("error", description)``."""
        session = _Session(**session_args)
        self.session = session
        _set_session(session)
        rank = session.context.get_world_rank()

        def target() -> None:
            try:
                fn = cloudpickle.loads(fn_blob)
                with capture(session.outbox):
                    try:
                        value = fn(config) if pass_config else fn()
                    except StopTraining:
                        value = None  # a callback stopped the run: not a failure
                session.finish()
                session.outbox.put(("done", value))
            except BaseException as error:  # noqa: BLE001 - every outcome must reach the driver
                session.outbox.put(("error", describe_error(error, rank)))

        threading.Thread(target=target, name=f"train-loop-rank-{rank}", daemon=True).start()
        try:
            while True:
                batch = _next_batch(session.outbox)
                yield batch
                if batch[-1][0] in ("done", "error"):
                    return
        finally:
            _set_session(None)


#: How long a worker gathers plain reports and log lines into one message to the driver. Each
#: message is a Ray object; one per report would cost more CPU than a small training step.
_BATCH_WINDOW_S = 0.05


def _next_batch(outbox: queue.Queue) -> list[tuple[str, Any]]:
    """The next items of the outbox, in order. Waits the batch window for more, unless an item
    is urgent: the end of the function, or a checkpoint report that a worker is blocked on."""
    batch = [outbox.get()]
    if not any(_urgent(item) for item in batch):
        time.sleep(_BATCH_WINDOW_S)
    while True:
        try:
            batch.append(outbox.get_nowait())
        except queue.Empty:
            return batch


def _urgent(item: tuple[str, Any]) -> bool:
    kind, payload = item
    return kind in ("done", "error", "persisted") or (
        kind == "report" and (payload["checkpoint"] is not None or payload["awaits_verdict"]))


def storage_is_visible(storage: RunStorage, marker: str) -> str | None:
    """None if this worker sees the driver's marker file, else why not."""
    try:
        fs, _ = storage.filesystem()
        return None if fs.exists(marker) else "the driver's marker file is not there"
    except Exception as error:  # noqa: BLE001 - reported to the driver as the reason
        return f"{type(error).__name__}: {error}"


def describe_error(error: BaseException, rank: int) -> dict[str, Any]:
    """Everything the driver needs to re-raise a worker's exception, as plain data."""
    try:
        pickled = cloudpickle.dumps(error)
    except Exception:  # noqa: BLE001 - an exception that can't travel still gets reported
        pickled = None
    return {
        "rank": rank,
        "type": f"{type(error).__module__}.{type(error).__qualname__}",
        "message": str(error),
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        "pickled": pickled,
        "pid": os.getpid(),
        "node_ip": ray.util.get_node_ip_address(),
    }


# -- Ray itself -------------------------------------------------------------------------------

_ray_lock = threading.Lock()
_ray_users = 0
_ray_started_here = False


@contextmanager
def ray_connection(address: str | None = None, init_kwargs: dict | None = None) -> Iterator[None]:
    """Use the Ray this process is connected to; else connect to ``address`` / ``RAY_ADDRESS``;
    else start a local Ray. Only a connection made here is closed here, when its last user
    (e.g. the last of several mapped ``train`` tasks) leaves."""
    global _ray_users, _ray_started_here
    with _ray_lock:
        if ray.is_initialized() and address not in (None, "auto") \
                and address != ray.get_runtime_context().gcs_address:
            logger.warning(
                "ray_address=%r is not used: this process is already connected to the Ray "
                "cluster at %s (e.g. through its task runner); call ray.shutdown() first to "
                "train elsewhere", address, ray.get_runtime_context().gcs_address)
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS") or None
            logger.info("Starting a local Ray" if address is None else f"Connecting to Ray at {address}")
            # "local": a new Ray, not one that `ray start` left on this machine.
            ray.init(address=address or "local", **(init_kwargs or {}))
            _ray_started_here = True
        _ray_users += 1
    try:
        yield
    finally:
        with _ray_lock:
            _ray_users -= 1
            if _ray_users == 0 and _ray_started_here:
                ray.shutdown()
                _ray_started_here = False


# -- The group --------------------------------------------------------------------------------


@dataclass
class _Member:
    actor: Any
    info: WorkerInfo
    metadata: dict[str, Any]


def _fits_per_node(bundle: dict[str, float], node_resources: dict[str, float]) -> int:
    return min(math.floor(node_resources.get(k, 0.0) / v + 1e-9) for k, v in bundle.items())


def capacity_now(scaling: ScalingConfig) -> int:
    """How many more workers the cluster's free resources hold right now."""
    available = ray.available_resources()
    return min(math.floor(available.get(k, 0.0) / v + 1e-9)
               for k, v in scaling.worker_resources.items())


def check_cluster_can_hold(scaling: ScalingConfig) -> None:
    """Fail in seconds, not after a timeout, when the cluster can never hold the group (its
    smallest allowed size, for an elastic group)."""
    bundle = scaling.worker_resources
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    totals: dict[str, float] = {}
    for node in nodes:
        for key, value in node["Resources"].items():
            if "_group_" not in key and not key.startswith("node:"):
                totals[key] = totals.get(key, 0.0) + value
    if scaling.use_gpu and totals.get("GPU", 0) == 0:
        raise ResourcesUnavailableError(
            "use_gpu=True but the Ray cluster has no GPUs "
            f"(cluster: {_describe(totals)}). Set use_gpu=False to train on CPUs, or connect "
            "to a cluster with GPU nodes (ray_address=... or RAY_ADDRESS)",
            requested=bundle, available=totals)
    held_on, held = held_by_caller()
    n = scaling.least_workers
    strategy = scaling.placement_strategy

    def holdable_with(held: dict[str, float]) -> int:
        fits = [_fits_per_node(bundle, {k: v - held.get(k, 0.0) if node["NodeID"] == held_on
                                        else v for k, v in node["Resources"].items()})
                for node in nodes]
        if strategy == "STRICT_PACK":
            return max(fits, default=0)
        if strategy == "STRICT_SPREAD":
            return sum(1 for f in fits if f >= 1)
        return sum(fits)

    holdable = holdable_with(held)
    if holdable < n and not settings.settings().allow_autoscaling:
        at_least = "at least " if scaling.min_workers else ""
        cluster = f"(cluster: {_describe(totals)} on {len(nodes)} node(s))"
        message = (f"ScalingConfig asks for {at_least}{n} workers of {_describe(bundle)} each "
                   f"({strategy}), but this Ray cluster can hold at most {holdable}")
        if held and holdable_with({}) >= n:  # it would fit but for what the caller holds
            message += (
                f" beside the Ray task that runs this train, which holds {_describe(held)} "
                f"itself (e.g. a task of prefect-ray's RayTaskRunner) {cluster}. Submit train "
                "with no CPUs of its own: `with prefect_ray.context.remote_options(num_cpus=0): "
                "pd.train.submit(...)`, or run the flow on `pd.ray_task_runner(...)`, which "
                "does so; or lower")
        else:
            message += f" {cluster}. Lower"
        raise ResourcesUnavailableError(
            f"{message} num_workers or resources_per_worker, or connect to a larger cluster "
            f"(ray_address=...). On a cluster with an autoscaler set "
            f"{settings.ALLOW_AUTOSCALING_ENV}=1 to wait instead",
            requested={k: v * n for k, v in bundle.items()}, available=totals)


def held_by_caller() -> tuple[str | None, dict[str, float]]:
    """(node id, resources) that the Ray task or actor calling this holds, e.g. the task of
    prefect-ray's RayTaskRunner that runs ``train``; (None, {}) in a driver."""
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None, {}
    held = {k: v for k, v in context.get_assigned_resources().items() if v > 0}
    return context.get_node_id(), held


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())) or "nothing"


class WorkerGroup:
    """``size`` actors (``num_workers`` unless an elastic group runs smaller), ranked by node so
    that local ranks are contiguous."""

    def __init__(self, scaling: ScalingConfig, size: int | None = None,
                 env: dict[str, str] | None = None):
        self.scaling = scaling
        self.size = size or scaling.num_workers
        self.env = dict(env or {})
        self.members: list[_Member] = []
        self._placement_group = None

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
                f"{self.size} workers of {_describe(bundle)} were not placed within "
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
        ray.get([m.actor.set_info.remote(m.info) for m in self.members])

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

    def request_stop(self, reason: str, at: int) -> None:
        """Tell every worker to end its training function at report ``at`` (or its next)."""
        for member in self.members:
            member.actor.request_stop.remote(reason, at)

    def acknowledge_commit(self, index: int, ranks: list[int]) -> None:
        """Tell the ranks that reported files for checkpoint ``index`` that it is committed."""
        for rank in ranks:
            self.members[rank].actor.acknowledge_commit.remote(index)

    def run(self, fn_blob: Any, pass_config: bool, config: Any,
            session_args: list[dict[str, Any]]) -> list:
        """Start the training function on every worker; one streaming generator per rank."""
        return [m.actor.run.remote(fn_blob, pass_config, config, args)
                for m, args in zip(self.members, session_args)]

    def shutdown(self) -> None:
        """Kill every actor and free the placement group. Safe to call twice."""
        for member in self.members:
            try:
                ray.kill(member.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass
        self.members = []
        if self._placement_group is not None:
            try:
                remove_placement_group(self._placement_group)
            except Exception:  # noqa: BLE001
                pass
            self._placement_group = None


def _rank(actors: list, metadata: list[dict]) -> list[_Member]:
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
        members.append(_Member(actors[i], info, metadata[i]))
    return members
