"""The hooks a backend implements; it acts on workers only through the worker group.

A backend is a small frozen config that names its Backend class. The controller calls
``on_start`` once the actors exist, ``on_training_start`` right before every run of the
training function, and ``on_shutdown`` before the actors are killed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from ..execution.worker_group import WorkerGroup


class Backend:
    """Set up and tear down a framework's distributed runtime on a worker group."""

    def worker_env(self, config: BackendConfig) -> dict[str, str]:
        """Environment variables the worker processes must have from their start, before any
        import (e.g. a switch read when the framework is first imported)."""
        return {}

    def on_start(self, worker_group: WorkerGroup, config: BackendConfig) -> None:
        """Once per group start: e.g. join the process group."""

    def on_training_start(self, worker_group: WorkerGroup, config: BackendConfig) -> None:
        """Before each run of the training function on the group."""

    def is_runtime_failure(self, error: BaseException) -> bool:
        """True if ``error`` comes from the framework's distributed runtime (a collective that
        timed out, a peer that vanished) rather than from the user's code: worth a restart.
        Judge it by ``error_type(error)``: the driver does not import the framework to re-raise
        its errors (they arrive as ``WorkerError``)."""
        return False

    def on_shutdown(self, worker_group: WorkerGroup, config: BackendConfig) -> None:
        """Before the actors are killed after a clean run; not called after a failure, when a
        collective may hang."""

    def on_discard(self, config: BackendConfig) -> None:
        """After the actors were killed without ``on_shutdown`` (a failure, a resize): free
        what the backend holds on the driver."""


@dataclass(frozen=True)
class BackendConfig:
    """Options of one backend. Subclasses set ``name`` and ``backend_cls``."""

    name: ClassVar[str] = ""
    backend_cls: ClassVar[type[Backend]] = Backend
    #: Whether ``on_shutdown`` then ``on_start`` on the same processes gives a clean runtime,
    #: so that a finished run's group can serve the next one (warm_pool.py). A backend says so
    #: itself, once that is so (torch does).
    reusable: ClassVar[bool] = False

    def make_backend(self) -> Backend:
        return self.backend_cls()

    def check_scaling(self, use_gpu: bool) -> None:
        """Raise ``ConfigurationError`` at once for options the workers could never use."""


def error_type(error: BaseException) -> str:
    """The qualified name of the type the worker raised (a ``WorkerError`` stands in for a type
    the driver has not imported)."""
    from ..exceptions import WorkerError

    if isinstance(error, WorkerError) and error.exc_type:
        return error.exc_type
    return f"{type(error).__module__}.{type(error).__qualname__}"


def address_and_free_port() -> tuple[str, int]:
    """On a worker: its node's address and a port free there now, for a framework's
    rendezvous (torch's MASTER_PORT, a TF_CONFIG entry).

    The port is released before the framework binds it again: one from the kernel's
    ephemeral range (what ``bind(0)`` returns) may be handed meanwhile to any process that
    connects or binds port 0 (Ray starts many), so a free one below that range comes first."""
    import random
    import socket

    import ray

    low = _ephemeral_low()
    for port in random.sample(range(20000, low), min(50, max(0, low - 20000))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
        return ray.util.get_node_ip_address(), port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux), else IANA's 49152."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152
