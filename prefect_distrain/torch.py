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

One module (over 350 lines) because it is one public module, ``pd.torch``, named as
``ray.train.torch``: what a torch training loop calls, and the state ``mode="auto"`` keeps.

Mixed precision: call ``accelerate(amp=True)`` first, prepare the optimizer with
``prepare_optimizer`` and call ``backward(loss)`` instead of ``loss.backward()`` (bf16 autocast
on CPU; fp16 with a gradient scaler on GPU). ``enable_reproducibility(seed)`` before building
the model makes two runs give the same weights. With ``CheckpointConfig(mode="auto")`` what
these helpers prepared is checkpointed before each pass over the training data.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import random
import tempfile
from typing import Any, Callable, Iterator

from .backends.torch import TorchConfig, cuda_device_index, import_torch
from .checkpoints.checkpoint import Checkpoint
from .exceptions import ConfigurationError, UnsafeCheckpointError
from .session import current_session
from .session.context import reset_before_each_run
from .torch_sharded import fully_shard, load_sharded, put_state, save_sharded, state_of
from .trainers import TorchTrainer

torch = import_torch()

from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import (  # noqa: E402
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
)

__all__ = ["TorchConfig", "TorchTrainer", "accelerate", "backward", "enable_reproducibility",
           "get_device", "load_sharded", "load_state", "prepare_data_loader", "prepare_model",
           "prepare_optimizer", "save_sharded"]


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
    """Move the model to this worker's device and wrap it in DistributedDataParallel, or with
    ``parallel_strategy="fsdp"`` shard its parameters across the ranks (FSDP2's
    ``fully_shard``, ``parallel_strategy_kwargs`` its options; save and load its state with
    ``save_sharded`` / ``load_sharded``, each rank its own shards).

    With one worker (or ``parallel_strategy=None``) the model is only moved: DDP over a world
    of one would cost a copy of every gradient for nothing.
    """
    if parallel_strategy not in ("ddp", "fsdp", None):
        raise ValueError(f"parallel_strategy {parallel_strategy!r}: use 'ddp', 'fsdp' or None")
    device = get_device()
    if move_to_device:
        model = model.to(device)
    _accelerator.prepared = True
    if _accelerator.amp:
        model.forward = _autocast(model.forward, device.type)
    auto = _auto_state()
    if auto is not None:
        auto.add_model(model, sharded=parallel_strategy == "fsdp")
    if parallel_strategy == "ddp" and _world_size() > 1:
        kwargs = dict(parallel_strategy_kwargs or {})
        if device.type == "cuda":
            kwargs.setdefault("device_ids", [device.index])
            kwargs.setdefault("output_device", device.index)
        model = DistributedDataParallel(model, **kwargs)
    if parallel_strategy == "fsdp" and _world_size() > 1:
        model = fully_shard(model, **dict(parallel_strategy_kwargs or {}))
    return model


def prepare_data_loader(data_loader: DataLoader, add_dist_sampler: bool = True,
                        move_to_device: bool = True) -> DataLoader | _DeviceLoader:
    """Give each rank its own share of the data and move batches to the device.

    Adds a DistributedSampler (shuffling if the loader shuffled) and calls its ``set_epoch``
    at the start of every pass, so each epoch shuffles differently but the same on all ranks.
    The first loader prepared is the training data of ``CheckpointConfig(mode="auto")``.
    """
    if _accelerator.seed is not None and data_loader.num_workers > 0 \
            and data_loader.worker_init_fn is None:
        data_loader.worker_init_fn = _seed_loader_worker
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
    session = current_session()
    auto = session.auto if session is not None and session.auto.claim_training_loader() \
        else None
    if not move_to_device and auto is None \
            and not isinstance(data_loader.sampler, DistributedSampler):
        return data_loader
    prepared = _DeviceLoader(data_loader, get_device() if move_to_device else None, auto)
    if auto is not None:  # the training data: its position goes with every report
        session.data_loader = prepared
        prepared.resume_at(session)
    return prepared


