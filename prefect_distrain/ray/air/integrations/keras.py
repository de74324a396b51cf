"""``ray.air.integrations.keras``: the Keras callback that reports (and checkpoints)."""

from ....tensorflow import ReportCheckpointCallback

__all__ = ["ReportCheckpointCallback"]
