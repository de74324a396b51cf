"""The Prefect task ``train``: validate, start the worker group, run, return a TrainResult.

Retries: ``train.with_options(retries=N)`` (or a flow with ``retries=N``) resumes by itself.
The default run name is ``<function>-<flow run id, 8 hex>-<digest of backend, config and
scaling>`` (``-1``, ``-2``... for repeated identical calls), the same for every retry of the task
and of the flow run, so a retry finds the run's checkpoints; on a retry,
``resume_from_checkpoint=None`` becomes ``"latest"``. Prefect retries only
infrastructure failures (``retry_on_infrastructure``): the user's bug fails once.

```python
from prefect import flow
import prefect_distrain as pd

@flow
def retrain():
    result = pd.train(train_loop, backend="torch", config={"epochs": 3},
                      scaling=pd.ScalingConfig(num_workers=2))
    return result.metrics
```
The task holds no state of its own: everything lives in the Trainer it builds and shuts down,
except that within a flow run the worker group stays warm for the flow's next ``train`` with the
same backend and scaling (warm_pool.py), until the flow run ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import threading
import time
from typing import Any, Callable, Iterator

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

from ..backends import BackendConfig
from ..callbacks import TrainingCallback, callback_list
from ..checkpoints.checkpoint import Checkpoint
from ..config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, run_name_part
from ..exceptions import ConfigurationError
from ..execution import warm_pool
from ..execution.failure_policy import is_retryable
from ..execution.trainer import Trainer
from ..integrations.data import DataConfig
from ..result import TrainResult
from . import lineage
from .artifacts import PrefectArtifacts, PrefectProgress, publish_checkpoint_table, publish_run


def _task_run_name() -> str:
    from prefect.runtime import task_run

    backend = task_run.parameters.get("backend", "torch")
    name = backend if isinstance(backend, str) else getattr(backend, "name", "custom")
    return f"train-{name}"


def retry_on_infrastructure(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry lost workers, collective timeouts, storage errors
    and a busy cluster; never the user's bug (the same exception on every rank, or fatal)."""
    try:
        error = state.result(raise_on_failure=False)
    except BaseException as failure:  # noqa: BLE001 - some states raise instead of returning
        error = failure
    return isinstance(error, BaseException) and is_retryable(error)


_names_lock = threading.Lock()
_names_by_task_run: dict[Any, str] = {}
_calls_by_identity: dict[tuple, int] = {}


def _stable_run_name(train_loop: Callable, identity: tuple) -> str | None:
    """``<function>-<flow run id, 8 hex>-<digest of backend, config, scaling>[-N]``.

    The same for every retry of this task (same task run) and of its flow run (the flow
    function runs again and makes the same calls); ``-N`` tells apart the N-th identical call
    within one run of the flow. Prefect's own dynamic keys are random in this engine, so they
    can't serve. None outside a flow run.
    """
    from prefect.runtime import flow_run

    context = TaskRunContext.get()
    if context is None or context.task_run.flow_run_id is None:
        return None
    task_run = context.task_run
    with _names_lock:
        if task_run.id in _names_by_task_run:
            return _names_by_task_run[task_run.id]
        digest = hashlib.sha1(repr(identity).encode()).hexdigest()[:6]
        key = (task_run.flow_run_id, flow_run.run_count, digest)
        duplicate = _calls_by_identity.get(key, 0)
        _calls_by_identity[key] = duplicate + 1
        name = f"{run_name_part(train_loop)}-{task_run.flow_run_id.hex[:8]}-{digest}"
        name += f"-{duplicate}" if duplicate else ""
        _names_by_task_run[task_run.id] = name
        return name


@contextlib.contextmanager
def _slots(scaling: ScalingConfig, logger: Any) -> Iterator[None]:
    """The run's slots of ``ScalingConfig.concurrency_limit``, held while it trains."""
    if scaling.concurrency_limit is None:
        yield
        return
    from prefect.concurrency.sync import concurrency

    logger.info("Waiting for %d slot(s) of concurrency limit %r", scaling.slots,
                scaling.concurrency_limit)
    try:
        with concurrency(scaling.concurrency_limit, occupy=scaling.slots, strict=True):
            yield
    except Exception as error:
        if type(error).__name__ == "ConcurrencySlotAcquisitionError":
            raise ConfigurationError(
                f"ScalingConfig(concurrency_limit={scaling.concurrency_limit!r}): {error}. "
                f"Create it first: prefect gcl create {scaling.concurrency_limit} --limit N"
            ) from error
        raise


class _QuietOutsideFlows(logging.Filter):
    """Prefect's API log handler cannot send the last line of a task run outside a flow
    ("Finished in state ...", logged after the run's context ended): it drops it with a
    warning. For ``train``'s own runs it is dropped quietly; other tasks are left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.task_runs: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return bool(getattr(record, "flow_run_id", None)) \
            or str(getattr(record, "task_run_id", "")) not in self.task_runs


_quiet = _QuietOutsideFlows()


def _quiet_outside_flows(context: TaskRunContext | None) -> None:
    if context is None or context.task_run.flow_run_id is not None:
        return
    from prefect.logging.handlers import APILogHandler

    _quiet.task_runs.add(str(context.task_run.id))
    for handler in logging.getLogger("prefect.task_runs").handlers:
        if isinstance(handler, APILogHandler) and _quiet not in handler.filters:
            handler.addFilter(_quiet)


def _end_warm_groups_with_flow_run() -> str | None:
    """Within a flow run, a finished ``train`` leaves its worker group warm for the next one
    (warm_pool.py) until the flow run ends: a hook on the flow (once) ends the groups its runs
    left. The flow run's id; None outside a flow run, and in a Ray worker (a task of
    prefect-ray's runner, whose flow's end this process never sees): nothing is kept warm."""
    import ray
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None or context.flow is None:
        return None
    if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        return None
    flow = context.flow
    for hooks in (flow.on_completion_hooks, flow.on_failure_hooks, flow.on_cancellation_hooks,
                  flow.on_crashed_hooks):
        if end_warm_worker_groups not in hooks:
            hooks.append(end_warm_worker_groups)
    return str(context.flow_run.id)


def end_warm_worker_groups(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook: the worker groups that this flow run's ``train`` calls left warm end."""
    warm_pool.drain(str(flow_run.id))


