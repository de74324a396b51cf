"""Everything Prefect shows about a run's checkpoints: a link per commit and a table at the end.

Runs on the driver inside the task run (only the driver talks to Prefect). URLs are shown
without credentials or query strings; keys follow Prefect's rules (lowercase letters, digits,
dashes).
"""

from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import create_link_artifact, create_table_artifact

from .callbacks import TrainingCallback
from .checkpoint import Checkpoint
from .result import TrainResult
from .storage import RunStorage, redact_url


def artifact_key(text: str) -> str:
    key = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return re.sub(r"-{2,}", "-", key) or "run"


def checkpoint_link(path: str) -> str:
    shown = redact_url(path)
    return shown if "://" in shown else f"file://{shown}"


def _shown_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


class PrefectArtifacts(TrainingCallback):
    """A link artifact for every committed checkpoint, under the key ``<run>-checkpoint``."""

    fatal_errors = False

    def __init__(self) -> None:
        self.key = "run"

    def start_training(self, logdir: str, config: Any, **info: Any) -> None:
        self.key = artifact_key(info.get("run_name") or logdir.rsplit("/", 1)[-1])

    def on_checkpoint_commit(self, checkpoint: Checkpoint, **info: Any) -> None:
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in _shown_metrics(checkpoint.metrics).items())
        create_link_artifact(
            link=checkpoint_link(checkpoint.path),
            link_text=f"checkpoint {checkpoint.index}",
            key=f"{self.key}-checkpoint",
            description=f"Checkpoint {checkpoint.index} (attempt {info.get('attempt', 0)}): "
                        f"{metrics or 'no metrics'}")


def publish_checkpoint_table(result: TrainResult) -> None:
    """A table of the run's kept checkpoints with their metrics, best first."""
    if not result.best_checkpoints:
        return
    rows = [{"index": c.index, "attempt": c.manifest["attempt"], "path": checkpoint_link(c.path),
             **_shown_metrics(metrics)} for c, metrics in result.best_checkpoints]
    create_table_artifact(
        table=rows, key=f"{artifact_key(result.run_name)}-checkpoints",
        description=f"Committed checkpoints of run {result.run_name!r}, best first")


def publish_attempt_ledger(storage: RunStorage) -> None:
    """One row per start of the worker group in this run, across Prefect retries: how it
    ended, its world size, the checkpoint it resumed from and the steps it had to redo."""
    attempts = storage.read_attempts()
    if not attempts:
        return
    rows = [{"attempt": a["attempt"], "status": a["status"], "world size": a["world_size"],
             "resumed from": a["resumed_from"] or "-", "steps redone": a.get("steps_redone"),
             "started because": a.get("restarted_because") or "first start",
             "cause": a.get("cause") or "-", "started": a["started_at"]} for a in attempts]
    create_table_artifact(table=rows, key=f"{artifact_key(storage.name)}-attempts",
                          description=f"Attempts of run {storage.name!r}")
