"""PyTorch helpers for the training function, named as in ``ray.train.torch``.

```python
import prefect_distrain as pd

def train_loop(config):
    model = pd.torch.prepare_model(Net())            # on pd.torch.get_device(), wrapped in DDP
    loader = pd.torch.prepare_data_loader(DataLoader(ds, batch_size=64, shuffle=True))
    for epoch in range(config["epochs"]):
        for x, y in loader:                           # this rank's share, already on the device
            ...
```
``batch_size`` stays per worker: the global batch is ``batch_size * get_world_size()``.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Iterator

from .backends.torch import TorchConfig, cuda_device_index, import_torch
from .checkpoint import Checkpoint
from .exceptions import UnsafeCheckpointError

torch = import_torch()

from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import (  # noqa: E402
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
)

__all__ = ["TorchConfig", "get_device", "load_state", "prepare_data_loader", "prepare_model"]


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_device() -> torch.device:
    """This worker's device: its own GPU when the run has ``use_gpu``, else the CPU."""
    index = cuda_device_index()
    if index is not None and torch.cuda.is_available():
        return torch.device("cuda", index)
    return torch.device("cpu")


def prepare_model(model: torch.nn.Module, move_to_device: bool = True,
                  parallel_strategy: str | None = "ddp",
                  parallel_strategy_kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
    """Move the model to this worker's device and wrap it in DistributedDataParallel.

    With one worker (or ``parallel_strategy=None``) the model is only moved: DDP over a world
    of one would cost a copy of every gradient for nothing.
    """
    if parallel_strategy not in ("ddp", None):
        raise ValueError(f"parallel_strategy {parallel_strategy!r}: use 'ddp' or None")
    device = get_device()
    if move_to_device:
        model = model.to(device)
    if parallel_strategy == "ddp" and _world_size() > 1:
        kwargs = dict(parallel_strategy_kwargs or {})
        if device.type == "cuda":
            kwargs.setdefault("device_ids", [device.index])
            kwargs.setdefault("output_device", device.index)
        model = DistributedDataParallel(model, **kwargs)
    return model


def prepare_data_loader(data_loader: DataLoader, add_dist_sampler: bool = True,
                        move_to_device: bool = True) -> DataLoader | _DeviceLoader:
    """Give each rank its own share of the data and move batches to the device.

    Adds a DistributedSampler (shuffling if the loader shuffled) and calls its ``set_epoch``
    at the start of every pass, so each epoch shuffles differently but the same on all ranks.
    """
    if (add_dist_sampler and _world_size() > 1
            and not isinstance(data_loader.dataset, IterableDataset)
            and not isinstance(data_loader.sampler, DistributedSampler)
            and type(data_loader.batch_sampler) is BatchSampler):
        shuffle = isinstance(data_loader.sampler, RandomSampler)
        data_loader = DataLoader(
            data_loader.dataset,
            batch_size=data_loader.batch_size,
            sampler=DistributedSampler(data_loader.dataset, shuffle=shuffle),
            num_workers=data_loader.num_workers,
            collate_fn=data_loader.collate_fn,
            pin_memory=data_loader.pin_memory,
            drop_last=data_loader.drop_last,
            timeout=data_loader.timeout,
            worker_init_fn=data_loader.worker_init_fn,
            generator=data_loader.generator,
            prefetch_factor=data_loader.prefetch_factor,
            persistent_workers=data_loader.persistent_workers,
        )
    if not move_to_device and not isinstance(data_loader.sampler, DistributedSampler):
        return data_loader
    return _DeviceLoader(data_loader, get_device() if move_to_device else None)


class _DeviceLoader:
    """Iterates a DataLoader, calling ``set_epoch`` per pass and moving batches to a device.

    A loop that calls ``loader.sampler.set_epoch(epoch)`` itself (as a loop resuming at epoch 3
    must, for the same data order as a run that never stopped) keeps its own epoch.
    """

    def __init__(self, loader: DataLoader, device: torch.device | None):
        self.loader = loader
        self.device = device
        self.passes = 0
        self._epoch_set = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # dataset, batch_size, sampler, ...
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        sampler = self.loader.sampler
        if isinstance(sampler, DistributedSampler) and sampler.epoch == self._epoch_set:
            sampler.set_epoch(self.passes)  # nobody else set it: count the passes
            self._epoch_set = self.passes
        self.passes += 1
        for batch in self.loader:
            yield batch if self.device is None else _to_device(batch, self.device)


def load_state(checkpoint: Checkpoint, filename: str = "model.pt",
               map_location: Any = None) -> Any:
    """Load a file of a checkpoint with ``torch.load(weights_only=True)``.

    Only tensors and plain containers load; a file whose pickle would build other objects (and
    could run code) raises UnsafeCheckpointError. There is no automatic fallback: if you trust
    the file, call ``torch.load(..., weights_only=False)`` yourself.
    """
    with checkpoint.as_directory() as folder:
        path = os.path.join(folder, *filename.split("/"))
        if not os.path.isfile(path):
            present = sorted((checkpoint.manifest or {}).get("files", {})) or os.listdir(folder)
            raise FileNotFoundError(
                f"checkpoint {checkpoint!r} has no file {filename!r} (it has: {present})")
        try:
            return torch.load(path, map_location=map_location or get_device(), weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafeCheckpointError(
                f"refused to load {filename!r} from {checkpoint!r}: it holds objects other than "
                "tensors and plain containers, and unpickling them could run code. Save "
                "state_dict()s (not whole modules), or if you trust the file, load it with "
                "torch.load(..., weights_only=False) yourself") from error


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=device.type == "cuda")
    if isinstance(value, (list, tuple)):
        moved = [_to_device(v, device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else type(value)(moved)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value
