"""TensorFlow: TF_CONFIG on every worker, so ``MultiWorkerMirroredStrategy()`` forms the cluster.

Each worker picks a free port on its node; every worker gets the same cluster list and its own
index (rank 0 is the chief). With ``keras="tf_keras"`` (the default, the one whose ``model.fit``
works under MultiWorkerMirroredStrategy) the worker processes start with
``TF_USE_LEGACY_KERAS=1``, so ``tf.keras`` is tf-keras; that variable must be set before
TensorFlow is first imported, which is why it goes into the actors' environment at creation.

A group stays warm between runs (warm_pool.py) although TensorFlow sets its collective runtime
up once per process, on the ports of the first ``TF_CONFIG``: a warm group's workers give the
ports their runtime already serves on, so the next run's ``TF_CONFIG`` is the first one again,
and its ``MultiWorkerMirroredStrategy()`` uses the runtime as it is instead of enabling it anew.
Enabling it anew resets each worker's collective executor while a peer that got there first is
already sending to it ("Delete called on non-empty BufRendezvous"); on new ports it hangs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .. import settings
from .base import Backend, BackendConfig, address_and_free_port, error_type

if TYPE_CHECKING:
    from ..execution.worker_group import WorkerGroup

INSTALL_HINT = "pip install 'prefect-distrain[tensorflow]'"
KERAS_CHOICES = ("tf_keras", "keras3")
TIMEOUT_ENV = "PREFECT_DISTRAIN_TF_COLLECTIVE_TIMEOUT_S"

#: TensorFlow's errors of a collective whose peer vanished or timed out (by name: the driver
#: never imports TensorFlow).
_RUNTIME_ERRORS = {"UnavailableError", "DeadlineExceededError", "AbortedError", "CancelledError"}


def import_tensorflow():
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(f"the tensorflow backend needs TensorFlow: {INSTALL_HINT}") from error
    return tf


def _set_tf_config(workers: list[str]) -> None:
    from ..session.context import get_worker_info

    rank = get_worker_info().world_rank
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}})


def _clear_tf_config() -> None:
    os.environ.pop("TF_CONFIG", None)


def _collective_server_def():
    """On a worker: the ServerDef TensorFlow's collective runtime serves in this process (a
    strategy of an earlier run enabled it), else None."""
    import sys

    if "tensorflow" not in sys.modules:
        return None
    import tensorflow as tf
    from tensorflow.python.eager import context

    ctx = context.context()
    if not (hasattr(ctx, "_collective_ops_server_def")
            and hasattr(tf.distribute.MultiWorkerMirroredStrategy, "_collective_key_base")):
        raise RuntimeError(f"TensorFlow {tf.__version__}'s collective runtime cannot be kept "
                           "between runs here: the worker group ends")
    return ctx._collective_ops_server_def


def _address_and_port() -> tuple[str, int]:
    """On a worker: its TF_CONFIG entry: the port its collective runtime already serves on
    (TensorFlow cannot move it), else a free one."""
    from ..session.context import get_worker_info

    server_def = _collective_server_def()
    if server_def is None:
        return address_and_free_port()
    rank = get_worker_info().world_rank
    if server_def.task_index != rank:
        raise RuntimeError(f"TensorFlow's collective runtime in this process serves task "
                           f"{server_def.task_index}; it cannot serve rank {rank}")
    jobs = {job.name: job for job in server_def.cluster.job}
    address, _, port = jobs[server_def.job_name].tasks[server_def.task_index].rpartition(":")
    return address, int(port)


def _rest() -> None:
    """After a clean run: TF_CONFIG goes; the collective runtime stays, and a later strategy
    over the same cluster takes it as it is (see the module's docstring), under new group
    keys: the runtime remembers each instance key of the old groups with its op's data type,
    and the next run's ops, numbered from 1 again, would meet them."""
    _clear_tf_config()
    server_def = _collective_server_def()
    if server_def is None:
        return
    import tensorflow as tf
    from tensorflow.python.eager import context

    # (as TensorFlow's own tests of many strategies in one process do)
    tf.distribute.MultiWorkerMirroredStrategy._collective_key_base += 100_000
    ctx = context.context()
    if getattr(ctx.enable_collective_ops, "keeps_runtime", False):
        return
    running = server_def.SerializeToString()
    enable = ctx.enable_collective_ops

    def enable_unless_running(new_def) -> None:
        if new_def.SerializeToString() != running:
            enable(new_def)

    enable_unless_running.keeps_runtime = True
    ctx.enable_collective_ops = enable_unless_running


class _TensorflowBackend(Backend):
    def worker_env(self, config: TensorflowConfig) -> dict[str, str]:
        env = {"TF_USE_LEGACY_KERAS": "1"} if config.keras == "tf_keras" else {}
        if config.timeout_s is not None:  # for pd.tensorflow.strategy()
            env[TIMEOUT_ENV] = str(config.timeout_s)
        return env

    def on_start(self, worker_group: WorkerGroup, config: TensorflowConfig) -> None:
        timeout = settings.settings().backend_setup_timeout_s
        workers = [f"{address}:{port}" for address, port in
                   worker_group.execute(_address_and_port, timeout=timeout)]
        worker_group.execute(_set_tf_config, workers, timeout=timeout)

    def is_runtime_failure(self, error: BaseException) -> bool:
        module, _, name = error_type(error).rpartition(".")
        return module.startswith("tensorflow.") and name in _RUNTIME_ERRORS

    def on_shutdown(self, worker_group: WorkerGroup, config: TensorflowConfig) -> None:
        worker_group.execute(_rest, timeout=settings.settings().shutdown_timeout_s)


@dataclass(frozen=True)
class TensorflowConfig(BackendConfig):
    """Options of the tensorflow backend.

    ``keras``: ``"tf_keras"`` (default) makes ``tf.keras`` the tf-keras package, whose
    ``model.fit`` works under MultiWorkerMirroredStrategy; ``"keras3"`` keeps Keras 3, for
    custom training loops under ``strategy.run`` (Keras 3's ``fit`` fails under that strategy).
    ``timeout_s``: the collective timeout of ``pd.tensorflow.strategy()``: a collective whose
    peer never comes raises ``DeadlineExceededError`` (infrastructure: restarted) after it.
    None (the default) keeps TensorFlow's, which never times out: TensorFlow runs a thread per
    collective to time it, so hang detection (``FailureConfig.hang_timeout_s``) is the
    everyday guard and this one is for a job that must not wait that long.
    """

    keras: str = "tf_keras"
    timeout_s: float | None = None

    name: ClassVar[str] = "tensorflow"
    backend_cls: ClassVar[type[Backend]] = _TensorflowBackend
    #: The next run's TF_CONFIG names the ports the first one's collective runtime serves on.
    reusable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        from ..exceptions import ConfigurationError

        if self.timeout_s is not None and (
                not isinstance(self.timeout_s, (int, float)) or isinstance(self.timeout_s, bool)
                or self.timeout_s <= 0):
            raise ConfigurationError(
                f"TensorflowConfig(timeout_s={self.timeout_s!r}): a positive number of seconds, "
                "or None for no collective timeout")
        if self.keras not in KERAS_CHOICES:
            raise ConfigurationError(
                f"TensorflowConfig(keras={self.keras!r}): use 'tf_keras' (model.fit under "
                "MultiWorkerMirroredStrategy) or 'keras3' (custom loops with strategy.run)")


CONFIG = TensorflowConfig
