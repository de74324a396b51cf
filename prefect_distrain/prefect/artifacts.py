"""Everything Prefect shows about a run: a link and an event per committed checkpoint, a live
progress artifact, tables of checkpoints and attempts, and a summary with a chart at the end.

Runs on the driver inside the task run (only the driver talks to Prefect). URLs are shown
without credentials or query strings; keys follow Prefect's rules (lowercase letters, digits,
dashes). A location is a link only where a browser opens it (HTTP(S), or a presigned link when
``PREFECT_DISTRAIN_LINK_EXPIRY_S`` is set); otherwise its path is shown as text to copy.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.events import emit_event

from .. import settings
from ..callbacks import TrainingCallback, progress_value
from ..checkpoints.checkpoint import Checkpoint
from ..checkpoints.fs import filesystem, redact_url
from ..checkpoints.ledger import read_attempts
from ..checkpoints.storage import RunStorage
from ..execution.failure_policy import is_retryable
from ..result import RunReport, TrainResult


def artifact_key(text: str) -> str:
    key = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return re.sub(r"-{2,}", "-", key) or "run"


def checkpoint_link(path: str) -> str:
    """The location as shown in tables and events: the path or URL, credentials stripped."""
    return redact_url(path)


def browser_url(path: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """A URL a browser opens from the Prefect UI, where the store has one: an HTTP(S) path as
    it is, or an object store's presigned HTTPS link when ``PREFECT_DISTRAIN_LINK_EXPIRY_S``
    allows it; None otherwise (a local path or ``s3://`` URL opens nothing in a browser)."""
    shown = redact_url(path)
    if shown.startswith(("http://", "https://")):
        return shown
    expiry = settings.settings().link_expiry_s
    if not expiry or "://" not in path:
        return None
    try:
        fs, inner = filesystem(path, dict(storage_options or {}))
        return fs.sign(inner, expiration=int(expiry))
    except Exception:  # noqa: BLE001 - no presigning here: the path as text
        return None


def location_markdown(path: str, label: str | None = None,
                      storage_options: dict[str, Any] | None = None) -> str:
    """Markdown for a location: a link where a browser can open it, else the path as text."""
    url = browser_url(path, storage_options)
    shown = checkpoint_link(path)
    if url is None:
        return f"{label} (`{shown}`)" if label else f"`{shown}`"
    return f"[{label or shown}]({url})"


def _shown_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


class PrefectArtifacts(TrainingCallback):
    """A link artifact for every committed checkpoint, under the key ``<run>-checkpoint``."""

    fatal_errors = False

    def __init__(self) -> None:
        self.key = self.run_name = "run"
        self.storage_options: dict[str, Any] = {}

    def start_training(self, logdir: str, config: Any, **info: Any) -> None:
        self.run_name = info.get("run_name") or logdir.rsplit("/", 1)[-1]
        self.key = artifact_key(self.run_name)
        if (storage := info.get("storage")) is not None:  # for presigned links, if enabled
            self.storage_options = storage.storage_options

    def on_checkpoint_commit(self, checkpoint: Checkpoint, **info: Any) -> None:
        emit_run_event("checkpoint.committed", self.run_name, {
            "index": checkpoint.index, "attempt": info.get("attempt", 0),
            "metrics": _shown_metrics(checkpoint.metrics)}, checkpoint)
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in _shown_metrics(checkpoint.metrics).items())
        description = (f"Checkpoint {checkpoint.index} (attempt {info.get('attempt', 0)}): "
                       f"{metrics or 'no metrics'}")
        url = browser_url(checkpoint.path, self.storage_options)
        if url is not None:
            create_link_artifact(link=url, link_text=f"checkpoint {checkpoint.index}",
                                 key=f"{self.key}-checkpoint", description=description)
        else:  # a path no browser opens: shown as text, to copy
            create_markdown_artifact(
                markdown=f"Checkpoint {checkpoint.index}: `{checkpoint_link(checkpoint.path)}`",
                key=f"{self.key}-checkpoint", description=description)

    def on_checkpoint_validated(self, checkpoint: Checkpoint, **info: Any) -> None:
        emit_run_event("checkpoint.validated", self.run_name, {
            "index": checkpoint.index, "status": checkpoint.status,
            "metrics": _shown_metrics(checkpoint.metrics), "error": info.get("error")},
            checkpoint)


