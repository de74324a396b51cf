"""``ray.tune.tuner``: ``Tuner``."""

from ...integrations.tune import Tuner

__all__ = ["Tuner"]
