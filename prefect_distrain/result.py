"""What a run returns: a plain, picklable value that Prefect can persist."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checkpoints.checkpoint import Checkpoint


@dataclass(frozen=True)
class TrainResult:
    """The outcome of one successful run.

    ``metrics`` is the last report of rank 0 and ``metrics_history`` every report of rank 0 in
    order; ``metrics_all_ranks`` the last report of every rank (in rank order) and
    ``metrics_history_all_ranks`` those of every iteration; ``worker_results`` holds the
    training function's return values in rank order.
    ``checkpoint`` is the latest committed checkpoint (None if none was reported) and
    ``best_checkpoints`` the kept ones with their metrics, best first by the score attribute
    (newest first without one); ``checkpoints`` the kept ones oldest first, each with its
    ``status`` (committed, or validated / validation failed with ``pd.Validation``) and its
    metrics, the validation's included. Checkpoints here carry no storage options, so no credentials
    are persisted with the result: ``resume_from_checkpoint`` adds the run's options back.
    ``attempt`` is the number of the attempt that finished (attempts count every start of the
    worker group in this run, across Prefect retries); ``failures`` the restarts in this call
    after failures, ``preemptions`` those after a worker was preempted.
    """

    metrics: dict[str, Any] | None
    metrics_history: list[dict[str, Any]]
    worker_results: list[Any]
    checkpoint: Checkpoint | None
    run_name: str
    path: str
    backend: str
    world_size: int
    best_checkpoints: list[tuple[Checkpoint, dict[str, Any]]] = field(default_factory=list)
    attempt: int = 0
    failures: int = 0
    preemptions: int = 0
    #: Why a callback (e.g. EarlyStopping) ended the run before the function returned.
    stopped_early: str | None = None
    metrics_all_ranks: list[dict[str, Any]] = field(default_factory=list)
    metrics_history_all_ranks: list[list[dict[str, Any]]] = field(default_factory=list)
    wall_time_s: float = field(default=0.0, compare=False)
    checkpoints: list[Checkpoint] = field(default_factory=list)

    @property
    def error(self) -> BaseException | None:
        """Ray's ``Result.error``: always None here, as a failed run raises instead."""
        return None

    @property
    def metrics_dataframe(self) -> Any:
        """Rank 0's reports as a pandas DataFrame, one row per report (Ray's name)."""
        import pandas

        return pandas.DataFrame(self.metrics_history)


@dataclass(frozen=True)
class RunReport:
    """What a run shows when it ends, successful or not (``train`` publishes it to Prefect):
    its storage, backend, rank 0's reports, wall time, the result or the error, and every
    rank's last log lines. Lives in the driver only (its storage holds the options)."""

    storage: Any
    backend: str
    history: list[dict[str, Any]]
    wall_time_s: float
    result: TrainResult | None = None
    error: BaseException | None = None
    tails: dict[int, list[str]] = field(default_factory=dict)
    #: Every rank's stacks, once per attempt that hung.
    forensics: list[str] = field(default_factory=list)
    #: How the datasets differ from those the resumed checkpoint was trained on.
    data_changes: list[str] = field(default_factory=list)