def publish_checkpoint_table(result: TrainResult) -> None:
    """A table of the run's kept checkpoints with their metrics, best first."""
    if not result.best_checkpoints:
        return
    rows = [{"index": c.index, "attempt": c.manifest.attempt, "status": c.status,
             "path": checkpoint_link(c.path), **_shown_metrics(metrics)}
            for c, metrics in result.best_checkpoints]
    create_table_artifact(
        table=rows, key=f"{artifact_key(result.run_name)}-checkpoints",
        description=f"Committed checkpoints of run {result.run_name!r}, best first")


def publish_attempt_ledger(storage: RunStorage) -> None:
    """One row per start of the worker group in this run, across Prefect retries: how it
    ended, its world size, the checkpoint it resumed from and the steps it had to redo."""
    attempts = read_attempts(storage)
    if not attempts:
        return
    rows = [{"attempt": a["attempt"], "status": a["status"], "world size": a["world_size"],
             "resumed from": a["resumed_from"] or "-", "steps redone": a.get("steps_redone"),
             "started because": a.get("restarted_because") or "first start",
             "cause": a.get("cause") or "-", "started": a["started_at"]} for a in attempts]
    create_table_artifact(table=rows, key=f"{artifact_key(storage.run_name)}-attempts",
                          description=f"Attempts of run {storage.run_name!r}")


class PrefectProgress(TrainingCallback):
    """A progress artifact that follows rank 0's ``key`` against ``total`` while training."""

    def __init__(self, total: int, key: str = "_training_iteration"):
        self.total, self.key = total, key
        self.artifact_id = None
        self.shown = -1.0

    def start_training(self, logdir: str, config: Any, **info: Any) -> None:
        if self.artifact_id is None:  # one artifact across restarts
            self.artifact_id = create_progress_artifact(
                progress=0.0, key=f"{artifact_key(info.get('run_name') or 'run')}-progress",
                description=f"Training progress against a total of {self.total}")

    def handle_result(self, results: list[dict[str, Any]], **info: Any) -> None:
        value = progress_value(results, self.key)
        if value is None or self.artifact_id is None:
            return
        percent = round(min(100.0, 100.0 * value / self.total), 1)
        if percent != self.shown:
            self.shown = percent
            update_progress_artifact(self.artifact_id, progress=percent)


def emit_run_event(name: str, run_name: str, payload: dict[str, Any],
                   checkpoint: Checkpoint | None = None) -> None:
    """``prefect-distrain.<name>`` about the run (and a checkpoint), for automations."""
    run_resource = {"prefect.resource.id": f"prefect-distrain.run.{run_name}",
                    "prefect.resource.name": run_name}
    if checkpoint is None:
        resource, related = run_resource, []
    else:
        resource = {"prefect.resource.id":
                    f"prefect-distrain.checkpoint.{run_name}.{checkpoint.index}",
                    "prefect.resource.name": f"{run_name} checkpoint {checkpoint.index}",
                    "prefect-distrain.path": checkpoint_link(checkpoint.path)}
        related = [{**run_resource, "prefect.resource.role": "run"}]
    emit_event(event=f"prefect-distrain.{name}", resource=resource, related=related,
               payload=json.loads(json.dumps(payload, default=str)))


_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(_BARS[int((v - low) / span * (len(_BARS) - 1))] for v in values)


def numeric_series(history: list[dict[str, Any]]) -> dict[str, list[float]]:
    names = [k for k in (history[-1] if history else {}) if not k.startswith("_")]
    return {name: [float(h[name]) for h in history if isinstance(h.get(name), (int, float))]
            for name in names if isinstance(history[-1][name], (int, float))}


def metrics_svg(series: dict[str, list[float]], width: int = 640, height: int = 80) -> str:
    """One small line chart per metric, stacked: an image a person reads at a glance."""
    rows = []
    for row, (name, values) in enumerate(series.items()):
        top = row * (height + 30)
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        step = (width - 20) / max(1, len(values) - 1)
        points = " ".join(f"{10 + i * step:.1f},"
                          f"{top + 25 + (height - 10) * (1 - (v - low) / span):.1f}"
                          for i, v in enumerate(values))
        rows.append(
            f'<text x="10" y="{top + 15}" font-family="sans-serif" font-size="13">{name}: '
            f'{values[0]:.4g} &#8594; {values[-1]:.4g} (min {low:.4g}, max {high:.4g})</text>'
            f'<polyline fill="none" stroke="#2563eb" stroke-width="2" points="{points}"/>')
    total = max(1, len(series)) * (height + 30)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total}" '
            f'viewBox="0 0 {width} {total}"><rect width="100%" height="100%" fill="white"/>'
            + "".join(rows) + "</svg>")


