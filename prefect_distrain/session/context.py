"""Where a worker sits: its ranks (``WorkerInfo``) and Ray Train's ``TrainContext``.

Set on every worker when the group starts (``set_worker_info``), read by backend hooks that run
on the worker (``get_worker_info``) and by the training function (``pd.get_context()``). A
backend whose ranks share a collective also sets ``set_any_rank``: how the ranks agree that one
of them holds a flag (the preemption notice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class WorkerInfo:
    """Where a worker sits in the group; fixed while the group lives."""

    world_rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    node_ip: str


@dataclass(frozen=True)
class TrainContext:
    """Ray Train's ``TrainContext``: the worker's ranks, the run, and the restart attempt."""

    info: WorkerInfo
    experiment_name: str
    storage_url: str
    attempt: int = 0
    backend: str = ""

    def get_world_rank(self) -> int:
        return self.info.world_rank

    def get_world_size(self) -> int:
        return self.info.world_size

    def get_local_rank(self) -> int:
        return self.info.local_rank

    def get_local_world_size(self) -> int:
        return self.info.local_world_size

    def get_node_rank(self) -> int:
        return self.info.node_rank

    def get_experiment_name(self) -> str:
        """The run's name (Ray Train calls a run an experiment)."""
        return self.experiment_name

    def get_storage(self) -> str:
        """The run's folder (URL) in storage."""
        return self.storage_url

    def get_attempt(self) -> int:
        """0 on the first start of the worker group, then 1, 2, ... after each restart."""
        return self.attempt

    def preemption_requested(self) -> bool:
        """True once a worker (or the driver) of this run was sent SIGTERM: save a checkpoint
        and ``report`` it now; that report ends the function, and the run resumes from it.

        On the torch backend every rank gets the same answer at the same call (one all-reduce
        of a flag: call it at the same point of the loop on every rank, e.g. after each
        step). Elsewhere it is this rank's own view, which the others reach a moment later:
        call it where ranks agree anyway, e.g. just before a report."""
        from . import current_session

        session = current_session()
        return session is not None and session.preemption_requested()


_worker_info: WorkerInfo | None = None


def set_worker_info(info: WorkerInfo) -> None:
    global _worker_info
    _worker_info = info


def get_worker_info() -> WorkerInfo:
    """The calling worker's ranks (for backend hooks that run on the worker)."""
    if _worker_info is None:
        raise RuntimeError("get_worker_info() runs only on a worker of a started worker group")
    return _worker_info


_any_rank: Callable[[bool], bool] | None = None


def set_any_rank(agree: Callable[[bool], bool] | None) -> None:
    """``agree(flag)`` returns on every rank whether any rank passed True (a collective: every
    rank calls it at the same point). Set by the backend when its process group is up."""
    global _any_rank
    _any_rank = agree


def any_rank() -> Callable[[bool], bool] | None:
    return _any_rank


#: What modules reset before each run in a worker process: a warm group's processes, and a
#: started Trainer's, serve several runs, and one run's choices must not reach the next.
_run_resets: list[Callable[[], None]] = []


def reset_before_each_run(reset: Callable[[], None]) -> Callable[[], None]:
    """Register ``reset`` (a module's per-run state back to its start) for ``new_run``."""
    if reset not in _run_resets:
        _run_resets.append(reset)
    return reset


def new_run() -> None:
    """Before a run in this worker process: every registered module's state as it started."""
    for reset in _run_resets:
        reset()
