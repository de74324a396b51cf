"""Horovod over gloo: the driver runs Horovod's rendezvous server; each worker gets the
environment ``horovodrun`` would give it, so a plain ``hvd.init()`` works for horovod.torch,
horovod.tensorflow and horovod.tensorflow.keras. No SSH, no MPI.

Every start of the group (and so every restart) gets a fresh rendezvous server with the new
world; shutdown stops it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .. import settings
from .base import Backend, BackendConfig, error_type

if TYPE_CHECKING:
    from ..execution.worker_group import WorkerGroup

INSTALL_HINT = (
    "install Horovod with gloo: `bash scripts/install_horovod.sh` from the prefect-distrain "
    "repository (Horovod 0.28.1 needs a patched build for torch >= 2.1 / TensorFlow 2.21), or "
    "pip install 'prefect-distrain[horovod]' on older frameworks")

#: Horovod's errors when a peer failed (checked by name: the driver need not import Horovod).
_RUNTIME_ERRORS = {"HorovodInternalError", "HostsUpdatedInterrupt"}

_ENV_PREFIXES = ("HOROVOD_",)


def import_horovod_runner():
    try:
        from horovod.runner.common.util.hosts import SlotInfo
        from horovod.runner.http.http_server import RendezvousServer
    except ImportError as error:
        raise ImportError(f"the horovod backend needs Horovod: {INSTALL_HINT}") from error
    return RendezvousServer, SlotInfo


def _network_interface() -> tuple[str, str]:
    """(hostname, the interface that carries this node's Ray address)."""
    import socket

    import psutil
    import ray

    address = ray.util.get_node_ip_address()
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addresses):
            return socket.gethostname(), name
    return socket.gethostname(), "lo"


def _set_env(values: dict[str, str]) -> None:
    for key in [k for k in os.environ if k.startswith(_ENV_PREFIXES)]:
        del os.environ[key]  # no variable of an earlier world survives
    os.environ.update(values)


def _set_env_by_rank(values_by_rank: list[dict[str, str]]) -> None:
    from ..session.context import get_worker_info

    _set_env(values_by_rank[get_worker_info().world_rank])


def _shutdown_horovod() -> None:
    """Leave the world this worker joined (if the function called hvd.init()): a warm group's
    next run joins a new one with ``hvd.init()``."""
    import sys

    for module in ("horovod.torch", "horovod.tensorflow"):
        if module in sys.modules:  # a failure here: the group is not kept warm, it ends
            sys.modules[module].shutdown()
    _set_env({})


class _HorovodBackend(Backend):
    def __init__(self) -> None:
        self.server: Any = None

    def worker_env(self, config: HorovodConfig) -> dict[str, str]:
        # horovod.tensorflow.keras 0.28 works with tf-keras (Keras 2), not Keras 3.
        return {"TF_USE_LEGACY_KERAS": "1"} if config.tf_keras else {}

    def on_start(self, worker_group: WorkerGroup, config: HorovodConfig) -> None:
        import ray

        rendezvous_server_cls, slot_info_cls = import_horovod_runner()
        timeout = settings.settings().backend_setup_timeout_s
        hosts = worker_group.execute(_network_interface, timeout=timeout)
        infos = [m.info for m in worker_group.members]
        # Horovod's "host" is a Ray node here; ranks are already grouped by node.
        node_names = [f"{hostname}-node{info.node_rank}" for (hostname, _), info in
                      zip(hosts, infos)]
        cross_size = {info.local_rank: 0 for info in infos}
        for info in infos:
            cross_size[info.local_rank] += 1
        slots = [slot_info_cls(hostname=name, rank=info.world_rank, local_rank=info.local_rank,
                               cross_rank=info.node_rank, size=info.world_size,
                               local_size=info.local_world_size,
                               cross_size=cross_size[info.local_rank])
                 for name, info in zip(node_names, infos)]
        self.stop_server()
        self.server = rendezvous_server_cls(verbose=int(config.verbose))
        port = self.server.start()
        self.server.init(slots)
        common = {"HOROVOD_GLOO_RENDEZVOUS_ADDR": ray.util.get_node_ip_address(),
                  "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
                  "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
                  **config.tuning_env()}
        per_rank = [{**common, "HOROVOD_GLOO_IFACE": iface, "HOROVOD_HOSTNAME": slot.hostname,
                     "HOROVOD_RANK": str(slot.rank), "HOROVOD_SIZE": str(slot.size),
                     "HOROVOD_LOCAL_RANK": str(slot.local_rank),
                     "HOROVOD_LOCAL_SIZE": str(slot.local_size),
                     "HOROVOD_CROSS_RANK": str(slot.cross_rank),
                     "HOROVOD_CROSS_SIZE": str(slot.cross_size)}
                    for (_, iface), slot in zip(hosts, slots)]
        worker_group.execute(_set_env_by_rank, per_rank, timeout=timeout)

    def is_runtime_failure(self, error: BaseException) -> bool:
        return error_type(error).rpartition(".")[2] in _RUNTIME_ERRORS

    def on_shutdown(self, worker_group: WorkerGroup, config: HorovodConfig) -> None:
        try:
            worker_group.execute(_shutdown_horovod, timeout=settings.settings().shutdown_timeout_s)
        finally:
            self.stop_server()

    def on_discard(self, config: HorovodConfig) -> None:
        self.stop_server()

    def stop_server(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()


@dataclass(frozen=True)
class HorovodConfig(BackendConfig):
    """Options of the horovod backend, set as Horovod's environment variables.

    ``timeout_s``: gloo's rendezvous and collective timeout (HOROVOD_GLOO_TIMEOUT_SECONDS);
    ``cycle_time_ms`` (HOROVOD_CYCLE_TIME) and ``fusion_threshold_bytes``
    (HOROVOD_FUSION_THRESHOLD) tune tensor fusion; None keeps Horovod's defaults.
    ``tf_keras``: start the workers with TF_USE_LEGACY_KERAS=1, as horovod.tensorflow.keras
    needs tf-keras as ``tf.keras``.
    """

    timeout_s: float = 300.0
    cycle_time_ms: float | None = None
    fusion_threshold_bytes: int | None = None
    verbose: bool = False
    tf_keras: bool = True

    name: ClassVar[str] = "horovod"
    backend_cls: ClassVar[type[Backend]] = _HorovodBackend
    #: ``hvd.shutdown()`` at a run's end, a new rendezvous server and ``hvd.init()`` at the
    #: next: Horovod joins a new world in the same process (as its elastic mode does).
    reusable: ClassVar[bool] = True

    def tuning_env(self) -> dict[str, str]:
        env = {"HOROVOD_GLOO_TIMEOUT_SECONDS": str(int(self.timeout_s))}
        if self.cycle_time_ms is not None:
            env["HOROVOD_CYCLE_TIME"] = str(self.cycle_time_ms)
        if self.fusion_threshold_bytes is not None:
            env["HOROVOD_FUSION_THRESHOLD"] = str(int(self.fusion_threshold_bytes))
        return env


CONFIG = HorovodConfig
