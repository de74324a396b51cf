"""TensorFlow helpers for the training function, as in ``ray.train.tensorflow``.

```python
import prefect_distrain as pd

def train_loop(config):
    import tensorflow as tf
    strategy = pd.tensorflow.strategy()       # MultiWorkerMirroredStrategy; TF_CONFIG is set
    global_batch = config["batch_size"] * pd.get_context().get_world_size()
    with strategy.scope():
        checkpoint = pd.get_checkpoint()
        model = pd.tensorflow.load_model(checkpoint) if checkpoint else build_and_compile()
    model.fit(dataset.batch(global_batch), epochs=config["epochs"],
              initial_epoch=pd.tensorflow.next_epoch(checkpoint),
              callbacks=[pd.tensorflow.ReportCheckpointCallback()])
```
MultiWorkerMirroredStrategy splits each global batch across the workers: give ``batch`` the
per-worker batch size times the world size (the seeds' rule), so each worker still sees its
per-worker batch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from .backends.tensorflow import TIMEOUT_ENV, TensorflowConfig, import_tensorflow
from .checkpoints.checkpoint import Checkpoint
from .session import current_session, get_context, report
from .trainers import TensorflowTrainer

tf = import_tensorflow()

__all__ = ["ReportCheckpointCallback", "TensorflowConfig", "TensorflowTrainer", "load_model",
           "next_epoch", "strategy"]

MODEL_FILE = "model.keras"
STATE_FILE = "state.json"


def strategy(**kwargs: Any):
    """``tf.distribute.MultiWorkerMirroredStrategy(**kwargs)`` over the run's workers, with
    ``TensorflowConfig(timeout_s)`` as its collective timeout when one is set."""
    timeout = os.environ.get(TIMEOUT_ENV)
    if timeout and "communication_options" not in kwargs:
        kwargs["communication_options"] = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=float(timeout))
    return tf.distribute.MultiWorkerMirroredStrategy(**kwargs)


def load_model(checkpoint: Checkpoint, **kwargs: Any):
    """The compiled model (weights and optimizer state) saved by ReportCheckpointCallback.

    Call it inside ``strategy.scope()``. Loads with Keras' safe mode (no arbitrary code).
    """
    with checkpoint.as_directory() as folder:
        return tf.keras.models.load_model(os.path.join(folder, MODEL_FILE), **kwargs)


def next_epoch(checkpoint: Checkpoint | None) -> int:
    """The epoch to continue at: 0 without a checkpoint, else one after the saved epoch."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, STATE_FILE)) as handle:
            return json.load(handle)["epoch"] + 1


class ReportCheckpointCallback(tf.keras.callbacks.Callback):
    """Reports each epoch's logs and, every ``checkpoint_every`` epochs, a checkpoint.

    Every worker saves the model (MultiWorkerMirroredStrategy needs all of them to take part);
    only the chief's (rank 0's) copy is reported and committed, the others are discarded.
    ``metrics``: the log keys to report (default all), or a mapping {reported name: log key}.
    """

    def __init__(self, metrics: list[str] | dict[str, str] | None = None,
                 checkpoint_every: int | None = 1):
        super().__init__()
        if isinstance(metrics, (list, tuple)):
            metrics = {name: name for name in metrics}
        self.metrics = metrics
        self.checkpoint_every = checkpoint_every

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        session = current_session()  # each batch is progress, for the driver's hang detection
        if session is not None:
            session.step()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if self.metrics is None:
            values = dict(logs)
        else:
            missing = [key for key in self.metrics.values() if key not in logs]
            if missing:
                raise KeyError(f"ReportCheckpointCallback: {missing} not in the epoch's logs "
                               f"(it has {sorted(logs)})")
            values = {name: logs[key] for name, key in self.metrics.items()}
        metrics = {"epoch": epoch, **{k: float(v) for k, v in values.items()}}
        if not self.checkpoint_every or (epoch + 1) % self.checkpoint_every:
            report(metrics)
            return
        folder = tempfile.mkdtemp(prefix="keras-checkpoint-")
        try:
            self.model.save(os.path.join(folder, MODEL_FILE))
            with open(os.path.join(folder, STATE_FILE), "w") as handle:
                json.dump({"epoch": epoch}, handle)
            chief = get_context().get_world_rank() == 0
            report(metrics, checkpoint=Checkpoint.from_directory(folder) if chief else None)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