class _DeviceLoader:
    """Iterates a DataLoader, calling ``set_epoch`` per pass and moving batches to a device.

    A loop that calls ``loader.sampler.set_epoch(epoch)`` itself (as a loop resuming at epoch 3
    must, for the same data order as a run that never stopped) keeps its own epoch.

    The training data loader knows its position (epoch, batches consumed in the pass) for the
    reports; resumed from a checkpoint of its own run taken mid-pass, its pass of that epoch
    iterates only what no rank consumed before (session/positions.py).
    """

    def __init__(self, loader: DataLoader, device: torch.device | None, auto: Any = None):
        self.loader = loader
        self.device = device
        self.auto = auto  # set on the training data loader: it begins each pass
        self.passes = 0
        self._epoch_set = 0
        self.epoch = 0
        self.batches = 0  # consumed in the current pass
        self._world = (0, 1)  # (rank, world size)
        self._resume: dict[str, Any] | None = None  # the positions to continue from
        #: In a pass that continued a checkpoint's: the batches its rank had consumed (same
        #: world size), or the chain it continued (another world size), and its order.
        self._offset = 0
        self._base: dict[str, Any] | None = None
        self._order: dict[str, Any] | None = None

    def resume_at(self, session: Any) -> None:
        """Take the positions of the checkpoint this run resumes from, if it is this run's
        own (a warm start from another run begins its passes whole) and, in mode "auto", it
        was taken within a pass."""
        from .session.positions import own_positions

        context = session.context
        self._world = (context.get_world_rank(), context.get_world_size())
        self._resume = own_positions(session.resume_from, context.storage_url, "sampler",
                                     auto=session.auto.enabled)

    def position(self) -> dict[str, Any] | None:
        """Where this rank is in its training data: ``{"at": position, "base": chain}``
        (session/positions.py); None without a DistributedSampler to reproduce the order
        from."""
        sampler = self.loader.sampler
        order = self._order
        if order is None:
            if type(sampler) is not DistributedSampler or not self.loader.batch_size:
                return None
            order = {"size": len(sampler.dataset), "seed": sampler.seed,
                     "shuffle": sampler.shuffle, "drop_last": sampler.drop_last}
        at = {"epoch": self.epoch, "batches": self._offset + self.batches,
              "world_size": self._world[1] if self._order is not None else sampler.num_replicas,
              "batch_size": self.loader.batch_size, **order}
        return {"at": at, "base": self._base}

    def _continued(self, epoch: int) -> DataLoader | None:
        """For the pass of the resumed epoch: a loader over what no rank consumed yet (None,
        and the positions kept, for a pass of another epoch)."""
        from .session.positions import remaining, same_order

        chain = self._resume
        first = chain["ranks"][0]
        if first["epoch"] != epoch:
            return None
        self._resume = None
        sampler = self.loader.sampler
        now = {"size": len(self.loader.dataset), "batch_size": self.loader.batch_size}
        if type(sampler) is DistributedSampler:
            now.update(seed=sampler.seed, shuffle=sampler.shuffle, drop_last=sampler.drop_last)
        if not same_order(chain, now) or any(
                p["batch_size"] != now["batch_size"] for p in chain["ranks"].values()):
            logging.getLogger("prefect_distrain").warning(
                "The checkpoint's data positions were made for other data or another loader "
                "(%s; now %s): pass %d starts from its beginning", {k: first[k] for k in now},
                now, epoch)
            return None
        rank, world = self._world
        indices = remaining(chain, world, rank)[rank]
        self._order = {k: first[k] for k in ("size", "seed", "shuffle", "drop_last")}
        if world == first["world_size"] and not chain.get("base"):
            self._offset = chain["ranks"][rank]["batches"]  # the same order, further on
        else:
            self._base = chain
        source = self.loader
        return DataLoader(source.dataset, batch_size=source.batch_size, sampler=indices,
                          num_workers=source.num_workers, collate_fn=source.collate_fn,
                          pin_memory=source.pin_memory, drop_last=source.drop_last,
                          timeout=source.timeout, worker_init_fn=source.worker_init_fn,
                          generator=source.generator, prefetch_factor=source.prefetch_factor,
                          persistent_workers=source.persistent_workers)

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
        epoch = sampler.epoch if isinstance(sampler, DistributedSampler) else self.passes
        self.passes += 1
        replay = self.auto is not None and self.auto.begin_pass()
        self._offset, self._base, self._order = 0, None, None
        continued = self._continued(epoch) if self._resume is not None and not replay \
            else None
        if self.auto is not None and not replay:
            self.auto.went_on(continued is not None, "the data loader")
        if continued is None:
            batches = iter(self.loader)
        else:  # without drawing the seed the pass drew when it began (mode "auto" restored
            with torch.random.fork_rng(devices=[]):  # the random state after that draw)
                batches = iter(continued)
        # Checkpoints within the pass need a position to go on from (a DistributedSampler).
        within = self.auto is not None and self.position() is not None
        self.epoch, self.batches = epoch, 0
        session = current_session()  # each batch is progress, for the driver's hang detection
        for batch in batches:
            if session is not None:
                session.step()
            self.batches += 1
            yield batch if self.device is None else _to_device(batch, self.device)
            if replay:  # a pass done before the restart (mode "auto"): one batch, undone later
                return
            if within:
                self.auto.after_batch(self._offset + self.batches)


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
            present = sorted(checkpoint.manifest.files if checkpoint.manifest
                             else os.listdir(folder))
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


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor in a batch or output of nested lists, tuples (named
    ones too) and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        mapped = [_map_tensors(v, fn) for v in value]
        return type(value)(*mapped) if hasattr(value, "_fields") else type(value)(mapped)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    return _map_tensors(value, lambda t: t.to(device, non_blocking=device.type == "cuda"))


