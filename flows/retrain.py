"""Scheduled retraining: each run warm-starts from the best checkpoint of the previous
retraining run and writes its checkpoints under a new run name, ``<model>-<UTC time>``.

    python flows/retrain.py                      # once, here
    (see deployments/prefect.yaml for the nightly deployment)

The first retraining finds no earlier run and trains from scratch; every later one fine-tunes
the previous run's best model on freshly prepared data.
"""

from __future__ import annotations

import datetime
import os
import sys

import fsspec
from prefect import flow

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits import digits_loop  # noqa: E402
from pipeline import DEFAULT_STORAGE, evaluate, prepare_digits  # noqa: E402

import prefect_distrain as pd  # noqa: E402


def previous_runs(storage: str, model: str) -> list[str]:
    """Earlier retraining runs of ``model`` in storage, oldest first (names sort by time)."""
    fs, root = fsspec.core.url_to_fs(storage)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(f"{model}-"))


@flow(name="digits-retraining", log_prints=True)
def retrain(storage: str = DEFAULT_STORAGE, model: str = "digits", epochs: int = 3,
            num_workers: int = 2, hidden: int = 64, ray_address: str | None = None) -> dict:
    data_uri = prepare_digits(storage, seed=datetime.date.today().toordinal() % 1000)
    start_from = None
    for earlier in reversed(previous_runs(storage, model)):
        start_from = pd.best_checkpoint(pd.RunConfig(name=earlier, storage=storage),
                                        "accuracy", mode="max")
        if start_from is not None:
            print(f"warm start from {earlier} checkpoint {start_from.index} "
                  f"(accuracy {start_from.metrics['accuracy']:.3f})")
            break
    else:
        print("no earlier run: training from scratch")
    name = f"{model}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    result = pd.train(digits_loop, config={"data_uri": data_uri, "epochs": epochs,
                                           "hidden": hidden, "lr": 0.02},
                      scaling=pd.ScalingConfig(num_workers=num_workers),
                      run=pd.RunConfig(name=name, storage=storage, total=epochs),
                      resume_from_checkpoint=start_from, ray_address=ray_address)
    best, metrics = result.best_checkpoints[0]
    score = evaluate(best, data_uri, hidden)
    print(f"retrained run {name}: test accuracy {score:.3f}")
    return {"run": name, "accuracy": score, "warm_started": start_from is not None}


if __name__ == "__main__":
    retrain()
