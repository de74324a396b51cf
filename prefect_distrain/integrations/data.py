"""Datasets handed to training: Ray Datasets, or parquet / CSV files at an fsspec URL.

```python
@flow
def pipeline():
    url = prepare_features()                     # an upstream task writes parquet, returns its URL
    pd.train(train_loop, datasets={"train": url}, scaling=pd.ScalingConfig(num_workers=2))

def train_loop(config):
    shard = pd.get_dataset_shard("train")         # this worker's share, disjoint from the others'
    for epoch in range(config["epochs"]):
        for batch in shard.iter_torch_batches(batch_size=64):
            ...
```
Each start of the worker group splits every dataset anew (``Dataset.streaming_split``), so after
a restart or an elastic resize the shards follow the new world size. Ray Data is imported only
when a run has datasets.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..checkpoints import fs as fsutil
from ..exceptions import ConfigurationError

#: File formats a dataset URL may hold, by file extension.
FORMATS = {".parquet": "parquet", ".csv": "csv"}


def import_ray_data() -> Any:
    try:
        import ray.data
    except ImportError as error:
        raise ImportError(
            "datasets=... needs Ray Data: pip install 'prefect-distrain[data]' (or "
            f"'ray[data]') ({error})") from error
    return ray.data


@dataclass(frozen=True)
class DataConfig:
    """Which datasets are split between the workers.

    ``datasets_to_split``: ``"all"`` (default) or a list of names; every other dataset reaches
    each worker whole (e.g. a small validation set every rank evaluates). ``equal=True`` gives
    every worker exactly the same number of rows (dropping at most ``world_size - 1`` rows), as
    DDP needs: a rank with one batch more would wait forever in its extra allreduce.

    ``on_data_change``: what a resume or warm start does when the datasets differ from those
    its checkpoint was trained on (a file added, removed or rewritten; see
    data_fingerprint.py): "warn" (default: logged and listed in the run's summary), "fail"
    (``DataChangedError`` before anything trains) or "ignore".
    """

    datasets_to_split: str | tuple[str, ...] = "all"
    equal: bool = True
    on_data_change: str = "warn"

    def __post_init__(self) -> None:
        split = self.datasets_to_split
        if split != "all" and not (isinstance(split, (list, tuple))
                                   and all(isinstance(n, str) for n in split)):
            raise ConfigurationError(
                f"datasets_to_split {split!r}: use 'all' or a list of dataset names")
        if isinstance(split, list):
            object.__setattr__(self, "datasets_to_split", tuple(split))
        if self.on_data_change not in ("warn", "fail", "ignore"):
            raise ConfigurationError(
                f"on_data_change {self.on_data_change!r}: use 'warn', 'fail' or 'ignore'")


def read_dataset(url: str, storage_options: Mapping[str, Any] | None = None,
                 format: str | None = None) -> Any:
    """A Ray Dataset of the parquet or CSV files at ``url`` (a file or a folder, any fsspec URL).

    ``format``: "parquet" or "csv"; by default taken from the files' extension.
    """
    data = import_ray_data()
    fs, path = fsutil.filesystem(url, dict(storage_options or {}))
    if not fs.exists(path):
        raise ConfigurationError(
            f"dataset {url!r} does not exist: pass the URL the upstream task wrote to (a "
            "parquet or CSV file, or a folder of them)")
    files = [path] if fs.isfile(path) else sorted(
        f for f in fs.find(path) if os.path.splitext(f)[1] in FORMATS)
    if not files:
        raise ConfigurationError(
            f"dataset {url!r} holds no {' or '.join(FORMATS)} files: write the dataset as "
            "parquet or CSV, or pass a Ray Dataset")
    if format is None:
        found = {FORMATS.get(os.path.splitext(f)[1]) for f in files}
        if len(found) != 1 or None in found:
            raise ConfigurationError(
                f"dataset {url!r} mixes or lacks file types ({sorted(map(str, found))}): pass "
                "format='parquet' or format='csv', or keep one format per folder")
        format = found.pop()
    if format not in FORMATS.values():
        raise ConfigurationError(f"format {format!r}: use 'parquet' or 'csv'")
    filesystem = None
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" not in protocols and "local" not in protocols:
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        filesystem = PyFileSystem(FSSpecHandler(fs))  # Ray Data reads through the same fs
    reader = data.read_parquet if format == "parquet" else data.read_csv
    return reader(files, filesystem=filesystem)


def resolve_datasets(datasets: Mapping[str, Any] | None, storage_url: str = "",
                     storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check names and types; read URLs as Ray Datasets, with the run's storage options where
    the URL is on the same kind of storage (e.g. both s3://)."""
    from fsspec.utils import get_protocol

    if not datasets:
        return {}
    if not isinstance(datasets, Mapping):
        raise ConfigurationError(
            f"datasets takes a dict of name -> Ray Dataset or URL, got {type(datasets).__name__}:"
            " e.g. datasets={'train': 's3://bucket/features/'}")
    data = import_ray_data()
    resolved = {}
    for name, value in datasets.items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"dataset names must be non-empty strings, got {name!r}")
        if isinstance(value, (str, os.PathLike)):
            url = os.fspath(value)
            same = get_protocol(url) == get_protocol(storage_url or "file://")
            value = read_dataset(url, storage_options if same else None)
        if not isinstance(value, data.Dataset):
            raise ConfigurationError(
                f"dataset {name!r} is a {type(value).__name__}: pass a Ray Dataset "
                "(ray.data.from_pandas(...), ray.data.read_parquet(...)) or the URL of parquet "
                "/ CSV files")
        resolved[name] = value
    return resolved


def needs_tasks(datasets: Mapping[str, Any] | None) -> bool:
    """Whether reading the datasets runs Ray tasks (each needs a CPU): anything not already
    materialized in Ray's object store."""
    if not datasets:
        return False
    import_ray_data()
    from ray.data.dataset import MaterializedDataset

    return any(not isinstance(ds, MaterializedDataset) for ds in datasets.values())


def split_datasets(datasets: Mapping[str, Any], world_size: int, config: DataConfig,
                   node_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """One ``{name: DataIterator}`` per rank: split datasets streamed in disjoint shares, the
    others whole. Called at every start of the group, with its current size."""
    names = set(datasets)
    split = names if config.datasets_to_split == "all" else set(config.datasets_to_split)
    unknown = split - names
    if unknown:
        raise ConfigurationError(
            f"DataConfig.datasets_to_split names {sorted(unknown)}, which are not in datasets "
            f"({sorted(names)})")
    hints = list(node_ids) if node_ids is not None else None
    shards: list[dict[str, Any]] = [{} for _ in range(world_size)]
    for name, dataset in datasets.items():
        if name in split:
            iterators = dataset.streaming_split(world_size, equal=config.equal,
                                                locality_hints=hints)
        else:
            iterators = [dataset.iterator() for _ in range(world_size)]
        for rank, iterator in enumerate(iterators):
            shards[rank][name] = iterator
    return shards
