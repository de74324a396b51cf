"""Where a worker sits: its ranks (``WorkerInfo``) and Ray Train's ``TrainContext``.

Set on every worker when the group starts (``set_worker_info``), read by backend hooks that run
on the worker (``get_worker_info``) and by the training function (``pd.get_context()``).
"""

from __future__ import annotations

from dataclasses import dataclass


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


_worker_info: WorkerInfo | None = None


def set_worker_info(info: WorkerInfo) -> None:
    global _worker_info
    _worker_info = info


def get_worker_info() -> WorkerInfo:
    """The calling worker's ranks (for backend hooks that run on the worker)."""
    if _worker_info is None:
        raise RuntimeError("get_worker_info() runs only on a worker of a started worker group")
    return _worker_info
