"""Placing a worker group: as many workers as the cluster holds, waiting when it holds too few.

A fixed group needs ``num_workers``; an elastic one (``min_workers``) takes what the cluster
holds now, down to ``min_workers``. With fewer, it waits with a doubling pause (1 s, 2 s, ... up
to PREFECT_DISTRAIN_BACKOFF_MAX_S), each wait logged, up to
PREFECT_DISTRAIN_PLACEMENT_GROUP_TIMEOUT_S, then fails as a busy cluster (retryable).
"""

from __future__ import annotations

import logging
import time

from .. import settings
from ..config import ScalingConfig
from ..exceptions import ResourcesUnavailableError
from . import warm_pool, worker_group
from .backend_setup import BackendSetup
from .cluster import capacity_now, could_hold
from .worker_group import WorkerGroup

#: After a scale-up decision, how long to wait for the old group's resources to come back
#: before starting a smaller group after all.
_RELEASE_WAIT_S = 10.0
#: After a group of this process ended, how long its freed resources may take to show (Ray's
#: view of free resources lags by about a second) before the cluster counts as busy.
_FREED_SETTLE_S = 3.0


def start_group(scaling: ScalingConfig, backend: BackendSetup,
                logger: logging.Logger | logging.LoggerAdapter,
                expect_full: bool = False, warm_key: tuple | None = None) -> WorkerGroup:
    """As many workers as the cluster holds now, up to ``num_workers`` and at least
    ``min_workers`` (``num_workers`` if not elastic); waits with a doubling, logged backoff
    while it holds fewer, up to PREFECT_DISTRAIN_PLACEMENT_GROUP_TIMEOUT_S.

    ``expect_full``: the cluster was just seen to hold the full group (a scale-up); give
    Ray a moment to release the old group's resources before settling for fewer (so too after
    ending idle warm groups for room).

    ``warm_key``: take a warm group left under this key (warm_pool.py) when there is one, at
    every look. Idle warm groups of other keys end first: they hold this run's room.
    """
    wanted, least = scaling.num_workers, scaling.least_workers
    if warm_pool.drain_other_keys(warm_key) or expect_full:
        _wait_for_room(scaling, wanted)
    elif time.monotonic() - worker_group.last_freed < _FREED_SETTLE_S and could_hold(scaling):
        _wait_for_room(scaling, wanted, _FREED_SETTLE_S)
    timeout = settings.settings().placement_group_timeout_s
    deadline = time.monotonic() + timeout
    delay = 1.0
    while True:
        if warm_key is not None and (warm := _take_warm(warm_key, backend, logger)) is not None:
            return warm
        began = time.monotonic()
        size = min(wanted, capacity_now(scaling))
        if size < wanted and warm_pool.drain_other_keys(warm_key):  # left while it waited
            _wait_for_room(scaling, wanted)
            size = min(wanted, capacity_now(scaling))
        if size >= least:
            group = WorkerGroup(scaling, size, env=backend.worker_env())
            try:
                group.start(timeout=max(1.0, min(deadline - began, 10.0)))
                backend.group_started(group)
                logger.info("Started %d %s worker(s) in %.1f s", size,
                                 backend.name, time.monotonic() - began)
                return group
            except ResourcesUnavailableError:
                # not placed in time: the cluster changed; look again
                backend.group_ends(group, graceful=False)
            except BaseException:
                backend.group_ends(group, graceful=False)
                raise
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ResourcesUnavailableError(
                f"waited {timeout:g} s for the cluster to hold {least} worker(s) of "
                f"{scaling.worker_resources}; it holds {max(size, 0)} now (other work "
                f"holds its resources, or nodes are gone). Set "
                f"{settings.PLACEMENT_GROUP_TIMEOUT_ENV} to wait longer",
                requested=scaling.worker_resources, retryable=True)
        logger.warning(
            "Waiting for resources: the cluster can hold %d of the %d worker(s) needed; "
            "looking again in %.0f s", max(size, 0), least, min(delay, remaining))
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, settings.settings().backoff_max_s)


def _wait_for_room(scaling: ScalingConfig, wanted: int, seconds: float = _RELEASE_WAIT_S) -> None:
    """Give Ray a moment to release the resources of actors just ended."""
    settle = time.monotonic() + seconds
    while capacity_now(scaling) < wanted and time.monotonic() < settle:
        time.sleep(0.2)


def _take_warm(key: tuple, backend: BackendSetup,
               logger: logging.Logger | logging.LoggerAdapter) -> WorkerGroup | None:
    """A warm group left under ``key``, its rest done and the backend set up anew; one that
    failed its rest or does not answer ends and the next is tried. None when there is none."""
    while (warm := warm_pool.take(key)) is not None:
        try:
            warm.group.rested(settings.settings().shutdown_timeout_s)
            backend.group_started(warm.group)
        except Exception as error:  # noqa: BLE001 - a dead group ends; a fresh one starts
            logger.info("A warm worker group could not be reused (%s: %s)", type(error).__name__,
                        error)
            warm_pool.end(warm)
            continue
        except BaseException:  # a cancel or an interrupt: the group, out of the pool, ends too
            warm_pool.end(warm)
            raise
        warm.ray.close()  # the taker holds its own connection to the same Ray
        logger.info("Took the %d warm %s worker(s) an earlier run left", len(warm.group),
                    backend.name)
        return warm.group
    return None
