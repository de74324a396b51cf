"""The Prefect task ``train``: validate, start the worker group, run, return a TrainResult.

```python
from prefect import flow
import prefect_distrain as pd

@flow
def retrain():
    result = pd.train(train_loop, backend="torch", config={"epochs": 3},
                      scaling=pd.ScalingConfig(num_workers=2))
    return result.metrics
```
The task holds no state of its own: everything lives in the Trainer it builds and shuts down.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from .artifacts import PrefectArtifacts, publish_checkpoint_table
from .backends import BackendConfig
from .callbacks import TrainingCallback
from .checkpoint import Checkpoint
from .config import CheckpointConfig, RunConfig, ScalingConfig
from .result import TrainResult
from .trainer import Trainer


def _task_run_name() -> str:
    from prefect.runtime import task_run

    backend = task_run.parameters.get("backend", "torch")
    name = backend if isinstance(backend, str) else getattr(backend, "name", "custom")
    return f"train-{name}"


# No cache: a training run has effects (checkpoints, metrics) and its inputs (a function,
# callbacks) do not hash into a meaningful key.
@task(name="train", cache_policy=NO_CACHE, task_run_name=_task_run_name)
def train(
    train_loop: Callable,
    *,
    backend: str | BackendConfig = "torch",
    config: Any = None,
    scaling: ScalingConfig | None = None,
    run: RunConfig | None = None,
    checkpoint: CheckpointConfig | None = None,
    resume_from_checkpoint: Checkpoint | str | None = None,
    callbacks: list[TrainingCallback] | None = None,
    ray_address: str | None = None,
    ray_init_kwargs: dict[str, Any] | None = None,
) -> TrainResult:
    """Run ``train_loop(config)`` on a Ray worker group with the chosen backend.

    Uses the Ray this process is connected to, else ``ray_address`` / ``RAY_ADDRESS``, else a
    local Ray that it starts and stops. Returns the metrics, the checkpoints and every rank's
    return value; raises the training function's own exception (with its rank) if one fails.
    Every committed checkpoint appears as a link artifact, and the kept ones as a table.
    """
    began = time.monotonic()
    logger = get_run_logger()
    trainer = Trainer(backend, scaling=scaling or ScalingConfig(), run=run, checkpoint=checkpoint,
                      ray_address=ray_address, ray_init_kwargs=ray_init_kwargs, logger=logger)
    with trainer:
        result = trainer.fit(train_loop, config=config,
                             callbacks=[*(callbacks or []), PrefectArtifacts()],
                             resume_from_checkpoint=resume_from_checkpoint)
    publish_checkpoint_table(result)
    logger.info("Training finished in %.1f s on %d worker(s); final metrics: %s",
                time.monotonic() - began, result.world_size,
                {k: v for k, v in (result.metrics or {}).items() if not k.startswith("_")})
    return result
