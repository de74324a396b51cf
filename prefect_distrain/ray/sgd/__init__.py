"""RaySGD v2's API (``ray.sgd``, ``ray.util.sgd.v2``; Ray 1.7) over prefect_distrain, so that a
RaySGD script ports by changing its imports::

    from ray import sgd                  ->  from prefect_distrain.ray import sgd
    from ray.sgd import Trainer          ->  from prefect_distrain.ray.sgd import Trainer
    from ray.sgd.callbacks import ...    ->  from prefect_distrain.ray.sgd.callbacks import ...

Each name is a few lines over prefect_distrain's own: ``report`` is ``pd.report``, the ranks
come from ``pd.get_context()``, checkpoints are dict checkpoints (``Checkpoint.from_dict``) and
``Trainer`` drives a ``prefect_distrain.Trainer`` (``.trainer``). Where they differ:

- ``save_checkpoint(**state)`` is called by every rank, the same number of times, as in RaySGD
  (whose driver waited for every worker's call): rank 0's state is the checkpoint, the other
  ranks' is ignored. Each call is one ``report`` on every rank (so report counts stay equal),
  marked ``_sgd_checkpoint`` with the state's scalar values; the ``SGDCallback`` family never
  sees these reports (RaySGD's callbacks never saw checkpoints), other callbacks do, and they
  take a ``_training_iteration`` number like any report.
- ``Trainer.run`` starts a run of its own, ``<logdir>/run_NNN`` (Ray's ``latest_run_dir``), with
  its checkpoints; ``run(checkpoint=...)`` takes a dict (stored as a dict checkpoint next to the
  run, ``run_NNN_initial_checkpoint``, and removed after it), a ``Checkpoint`` or a checkpoint
  folder's path/URL, never a pickle file. After an infrastructure failure the group restarts
  (``max_retries`` times) and ``load_checkpoint()`` returns the latest saved state.
- ``latest_checkpoint`` is the latest checkpoint of the latest run, read from storage (tensors
  on the CPU); ``get_dataset_shard`` returns a Ray ``DataIterator``, not a ``Dataset``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import warnings
import weakref
from typing import Any, Callable, Mapping

from ... import session
from ...backends import BackendConfig
from ...checkpoints.checkpoint import Checkpoint
from ...checkpoints.fs import filesystem, redact_url
from ...config import FailureConfig, RunConfig, ScalingConfig, default_storage
from ...execution.trainer import Trainer as DistrainTrainer
from .callbacks import CHECKPOINT_KEY, SGDCallback

__all__ = ["SGDCallback", "Trainer", "get_dataset_shard", "load_checkpoint", "local_rank",
           "report", "save_checkpoint", "world_rank", "world_size"]


# -- in the training function --------------------------------------------------------------------


def report(**metrics: Any) -> None:
    """``sgd.report(loss=...)``: ``pd.report(metrics)``; every rank, the same number of times."""
    session.report(metrics)


def world_rank() -> int:
    return session.get_context().get_world_rank()


def local_rank() -> int:
    return session.get_context().get_local_rank()


def world_size() -> int:
    return session.get_context().get_world_size()


def save_checkpoint(**state: Any) -> None:
    """Call it on every rank: rank 0's ``state`` is committed as a dict checkpoint (see
    ``Checkpoint.from_dict`` for the values it takes), the others' is ignored."""
    metrics = {key: value for key, value in state.items()
               if type(value) in (int, float, str, bool) and not key.startswith("_")}
    checkpoint = Checkpoint.from_dict(state) if world_rank() == 0 else None
    try:
        session.report({**metrics, CHECKPOINT_KEY: True}, checkpoint=checkpoint)
    finally:
        if checkpoint is not None:
            shutil.rmtree(checkpoint.path, ignore_errors=True)


#: Each session's loaded checkpoint: (its path, its dict).
_loaded: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def load_checkpoint() -> dict[str, Any] | None:
    """The dict of the checkpoint to resume from (``run(checkpoint=...)``, or after a restart
    the latest saved), or None; the same dict on every call."""
    checkpoint = session.get_checkpoint()
    if checkpoint is None:
        return None
    current = session.current_session()
    if current not in _loaded or _loaded[current][0] != checkpoint.path:
        _loaded[current] = (checkpoint.path, checkpoint.to_dict())
    return _loaded[current][1]


def get_dataset_shard(dataset_name: str | None = None) -> Any:
    """This worker's share of ``run(dataset=...)``: a ``DataIterator``. A single dataset needs no
    name (it is ``"train"``); with several, name one. None (with a warning) when none was
    given."""
    current = session.current_session()
    if dataset_name is not None or current is None:
        return session.get_dataset_shard(dataset_name or "train")
    names = sorted(current.datasets)
    if not names:
        warnings.warn("No dataset passed in. Returning None. Pass it as Trainer.run(..., "
                      "dataset=...)", stacklevel=2)
        return None
    if len(names) > 1:
        raise RuntimeError(f"Several datasets were passed to Trainer.run ({names}): name one, "
                           f"e.g. get_dataset_shard({names[0]!r})")
    return session.get_dataset_shard(names[0])


# -- on the driver ------------------------------------------------------------------------------


