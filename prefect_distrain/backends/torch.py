"""PyTorch DDP: every rank joins one process group (gloo on CPU, nccl on GPU).

Rank 0 opens the rendezvous store (a TCPStore listening on a port the kernel picks), then every
rank gets MASTER_ADDR / MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and NODE_RANK
(what torchrun would set, so code written for torchrun works) and all ranks call
``init_process_group`` on that store at once. The store listens before any rank connects: a
rank that connects too early would back off for up to a second (torch's retry), and a port
picked first and bound later could be taken meanwhile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, ClassVar

from .. import settings
from .base import Backend, BackendConfig, error_type

if TYPE_CHECKING:
    from ..execution.worker_group import WorkerGroup

_INSTALL_HINT = "pip install 'prefect-distrain[torch]'"

#: The CUDA device index of this worker within its CUDA_VISIBLE_DEVICES, or None on CPU.
_cuda_device_index: int | None = None
#: On rank 0, between ``_open_store`` and ``_join_process_group``: the rendezvous store.
_store = None


def import_torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"the torch backend needs PyTorch: {_INSTALL_HINT}") from error
    return torch


def cuda_device_index() -> int | None:
    return _cuda_device_index


class _TorchBackend(Backend):
    def on_start(self, worker_group: WorkerGroup, config: TorchConfig) -> None:
        use_gpu = worker_group.scaling.use_gpu
        timeout = settings.settings().backend_setup_timeout_s
        if use_gpu:
            gpus_by_node: dict[str, list[str]] = {}
            for member in worker_group.members:
                ids = gpus_by_node.setdefault(member.metadata["node_id"], [])
                ids.extend(g for g in member.metadata["gpu_ids"] if g not in ids)
            gpus_by_node = {k: sorted(v, key=lambda g: (len(g), g))
                            for k, v in gpus_by_node.items()}
            worker_group.execute(_share_node_gpus, gpus_by_node, timeout=timeout)
        address, port = worker_group.execute(_open_store, config.timeout_s, timeout=timeout)[0]
        worker_group.execute(_join_process_group, address, port,
                             config.process_group_backend(use_gpu), config.timeout_s,
                             timeout=timeout)

    def is_runtime_failure(self, error: BaseException) -> bool:
        # DistError covers DistBackendError (e.g. an nccl collective timeout), DistNetworkError
        # and DistStoreError; gloo on CPU raises a plain RuntimeError from its transport ("...
        # gloo/transport/tcp/... Timed out waiting 5000ms for recv", "Connection closed by
        # peer" on the other ranks). Either is the runtime, not the user's code.
        kind = error_type(error)
        if kind in _DIST_ERRORS:
            return True
        return kind == "builtins.RuntimeError" and any(mark in str(error)
                                                       for mark in _RUNTIME_MARKS)

    def on_shutdown(self, worker_group: WorkerGroup, config: TorchConfig) -> None:
        worker_group.execute(_leave_process_group, timeout=settings.settings().shutdown_timeout_s)


@dataclass(frozen=True)
class TorchConfig(BackendConfig):
    """Options of the torch backend.

    ``backend``: "gloo" or "nccl"; None picks nccl with GPUs and gloo without.
    ``timeout_s``: collective timeout; 1800 s is torch's own default, long enough for a slow
    first step or a checkpoint on one rank while the others wait in a collective.
    """

    backend: str | None = None
    timeout_s: float = 1800.0

    name: ClassVar[str] = "torch"
    backend_cls: ClassVar[type[Backend]] = _TorchBackend
    #: The process group is destroyed at a run's end and joined anew (a new store) at the next.
    reusable: ClassVar[bool] = True

    def process_group_backend(self, use_gpu: bool) -> str:
        return self.backend or ("nccl" if use_gpu else "gloo")

    def check_scaling(self, use_gpu: bool) -> None:
        from ..exceptions import ConfigurationError

        if self.backend not in (None, "gloo", "nccl"):
            raise ConfigurationError(
                f"TorchConfig(backend={self.backend!r}): use 'gloo', 'nccl', or None (nccl with "
                "GPUs, gloo without)")
        if self.backend == "nccl" and not use_gpu:
            raise ConfigurationError(
                "TorchConfig(backend='nccl') needs GPUs, but the workers have none: set "
                "use_gpu=True, or use backend='gloo' (or None: nccl with GPUs, gloo without)")


#: What torch's collectives put in a plain RuntimeError when a peer is gone or too slow.
_DIST_ERRORS = {f"torch.distributed.{name}" for name in (
    "DistError", "DistBackendError", "DistNetworkError", "DistStoreError")}
_RUNTIME_MARKS = ("gloo/transport", "Connection closed by peer", "Connection reset by peer",
                  "Timed out waiting", "ProcessGroupGloo", "ProcessGroupNCCL",
                  "Watchdog caught collective operation timeout")


def _share_node_gpus(gpus_by_node: dict[str, list[str]]) -> None:
    """Let every worker see all GPUs its node gives the group (nccl needs peers visible), and
    remember which of them is this worker's own."""
    import ray

    global _cuda_device_index
    own = [str(g) for g in ray.get_gpu_ids()]
    node_gpus = gpus_by_node[ray.get_runtime_context().get_node_id()]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)
    _cuda_device_index = node_gpus.index(own[0]) if own else None


def _open_store(timeout_s: float) -> tuple[str, int] | None:
    """Every rank imports torch (at once, not one after the other); rank 0 opens the group's
    rendezvous store, listening on a free port, and returns its address."""
    import ray

    from ..session.context import get_worker_info

    global _store
    import_torch()
    import torch.distributed as dist

    if get_worker_info().world_rank != 0:
        return None
    address = ray.util.get_node_ip_address()
    _store = dist.TCPStore(address, 0, None, True, timedelta(seconds=timeout_s),
                           wait_for_workers=False)
    return address, _store.port


def _join_process_group(master_addr: str, master_port: int, backend: str, timeout_s: float) -> None:
    from ..session.context import get_worker_info, set_any_rank

    global _store
    torch = import_torch()
    import torch.distributed as dist

    info = get_worker_info()
    store, _store = _store, None  # rank 0's own; the others connect to it
    if store is None:
        store = dist.TCPStore(master_addr, master_port, None, False,
                              timedelta(seconds=timeout_s))
    os.environ.update({
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
        "RANK": str(info.world_rank), "WORLD_SIZE": str(info.world_size),
        "LOCAL_RANK": str(info.local_rank), "LOCAL_WORLD_SIZE": str(info.local_world_size),
        "NODE_RANK": str(info.node_rank),
    })
    if backend == "nccl" and _cuda_device_index is not None:
        torch.cuda.set_device(_cuda_device_index)
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group(backend=backend, store=store, rank=info.world_rank,
                            world_size=info.world_size, timeout=timedelta(seconds=timeout_s))
    set_any_rank(_any_rank)


def _any_rank(flag: bool) -> bool:
    """Whether any rank passed True: one all-reduce (MAX) of a flag over the process group."""
    import torch
    import torch.distributed as dist

    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _leave_process_group() -> None:
    import torch.distributed as dist

    from ..session.context import set_any_rank

    set_any_rank(None)
    if dist.is_initialized():
        dist.destroy_process_group()


CONFIG = TorchConfig