def publish_run_summary(*, storage: RunStorage, backend: str, history: list[dict[str, Any]],
                        wall_time_s: float, result: TrainResult | None = None,
                        error: BaseException | None = None,
                        tails: dict[int, Any] | None = None,
                        forensics: list[str] | None = None,
                        data_changes: list[str] | None = None) -> str:
    """The markdown summary of a finished run, successful or not; returns the markdown."""
    attempts = read_attempts(storage)
    status = "completed" if error is None else "failed"
    world = result.world_size if result else (attempts[-1]["world_size"] if attempts else "?")
    lines = [f"# Training run `{storage.run_name}`: {status}", "",
             "| backend | world size | attempts | wall time |", "|---|---|---|---|",
             f"| {backend} | {world} | {len(attempts)} | {wall_time_s:.1f} s |", ""]
    if data_changes:
        lines += ["## Trained on other data than its checkpoint", "",
                  *[f"- {line}" for line in data_changes], ""]
    series = numeric_series(history)
    if history:
        lines += ["## Metrics", "", "| metric | final | best (min / max) | over the run |",
                  "|---|---|---|---|"]
        for name, values in series.items():
            lines.append(f"| {name} | {values[-1]:.4g} | {min(values):.4g} / {max(values):.4g} "
                         f"| {sparkline(values)} |")
        # The chart inline (Prefect's UI shows a data: image in markdown) and in the run's
        # folder, for whoever reads the storage.
        svg = metrics_svg(series)
        inline = base64.b64encode(svg.encode()).decode()
        lines += ["", f"![Every metric of rank 0, report by report](data:image/svg+xml;base64,"
                      f"{inline})", ""]
        fs, root = storage.filesystem()
        try:
            fs.pipe_file(f"{root.rstrip('/')}/metrics.svg", svg.encode())
            lines += ["The same chart in the run's folder: " + location_markdown(
                f"{storage.run_url}/metrics.svg", "metrics.svg", storage.storage_options), ""]
        except Exception as failure:  # noqa: BLE001 - the summary goes on without the file
            lines += [f"(metrics.svg could not be written: {type(failure).__name__})", ""]
    checkpoints = result.best_checkpoints if result else [
        (c, c.metrics) for c in storage.checkpoints()]
    if checkpoints:
        lines += ["## Committed checkpoints" + (", best first" if result else ""), "",
                  "| checkpoint | status | metrics |", "|---|---|---|"]
        for checkpoint, metrics in checkpoints:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in _shown_metrics(metrics).items())
            where = location_markdown(checkpoint.path, str(checkpoint.index),
                                      storage.storage_options)
            lines.append(f"| {where} | {checkpoint.status} | {shown} |")
        lines.append("")
    if error is not None:
        lines += ["## Failure", "", f"`{type(error).__name__}: {error}`"[:2000], ""]
        cause = error.__cause__
        if cause is not None:
            lines += ["```", str(cause).strip()[-6000:], "```", ""]
        for rank, tail in sorted((tails or {}).items()):
            lines += [f"### Last log lines of rank {rank}", "", "```", *list(tail), "```", ""]
    for hang in forensics or []:  # also when a restart got the run through
        lines += ["## A hang, and where every rank was", "", "```", hang[-12000:], "```", ""]
    markdown = "\n".join(lines)
    create_markdown_artifact(markdown=markdown, key=f"{artifact_key(storage.run_name)}-summary",
                             description=f"Summary of training run {storage.run_name!r}")
    return markdown


def publish_run(report: RunReport, logger: Any) -> None:
    """The end of a run in Prefect: the attempt ledger, the summary and the closing event.
    Never masks the run's own error (a failure here is logged)."""
    try:
        publish_attempt_ledger(report.storage)
        publish_run_summary(storage=report.storage, backend=report.backend,
                            history=report.history, wall_time_s=report.wall_time_s,
                            result=report.result, error=report.error, tails=report.tails,
                            forensics=report.forensics, data_changes=report.data_changes)
        final = _shown_metrics(report.history[-1] if report.history else {})
        if report.error is None:
            result = report.result
            emit_run_event("run.completed", report.storage.run_name, {
                "metrics": final, "world_size": result.world_size, "attempt": result.attempt,
                "checkpoint": result.checkpoint.index if result.checkpoint else None})
        else:
            emit_run_event("run.failed", report.storage.run_name, {
                "metrics": final, "error": f"{type(report.error).__name__}: {report.error}"[:1000],
                "retryable": is_retryable(report.error)})
    except Exception:
        logger.exception("Could not publish the run's summary to Prefect")
