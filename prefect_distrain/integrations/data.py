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

The training dataset ("train", or the only one split) is split in its own order
(``preserve_order``), so a world size always splits it the same way: a rank's share of a pass
is known by the rows it consumed, and a checkpoint keeps them as its data position
(session/positions.py). A resume of the same world size skips them on each rank; one of another
size first gathers what no rank consumed (``rest_of_pass``, in Ray's object store) and splits
that over the new ranks for the interrupted pass.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..checkpoints import fs as fsutil
from ..exceptions import ConfigurationError

#: The most ranks whose shares ``rest_of_pass`` reads again (one Ray task each).
MAX_SHARES = 4096
#: File formats a dataset URL may hold, by file extension.
FORMATS = {".parquet": "parquet", ".csv": "csv"}
#: Held while a parquet read sets Ray Data's reader choice aside.
_READER_CHOICE = threading.Lock()


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

    Parquet is read with Ray Data's first reader, which reads the files' footers once, here.
    Its second (Ray 2.60's default) lists and reads them again on every pass, in 32
    new actors: 5-7 s a pass for 3 small files on 2 cores, against 0.4 s.
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
    # One read task per file: blocks then follow the files, not the cluster's CPU count (which
    # Ray's default multiplies them by), so a pass splits the same way after a node is lost
    # and a data position still names the same rows.
    blocks = {"override_num_blocks": len(files)}
    if format == "csv":
        return data.read_csv(files, filesystem=filesystem, **blocks)
    with _READER_CHOICE:  # one read at a time: two must not restore each other's choice
        context = data.DataContext.get_current()
        v2 = getattr(context, "use_datasource_v2", False)
        context.use_datasource_v2 = False  # decided at read time only; the dataset keeps a copy
        try:
            return data.read_parquet(files, filesystem=filesystem, **blocks)
        finally:
            if v2:
                context.use_datasource_v2 = v2


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


@dataclass
class TrainingData:
    """A rank's share of the training dataset, and where its pass ``epoch`` goes on from after
    a resume: ``skip`` rows of ``continued`` (or of ``iterator``, the share of every pass,
    when None), the positions of the chain ``base`` that ``continued`` continues."""

    iterator: Any
    world_size: int
    epoch: int = 0
    skip: int = 0
    continued: Any = None
    base: dict[str, Any] | None = None


def training_dataset(datasets: Mapping[str, Any], config: DataConfig) -> str | None:
    """The dataset whose position checkpoints keep: "train", or the only split one."""
    split = list(datasets) if config.datasets_to_split == "all" else \
        [n for n in config.datasets_to_split if n in datasets]
    if "train" in split:
        return "train"
    return split[0] if len(split) == 1 else None


def _ordered(dataset: Any) -> Any:
    """``dataset`` executing in its own order: ``streaming_split`` then splits it the same
    way for the same world size."""
    options = copy.deepcopy(dataset.context.execution_options)
    options.preserve_order = True
    dataset.context.execution_options = options
    return dataset


def _rest_of_share(iterator: Any, skip: int) -> tuple[int, Any]:
    """A Ray task: the rows of one rank's share after its first ``skip``, as one table."""
    import pyarrow

    tables, left = [], skip
    for block in iterator.iter_batches(batch_size=None, batch_format="pyarrow"):
        if left >= block.num_rows:
            left -= block.num_rows
            continue
        tables.append(block.slice(left))
        left = 0
    table = pyarrow.concat_tables(tables) if tables else None
    return (table.num_rows if table is not None else 0), table


def rest_of_pass(dataset: Any, chain: dict[str, Any], equal: bool = True) -> Any:
    """What no rank consumed of the pass ``chain`` stopped in, as a Dataset in the order of
    the ranks that held it (every share read at once: the split waits for all of them)."""
    import ray

    data = import_ray_data()
    source = rest_of_pass(dataset, chain["base"], equal) if chain.get("base") else dataset
    ranks = chain["ranks"]
    if len(ranks) > MAX_SHARES:
        raise ValueError(f"a chain of {len(ranks)} ranks (at most {MAX_SHARES})")
    shares = _ordered(source).streaming_split(len(ranks), equal=equal)
    task = ray.remote(_rest_of_share).options(num_cpus=0, num_returns=2)
    parts = [task.remote(shares[r], ranks[r]["rows"]) for r in range(len(ranks))]
    counts = ray.get([count for count, _ in parts])
    tables = [table for (_, table), n in zip(parts, counts) if n]
    return data.from_arrow_refs(tables) if tables else data.from_items([])


def split_datasets(datasets: Mapping[str, Any], world_size: int, config: DataConfig,
                   node_ids: Iterable[str] | None = None,
                   positions: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One ``{name: DataIterator}`` per rank: split datasets streamed in disjoint shares, the
    others whole; the training dataset's as ``TrainingData``, going on from ``positions`` (a
    Ray Data shard's chain, session/positions.py). Called at every start of the group, with
    its current size."""
    names = set(datasets)
    split = names if config.datasets_to_split == "all" else set(config.datasets_to_split)
    unknown = split - names
    if unknown:
        raise ConfigurationError(
            f"DataConfig.datasets_to_split names {sorted(unknown)}, which are not in datasets "
            f"({sorted(names)})")
    hints = list(node_ids) if node_ids is not None else None
    training = training_dataset(datasets, config)
    shards: list[dict[str, Any]] = [{} for _ in range(world_size)]
    for name, dataset in datasets.items():
        if name not in split:
            shares: list[Any] = [dataset.iterator() for _ in range(world_size)]
        elif name != training:
            shares = dataset.streaming_split(world_size, equal=config.equal,
                                             locality_hints=hints)
        else:
            dataset = _ordered(dataset)
            iterators = dataset.streaming_split(world_size, equal=config.equal,
                                                locality_hints=hints)
            try:
                shares = _continuations(dataset, iterators, positions, config.equal)
            except Exception as error:  # noqa: BLE001 - the pass can always start over
                logging.getLogger("prefect_distrain").warning(
                    "The interrupted pass of %r can't go on from the checkpoint's data "
                    "positions (%s: %s): it starts from its beginning", name,
                    type(error).__name__, str(error)[:300])
                shares = _continuations(dataset, iterators, None, config.equal)
        for rank, share in enumerate(shares):
            shards[rank][name] = share
    return shards


def _continuations(dataset: Any, iterators: list[Any], chain: dict[str, Any] | None,
                   equal: bool) -> list[TrainingData]:
    """Each rank's ``TrainingData``: with a chain, where the pass it stopped in goes on."""
    world = len(iterators)
    if not chain or not (chain.get("base") or any(p["rows"] for p in chain["ranks"].values())):
        epoch = chain["ranks"][0]["epoch"] if chain else 0
        return [TrainingData(it, world, epoch) for it in iterators]
    epoch = chain["ranks"][0]["epoch"]
    if len(chain["ranks"]) == world:  # the same shares: each rank skips what it consumed
        base = chain.get("base")
        continued = _ordered(rest_of_pass(dataset, base, equal)).streaming_split(
            world, equal=equal) if base else [None] * world
        return [TrainingData(it, world, epoch, chain["ranks"][r]["rows"], continued[r], base)
                for r, it in enumerate(iterators)]
    rest = _ordered(rest_of_pass(dataset, chain, equal)).streaming_split(world, equal=equal)
    return [TrainingData(it, world, epoch, 0, rest[r], chain) for r, it in enumerate(iterators)]
