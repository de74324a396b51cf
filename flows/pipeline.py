"""A data pipeline hands its output to training, and an evaluation consumes the best checkpoint.

    python flows/pipeline.py

``prepare_digits`` (an ordinary Prefect task) writes the train/test split to fsspec storage and
returns its URI; ``pd.train`` trains on it with 2 workers, each reading the URI; ``evaluate``
loads the run's best checkpoint and scores it on the held-out split.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

import fsspec
from prefect import flow, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits import accuracy, build_model, digits_loop, load_arrays  # noqa: E402

import prefect_distrain as pd  # noqa: E402

DEFAULT_STORAGE = os.path.join(tempfile.gettempdir(), "prefect-distrain")


@task
def prepare_digits(storage: str, seed: int = 0) -> str:
    """Scale, split and write the digits data set; returns the URI of the arrays."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.25, random_state=seed)
    buffer = io.BytesIO()
    np.savez(buffer, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    uri = f"{storage.rstrip('/')}/datasets/digits-seed{seed}.npz"
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, buffer.getvalue())
    return uri


@task
def evaluate(checkpoint: pd.Checkpoint, data_uri: str, hidden: int) -> float:
    """Test accuracy of a committed checkpoint, loaded safely (weights only, hash-checked)."""
    import torch

    arrays = load_arrays(data_uri)
    model = build_model(hidden)
    model.load_state_dict(pd.torch.load_state(checkpoint, "state.pt", map_location="cpu")["model"])
    return accuracy(model, torch.tensor(arrays["x_test"], dtype=torch.float32),
                    torch.tensor(arrays["y_test"], dtype=torch.long))


@flow(name="digits-pipeline", log_prints=True)
def pipeline(storage: str = DEFAULT_STORAGE, epochs: int = 5, num_workers: int = 2,
             hidden: int = 64) -> float:
    data_uri = prepare_digits(storage)
    result = pd.train(digits_loop, config={"data_uri": data_uri, "epochs": epochs,
                                           "hidden": hidden, "lr": 0.05},
                      scaling=pd.ScalingConfig(num_workers=num_workers),
                      run=pd.RunConfig(storage=storage, total=epochs),
                      checkpoint=pd.CheckpointConfig(num_to_keep=2,
                                                     checkpoint_score_attribute="accuracy",
                                                     checkpoint_score_order="max"))
    best, metrics = result.best_checkpoints[0]
    score = evaluate(best, data_uri, hidden)
    print(f"Best checkpoint {best.index} of run {result.run_name}: test accuracy {score:.3f}")
    return score


if __name__ == "__main__":
    pipeline()
