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
from typing import Any, Callable, Iterator

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
    if not isinstance(search_space, dict):
        raise ConfigurationError(
            "search_space takes a dict of name -> pd.grid([...]) / pd.choice([...]) / "
            "pd.uniform(a, b) / a plain value")
    for name, value in search_space.items():
        if isinstance(value, dict) and any(isinstance(v, (grid, choice, uniform, loguniform))
                                           for v in value.values()):
            raise ConfigurationError(
                f"search_space[{name!r}] is a dict with values to search inside: searched "
                f"values go at the top level, e.g. {{'{name}_lr': pd.grid([...])}}")
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
    #: Where a trial's config sits in Ray's ``Result.config``: a ``Tuner`` over a trainer
    #: nests it under "train_loop_config", as Ray does; None: the config itself.
    config_key: str | None = None

    # -- Ray Tune's ResultGrid -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.trials)

    def __getitem__(self, i: int) -> TrialResult:
        return TrialResult.of(self.trials[i], self.config_key)

    def __iter__(self) -> Iterator[TrialResult]:
        return (TrialResult.of(record, self.config_key) for record in self.trials)

    @property
    def errors(self) -> list[str]:
        return [r["error"] for r in self.trials if r.get("error")]

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_best_result(self, metric: str | None = None, mode: str | None = None,
                        scope: str = "last") -> TrialResult:
        """The best trial by ``metric`` (default: the sweep's) in its last report
        (``scope="last"``) or any (``"all"``); the rule of checkpoints: NaN is never best."""
        metric, mode = metric or self.metric, mode or self.mode
        if metric is None or mode not in ("min", "max") or scope not in ("last", "all"):
            raise ConfigurationError(
                f"get_best_result(metric={metric!r}, mode={mode!r}, scope={scope!r}): name a "
                "reported metric, mode 'min' or 'max', scope 'last' or 'all' (or give metric "
                "and mode to the sweep)")
        ordered = sorted(self.trials, key=lambda r: (
            _rank_key(_trial_value(r, metric, mode, scope), mode), r["trial"]))
        if not ordered or _trial_value(ordered[0], metric, mode, scope) is None:
            raise ValueError(f"no trial reported a real value of {metric!r}: "
                             f"{[r['trial'] for r in self.trials]}")
        return TrialResult.of(ordered[0], self.config_key)

    def get_best_config(self, metric: str | None = None, mode: str | None = None,
                        scope: str = "last") -> dict[str, Any]:
        """The config of ``get_best_result(metric, mode, scope)`` (Ray Tune's analysis)."""
        return self.get_best_result(metric, mode, scope).config

    def get_dataframe(self) -> Any:
        """One row per trial: its last metrics, status and config (``config/<key>``, as Ray
        names the columns)."""
        import pandas

        from .trackers import flatten

        return pandas.DataFrame([
            {"trial": t.trial, "status": t.status, "error": t.error, **(t.metrics or {}),
             **{f"config/{k}": v for k, v in flatten(t.config, sep="/").items()}}
            for t in self])


@dataclass(frozen=True)
class TrialResult:
    """One trial, with Ray's ``Result`` names: its config, last metrics, best checkpoint (by
    the sweep's metric), run path, error (the failure's type and message, or None) and every
    report's numbers (``metrics_history``)."""

    trial: str
    config: dict[str, Any]
    metrics: dict[str, Any] | None
    checkpoint: Checkpoint | None
    path: str | None
    error: str | None
    status: str
    metrics_history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, record: dict[str, Any], config_key: str | None = None) -> TrialResult:
        config = {config_key: record["config"]} if config_key else record["config"]
        return cls(trial=record["trial"], config=config, metrics=record.get("metrics"),
                   checkpoint=Checkpoint(record["checkpoint"]) if record.get("checkpoint")
                   else None, path=record.get("run_path"), error=record.get("error"),
                   status=record["status"], metrics_history=record.get("history", []))


def tune(train_loop: Callable, *, search_space: dict[str, Any], metric: str | None = None,
         mode: str = "min",
         num_samples: int = 1, max_concurrent_trials: int | None = None,
         scheduler: TrialScheduler | None = None, config: dict[str, Any] | None = None,
         backend: Any = "torch", scaling: ScalingConfig | None = None,
         run: RunConfig | None = None, checkpoint: CheckpointConfig | None = None,
         failure: FailureConfig | None = None, callbacks: list[TrainingCallback] | None = None,
         scope: str = "last", seed: int = 0, datasets: dict[str, Any] | None = None,
         data_config: Any = None, ray_address: str | None = None,
         ray_init_kwargs: dict[str, Any] | None = None, ray_cluster: Any = None) -> TuneResult:
    """Run a sweep of ``train`` trials as a Prefect flow (a subflow inside a flow).

    Each trial's config is ``config`` updated with one point of ``search_space``. The best
    trial is the one with the best ``metric`` (``mode`` "min" or "max") in its last report
    (``scope="last"``) or in any report (``scope="all"``). ``run`` names the sweep and its
    storage; by default the name is stable within a flow run, so a retry finds its trials,
    and new at each call outside a flow (give ``run=RunConfig(name=...)`` to resume a sweep).
    ``datasets`` / ``data_config``: as for ``train``, every trial reads its shards of them.
    Without a ``metric`` the trials are kept in order and ``get_best_result(metric, mode)``
    picks afterwards.
    """
    from prefect.task_runners import ThreadPoolTaskRunner

    from ..execution.cluster import groups_the_cluster_holds, ray_connection

    if metric is None and scheduler is not None and getattr(scheduler, "metric", None) is None:
        raise ConfigurationError("a scheduler needs the metric it compares: give metric=...")
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
                     checkpoint, failure, callback_list(callbacks), datasets, data_config)


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune's ``TuneConfig``: what the sweep compares and how many trials run."""

    metric: str | None = None
    mode: str = "min"
    num_samples: int = 1
    max_concurrent_trials: int | None = None
    scheduler: TrialScheduler | None = None
    search_alg: Any = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.search_alg is not None:
            raise ConfigurationError(
                "search_alg is not supported: sweeps draw from pd.grid / pd.choice / "
                "pd.uniform / pd.loguniform (Tune's grid_search, choice, uniform, loguniform)")


