"""Driver-side callbacks, as in RaySGD: they see every reported iteration of every rank.

``handle_result(results, **info)`` gets one dict per worker, in rank order, once all ranks have
reported that iteration. Callbacks run on the driver, in threads of their own: a slow callback
never holds up ``report()`` or a commit. An exception in one is logged and training goes on,
unless the callback sets ``fatal_errors = True``.

A callback ends the run cleanly by setting ``stop_training`` to the reason. With
``exact_stop = True`` (``EarlyStopping``, the sweep schedulers) every report waits for the
callback's verdict on its iteration, so a stop decided at report N ends every rank at report N;
the price is a round trip to the driver per report, and a slow exact-stop callback slows the
reports. Without it reports never wait, and a stop ends every rank at its first report at or
after the highest iteration the driver had seen when the stop was decided.
"""

from __future__ import annotations

import json
from typing import Any


def callback_list(callbacks: Any) -> list[TrainingCallback]:
    """``callbacks=`` as a list, or the error that names the fix (one callback, not a list;
    something that is not a callback)."""
    from .exceptions import ConfigurationError

    if isinstance(callbacks, TrainingCallback):
        raise ConfigurationError(
            f"callbacks takes a list of callbacks, got one {type(callbacks).__name__}: use "
            f"callbacks=[{type(callbacks).__name__}(...)]")
    if callbacks is not None and not isinstance(callbacks, (list, tuple)):
        raise ConfigurationError(
            f"callbacks takes a list of TrainingCallback, got {type(callbacks).__name__}")
    for callback in callbacks or []:
        if not isinstance(callback, TrainingCallback):
            raise ConfigurationError(
                f"callbacks must be TrainingCallback instances, got {type(callback).__name__}")
    return list(callbacks or [])


class TrainingCallback:
    """Subclass and override what you need; every hook is optional."""

    #: Re-raise this callback's exceptions (ending the run) instead of logging them.
    fatal_errors: bool = False
    #: Set to the reason (e.g. in ``handle_result``) to stop the run: what was committed stays,
    #: and the result says it stopped early.
    stop_training: str | None = None
    #: True: every report waits for this callback's verdict on its iteration, and a stop it
    #: decides in ``handle_result`` of iteration N ends every rank at report N. False: reports
    #: never wait for it; a stop lands at each rank's first report at or after the highest
    #: iteration the driver has seen (ranks that ran ahead end later).
    exact_stop: bool = False

    def start_training(self, logdir: str, config: Any, **info: Any) -> None:
        """Before the training function starts; ``logdir`` is the run's storage URL."""

    def handle_result(self, results: list[dict[str, Any]], **info: Any) -> None:
        """One reported iteration: ``results[rank]`` is that rank's metrics. An iteration that
        some ranks never reported (they stopped or returned earlier) comes once at the end with
        ``partial=True`` and ``missing_ranks``; those ranks' results are ``{}``."""

    def on_checkpoint_commit(self, checkpoint: Any, **info: Any) -> None:
        """A checkpoint was committed (its manifest written); ``checkpoint.metrics`` holds
        rank 0's metrics of that report. It carries no credentials."""

    def on_checkpoint_validated(self, checkpoint: Any, **info: Any) -> None:
        """A committed checkpoint's validation (``pd.Validation``) ended: ``checkpoint.status``
        is "validated" (its metrics include the validation's) or "validation failed"
        (``info["error"]`` says why)."""

    def finish_training(self, error: bool = False, **info: Any) -> None:
        """After the run, whether it succeeded (``error=False``) or not."""


class PrintingCallback(TrainingCallback):
    """Prints every iteration's results as JSON, like RaySGD's PrintingCallback."""

    def handle_result(self, results: list[dict[str, Any]], **info: Any) -> None:
        print(json.dumps(results, default=str))


def progress_value(results: list[dict[str, Any]], key: str) -> float | None:
    """Rank 0's count of done units (e.g. its report number) in an iteration's results."""
    value = results[0].get(key) if results else None
    return float(value) if isinstance(value, (int, float)) else None


class RichProgress(TrainingCallback):
    """A terminal progress bar of rank 0's ``key`` against ``total``."""

    def __init__(self, total: int, key: str = "_training_iteration", console: Any = None):
        self.total, self.key, self.console = total, key, console
        self.progress = None
        self.task = None

    def start_training(self, logdir: str, config: Any, **info: Any) -> None:
        from rich.progress import Progress

        if self.progress is None:
            self.progress = Progress(console=self.console)
            self.progress.start()
            self.task = self.progress.add_task(f"training {info.get('run_name', '')}",
                                               total=self.total)

    def handle_result(self, results: list[dict[str, Any]], **info: Any) -> None:
        value = progress_value(results, self.key)
        if self.progress is not None and value is not None:
            self.progress.update(self.task, completed=min(value, self.total))

    def finish_training(self, error: bool = False, **info: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class EarlyStopping(TrainingCallback):
    """Stops the run once rank 0's ``metric`` has not improved by more than ``min_delta`` for
    ``patience`` reports in a row. Reports without the metric are ignored.

    ``exact=True`` (default): every rank ends at the report that decided the stop (each report
    waits for the verdict); ``exact=False``: reports never wait, and ranks end at their first
    report after the stop reaches them (a few more reports when steps are fast)."""

    def __init__(self, metric: str, mode: str = "min", patience: int = 3,
                 min_delta: float = 0.0, exact: bool = True):
        self.exact_stop = bool(exact)
        if mode not in ("min", "max"):
            raise ValueError(f"mode {mode!r}: use 'min' (lower is better) or 'max'")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive number of reports (got {patience!r})")
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.best: float | None = None
        self.best_iteration: int | None = None
        self.waited = 0

    def handle_result(self, results: list[dict[str, Any]], **info: Any) -> None:
        value = results[0].get(self.metric) if results else None
        if not isinstance(value, (int, float)) or self.stop_training or info.get("partial"):
            return
        gain = (self.best - value if self.mode == "min" else value - self.best) \
            if self.best is not None else float("inf")
        if gain > self.min_delta:
            self.best, self.best_iteration, self.waited = value, info.get("training_iteration"), 0
            return
        self.waited += 1
        if self.waited >= self.patience:
            self.stop_training = (
                f"early stopping: {self.metric} did not improve by more than {self.min_delta:g} "
                f"for {self.patience} reports (best {self.best:g} at iteration "
                f"{self.best_iteration})")


#: The experiment trackers are callbacks too: pd.callbacks.TensorBoardLogger(),
#: MLflowLogger(...), WandbLogger(...); their module loads when one is asked for (it imports
#: this one), and their libraries when a tracker is used.
_TRACKERS = ("MLflowLogger", "TensorBoardLogger", "WandbLogger")


def __getattr__(name: str) -> Any:
    if name in _TRACKERS:
        from .integrations import trackers

        return getattr(trackers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
