"""The Ray cluster: the connection ``train`` uses, and what the cluster can hold.

```python
with ray_connection(address=None):          # the connected Ray, RAY_ADDRESS, or a new local one
    check_cluster_can_hold(scaling)          # fails in seconds when it never could
    capacity_now(scaling)                    # workers its free resources hold right now
```
One formula for "how many workers of this size fit" (``fits``) serves the capacity check, the
elastic group's look at the cluster and the sweeps' concurrency.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import ray

from .. import settings
from ..config import ScalingConfig
from ..exceptions import ConfigurationError, ResourcesUnavailableError
from .ray_auth import (
    RayAuth,
    auth_failure_message,
    is_auth_failure,
    ray_auth,
    redact_address,
    refused_for_auth,
    reload_ray_auth,
    split_auth,
    token_found,
)

logger = logging.getLogger("prefect_distrain")


def fits(bundle: dict[str, float], resources: dict[str, float]) -> int:
    """How many ``bundle``s the ``resources`` hold."""
    return min(math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in bundle.items())


def groups_the_cluster_holds(scaling: ScalingConfig) -> int:
    """How many groups of the smallest allowed size the cluster's total resources hold."""
    group = {k: v * scaling.least_workers for k, v in scaling.worker_resources.items()}
    return fits(group, ray.cluster_resources())


_ray_lock = threading.Lock()
_ray_users = 0
_ray_started_here = False
_connected_to_address = False  # the Ray started here is a cluster's, connected with ray_auth


@contextmanager
def ray_connection(address: str | None = None, init_kwargs: dict | None = None,
                   scaling: ScalingConfig | None = None) -> Iterator[None]:
    """Use the Ray this process is connected to; else connect to ``address`` / ``RAY_ADDRESS``;
    else start a local Ray (sized for ``scaling``, see ``local_cpus``), without Ray's echo of
    the workers' output unless ``init_kwargs`` ask for it. Only a connection made here is
    closed here, when its last user (e.g. the last of several mapped ``train`` tasks) leaves.

    A ``RayCluster`` block's auth token and mode (``init_kwargs[AUTH_KEY]``) are applied
    while connecting only (``ray_auth``); a cluster that refuses the connection for its token
    raises ``ConfigurationError`` naming the fix, fast (``refused_for_auth``)."""
    global _ray_users, _ray_started_here, _connected_to_address
    with _ray_lock:
        if ray.is_initialized() and address not in (None, "auto") \
                and address != ray.get_runtime_context().gcs_address:
            logger.warning(
                "ray_address=%r is not used: this process is already connected to the Ray "
                "cluster at %s (e.g. through its task runner); call ray.shutdown() first to "
                "train elsewhere", redact_address(address),
                ray.get_runtime_context().gcs_address)
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS") or None
            logger.info("Starting a local Ray" if address is None
                        else f"Connecting to Ray at {redact_address(address)}")
            kwargs, auth = split_auth(init_kwargs)
            if address is None and scaling is not None and "num_cpus" not in kwargs:
                kwargs.update(local_cpus(scaling))
            # The workers' prints and logs reach the driver as [rank N] lines (logs.py): Ray's
            # own echo of their stdout would show each line twice. Its log files keep them.
            kwargs.setdefault("log_to_driver", False)
            if address is None:
                # "local": a new Ray, not one that `ray start` left on this machine.
                ray.init(address="local", **kwargs)
            else:
                _connect(address, kwargs, auth)
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
                if _connected_to_address:  # the next Ray of this process must not reuse its
                    _connected_to_address = False  # auth settings (e.g. a local one)
                    reload_ray_auth()


def _connect(address: str, kwargs: dict[str, Any], auth: RayAuth | None) -> None:
    """``ray.init(address=...)`` with ``auth`` applied; a refusal for the token becomes a
    ``ConfigurationError`` naming the fix, with neither the token nor the address's
    credentials in it. A failed attempt leaves no auth settings cached in Ray."""
    global _connected_to_address
    message = None
    try:
        with ray_auth(auth):
            try:
                # Token mode without a token: Ray's client would abort the process (a failed
                # RAY_CHECK); a refused token: found in milliseconds, ray.init retries for 20 s.
                if not token_found() or refused_for_auth(address):
                    message = auth_failure_message(address, auth)
                else:
                    ray.init(address=address, **kwargs)
                    _connected_to_address = True
            except Exception as error:
                if not is_auth_failure(error):
                    raise
                message = auth_failure_message(address, auth)
    except BaseException:
        reload_ray_auth()
        raise
    if message is not None:
        reload_ray_auth()
        raise ConfigurationError(message) from None  # Ray's chain shows the address unredacted



