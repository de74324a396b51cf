"""Sharded torch state: every rank saves and uploads only what it owns (FSDP), into one checkpoint.

```python
model = pd.torch.prepare_model(Net(), parallel_strategy="fsdp")   # FSDP2: parameters sharded
...
with tempfile.TemporaryDirectory() as folder:
    pd.torch.save_sharded(folder, model, optimizer)              # this rank's shards (DCP)
    pd.report(metrics, checkpoint=pd.Checkpoint.from_directory(folder))   # on every rank
...
if (checkpoint := pd.get_checkpoint()) is not None:
    pd.torch.load_sharded(checkpoint, model, optimizer)          # resharded to this world
```
The files are PyTorch Distributed Checkpoint's (``torch.distributed.checkpoint``): one
``__<rank>_0.distcp`` per rank and rank 0's ``.metadata``, under ``sharded/``. Each rank uploads
its own file, all at once, and the checkpoint commits once every rank's are in. A load reads
them into whatever sharding the model has now, so a run may resume on another world size.
"""

from __future__ import annotations

import os
from typing import Any

from .backends.torch import import_torch
from .checkpoints.checkpoint import Checkpoint

torch = import_torch()

#: The folder of a checkpoint that holds the DCP files.
SHARDED_FOLDER = "sharded"


def fully_shard(model: Any, **kwargs: Any) -> Any:
    """FSDP2 over the whole world: the model's parameters sharded across the ranks."""
    from torch.distributed.fsdp import fully_shard as shard

    return shard(model, **kwargs)


def state_of(model: Any, optimizer: Any = None) -> dict[str, Any]:
    """What DCP saves and loads: the model's (and optimizer's) state, each rank its own shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(folder: str | os.PathLike, model: Any, optimizer: Any = None) -> None:
    """On every rank at once (a collective): write this rank's shards of ``model`` (and
    ``optimizer``) into ``folder``; then report ``folder`` as a checkpoint from every rank."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state_of(model, optimizer), checkpoint_id=os.path.join(folder, SHARDED_FOLDER))


def load_sharded(checkpoint: Checkpoint | str | os.PathLike, model: Any,
                 optimizer: Any = None) -> None:
    """On every rank at once: load what ``save_sharded`` wrote into ``model`` (and
    ``optimizer``), in the sharding they have now. ``checkpoint``: a Checkpoint (its files are
    verified as they download) or a local folder."""
    import torch.distributed.checkpoint as dcp

    if isinstance(checkpoint, Checkpoint):
        with checkpoint.as_directory() as folder:
            load_sharded(folder, model, optimizer)
        return
    path = os.path.join(checkpoint, SHARDED_FOLDER)
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(
            f"no sharded state in {checkpoint}: save it with pd.torch.save_sharded(folder, "
            "model, optimizer) on every rank and report the folder from every rank")
    state = state_of(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    put_state(model, optimizer, state)


def put_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """``state_of``'s state, loaded by DCP, into ``model`` (and ``optimizer``)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
