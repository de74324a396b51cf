"""TensorFlow: TF_CONFIG on every worker, so ``MultiWorkerMirroredStrategy()`` forms the cluster.

Each worker picks a free port on its node; every worker gets the same cluster list and its own
index (rank 0 is the chief). With ``keras="tf_keras"`` (the default, the one whose ``model.fit``
works under MultiWorkerMirroredStrategy) the worker processes start with
``TF_USE_LEGACY_KERAS=1``, so ``tf.keras`` is tf-keras; that variable must be set before
TensorFlow is first imported, which is why it goes into the actors' environment at creation.
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


class _TensorflowBackend(Backend):
    def worker_env(self, config: TensorflowConfig) -> dict[str, str]:
        env = {"TF_USE_LEGACY_KERAS": "1"} if config.keras == "tf_keras" else {}
        if config.timeout_s is not None:  # for pd.tensorflow.strategy()
            env[TIMEOUT_ENV] = str(config.timeout_s)
        return env

    def on_start(self, worker_group: WorkerGroup, config: TensorflowConfig) -> None:
        timeout = settings.settings().backend_setup_timeout_s
        workers = [f"{address}:{port}" for address, port in
                   worker_group.execute(address_and_free_port, timeout=timeout)]
        worker_group.execute(_set_tf_config, workers, timeout=timeout)

    def is_runtime_failure(self, error: BaseException) -> bool:
        module, _, name = error_type(error).rpartition(".")
        return module.startswith("tensorflow.") and name in _RUNTIME_ERRORS

    def on_shutdown(self, worker_group: WorkerGroup, config: TensorflowConfig) -> None:
        worker_group.execute(_clear_tf_config, timeout=settings.settings().shutdown_timeout_s)


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
