"""``ray.tune.schedulers``: the trial schedulers a sweep takes."""

from ...integrations.schedulers import ASHAScheduler, MedianStoppingRule, TrialScheduler

__all__ = ["ASHAScheduler", "MedianStoppingRule", "TrialScheduler"]
