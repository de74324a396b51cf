"""``ray.tune.tune_config``: ``TuneConfig``."""

from ...integrations.tune import TuneConfig

__all__ = ["TuneConfig"]