class Trainer:
    """RaySGD's ``Trainer`` over ``prefect_distrain.Trainer`` (``self.trainer``): the workers stay
    up from ``start()`` to ``shutdown()``; ``max_retries`` restarts after infrastructure
    failures (``FailureConfig(max_failures)``, -1 without limit)."""

    def __init__(self, backend: str | BackendConfig, num_workers: int = 1, use_gpu: bool = False,
                 resources_per_worker: dict[str, float] | None = None,
                 logdir: str | os.PathLike | None = None, max_retries: int = 3):
        if logdir is None:
            logdir = os.path.join(default_storage(), f"sgd_{time.strftime('%Y-%m-%d_%H-%M-%S')}")
        logdir = os.fspath(logdir)
        self.logdir = logdir if "://" in logdir else os.path.abspath(os.path.expanduser(logdir))
        self.trainer = DistrainTrainer(
            backend, scaling=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                           resources_per_worker=resources_per_worker),
            run=RunConfig(storage=self.logdir), failure=FailureConfig(max_failures=max_retries))
        #: The folder (URL) of the latest run, ``<logdir>/run_NNN``.
        self.latest_run_dir: str | None = None
        self._runs = 0
        self._latest: tuple[str, dict[str, Any]] | None = None

    def start(self) -> None:
        self.trainer.start()

    def shutdown(self) -> None:
        self.trainer.shutdown()

    def run(self, train_func: Callable, config: dict[str, Any] | None = None,
            callbacks: list[Any] | None = None, dataset: Any = None, checkpoint: Any = None,
            **unexpected: Any) -> list[Any]:
        """Run ``train_func`` (with ``config`` if it takes an argument) on every worker; the
        list of every worker's return value, in rank order."""
        if unexpected:
            fix = (" (the number of workers is given to Trainer(num_workers=...); some RaySGD "
                   "docs show it on run(), which RaySGD never took)"
                   if "num_workers" in unexpected else "")
            raise TypeError(f"Trainer.run() got unexpected arguments {sorted(unexpected)}{fix}")
        run = self._next_run()
        url, _ = run.resolved_storage()
        self.latest_run_dir = redact_url(f"{url.rstrip('/')}/{run.name}")
        datasets = None if dataset is None else \
            dict(dataset) if isinstance(dataset, Mapping) else {"train": dataset}
        resume, initial = self._resume_from(checkpoint, run)
        try:
            return self.trainer.run(train_func, config=config, callbacks=callbacks,
                                    resume_from_checkpoint=resume, datasets=datasets)
        finally:
            if initial is not None:
                fs, path = initial.location()
                fs.rm(path, recursive=True)

    def _next_run(self) -> RunConfig:
        """The trainer's run config named ``run_NNN``, the first number unused in ``logdir``."""
        fs, root = filesystem(*self.trainer.run_config.resolved_storage())
        self._runs += 1
        while fs.exists(f"{root.rstrip('/')}/run_{self._runs:03d}"):
            self._runs += 1
        run = dataclasses.replace(self.trainer.run_config, name=f"run_{self._runs:03d}")
        self.trainer.run_config = run
        return run

    def _resume_from(self, checkpoint: Any, run: RunConfig
                     ) -> tuple[Checkpoint | str | None, Checkpoint | None]:
        """(what to resume from, the initial checkpoint written for it, to remove after)."""
        if checkpoint is None or isinstance(checkpoint, Checkpoint):
            return checkpoint, None
        if isinstance(checkpoint, (str, os.PathLike)):
            return os.fspath(checkpoint), None
        if not isinstance(checkpoint, Mapping):
            raise TypeError(f"Trainer.run(checkpoint=...) takes a dict, a Checkpoint or a "
                            f"checkpoint folder's path, got {type(checkpoint).__name__}")
        url, options = run.resolved_storage()
        initial = Checkpoint(f"{url.rstrip('/')}/{run.name}_initial_checkpoint", options)
        local = Checkpoint.from_dict(checkpoint)
        try:  # in storage, where every worker can read it
            fs, target = initial.location()
            for parent, _, names in os.walk(local.path):
                for name in names:
                    relative = os.path.relpath(os.path.join(parent, name), local.path)
                    destination = f"{target}/{relative.replace(os.sep, '/')}"
                    fs.makedirs(destination.rsplit("/", 1)[0], exist_ok=True)
                    fs.put_file(os.path.join(parent, name), destination)
        finally:
            shutil.rmtree(local.path, ignore_errors=True)
        return initial, initial

    @property
    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The dict of the latest run's latest checkpoint, or None."""
        manager = self.trainer.checkpoints
        latest = manager.latest() if manager is not None else None
        if latest is None:
            return None
        if self._latest is None or self._latest[0] != latest.path:
            self._latest = (latest.path, latest.to_dict())
        return self._latest[1]

    def to_tune_trainable(self, train_func: Callable, dataset: Any = None) -> Any:
        """What the seeds' ``tune.run(trainable, config={...})`` sweeps
        (``prefect_distrain.ray.tune.run``): ``train_func`` on this trainer's backend and
        workers, one run per trial."""
        from ...trainers import DataParallelTrainer

        return DataParallelTrainer(
            train_func, backend_config=self.trainer.backend_config,
            scaling_config=self.trainer.scaling,
            run_config=RunConfig(storage=self.logdir),
            datasets=None if dataset is None else
            dataset if isinstance(dataset, dict) else {"train": dataset})
