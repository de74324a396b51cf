"""Hyperparameter sweeps as Prefect flows: every trial is a ``train`` task run.

```python
result = pd.tune(train_loop,
                 search_space={"lr": pd.grid([1e-3, 1e-2]), "hidden": pd.choice([64, 128])},
                 num_samples=2, metric="val_loss", mode="min", max_concurrent_trials=2,
                 scheduler=pd.ASHAScheduler(grace_period=1, reduction_factor=2),
                 scaling=pd.ScalingConfig(num_workers=2),
                 run=pd.RunConfig(name="sweep", storage=...))
result.best_config, result.best_checkpoint
```
The sweep is a flow (a subflow inside yours); each trial a ``train`` task with its own run
(``<sweep>/trial_NNN`` in storage) and checkpoints, at most ``max_concurrent_trials`` (and what
the cluster holds) at once. A scheduler stops bad trials from their reports: a stopped trial ends
cleanly at its next ``report()``, checkpoints kept. A failed trial is recorded with its error and
the sweep goes on. Each trial's outcome is written to ``<sweep>/_trials/``: a Prefect retry of the
sweep (or of the flow around it) reuses finished trials and resumes the others from their
latest checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from ..callbacks import TrainingCallback, callback_list
from ..checkpoints.checkpoint import Checkpoint
from ..checkpoints.fs import redact_url
from ..checkpoints.manager import best_first, score
from ..checkpoints.storage import RunStorage
from ..config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, run_name_part
from ..exceptions import ConfigurationError
from .schedulers import TrialScheduler, TrialSupervisor

#: The sweep's folder for its trials' records (``trial_NNN.json``).
TRIALS = "_trials"

# -- the search space ---------------------------------------------------------------------------


@dataclass(frozen=True)
class grid:  # noqa: N801 - named like Ray Tune's tune.grid_search
    """Every value, in every sample: the grid is the product of all ``grid`` entries."""

    values: list[Any]


@dataclass(frozen=True)
class choice:  # noqa: N801
    """One value drawn at random per trial."""

    values: list[Any]

    def sample(self, rng: random.Random) -> Any:
        return rng.choice(self.values)


@dataclass(frozen=True)
class uniform:  # noqa: N801
    low: float
    high: float

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)


@dataclass(frozen=True)
class loguniform:  # noqa: N801
    low: float
    high: float

    def sample(self, rng: random.Random) -> float:
        return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))


def trial_configs(search_space: dict[str, Any], num_samples: int = 1,
                  seed: int = 0) -> list[dict[str, Any]]:
    """``num_samples`` x the grid's product; random entries drawn per trial (seeded, so a
    retried sweep draws the same configs); plain values passed as they are."""
    if not isinstance(search_space, dict) or not search_space:
        raise ConfigurationError(
            "search_space takes a dict of name -> pd.grid([...]) / pd.choice([...]) / "
            "pd.uniform(a, b) / a plain value")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigurationError(f"num_samples must be at least 1 (got {num_samples!r})")
    for name, value in search_space.items():
        if isinstance(value, (grid, choice)) and not value.values:
            raise ConfigurationError(f"search_space[{name!r}] has no values to try")
    rng = random.Random(seed)
    grids = [(k, v.values) for k, v in search_space.items() if isinstance(v, grid)]
    configs = []
    for _ in range(num_samples):
        for combination in itertools.product(*(values for _, values in grids)):
            chosen = dict(zip((k for k, _ in grids), combination))
            configs.append({k: chosen[k] if isinstance(v, grid) else
                            v.sample(rng) if hasattr(v, "sample") else v
                            for k, v in search_space.items()})
    return configs


# -- the sweep ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuneResult:
    """The sweep's outcome: the best trial's config, checkpoint and metrics, and every trial's
    record (config, status, final and best metric, error, run path), best first."""

    metric: str
    mode: str
    best_config: dict[str, Any] | None
    best_checkpoint: Checkpoint | None
    best_metrics: dict[str, Any] | None
    best_trial: str | None
    trials: list[dict[str, Any]] = field(default_factory=list)
    sweep: str = ""
    path: str = ""


def tune(train_loop: Callable, *, search_space: dict[str, Any], metric: str, mode: str = "min",
         num_samples: int = 1, max_concurrent_trials: int | None = None,
         scheduler: TrialScheduler | None = None, config: dict[str, Any] | None = None,
         backend: Any = "torch", scaling: ScalingConfig | None = None,
         run: RunConfig | None = None, checkpoint: CheckpointConfig | None = None,
         failure: FailureConfig | None = None, callbacks: list[TrainingCallback] | None = None,
         scope: str = "last", seed: int = 0, ray_address: str | None = None,
         ray_init_kwargs: dict[str, Any] | None = None, ray_cluster: Any = None) -> TuneResult:
    """Run a sweep of ``train`` trials as a Prefect flow (a subflow inside a flow).

    Each trial's config is ``config`` updated with one point of ``search_space``. The best
    trial is the one with the best ``metric`` (``mode`` "min" or "max") in its last report
    (``scope="last"``) or in any report (``scope="all"``). ``run`` names the sweep and its
    storage; by default the name is stable within a flow run, so a retry finds its trials.
    """
    from prefect.task_runners import ThreadPoolTaskRunner

    from ..execution.cluster import groups_the_cluster_holds, ray_connection

    if mode not in ("min", "max") or scope not in ("last", "all"):
        raise ConfigurationError(f"mode {mode!r} / scope {scope!r}: use mode 'min' or 'max', "
                                 "scope 'last' or 'all'")
    configs = [{**(config or {}), **point} for point in trial_configs(search_space, num_samples,
                                                                       seed)]
    scaling = scaling or ScalingConfig()
    run = run or RunConfig()
    if run.name is None:
        run = dataclasses.replace(run, name=_sweep_name(train_loop, search_space, num_samples))
    if ray_cluster is not None:
        ray_address, ray_init_kwargs = ray_cluster.ray_init_arguments()
    with ray_connection(ray_address, ray_init_kwargs):  # one Ray for every trial of the sweep
        concurrency = min(max_concurrent_trials or len(configs), len(configs),
                          max(1, groups_the_cluster_holds(scaling)))
        sweep = _sweep_flow().with_options(
            name=f"tune-{getattr(train_loop, '__name__', 'train')}",
            flow_run_name=f"sweep-{run.name}",
            task_runner=ThreadPoolTaskRunner(max_workers=concurrency))
        return sweep(train_loop, configs, metric, mode, scope, scheduler, backend, scaling, run,
                     checkpoint, failure, callback_list(callbacks))


def _sweep_name(train_loop: Callable, search_space: dict, num_samples: int) -> str:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    # In a flow, the flow run's id: a Prefect retry finds the same sweep. Outside one, a fresh
    # name each call (a changed function must not find the old trials); give
    # RunConfig(name=...) to resume a sweep on purpose.
    flow_run = context.flow_run.id.hex[:8] if context and context.flow_run \
        else f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{uuid.uuid4().hex[:4]}"
    digest = hashlib.sha1(repr((getattr(train_loop, "__qualname__", ""), search_space,
                                num_samples)).encode()).hexdigest()[:6]
    return f"{run_name_part(train_loop)}-sweep-{flow_run}-{digest}"


def _sweep(train_loop: Callable, configs: list[dict], metric: str, mode: str, scope: str,
           scheduler: TrialScheduler | None, backend: Any, scaling: ScalingConfig,
           run: RunConfig, checkpoint: CheckpointConfig | None, failure: FailureConfig | None,
           callbacks: list[TrainingCallback]) -> TuneResult:
    from prefect.futures import as_completed
    from prefect.logging import get_run_logger

    from ..prefect.tasks import train

    logger = get_run_logger()
    url, options = run.resolved_storage()
    storage = RunStorage(url, run.name, options)
    if scheduler is not None:
        scheduler.bind(metric, mode)
    records: dict[str, dict[str, Any]] = {}
    futures = {}
    for number, trial_config in enumerate(configs):
        trial = f"trial_{number:03d}"
        earlier = storage.read_json(TRIALS, f"{trial}.json")
        if earlier and earlier.get("status") in ("completed", "stopped") \
                and earlier.get("config") == json.loads(json.dumps(trial_config, default=str)):
            records[trial] = {**earlier, "reused": True}
            if scheduler is not None:  # the scheduler knows the finished trials' reports
                for result in earlier.get("history", []):
                    scheduler.should_stop(trial, result)
            continue
        trial_callbacks = list(callbacks)
        if scheduler is not None:
            trial_callbacks.append(TrialSupervisor(scheduler, trial))
        futures[train.with_options(task_run_name=f"{trial}", retries=0).submit(
            train_loop, backend=backend, config=trial_config, scaling=scaling,
            run=dataclasses.replace(run, name=trial, storage=storage.run_url,
                                    storage_options=options),
            checkpoint=checkpoint, failure=failure, resume_from_checkpoint="latest",
            callbacks=trial_callbacks)] = (trial, trial_config, time.time())
    if records:
        logger.info("Reusing %d finished trial(s) of sweep %r from storage", len(records),
                    run.name)
    for future in as_completed(list(futures)):
        trial, trial_config, began = futures[future]
        outcome = future.result(raise_on_failure=False)
        records[trial] = _trial_record(trial, trial_config, outcome, metric, mode, began)
        storage.write_json(records[trial], TRIALS, f"{trial}.json")
        logger.info("Trial %s %s: %s=%s", trial, records[trial]["status"], metric,
                    records[trial]["final"])
    ordered = sorted(records.values(), key=lambda r: (_rank_key(r, scope, mode), r["trial"]))
    best = ordered[0] if ordered and _rank_key(ordered[0], scope, mode)[0] == 0 else None
    _publish_trials(run.name, ordered, metric, scope)
    return TuneResult(
        metric=metric, mode=mode, best_config=best["config"] if best else None,
        best_checkpoint=Checkpoint(best["checkpoint"]) if best and best["checkpoint"] else None,
        best_metrics=best["metrics"] if best else None, best_trial=best["trial"] if best else None,
        trials=ordered, sweep=run.name, path=redact_url(storage.run_url))


def _trial_record(trial: str, trial_config: dict, outcome: Any, metric: str, mode: str,
                  began: float) -> dict[str, Any]:
    ended = time.time()
    record: dict[str, Any] = {"trial": trial, "config": json.loads(json.dumps(
        trial_config, default=str)), "submitted": began, "ended": ended}
    if isinstance(outcome, BaseException):
        return {**record, "status": "failed", "error": f"{type(outcome).__name__}: {outcome}"[:500],
                "final": None, "best": None, "metrics": None, "checkpoint": None, "history": []}
    values = [m[metric] for m in outcome.metrics_history if score(m, metric) is not None]
    history = [{k: v for k, v in m.items() if isinstance(v, (int, float))}
               for m in outcome.metrics_history]
    # The trial's best checkpoint by the sweep's metric (its newest when none reports it).
    ordered = best_first([c for c, _ in outcome.best_checkpoints], metric, mode)
    best_checkpoint = ordered[0] if ordered else None
    return {**record, "started": ended - outcome.wall_time_s,
            "status": "stopped" if outcome.stopped_early else "completed",
            "stopped_because": outcome.stopped_early, "error": None,
            "final": values[-1] if values else None,
            "best": (min if mode == "min" else max)(values) if values else None,
            "reports": len(outcome.metrics_history), "metrics": outcome.metrics,
            "checkpoint": best_checkpoint.path if best_checkpoint else None,
            "run_path": outcome.path, "history": history}


def _rank_key(record: dict[str, Any], scope: str, mode: str) -> tuple[int, float]:
    """Trials best first, by the same rule as checkpoints: a trial without a real value of the
    metric (none reported, NaN) is never best."""
    value = score(record, "final" if scope == "last" else "best")
    if value is None:
        return (1, 0.0)
    return (0, value if mode == "min" else -value)


def _publish_trials(sweep: str, ordered: list[dict[str, Any]], metric: str, scope: str) -> None:
    from prefect.artifacts import create_table_artifact

    from ..prefect.artifacts import artifact_key, checkpoint_link

    rows = [{"trial": r["trial"], "config": json.dumps(r["config"], default=str),
             f"final {metric}": r["final"], f"best {metric}": r["best"], "status": r["status"],
             "reports": r.get("reports"), "why": r.get("error") or r.get("stopped_because") or "-",
             "checkpoint": checkpoint_link(r["checkpoint"]) if r["checkpoint"] else "-"}
            for r in ordered]
    create_table_artifact(table=rows, key=f"{artifact_key(sweep)}-trials",
                          description=f"Trials of sweep {sweep!r}, best first by {metric} "
                                      f"({scope} report)")


@functools.cache
def _sweep_flow() -> Any:
    """The sweep flow, built on first use so that importing this module needs no Prefect."""
    from prefect import flow

    return flow(name="tune", validate_parameters=False, log_prints=True)(_sweep)