def _is_prefect_retry() -> bool:
    from prefect.runtime import flow_run, task_run

    return (task_run.run_count or 1) > 1 or (flow_run.run_count or 1) > 1


# No cache: a training run has effects (checkpoints, metrics) and its inputs (a function,
# callbacks) do not hash into a meaningful key.
@task(name="train", cache_policy=NO_CACHE, task_run_name=_task_run_name,
      retry_condition_fn=retry_on_infrastructure)
def train(
    train_loop: Callable,
    *,
    backend: str | BackendConfig = "torch",
    config: Any = None,
    scaling: ScalingConfig | None = None,
    run: RunConfig | None = None,
    checkpoint: CheckpointConfig | None = None,
    failure: FailureConfig | None = None,
    resume_from_checkpoint: Checkpoint | str | None = None,
    callbacks: list[TrainingCallback] | None = None,
    datasets: dict[str, Any] | None = None,
    data_config: DataConfig | None = None,
    ray_address: str | None = None,
    ray_init_kwargs: dict[str, Any] | None = None,
    ray_cluster: Any = None,
) -> TrainResult:
    """Run ``train_loop(config)`` on a Ray worker group with the chosen backend.

    Uses the Ray this process is connected to, else ``ray_address`` / ``RAY_ADDRESS``, else a
    local Ray that it starts and stops. Returns the metrics, the checkpoints and every rank's
    return value; raises the training function's own exception (with its rank) if one fails.
    ``ray_cluster``: a ``prefect_distrain.blocks.RayCluster`` block (address, runtime_env, init
    options) instead of ``ray_address`` / ``ray_init_kwargs``. ``datasets``: name -> Ray
    Dataset or URL of parquet / CSV files (e.g. what an upstream task wrote); each worker reads
    its share with ``pd.get_dataset_shard(name)``.

    In Prefect: worker log lines and prints in the run log with their rank; a progress
    artifact (with ``RunConfig(total=...)``); a link artifact and a
    ``prefect-distrain.checkpoint.committed`` event per committed checkpoint; tables of the kept
    checkpoints and of the attempts; and a summary with a chart of the metrics (with the
    failing rank's traceback and every rank's last log lines after a failure), followed by a
    ``prefect-distrain.run.completed`` or ``.failed`` event; and the run's model as an asset
    materialized from its datasets and upstream assets (lineage.py).
    """
    began = time.monotonic()
    logger = get_run_logger()
    run = run or RunConfig()
    identity = (getattr(train_loop, "__qualname__", ""), backend, config, scaling)
    if run.name is None and (name := _stable_run_name(train_loop, identity)) is not None:
        run = dataclasses.replace(run, name=name)
    if resume_from_checkpoint is None and _is_prefect_retry():
        logger.info("This is a Prefect retry: resuming run %r from its latest checkpoint", run.name)
        resume_from_checkpoint = "latest"
    if ray_cluster is not None:
        ray_address, ray_init_kwargs = ray_cluster.ray_init_arguments()
    owner = _end_warm_groups_with_flow_run()
    trainer = Trainer(backend, scaling=scaling or ScalingConfig(), run=run, checkpoint=checkpoint,
                      failure=failure, ray_address=ray_address, ray_init_kwargs=ray_init_kwargs,
                      logger=logger, keep_warm=owner is not None)
    trainer.warm_owner = owner
    context = TaskRunContext.get()
    _quiet_outside_flows(context)
    if context is not None:  # the run's lease names this task run: its retries take it over
        trainer.holder.update(task_run_id=str(context.task_run.id),
                              flow_run_id=str(context.task_run.flow_run_id))
    shown = [PrefectArtifacts()]
    if run.total:
        shown.append(PrefectProgress(run.total, run.progress_key))
    result, error, model = None, None, None
    try:
        with _slots(trainer.scaling, logger), trainer:
            result = trainer.fit(train_loop, config=config,
                                 callbacks=[*callback_list(callbacks), *shown],
                                 resume_from_checkpoint=resume_from_checkpoint,
                                 datasets=datasets, data_config=data_config)
    except BaseException as failure:
        error = failure
        raise
    finally:
        if trainer.storage is not None:
            model = lineage.declare(trainer.storage.run_url, datasets, resume_from_checkpoint)
            publish_run(trainer.run_report(result, error, time.monotonic() - began), logger)
    lineage.describe(model, result, config)
    publish_checkpoint_table(result)
    if result.stopped_early:
        logger.info("The run stopped early (%s); it is complete, not failed", result.stopped_early)
    logger.info("Training finished in %.1f s on %d worker(s); final metrics: %s",
                time.monotonic() - began, result.world_size,
                {k: v for k, v in (result.metrics or {}).items() if not k.startswith("_")})
    return result
