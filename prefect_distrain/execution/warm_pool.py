"""Worker groups kept warm between the runs of one process: a flow's next ``train`` or a
sweep's next trial takes the group the last run left, instead of starting actors (and importing
the framework in them) again.

Only a run with the same key takes a group: the backend config, the scaling, and the Ray address
and ``ray_init_kwargs`` (its runtime_env) the group was started with. A group is left here only
after a clean run, at its full size, by a backend that can set itself up again in the same
processes (``BackendConfig.reusable``). Between runs its workers have left the backend (the
torch process group is destroyed), hold no session and have the environment they started with
(that rest goes on in the workers after the run returns; the taker waits for it); the taker
sets the backend up anew.

A group ends (its actors killed) when the flow run that left it ends, when a run of this process
starts with another key (it would hold resources that run's workers, data or validation tasks
need), and after ``PREFECT_DISTRAIN_WARM_POOL_IDLE_S`` idle. Its Ray connection is given back
at its end, except after the idle timeout: that end comes from a timer thread while the flow may
still use the Ray that ``train`` started, so the connection stays parked until the flow run ends
(or a run with other Ray options starts, or the process exits).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .worker_group import WorkerGroup

logger = logging.getLogger("prefect_distrain")


@dataclass
class WarmGroup:
    key: tuple
    #: The Ray address and options the group's connection was made with (part of ``key``).
    ray_options: tuple
    group: WorkerGroup
    #: The Ray connection the group holds (``ray_connection``'s use of it).
    ray: contextlib.ExitStack
    #: The flow run that left it: its end ends the group.
    owner: str | None = None
    idle_since: float = field(default_factory=time.monotonic)


_lock = threading.Lock()
_idle: list[WarmGroup] = []
#: Connections of groups ended by the idle timeout: (owner, ray options, connection).
_parked: list[tuple[str | None, tuple, contextlib.ExitStack]] = []


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
    reaper = threading.Timer(idle_s, _reap, args=(idle_s,))
    reaper.daemon = True
    reaper.start()


def idle_groups() -> int:
    with _lock:
        return len(_idle)


def _end_where(ends: Callable[[WarmGroup], bool], release: bool = True) -> int:
    with _lock:
        ending = [w for w in _idle if ends(w)]
        for warm in ending:
            _idle.remove(warm)
    for warm in ending:
        end(warm, release)
    return len(ending)


def _reap(idle_s: float) -> None:
    """The idle timeout: groups idle ``idle_s`` end; their connections are parked."""
    now = time.monotonic()
    _end_where(lambda w: now - w.idle_since >= idle_s - 0.01, release=False)


def drain(owner: str | None = None) -> int:
    """End the idle groups (those flow run ``owner`` left) and give their Ray connections back,
    with the parked ones; how many groups ended. At the flow run's end, and at exit."""
    ended = _end_where(lambda w: owner is None or w.owner == owner)
    _release_parked(lambda o, _: owner is None or o == owner)
    return ended


def drain_other_keys(key: tuple) -> int:
    """A run with ``key`` starts: idle groups of other keys end (they hold its room)."""
    return _end_where(lambda w: w.key != key)


def drain_other_rays(ray_options: tuple) -> None:
    """A run connects to Ray with ``ray_options``: groups (and parked connections) made with
    other options end, so that a local Ray they kept up stops and starts anew with these."""
    _end_where(lambda w: w.ray_options != ray_options)
    _release_parked(lambda _, options: options != ray_options)


def _release_parked(releases: Callable[[str | None, tuple], bool]) -> None:
    with _lock:
        leaving = [p for p in _parked if releases(p[0], p[1])]
        for parked in leaving:
            _parked.remove(parked)
    for _, _, connection in leaving:
        connection.close()


def end(warm: WarmGroup, release: bool = True) -> None:
    """Kill the group's actors; give its Ray connection back (a local Ray started for it stops
    when no run uses it any more), or park it (``release=False``)."""
    try:
        warm.group.shutdown()
    except Exception as error:  # noqa: BLE001 - ending what is gone already is fine
        logger.debug("Ending a warm worker group: %s", error)
    finally:
        if release:
            warm.ray.close()
        else:
            with _lock:
                _parked.append((warm.owner, warm.ray_options, warm.ray))


atexit.register(drain)  # before Ray's own exit hook (registered earlier, so run later)