def local_cpus(scaling: ScalingConfig) -> dict[str, int]:
    """``num_cpus`` for a local Ray whose workers would take every CPU of the machine: one
    logical CPU more, so Ray Data's read tasks (and whatever else the run starts) are never
    starved. Otherwise nothing: Ray's own count. A group that does not fit is not helped."""
    try:
        from ray._private.utils import get_num_cpus  # Ray's count (cgroup limits included)

        cores = get_num_cpus()
    except Exception:  # noqa: BLE001 - a private helper: fall back to the OS's count
        cores = os.cpu_count() or 1
    need = scaling.worker_resources.get("CPU", 0.0) * scaling.num_workers
    if need <= cores < need + 1:
        logger.info("Starting the local Ray with %d logical CPUs (the machine has %g): the "
                    "%d workers take %g, one is left for Ray Data's tasks", math.ceil(need) + 1,
                    cores, scaling.num_workers, need)
        return {"num_cpus": math.ceil(need) + 1}
    return {}


def check_cpus_left_for_data(scaling: ScalingConfig, workers: int) -> None:
    """A run with ``datasets=`` needs a CPU besides its workers for Ray Data's read and map
    tasks; a cluster whose CPUs the workers (and the caller) take would wait forever."""
    total = ray.cluster_resources().get("CPU", 0.0)
    taken = scaling.worker_resources.get("CPU", 0.0) * workers + held_by_caller()[1].get(
        "CPU", 0.0)
    if total - taken < 1 and not settings.settings().allow_autoscaling:
        raise ResourcesUnavailableError(
            f"datasets= needs a CPU for Ray Data's read tasks, but the {workers} workers "
            f"(and the task that runs train) take {taken:g} of the cluster's {total:g} CPUs, "
            "so reading would wait forever: use fewer workers, a fraction of a CPU each "
            "(resources_per_worker={'CPU': 0.5}), or a cluster with more CPUs (a local Ray "
            "that train starts leaves one for it by itself)",
            requested={"CPU": taken + 1}, available={"CPU": total})


def capacity_now(scaling: ScalingConfig) -> int:
    """How many more workers the cluster's free resources hold right now."""
    return fits(scaling.worker_resources, ray.available_resources())


def could_hold(scaling: ScalingConfig) -> bool:
    """Whether the cluster's resources, free or not, hold ``num_workers`` (not after a node
    was lost, say)."""
    return fits(scaling.worker_resources, ray.cluster_resources()) >= scaling.num_workers


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
            f"(cluster: {describe(totals)}). Set use_gpu=False to train on CPUs, or connect "
            "to a cluster with GPU nodes (ray_address=... or RAY_ADDRESS)",
            requested=bundle, available=totals)
    held_on, held = held_by_caller()
    n = scaling.least_workers
    strategy = scaling.placement_strategy

    def holdable_with(held: dict[str, float]) -> int:
        per_node = [fits(bundle, {k: v - held.get(k, 0.0) if node["NodeID"] == held_on
                                  else v for k, v in node["Resources"].items()})
                    for node in nodes]
        if strategy == "STRICT_PACK":
            return max(per_node, default=0)
        if strategy == "STRICT_SPREAD":
            return sum(1 for f in per_node if f >= 1)
        return sum(per_node)

    holdable = holdable_with(held)
    if holdable < n and not settings.settings().allow_autoscaling:
        at_least = "at least " if scaling.min_workers else ""
        cluster = f"(cluster: {describe(totals)} on {len(nodes)} node(s))"
        message = (f"ScalingConfig asks for {at_least}{n} workers of {describe(bundle)} each "
                   f"({strategy}), but this Ray cluster can hold at most {holdable}")
        if held and holdable_with({}) >= n:  # it would fit but for what the caller holds
            message += (
                f" beside the Ray task that runs this train, which holds {describe(held)} "
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


def check_cluster_can_validate(task: dict[str, float], bundle: dict[str, float],
                               workers: int) -> None:
    """Fail at once when a validation task (``pd.Validation``) could never run beside the
    worker group: each would wait out its timeout and fail, holding up the end of the run."""
    if not task or settings.settings().allow_autoscaling:
        return
    _, held = held_by_caller()
    totals = {k: v for k, v in ray.cluster_resources().items()
              if "_group_" not in k and not k.startswith("node:")}
    taken = {k: v * workers + held.get(k, 0.0) for k, v in bundle.items()}
    for key in held:
        taken.setdefault(key, held[key])
    left = {k: totals.get(k, 0.0) - taken.get(k, 0.0) for k in task}
    if fits(task, left) < 1:
        raise ResourcesUnavailableError(
            f"Validation asks for {describe(task)} per validation, but beside the {workers} "
            f"workers ({describe(bundle)} each) this Ray cluster has {describe(left)} left "
            f"(cluster: {describe(totals)}): no validation could ever start. Give it less, e.g. "
            "pd.Validation(fn, resources={'CPU': 0.5}), use fewer workers, or a bigger cluster",
            requested=task, available=left)


def held_by_caller() -> tuple[str | None, dict[str, float]]:
    """(node id, resources) that the Ray task or actor calling this holds, e.g. the task of
    prefect-ray's RayTaskRunner that runs ``train``; (None, {}) in a driver."""
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None, {}
    held = {k: v for k, v in context.get_assigned_resources().items() if v > 0}
    return context.get_node_id(), held


def describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())) or "nothing"
