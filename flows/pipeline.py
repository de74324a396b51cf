"""A data pipeline hands its output to training, and an evaluation consumes the best checkpoint.

    python flows/pipeline.py

``publish_digits`` writes the train/test split to fsspec storage, returns its URI and
materializes it as the Prefect asset ``digits-data`` (key: the URI); ``pd.train`` trains on
it with 2 workers, each reading the URI, and materializes the run's model asset downstream of
it. Each committed checkpoint is validated on the held-out split off the training path
(``pd.Validation``), and the best by that score is kept; ``evaluate`` scores it again.

``digits_data`` is the data step alone: the deployment ``digits-on-new-data``
(deployments/prefect.yaml) retrains whenever it materializes a new data set.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

import fsspec
from prefect import flow, task
from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits import accuracy, build_model, digits_loop, load_arrays  # noqa: E402

import prefect_distrain as pd  # noqa: E402

DEFAULT_STORAGE = os.path.join(tempfile.gettempdir(), "prefect-distrain")
#: The data set's asset name: what the retraining deployment's trigger matches.
DATA_ASSET = "digits-data"


def digits_uri(storage: str, seed: int) -> str:
    return f"{storage.rstrip('/')}/datasets/digits-seed{seed}.npz"


def data_asset(uri: str) -> Asset:
    """The data set as a Prefect asset: its URI is the key (a local path as ``file://``)."""
    key = uri if "://" in uri else f"file://{os.path.abspath(uri)}"
    return Asset(key=key, properties=AssetProperties(
        name=DATA_ASSET, description="The digits data set, scaled and split (npz)"))


def write_digits(storage: str, seed: int) -> tuple[str, dict]:
    """Scale, split and write the digits data set; the URI of the arrays, and their sizes."""
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
    return uri, {"seed": seed, "train_rows": len(y_train), "test_rows": len(y_test)}


@task
def prepare_digits(storage: str, seed: int = 0) -> str:
    """The data set for one retraining run (no asset event: nothing else follows it)."""
    return write_digits(storage, seed)[0]


@materialize(data_asset(digits_uri(DEFAULT_STORAGE, 0)), by="scikit-learn")
def publish_digits(storage: str, seed: int = 0) -> str:
    """The data set, published as the ``digits-data`` asset (called with its own asset:
    ``publish_digits.with_options(assets=[data_asset(uri)])``)."""
    uri, sizes = write_digits(storage, seed)
    add_asset_metadata(data_asset(uri), sizes)
    return uri


def publish(storage: str, seed: int = 0) -> str:
    """Publish the data set in ``storage`` as its own asset; its URI."""
    return publish_digits.with_options(assets=[data_asset(digits_uri(storage, seed))])(
        storage, seed)


@flow(name="digits-data", log_prints=True)
def digits_data(storage: str = DEFAULT_STORAGE, seed: int = 0) -> str:
    """The data step alone: a new data set for the retraining that follows it."""
    uri = publish(storage, seed)
    print(f"published {uri}")
    return uri


def validate_digits(checkpoint: pd.Checkpoint, config: dict) -> dict:
    """Held-out accuracy of a committed checkpoint, off the training path (a Ray task)."""
    import torch

    arrays = load_arrays(config["data_uri"])
    model = build_model(config["hidden"])
    model.load_state_dict(pd.torch.load_state(checkpoint, "state.pt")["model"])
    return {"val_accuracy": accuracy(model, torch.tensor(arrays["x_test"], dtype=torch.float32),
                                     torch.tensor(arrays["y_test"], dtype=torch.long))}


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
    data_uri = publish(storage)
    config = {"data_uri": data_uri, "epochs": epochs, "hidden": hidden, "lr": 0.05}
    result = pd.train(digits_loop, config=config,
                      scaling=pd.ScalingConfig(num_workers=num_workers),
                      run=pd.RunConfig(storage=storage, total=epochs),
                      checkpoint=pd.CheckpointConfig(
                          num_to_keep=2, checkpoint_score_attribute="val_accuracy",
                          validate=pd.Validation(validate_digits, config=config)))
    best, metrics = result.best_checkpoints[0]
    score = evaluate(best, data_uri, hidden)
    print(f"Best checkpoint {best.index} of run {result.run_name} ({best.status}, "
          f"val_accuracy {metrics.get('val_accuracy', float('nan')):.3f}): test accuracy "
          f"{score:.3f}")
    return score


if __name__ == "__main__":
    pipeline()
