"""A data pipeline on prefect-ray's ``RayTaskRunner`` hands its result to ``pd.train`` on the
same Ray cluster.

    python flows/ray_pipeline.py                         # a temporary local Ray for the flow run
    RAY_ADDRESS=127.0.0.1:6379 python flows/ray_pipeline.py   # a cluster that is running

Two preprocessing tasks run as Ray tasks: ``scale_digits`` scales scikit-learn's bundled digits
to [0, 1] and writes them to fsspec storage; ``split_digits`` splits them into training and test
arrays, which ``digits_loop`` (flows/digits.py) trains on. ``pd.train`` is submitted to the same
runner: it runs as a Ray task too, places its 2 workers on the same cluster (no second Ray
starts) and holds no CPU of its own, so on a 2-CPU machine its 2 workers fit beside it. Every
task, ``train`` included, logs to its own task run in the flow's Prefect API:
``pd.ray_task_runner`` passes the flow's API address on to the Ray tasks, so none of them starts
an ephemeral Prefect server of its own.

With a Prefect server, the same flow runs from a deployment; with a ``RayCluster`` block, one
definition serves the runner and ``train``::

    cluster = RayCluster(address="ray://head:10001", runtime_env={"pip": ["scikit-learn"]})
    cluster.save("prod")
    @flow(task_runner=pd.ray_task_runner("prod"))   # loaded when the flow run starts
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

from prefect import flow, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits import digits_loop, load_arrays  # noqa: E402

import prefect_distrain as pd  # noqa: E402

DEFAULT_STORAGE = os.path.join(tempfile.gettempdir(), "prefect-distrain")


def _save(url: str, storage_options: dict | None, **arrays) -> str:
    import numpy as np
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url, **(storage_options or {}))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with fs.open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return url


@task
def scale_digits(storage: str, storage_options: dict | None = None) -> str:
    """Preprocessing 1: the digits' pixels scaled to [0, 1], written to storage."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _save(f"{storage.rstrip('/')}/datasets/digits-scaled.npz", storage_options,
                 x=(digits.data / 16.0).astype("float32"), y=digits.target.astype("int64"))


@task
def split_digits(url: str, storage_options: dict | None = None, test_size: float = 0.25,
                 seed: int = 0) -> str:
    """Preprocessing 2: a stratified train / test split of the scaled data, in the file
    layout ``digits_loop`` reads; its URL."""
    from sklearn.model_selection import train_test_split

    data = load_arrays(url, storage_options)
    x_train, x_test, y_train, y_test = train_test_split(
        data["x"], data["y"], test_size=test_size, random_state=seed, stratify=data["y"])
    return _save(f"{url.rsplit('/', 1)[0]}/digits-split.npz", storage_options,
                 x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


@flow(name="digits-ray-pipeline", log_prints=True, task_runner=pd.ray_task_runner())
def ray_pipeline(storage: str = DEFAULT_STORAGE, storage_options: dict | None = None,
                 epochs: int = 5, num_workers: int = 2) -> float:
    scaled = scale_digits.submit(storage, storage_options)
    data_uri = split_digits.submit(scaled, storage_options)
    result = pd.train.with_options(retries=1).submit(
        digits_loop,
        config={"epochs": epochs, "lr": 0.05, "hidden": 64, "data_uri": data_uri,
                "storage_options": storage_options},
        scaling=pd.ScalingConfig(num_workers=num_workers),
        run=pd.RunConfig(storage=storage, storage_options=storage_options or {}, total=epochs),
        checkpoint=pd.CheckpointConfig(num_to_keep=2),
    ).result()
    for metrics in result.metrics_history:
        print(f"epoch {metrics['epoch']}: loss {metrics['loss']:.4f}  "
              f"test accuracy {metrics['accuracy']:.3f}")
    print(f"Final test accuracy: {result.metrics['accuracy']:.3f}")
    return result.metrics["accuracy"]


if __name__ == "__main__":
    ray_pipeline(storage=os.environ.get("PIPELINE_STORAGE", DEFAULT_STORAGE))
