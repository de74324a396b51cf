"""What the training function calls on a worker: ``report``, ``get_checkpoint``,
``get_context``, ``get_dataset_shard``, with Ray Train's names.

```python
def train_loop(config):
    ctx = pd.get_context()                     # ranks, the run, the restart attempt
    if (checkpoint := pd.get_checkpoint()):    # resume_from_checkpoint, else None
        ...
    pd.report({"loss": loss}, checkpoint=pd.Checkpoint.from_directory(folder))
```
The session room: ``core`` (reports and the driver's answers), ``uploader`` (checkpoint
uploads), ``auto`` (``CheckpointConfig(mode="auto")``), ``shard`` and ``positions`` (the
training data's position), ``context`` (ranks). Nothing here imports Prefect.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

from ..checkpoints.checkpoint import Checkpoint
from ..integrations.data import TrainingData
from .context import TrainContext, WorkerInfo
from .core import Session
from .shard import TrainingShard

__all__ = ["Session", "TrainContext", "WorkerInfo", "current_session", "get_checkpoint",
           "get_context", "get_dataset_shard", "report", "set_current_session"]

_current: Session | None = None
_lock = threading.Lock()


def set_current_session(session: Session | None) -> None:
    global _current
    with _lock:
        _current = session


def current_session() -> Session | None:
    """The session of the training function running in this process, or None."""
    return _current


def _session(caller: str) -> Session:
    if _current is None:
        raise RuntimeError(
            f"prefect_distrain.{caller}() was called outside a training function. Call it "
            "inside the function you pass to prefect_distrain.train(...) or Trainer.run(...)")
    return _current


def report(metrics: Mapping[str, Any], checkpoint: Checkpoint | None = None, *,
           validate: bool | None = None) -> None:
    """Send metrics (and optionally a checkpoint) from this worker to the driver.

    Without a checkpoint: returns at once (or, while an exact-stop callback is attached, once
    the driver judged this iteration). With one: returns once it is committed (sync upload,
    waiting for every rank's report of this iteration) or staged locally (async upload).
    Once a callback has stopped the run, it sends this report and then raises
    ``StopTraining``, which ends the training function cleanly. Every rank must call it the
    same number of times.

    ``validate``: with ``CheckpointConfig(validate=pd.Validation(fn))``, whether this
    checkpoint is validated once committed (default: as ``Validation(every=...)`` says).
    """
    _session("report").report(metrics, checkpoint, validate)


def get_checkpoint() -> Checkpoint | None:
    """The committed checkpoint to resume from (``resume_from_checkpoint``), or None on a fresh
    run. Fixed while the function runs, like Ray Train's."""
    return _session("get_checkpoint").resume_from


def get_dataset_shard(name: str = "train") -> Any:
    """This worker's share of the dataset ``name`` given to ``train(datasets=...)``: a Ray
    ``DataIterator`` (``iter_torch_batches``, ``iter_batches``, ``iter_rows``). Split datasets
    give each rank a disjoint share; the others reach every rank whole."""
    session = _session("get_dataset_shard")
    if name not in session.datasets:
        given = ", ".join(repr(n) for n in sorted(session.datasets)) or "none"
        raise KeyError(
            f"no dataset {name!r} was given to this run (given: {given}): pass it with "
            f"train(..., datasets={{{name!r}: ray_dataset_or_url}})")
    shard = session.datasets[name]
    if isinstance(shard, TrainingData):  # the training data: its position goes with reports
        session.datasets[name] = shard = TrainingShard(shard, session)
    return shard


def get_context() -> TrainContext:
    """This worker's ranks, the run's name and storage, and the restart attempt."""
    return _session("get_context").context
