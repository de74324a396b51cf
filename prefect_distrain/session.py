"""What the training function calls on a worker: ``report``, ``get_checkpoint``, ``get_context``.

``report`` is **not a barrier**. It hands the metrics to the worker's outbox and returns; with a
checkpoint it first copies the checkpoint's files into storage (so the directory may be deleted
or changed as soon as ``report`` returns), but it never waits for other ranks or for the
driver. The driver pairs the reports of all ranks by their iteration number, so every rank must
call ``report`` the same number of times; its callbacks see one list per iteration.

This module never imports Prefect: workers stay light and start fast.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from .checkpoint import Checkpoint
from .storage import RunStorage


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
        return self.experiment_name

    def get_storage(self) -> str:
        """The run's folder (URL) in storage."""
        return self.storage_url

    def get_attempt(self) -> int:
        """0 on the first start of the worker group, then 1, 2, ... after each restart."""
        return self.attempt


@dataclass
class _Session:
    context: TrainContext
    storage: RunStorage
    checkpoint: Checkpoint | None
    first_checkpoint_index: int
    outbox: queue.Queue = field(default_factory=queue.Queue)
    iteration: int = 0
    last_report_time: float = field(default_factory=time.time)

    def report(self, metrics: Mapping[str, Any], checkpoint: Checkpoint | None) -> None:
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"report() takes a dict of metrics, got {type(metrics).__name__}: "
                "call report({'loss': loss}) (use {} to report only a checkpoint)"
            )
        if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
            raise TypeError(
                "report(checkpoint=...) takes a prefect_distrain.Checkpoint, got "
                f"{type(checkpoint).__name__}: use Checkpoint.from_directory(path)"
            )
        bad_keys = [k for k in metrics if not isinstance(k, str)]
        if bad_keys:
            raise TypeError(f"report() metric names must be strings, got {bad_keys!r}")
        now = time.time()
        self.iteration += 1
        result = dict(metrics)
        result["_timestamp"] = int(now)
        result["_time_this_iter_s"] = now - self.last_report_time
        result["_training_iteration"] = self.iteration
        self.last_report_time = now
        persisted = None
        if checkpoint is not None:
            index = self.first_checkpoint_index + self.iteration - 1
            persisted = self.storage.persist(checkpoint.path, index)
            self.checkpoint = persisted
        self.outbox.put(("report", {"metrics": result, "checkpoint": persisted}))


_current: _Session | None = None
_lock = threading.Lock()


def _set_session(session: _Session | None) -> None:
    global _current
    with _lock:
        _current = session


def _session(caller: str) -> _Session:
    if _current is None:
        raise RuntimeError(
            f"prefect_distrain.{caller}() was called outside a training function. Call it "
            "inside the function you pass to prefect_distrain.train(...) or Trainer.run(...)"
        )
    return _current


def report(metrics: Mapping[str, Any], checkpoint: Checkpoint | None = None) -> None:
    """Send metrics (and optionally a checkpoint) from this worker to the driver.

    Not a barrier: returns as soon as the checkpoint's files are in storage (or at once without
    one). Every rank must call it the same number of times.
    """
    _session("report").report(metrics, checkpoint)


def get_checkpoint() -> Checkpoint | None:
    """The checkpoint to resume from: the one given to ``resume_from_checkpoint`` at the
    start, then the latest this worker reported. None on a fresh run."""
    return _session("get_checkpoint").checkpoint


def get_context() -> TrainContext:
    """This worker's ranks, the run's name and storage, and the restart attempt."""
    return _session("get_context").context