# -- mixed precision, reproducibility and automatic checkpoints --------------------------------


class _Accelerator:
    """This worker's choices, made by ``accelerate`` / ``enable_reproducibility``."""

    def __init__(self) -> None:
        self.amp = False
        self.scaler: Any = None
        self.seed: int | None = None
        self.prepared = False


_accelerator = _Accelerator()


@reset_before_each_run
def _new_run() -> None:
    """An earlier run's accelerate / enable_reproducibility choices end with it."""
    global _accelerator
    if _accelerator.seed is not None:  # what enable_reproducibility turned on, and only that
        torch.use_deterministic_algorithms(False)
    _accelerator = _Accelerator()


def accelerate(amp: bool = False) -> None:
    """Turn on automatic mixed precision for what is prepared next: the model's forward runs
    under autocast (bf16 on CPU, fp16 on GPU, outputs back in float32) and, on GPU,
    ``prepare_optimizer`` / ``backward`` scale the loss so fp16 gradients do not underflow.
    Call it before ``prepare_model``."""
    if _accelerator.prepared:
        raise ConfigurationError(
            "accelerate() must come before prepare_model(): call it first in the training "
            "function")
    _accelerator.amp = bool(amp)
    cuda = get_device().type == "cuda"
    _accelerator.scaler = torch.amp.GradScaler("cuda") if amp and cuda else None


def _autocast(forward: Callable, device_type: str) -> Callable:
    dtype = torch.float16 if device_type == "cuda" else torch.bfloat16

    @functools.wraps(forward)
    def forward_in_mixed_precision(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=device_type, dtype=dtype):
            outputs = forward(*args, **kwargs)
        return _map_tensors(outputs, lambda t: t.float() if t.is_floating_point() else t)

    return forward_in_mixed_precision


