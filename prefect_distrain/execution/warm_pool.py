"""Worker groups kept warm between the runs of one process: a flow's next ``train`` or a
sweep's next trial takes the group the last run left, instead of starting actors (and importing
the framework in them) again.

Only a run with the same key takes a group: the backend config, the scaling, and the Ray address
and ``ray_init_kwargs`` (its runtime_env) the group was started with. A group is left here only
after a clean run, at its full size, by a backend that can set itself up again in the same
processes (``BackendConfig.reusable``). Between runs its workers have left the backend (the
torch process group is destroyed), hold no session and have the environment they started with;
the taker sets the backend up anew. A group ends (actors killed, its Ray connection released)
when it has been idle ``PREFECT_DISTRAIN_WARM_POOL_IDLE_S``, when the flow run that left it
ends, when a run in this process needs the cluster's resources it holds, and at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

from .worker_group import WorkerGroup

logger = logging.getLogger("prefect_distrain")


@dataclass
class WarmGroup:
    key: tuple
    group: WorkerGroup
    #: The Ray connection the group holds (``ray_connection``'s use of it), released at its end.
    ray: contextlib.ExitStack
    #: The flow run that left it: its end ends the group.
    owner: str | None = None
    idle_since: float = field(default_factory=time.monotonic)


_lock = threading.Lock()
_idle: list[WarmGroup] = []


def take(key: tuple) -> WarmGroup | None:
    """The idle group left under ``key`` longest ago, now the caller's; None if there is none."""
    with _lock:
        for i, warm in enumerate(_idle):
            if warm.key == key:
                return _idle.pop(i)
    return None


def give(warm: WarmGroup, idle_s: float) -> None:
    """Keep ``warm`` for the next run with its key, for ``idle_s`` seconds at most."""
    warm.idle_since = time.monotonic()
    with _lock:
        _idle.append(warm)
    reaper = threading.Timer(idle_s, drain, kwargs={"idle_for": idle_s})
    reaper.daemon = True
    reaper.start()


def idle_groups() -> int:
    with _lock:
        return len(_idle)


def drain(owner: str | None = None, idle_for: float | None = None) -> int:
    """End the idle groups (those left by flow run ``owner``, those idle ``idle_for`` seconds
    or more); how many ended."""
    now = time.monotonic()
    with _lock:
        ending = [w for w in _idle if (owner is None or w.owner == owner)
                  and (idle_for is None or now - w.idle_since >= idle_for - 0.01)]
        for warm in ending:
            _idle.remove(warm)
    for warm in ending:
        end(warm)
    return len(ending)


def end(warm: WarmGroup) -> None:
    """Kill the group's actors and release its Ray connection (a local Ray started for it
    stops when no run uses it any more)."""
    try:
        warm.group.shutdown()
    except Exception as error:  # noqa: BLE001 - ending what is gone already is fine
        logger.debug("Ending a warm worker group: %s", error)
    finally:
        warm.ray.close()


atexit.register(drain)  # before Ray's own exit hook (registered earlier, so run later)