class Tuner:
    """Ray Tune's ``Tuner`` over ``tune``: ``trainable`` is a ``TorchTrainer`` (any
    ``DataParallelTrainer``), whose ``param_space={"train_loop_config": {...}}`` is searched,
    or a plain function (one worker, no framework set up) whose ``param_space`` is its config.
    A trial's ``Result.config`` has the shape of ``param_space``, as in Ray.

    ```python
    tuner = Tuner(trainer, param_space={"train_loop_config": {"lr": grid_search([1e-3, 1e-2])}},
                  tune_config=TuneConfig(metric="loss", mode="min"))
    results = tuner.fit()      # results.get_best_result().config["train_loop_config"]["lr"]
    ```
    """

    def __init__(self, trainable: Any, *, param_space: dict[str, Any] | None = None,
                 tune_config: TuneConfig | None = None, run_config: Any = None):
        from ..trainers import DataParallelTrainer

        space = dict(param_space or {})
        self.config_key: str | None = "train_loop_config"
        if not isinstance(trainable, DataParallelTrainer):
            if not callable(trainable):
                raise ConfigurationError(
                    f"Tuner takes a trainer (e.g. TorchTrainer) or a training function, got "
                    f"{type(trainable).__name__}")
            from ..backends import BackendConfig

            trainable = DataParallelTrainer(trainable, backend_config=BackendConfig())
            space, self.config_key = {"train_loop_config": space}, None
        loop_space = space.pop("train_loop_config", {})
        if space:
            raise ConfigurationError(
                f"param_space keys {sorted(space)} cannot be searched: put the values to try "
                "under param_space={'train_loop_config': {...}} and read them from the config")
        if not isinstance(loop_space, dict):
            raise ConfigurationError("param_space['train_loop_config'] takes a dict")
        self.trainable = trainable
        self.search_space = loop_space
        self.tune_config = tune_config or TuneConfig()
        self.run_config = run_config

    def fit(self) -> TuneResult:
        """Run the sweep; Ray's ``ResultGrid`` names on the result (``get_best_result``)."""
        trainable = self.trainable if self.run_config is None \
            else self.trainable.replace(run_config=self.run_config)
        arguments = trainable.train_arguments()
        if arguments.pop("resume_from_checkpoint") is not None:
            raise ConfigurationError("a Tuner's trainer resumes each trial from its own "
                                     "checkpoints: leave resume_from_checkpoint unset")
        base = dict(arguments.pop("config") or {})
        options = self.tune_config
        result = tune(trainable.train_loop_per_worker, search_space=self.search_space,
                      metric=options.metric, mode=options.mode, num_samples=options.num_samples,
                      max_concurrent_trials=options.max_concurrent_trials,
                      scheduler=options.scheduler, seed=options.seed, config=base, **arguments)
        return dataclasses.replace(result, config_key=self.config_key)


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
           callbacks: list[TrainingCallback], datasets: dict[str, Any] | None = None,
           data_config: Any = None) -> TuneResult:
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
            callbacks=trial_callbacks, datasets=datasets, data_config=data_config)] = (
                trial, trial_config, time.time())
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
    def value(record: dict[str, Any]) -> float | None:
        return score(record, "final" if scope == "last" else "best")

    ordered = sorted(records.values(), key=lambda r: (_rank_key(value(r), mode), r["trial"]))
    best = ordered[0] if ordered and value(ordered[0]) is not None else None
    _publish_trials(run.name, ordered, metric, scope)
    return TuneResult(
        metric=metric, mode=mode, best_config=best["config"] if best else None,
        best_checkpoint=Checkpoint(best["checkpoint"]) if best and best["checkpoint"] else None,
        best_metrics=best["metrics"] if best else None, best_trial=best["trial"] if best else None,
        trials=ordered, sweep=run.name, path=redact_url(storage.run_url))


def _trial_record(trial: str, trial_config: dict, outcome: Any, metric: str | None, mode: str,
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


def _trial_value(record: dict[str, Any], metric: str, mode: str, scope: str) -> float | None:
    """The trial's real value of ``metric``: in its last report that has one (``"last"``),
    or its best (``"all"``); None when it reported none (or only NaN)."""
    values = [h[metric] for h in record.get("history", []) if score(h, metric) is not None]
    if not values:
        return None
    return values[-1] if scope == "last" else (min if mode == "min" else max)(values)


def _rank_key(value: float | None, mode: str) -> tuple[int, float]:
    """Trials best first, by the same rule as checkpoints: a trial without a real value of the
    metric (none reported, NaN) is never best."""
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