class _ScaledOptimizer(torch.optim.Optimizer):
    """The user's optimizer, stepping through the gradient scaler (fp16 on GPU); still an
    Optimizer, so learning-rate schedulers accept it."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: Any):
        self.optimizer = optimizer
        self.scaler = scaler

    def __getattr__(self, name: str) -> Any:
        if name in ("optimizer", "scaler"):
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def param_groups(self) -> Any:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def defaults(self) -> Any:  # type: ignore[override]
        return self.optimizer.defaults

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def step(self, closure: Callable | None = None) -> Any:
        result = self.scaler.step(self.optimizer, closure) if closure else \
            self.scaler.step(self.optimizer)
        self.scaler.update()
        return result


def prepare_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Ready the optimizer for ``accelerate(amp=True)`` (a gradient scaler on GPU) and for
    ``CheckpointConfig(mode="auto")``. Without either it is returned as it is."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigurationError(
            f"prepare_optimizer takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    auto = _auto_state()
    if auto is not None:
        auto.add_optimizer(optimizer)
    if _accelerator.scaler is not None:
        return _ScaledOptimizer(optimizer, _accelerator.scaler)
    return optimizer


def backward(loss: torch.Tensor) -> None:
    """``loss.backward()``, through the gradient scaler when mixed precision needs one."""
    if _accelerator.scaler is not None:
        _accelerator.scaler.scale(loss).backward()
    else:
        loss.backward()


def enable_reproducibility(seed: int = 0) -> None:
    """Seed every random generator (torch, numpy, random, data loader workers) and use
    deterministic algorithms only, so two runs with the same seed and world size give the same
    weights. Call it first in the training function. Slower on GPU; not for every op (torch
    raises on ops without a deterministic version)."""
    _accelerator.seed = seed
    torch.manual_seed(seed)
    _seed_python_and_numpy(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS (CUDA >= 10.2)


def _seed_loader_worker(worker_id: int) -> None:
    _seed_python_and_numpy(torch.initial_seed() % 2**32)


def _seed_python_and_numpy(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy
        numpy.random.seed(seed)
    except ImportError:
        pass


_STATE_FILE = "auto_state.pt"
#: The DCP folder of an FSDP model's state in mode "auto": each rank's own shards.
_SHARDED_STATE = "auto_sharded"


def _rng_file(rank: int) -> str:
    return f"auto_rng_rank{rank}.pt"


class _TorchAutoState:
    """The models and optimizers ``mode="auto"`` checkpoints; restores them (and the random
    state) where the first pass after a restart's replay begins."""

    def __init__(self, auto: Any):
        self.auto = auto
        self.models: list[torch.nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        #: A model prepared with parallel_strategy="fsdp" (sharded or, in a world of one, not):
        #: every rank saves its own shards with DCP, whatever the world size.
        self.sharded = False
        self._folder: str | None = None

    def _saved(self, name: str) -> Any:
        """A file of the resume checkpoint (downloaded once), or None on a fresh start."""
        checkpoint = self.auto.resume
        if self.auto.passes_done_at_resume == 0 or checkpoint is None:
            return None
        if self._folder is None:
            self._folder = checkpoint.to_directory(tempfile.mkdtemp(prefix="auto-resume-"))
        path = os.path.join(self._folder, name)
        if not os.path.exists(path):
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def add_model(self, model: torch.nn.Module, sharded: bool = False) -> None:
        self.models.append(model)
        self.sharded = self.sharded or sharded

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizers.append(optimizer)

    def save(self, folder: str, rank: int) -> None:
        if self.sharded:
            import torch.distributed.checkpoint as dcp

            dcp.save(self._sharded_state(), checkpoint_id=os.path.join(folder, _SHARDED_STATE))
        if rank == 0:
            torch.save({
                "models": [] if self.sharded else [_unwrapped(m).state_dict()
                                                   for m in self.models],
                "optimizers": [] if self.sharded else [o.state_dict() for o in self.optimizers],
                "scaler": _accelerator.scaler.state_dict() if _accelerator.scaler else None,
            }, os.path.join(folder, _STATE_FILE))
        torch.save(_random_state(), os.path.join(folder, _rng_file(rank)))

    def _sharded_state(self) -> dict[str, Any]:
        """Every model's state (with its optimizer's, paired in the order prepared)."""
        if len(self.optimizers) > len(self.models):
            raise ConfigurationError(
                f"mode='auto' with an FSDP model pairs each prepared optimizer with the model "
                f"prepared in the same order, but {len(self.optimizers)} optimizers were "
                f"prepared for {len(self.models)} model(s): prepare one optimizer per model, or "
                "checkpoint with pd.torch.save_sharded yourself (mode='manual')")
        return {f"model_{i}": state_of(model, optimizer)
                for i, (model, optimizer) in enumerate(self._pairs())}

    def _pairs(self) -> list[tuple[torch.nn.Module, torch.optim.Optimizer | None]]:
        return list(zip(self.models, self.optimizers + [None] * len(self.models)))

    def _resume_sharded(self) -> None:
        """DCP's files into the models in the sharding they have now (another world size, or
        none in a world of one)."""
        import torch.distributed.checkpoint as dcp

        state = self._sharded_state()
        dcp.load(state, checkpoint_id=os.path.join(self._folder, _SHARDED_STATE))
        for i, (model, optimizer) in enumerate(self._pairs()):
            put_state(model, optimizer, state[f"model_{i}"])

    def resume_pass(self) -> None:
        state = self._saved(_STATE_FILE)
        if state is None:
            return
        assert self._folder is not None
        if os.path.isfile(os.path.join(self._folder, _SHARDED_STATE, ".metadata")):
            self._resume_sharded()
        elif self.sharded and state["models"]:
            raise ConfigurationError(
                f"{self.auto.resume!r} holds whole models, saved without "
                "parallel_strategy='fsdp', but this run shards them: resume it with the "
                "parallel strategy it was saved with")
        for model, saved in zip(self.models, state["models"]):
            _unwrapped(model).load_state_dict(saved)
        for model in self.models:
            for parameter in model.parameters():
                parameter.grad = None  # the replayed steps' gradients
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        if state.get("scaler") and _accelerator.scaler is not None:
            _accelerator.scaler.load_state_dict(state["scaler"])
        rank = self.auto.rank
        randomness = self._saved(_rng_file(rank)) or self._saved(_rng_file(0))
        if randomness is not None:
            _set_random_state(randomness)


def _auto_state() -> _TorchAutoState | None:
    session = current_session()
    if session is None or not session.auto.enabled:
        return None
    if session.auto.state is None:
        session.auto.state = _TorchAutoState(session.auto)
    return session.auto.state


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _random_state() -> dict[str, Any]:
    """Every generator a training step may draw from, as tensors and plain values only (so
    that ``weights_only`` loading reads it back)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "python": (version, torch.tensor(internal, dtype=torch.int64), gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
        name, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    except ImportError:
        pass
    return state


def _set_random_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy
        name, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
