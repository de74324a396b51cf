"""Ray Train's collective helpers for the training function: ``barrier`` and
``broadcast_from_rank_zero``, with a timeout.

```python
def train_loop(config):
    rank = pd.get_context().get_world_rank()
    if rank == 0:
        download(config["url"], "/shared/data")          # one rank fetches the data...
    pd.collective.barrier()                              # ...the others wait until it has
    run_id = pd.collective.broadcast_from_rank_zero(uuid.uuid4().hex if rank == 0 else None)
```
Why not ``torch.distributed``'s: these work on every backend and before any process group
exists, carry any picklable object, name the ranks that did not come when they time out, and
tell the hang detector that a rank waiting here is waiting, not hung.

The calls meet on one small Ray actor per worker group (``execution/sync_actor.py``), whose
handle every worker gets when the group starts. The N-th call of each rank meets the N-th call
of every other rank (``barrier`` and ``broadcast_from_rank_zero`` count together, as in Ray
Train), so every rank must make the same calls in the same order.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, TypeVar

import ray
from ray import cloudpickle

from .exceptions import DistrainError, WorkerLostError
from .session import current_session

__all__ = ["DEFAULT_TIMEOUT_S", "CollectiveTimeoutError", "barrier", "broadcast_from_rank_zero"]

#: How long a rank waits for the others by default: 30 minutes, torch.distributed's default
#: collective timeout (gloo's), so a loop that waits this long in DDP waits as long here; a
#: barrier often covers one rank's slow chore (a download, a dataset build). It is longer than
#: ``FailureConfig.hang_timeout_s`` (10 minutes): a rank stuck without progress is caught (and
#: restarted) by the hang detector first, so this timeout names a rank that runs on elsewhere,
#: which is the loop's bug.
DEFAULT_TIMEOUT_S = 1800.0

T = TypeVar("T")

#: The worker group's synchronization actor, set on every worker when the group starts
#: (``set_sync_actor``); None in a group of one.
_sync_actor: Any = None
#: Collective calls so far per session: a new run (a new session) counts from 0 again.
_calls: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class CollectiveTimeoutError(DistrainError, TimeoutError):
    """A rank waited ``timeout_s`` in ``barrier`` / ``broadcast_from_rank_zero`` and the ranks
    in ``missing`` never came. The loop's bug (they make other calls, or return): not
    restarted, not retried; raise ``timeout_s`` if they are only slow."""

    def __init__(self, message: str, *, call: int, arrived: list[int], missing: list[int],
                 timeout_s: float):
        super().__init__(message)
        self.call = call
        self.arrived = arrived
        self.missing = missing
        self.timeout_s = timeout_s

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, {
            "call": self.call, "arrived": self.arrived, "missing": self.missing,
            "timeout_s": self.timeout_s}))


def _rebuild(cls, args, state):
    return cls(*args, **state)


def barrier(*, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> None:
    """Return once every rank of the group has called ``barrier`` (its same-numbered
    collective call). ``timeout_s``: how long to wait for the others (None: forever);
    ``CollectiveTimeoutError`` names the ranks that did not come."""
    _meet("barrier", None, timeout_s, broadcast=False)


def broadcast_from_rank_zero(data: T, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> T:
    """Rank 0's ``data`` on every rank (the others' ``data`` is ignored; pass None), once every
    rank has called it: a barrier that carries a value. Rank 0 gets its own object back, the
    others a copy. Meant for small objects (a path, a seed, a run id, a config); ``data`` must
    pickle (TypeError on every rank otherwise). ``timeout_s``: as for ``barrier``."""
    return _meet("broadcast_from_rank_zero", data, timeout_s, broadcast=True)


def set_sync_actor(actor: Any) -> None:
    """Set on every worker by ``WorkerGroup.start`` (through ``execute``)."""
    global _sync_actor
    _sync_actor = actor


def _meet(caller: str, data: Any, timeout_s: float | None, broadcast: bool) -> Any:
    session = current_session()
    if session is None:
        raise RuntimeError(
            f"prefect_distrain.collective.{caller}() was called outside a training function. "
            "Call it inside the function you pass to prefect_distrain.train(...) or "
            "Trainer.run(...), on every rank")
    if timeout_s is not None and (isinstance(timeout_s, bool)
                                  or not isinstance(timeout_s, (int, float)) or timeout_s <= 0):
        raise ValueError(f"{caller}(timeout_s=...) takes a number of seconds > 0 or None "
                         f"(wait forever), got {timeout_s!r}")
    info = session.context.info
    rank, world_size = info.world_rank, info.world_size
    blob, poison = None, None
    if broadcast and rank == 0:
        try:
            blob = cloudpickle.dumps(data)
        except Exception as error:  # noqa: BLE001 - named below, on every rank
            poison = (
                f"{caller}(): rank 0's data ({type(data).__module__}.{type(data).__qualname__}) "
                f"cannot be pickled ({error}): broadcast plain data (numbers, strings, arrays, "
                "lists or dicts of them) and build the rest from it on every rank")
    if world_size == 1:
        if poison is not None:
            raise TypeError(poison)
        return data
    actor = _sync_actor
    if actor is None:
        raise RuntimeError(
            f"prefect_distrain.collective.{caller}(): this worker (rank {rank} of {world_size}) "
            "has no synchronization actor; only a prefect_distrain worker group "
            "(prefect_distrain.train or Trainer) sets one")
    with _lock:
        call = _calls.get(session, 0)
        _calls[session] = call + 1
    try:
        with session.busy_with(f"waiting in {caller}"):
            status, value = ray.get(actor.meet.remote(call, rank, blob, timeout_s, poison))
    except ray.exceptions.RayActorError as error:
        raise WorkerLostError(
            f"{caller}() on rank {rank}: the worker group's synchronization actor was lost "
            f"(its node may be gone): {error}", rank=rank) from None
    if status == "poisoned":
        raise TypeError(value)
    if status == "timeout":
        arrived, missing = value["arrived"], value["missing"]
        raise CollectiveTimeoutError(
            f"{caller}() timed out after {timeout_s:g} s on rank {rank} (collective call "
            f"#{call + 1}): ranks {arrived} arrived, ranks {missing} did not. Every rank must "
            "call barrier() and broadcast_from_rank_zero() the same number of times, in the "
            "same order (a rank that skips one or returns early leaves the others waiting); "
            f"if ranks {missing} are only slow (e.g. one rank alone downloads the data), "
            f"raise timeout_s (default {DEFAULT_TIMEOUT_S:g} s)",
            call=call + 1, arrived=arrived, missing=missing, timeout_s=timeout_s)
    if not broadcast:
        return None
    if rank == 0:
        return data
    return None if value is None else cloudpickle.loads(value)
