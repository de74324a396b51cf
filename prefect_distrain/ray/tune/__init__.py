"""``ray.tune`` over ``prefect_distrain.tune``: a sweep is a Prefect flow of ``train`` trials.

``Tuner(trainer, param_space={"train_loop_config": {...}}, tune_config=TuneConfig(...)).fit()``
returns a ``TuneResult`` with Ray's ``ResultGrid`` names (``get_best_result``, iteration,
``errors``, ``get_dataframe``); ``run`` is the seeds' ``tune.run(trainable, config=...)``.
"""

from __future__ import annotations

from typing import Any

from ...integrations.schedulers import ASHAScheduler, MedianStoppingRule, TrialScheduler
from ...integrations.tune import (
    TrialResult,
    TuneConfig,
    Tuner,
    TuneResult,
    choice,
    loguniform,
    uniform,
)
from ...integrations.tune import grid as grid_search
from ...session import get_checkpoint, report
from ...trainers import DataParallelTrainer

ResultGrid = TuneResult
Result = TrialResult

__all__ = ["ASHAScheduler", "MedianStoppingRule", "Result", "ResultGrid", "TrialScheduler",
           "TuneConfig", "Tuner", "choice", "get_checkpoint", "grid_search", "loguniform",
           "report", "run", "uniform"]


def run(run_or_experiment: Any, *, config: dict[str, Any] | None = None, metric: str | None = None,
        mode: str = "min", num_samples: int = 1, scheduler: TrialScheduler | None = None,
        max_concurrent_trials: int | None = None, run_config: Any = None) -> TuneResult:
    """The seeds' ``tune.run(trainable, config={...})``: ``config`` holds the values to try
    (``grid_search``, ``choice``...) beside plain ones; Ray Tune's analysis names
    (``get_best_config(metric, mode)``) on the result."""
    trainer = isinstance(run_or_experiment, DataParallelTrainer)
    tuner = Tuner(run_or_experiment,
                  param_space={"train_loop_config": config or {}} if trainer else config,
                  tune_config=TuneConfig(metric=metric, mode=mode, num_samples=num_samples,
                                         scheduler=scheduler,
                                         max_concurrent_trials=max_concurrent_trials),
                  run_config=run_config)
    tuner.config_key = None  # the seeds' analysis holds the config itself
    return tuner.fit()
