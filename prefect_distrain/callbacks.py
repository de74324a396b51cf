"""Driver-side callbacks, as in RaySGD: they see every reported iteration of every rank.

``handle_result(results, **info)`` gets one dict per worker, in rank order, once all ranks have
reported that iteration. Callbacks run on the driver; an exception in one is logged and training
goes on, unless the callback sets ``fatal_errors = True``.
"""

from __future__ import annotations

import json
from typing import Any


class TrainingCallback:
    """Subclass and override what you need; every hook is optional."""

    #: Re-raise this callback's exceptions (ending the run) instead of logging them.
    fatal_errors: bool = False

    def start_training(self, logdir: str, config: Any, **info: Any) -> None:
        """Before the training function starts; ``logdir`` is the run's storage URL."""

    def handle_result(self, results: list[dict[str, Any]], **info: Any) -> None:
        """One reported iteration: ``results[rank]`` is that rank's metrics."""

    def on_checkpoint_commit(self, checkpoint: Any, **info: Any) -> None:
        """A checkpoint was committed (its manifest written); ``checkpoint.metrics`` holds
        rank 0's metrics of that report. It carries no credentials."""

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
