"""Schedulers that stop a sweep's bad trials early, from their reports (as Ray Tune's).

``ASHAScheduler`` (asynchronous successive halving) and ``MedianStoppingRule``; each trial's
``TrialSupervisor`` (a callback with ``exact_stop``) feeds rank 0's reports to the scheduler and
stops the trial at the report it judged.
"""

from __future__ import annotations

import math
import statistics
import threading
from typing import Any

from ..callbacks import TrainingCallback
from ..exceptions import ConfigurationError


class TrialScheduler:
    """Decides from each report of a trial whether it goes on. Thread-safe: trials run in
    parallel threads of the sweep."""

    metric: str | None = None
    mode: str | None = None

    def bind(self, metric: str, mode: str) -> None:
        self.metric = self.metric or metric
        self.mode = self.mode or mode
        self._lock = threading.Lock()

    def _score(self, result: dict[str, Any]) -> float | None:
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        return float(value) if self.mode == "max" else -float(value)  # higher is better

    def should_stop(self, trial: str, result: dict[str, Any]) -> str | None:
        """The reason to stop ``trial`` after this report, or None."""
        raise NotImplementedError


class ASHAScheduler(TrialScheduler):
    """Asynchronous successive halving (Ray Tune's ASHA, one bracket): at each rung (``time_attr``
    = grace_period x reduction_factor^k), a trial goes on only if it is in the best
    1/reduction_factor of the trials that reached that rung before it."""

    def __init__(self, time_attr: str = "_training_iteration", grace_period: int = 1,
                 reduction_factor: float = 3, max_t: int = 100, metric: str | None = None,
                 mode: str | None = None):
        if grace_period < 1 or reduction_factor <= 1 or max_t < grace_period:
            raise ConfigurationError(
                "ASHAScheduler needs grace_period >= 1, reduction_factor > 1 and max_t >= "
                "grace_period")
        self.time_attr, self.rf, self.max_t = time_attr, reduction_factor, max_t
        self.metric, self.mode = metric, mode
        milestones, t = [], grace_period
        while t < max_t:
            milestones.append(t)
            t *= reduction_factor
        self.rungs: dict[float, dict[str, float]] = {m: {} for m in reversed(milestones)}

    def should_stop(self, trial: str, result: dict[str, Any]) -> str | None:
        score, t = self._score(result), result.get(self.time_attr)
        if score is None or not isinstance(t, (int, float)):
            return None
        with self._lock:
            for milestone, recorded in self.rungs.items():  # the highest rung reached first
                if t < milestone or trial in recorded:
                    continue
                others = list(recorded.values())
                recorded[trial] = score
                if others:
                    cutoff = _percentile(others, 1 - 1 / self.rf)
                    if score < cutoff:
                        return (f"ASHA: {self.metric} at {self.time_attr}={t:g} is not in the "
                                f"best 1/{self.rf:g} of the {len(others)} trial(s) there")
                break
        if t >= self.max_t:
            return f"ASHA: reached max_t={self.max_t}"
        return None


class MedianStoppingRule(TrialScheduler):
    """Stops a trial whose best result so far is worse than the median of the other trials'
    running means at the same ``time_attr`` (Ray Tune's median stopping rule)."""

    def __init__(self, time_attr: str = "_training_iteration", grace_period: float = 1,
                 min_samples_required: int = 2, metric: str | None = None,
                 mode: str | None = None):
        self.time_attr, self.grace_period = time_attr, grace_period
        self.min_samples_required = min_samples_required
        self.metric, self.mode = metric, mode
        self.history: dict[str, list[tuple[float, float]]] = {}

    def should_stop(self, trial: str, result: dict[str, Any]) -> str | None:
        score, t = self._score(result), result.get(self.time_attr)
        if score is None or not isinstance(t, (int, float)):
            return None
        with self._lock:
            self.history.setdefault(trial, []).append((t, score))
            if t < self.grace_period:
                return None
            means = [statistics.fmean(s for u, s in points if u <= t)
                     for other, points in self.history.items()
                     if other != trial and any(u <= t for u, _ in points)
                     and max(u for u, _ in points) >= t]
            if len(means) < self.min_samples_required:
                return None
            median = statistics.median(means)
            best = max(s for _, s in self.history[trial])
            if best < median:
                return (f"median stopping: best {self.metric} so far is worse than the median "
                        f"of {len(means)} other trial(s) at {self.time_attr}={t:g}")
        return None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class TrialSupervisor(TrainingCallback):
    """Feeds a trial's reports (rank 0) to the scheduler; stops the trial at the report the
    scheduler judged."""

    exact_stop = True

    def __init__(self, scheduler: TrialScheduler, trial: str):
        self.scheduler, self.trial = scheduler, trial

    def handle_result(self, results: list[dict[str, Any]], **info: Any) -> None:
        if results and not self.stop_training and not info.get("partial"):
            self.stop_training = self.scheduler.should_stop(self.trial, results[0])
