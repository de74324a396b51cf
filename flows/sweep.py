"""A learning-rate sweep of the digits model: every trial a `train` task run, 2 at a time.

    python flows/sweep.py

``prepare_digits`` writes the data once; ``pd.tune`` runs one ``train`` per point of the search
space (4 learning rates x a random hidden size), stops trials that fall behind at each rung
(ASHA), and publishes a table of the trials, best first. A Prefect retry of this flow reuses
the trials that finished.
"""

from __future__ import annotations

import os
import sys
import tempfile

from prefect import flow

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits import digits_loop  # noqa: E402
from pipeline import prepare_digits  # noqa: E402

import prefect_distrain as pd  # noqa: E402

DEFAULT_STORAGE = os.path.join(tempfile.gettempdir(), "prefect-distrain")


@flow(name="digits-sweep", log_prints=True, retries=1)
def sweep(storage: str = DEFAULT_STORAGE, epochs: int = 4, num_workers: int = 2,
          learning_rates: tuple[float, ...] = (0.3, 0.1, 0.01, 0.001),
          early_stopping: bool = True) -> pd.TuneResult:
    data_uri = prepare_digits(storage)
    result = pd.tune(
        digits_loop, config={"data_uri": data_uri, "epochs": epochs},
        search_space={"lr": pd.grid(list(learning_rates)), "hidden": pd.choice([32, 64])},
        metric="accuracy", mode="max", max_concurrent_trials=2,
        scheduler=pd.ASHAScheduler(grace_period=2, reduction_factor=2) if early_stopping else None,
        scaling=pd.ScalingConfig(num_workers=num_workers),
        run=pd.RunConfig(storage=storage))
    for trial in result.trials:
        print(f"{trial['trial']}: lr={trial['config']['lr']:g} hidden={trial['config']['hidden']} "
              f"{trial['status']}, accuracy {trial['final']}")
    print(f"Best: {result.best_config} (accuracy {result.best_metrics['accuracy']:.3f})")
    return result


if __name__ == "__main__":
    sweep()
