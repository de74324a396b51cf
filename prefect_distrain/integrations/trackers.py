"""Experiment trackers as driver-side callbacks: TensorBoard, MLflow and Weights & Biases.

```python
pd.train(train_loop, callbacks=[pd.callbacks.TensorBoardLogger(),
                                pd.callbacks.MLflowLogger("sqlite:///mlflow.db")])
```
They run on the driver, so one process talks to the tracker (not one duplicate run per rank)
and the workers need none of these packages; each is looked up when its tracker is built (a
missing one fails there, naming the extra) and imported at the first hook. Nothing sent to a
tracker carries credentials: the run's URL and checkpoint paths are redacted, secret-looking
config keys are masked, and the storage options (used only to reach the run's storage) are
never logged. A tracker's failure is logged, not fatal (``fatal_errors`` is False), and a
tracker that failed stays off until the next attempt: every call to a dead tracking server
would otherwise block the driver for the client's retries (minutes for MLflow).
``start_training``/``finish_training`` are called once per attempt, so a restarted run goes on
in the same tracker run.

One module for the three (over 350 lines): they share the flattening, redaction and
stay-off-after-failure helpers, and each is a short class around its client.
"""

from __future__ import annotations

import functools
import importlib.util
import numbers
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..callbacks import TrainingCallback
from ..checkpoints.checkpoint import Checkpoint
from ..checkpoints.fs import filesystem, redact_url

__all__ = ["MLflowLogger", "TensorBoardLogger", "WandbLogger", "flatten", "scalars"]

#: Config keys whose values are masked before they reach a tracker (its params are readable by
#: everyone with access to the experiment).
_SECRET = re.compile(r"secret|passw|token|credential|api_?key|access_?key|private_?key|"
                     r"storage_options", re.IGNORECASE)
_REDACTED = "<redacted>"


def _require(module: str, extra: str, who: str) -> None:
    """Fail when the tracker is built, not at its first hook: a hook's error is only logged,
    and the run would go on untracked. Only looks the package up; hooks import it."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{who} needs the {module!r} package: "
                          f"pip install 'prefect-distrain[{extra}]'")


def flatten(value: Any, sep: str = ".") -> dict[str, Any]:
    """A nested config as one level (``{"opt": {"lr": 1}}`` -> ``{"opt.lr": 1}``), as trackers
    take params; values that are not plain JSON scalars become strings, secrets are masked."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        value = {"config": value}
    flat: dict[str, Any] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, item in node.items():
            name = f"{prefix}{key}"
            if _SECRET.search(str(key)):
                flat[name] = _REDACTED
            elif isinstance(item, Mapping) and item:
                walk(item, name + sep)
            else:
                plain = isinstance(item, (str, int, float, bool)) or item is None
                flat[name] = item if plain else str(item)

    walk(value, "")
    return flat


def scalars(metrics: Any, sep: str = "/") -> dict[str, float]:
    """The numeric metrics of one report: no ``_``-prefixed internal keys, no bools (a flag is
    not a curve), nested dicts joined with ``sep``, one-element numpy/torch values unwrapped."""
    if not isinstance(metrics, Mapping):
        return {}
    found: dict[str, float] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            if not prefix and str(key).startswith("_"):
                continue
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}{sep}")
                continue
            if callable(getattr(value, "item", None)) and not isinstance(value, bool):
                try:
                    value = value.item()
                except (TypeError, ValueError, RuntimeError):  # not one element
                    continue
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                found[f"{prefix}{key}"] = float(value)

    walk(metrics, "")
    return found


def _rank0(results: Any) -> Mapping:
    """Rank 0's metrics, or {} when the iteration lacks them."""
    first = results[0] if isinstance(results, (list, tuple)) and results else None
    return first if isinstance(first, Mapping) else {}


def _step(metrics: Mapping, info: Mapping) -> int | None:
    step = metrics.get("_training_iteration", info.get("training_iteration"))
    return int(step) if isinstance(step, numbers.Real) else None


def _run_filesystem(logdir: str, info: Mapping) -> tuple[fsspec.AbstractFileSystem, str]:
    """The run's real filesystem: ``logdir`` is redacted (no credentials), so prefer the
    RunStorage the controller passes as ``storage=``."""
    storage = info.get("storage")
    if storage is not None:
        return storage.filesystem()
    return filesystem(logdir, {})


def _stays_off_after_failure(hook: Callable) -> Callable:
    """After one failure, later hooks of the attempt do nothing (the error was logged once);
    ``start_training`` of the next attempt tries again."""

    @functools.wraps(hook)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        if hook.__name__ == "start_training":
            self._failed = False
        elif getattr(self, "_failed", False):
            return None
        try:
            return hook(self, *args, **kwargs)
        except Exception:
            self._failed = True
            raise

    return guarded


class TensorBoardLogger(TrainingCallback):
    """Event files of every reported scalar at step ``_training_iteration``, in
    ``<run storage>/tensorboard/``, so ``tensorboard --logdir <run>/tensorboard`` shows the
    curves, on any fsspec storage.

    tensorboardX writes locally (object stores cannot append); the files are uploaded at most
    every ``flush_every_s`` and at the end of each attempt. Rank 0's metrics by default;
    ``all_ranks=True`` logs every rank's, as ``rank_<N>/<metric>``. A restart adds a new event
    file; TensorBoard drops the redone steps of the old one.
    """

    def __init__(self, all_ranks: bool = False, flush_every_s: float = 10.0):
        _require("tensorboardX", "tensorboard", type(self).__name__)
        self.all_ranks, self.flush_every_s = all_ranks, flush_every_s
        self._writer: Any = None
        self._local: str | None = None
        self._fs: fsspec.AbstractFileSystem | None = None
        self._remote = ""
        self._uploaded_at = 0.0

    @_stays_off_after_failure
    def start_training(self, logdir: str, config: Any, **info: Any) -> None:
        if self._fs is None:  # called again without a finish: keep going as we are
            self._fs, root = _run_filesystem(logdir, info)
            self._remote = f"{root.rstrip('/')}/tensorboard"
            self._uploaded_at = time.monotonic()

    def _open(self, first_step: int) -> Any:
        """The writer, made at the first reported step: ``purge_step`` marks a restart, so
        TensorBoard hides the previous attempts' events from that step on (the redone steps)."""
        from tensorboardX import SummaryWriter

        self._local = tempfile.mkdtemp(prefix="distrain-tensorboard-")
        # File names start with the time in whole seconds; TensorBoard reads them in name
        # order. The suffix keeps two attempts' files within one second distinct and in order.
        suffix = f".{time.time_ns()}.{uuid.uuid4().hex[:6]}"
        return SummaryWriter(self._local, purge_step=first_step, filename_suffix=suffix)

    @_stays_off_after_failure
    def handle_result(self, results: list[dict[str, Any]], **info: Any) -> None:
        if self._fs is None:
            return
        reports = list(enumerate(results or [])) if self.all_ranks else [(0, _rank0(results))]
        for rank, metrics in reports:
            step = _step(metrics, info) if isinstance(metrics, Mapping) else None
            values = scalars(metrics)
            if step is None or not values:
                continue
            if self._writer is None:
                self._writer = self._open(step)
            walltime = metrics.get("_timestamp")
            walltime = float(walltime) if isinstance(walltime, (int, float)) else None
            prefix = f"rank_{rank}/" if self.all_ranks else ""
            for tag, value in values.items():
                self._writer.add_scalar(prefix + tag, value, global_step=step, walltime=walltime)
        if self._writer is not None and time.monotonic() - self._uploaded_at >= self.flush_every_s:
            self._upload()

    def _upload(self) -> None:
        assert self._writer is not None and self._local is not None and self._fs is not None
        self._writer.flush()
        self._uploaded_at = time.monotonic()
        local, remote = [], []
        for folder, _, names in os.walk(self._local):
            for name in names:
                path = os.path.join(folder, name)
                local.append(path)
                relative = os.path.relpath(path, self._local).replace(os.sep, "/")
                remote.append(f"{self._remote}/{relative}")
        if isinstance(self._fs, LocalFileSystem):
            for parent in {p.rsplit("/", 1)[0] for p in remote}:
                self._fs.makedirs(parent, exist_ok=True)
        if local:
            self._fs.put(local, remote)

    def finish_training(self, error: bool = False, **info: Any) -> None:
        """Upload what is left even after a failed hook: the curves so far are still useful."""
        writer, local = self._writer, self._local
        try:
            if writer is not None:
                self._upload()
        finally:
            if writer is not None:
                writer.close()
                shutil.rmtree(local, ignore_errors=True)
            self._writer = self._local = self._fs = None


class MLflowLogger(TrainingCallback):
    """One MLflow run per training run: params (the flattened config), rank 0's metrics at step
    ``_training_iteration``, and every committed checkpoint.

    ``log_checkpoints="uri"`` sets tags ``checkpoint_<index>`` and ``latest_checkpoint`` to
    the checkpoint's URL (retention may delete older ones from storage later);
    ``"artifacts"`` also uploads its files as ``checkpoints/checkpoint_<index>``. The run is
    found again by its storage URL (tag ``prefect_distrain.run_url``), so restarts and Prefect
    retries of one run go on in one MLflow run. It uses ``MlflowClient`` with explicit run ids:
    no global active run, which the driver's other threads (or the user's code) may hold.

    MLflow 3 refuses the ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``; prefer
    ``sqlite:///mlflow.db`` or a tracking server. ``artifact_location``: where a new
    experiment keeps artifacts (MLflow's default is ``./mlruns`` for database stores).
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "prefect-distrain",
                 run_name: str | None = None, log_checkpoints: str = "uri",
                 tags: dict[str, str] | None = None, artifact_location: str | None = None):
        if log_checkpoints not in ("uri", "artifacts"):
            raise ValueError(f"log_checkpoints={log_checkpoints!r}: use 'uri' or 'artifacts'")
        _require("mlflow", "mlflow", type(self).__name__)
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.log_checkpoints, self.tags = log_checkpoints, dict(tags or {})
        self.artifact_location = artifact_location
        self.run_id: str | None = None
        self._run_url: str | None = None
        self._client: Any = None
        self._storage: Any = None
        self._latest = -1

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @_stays_off_after_failure
    def start_training(self, logdir: str, config: Any, **info: Any) -> None:
        from mlflow.entities import Param, RunStatus

        self._storage = info.get("storage")
        client = self.client
        if self.run_id is None or self._run_url != logdir:
            experiment = client.get_experiment_by_name(self.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None else
                             client.create_experiment(self.experiment, self.artifact_location))
            self.run_id, self._run_url = self._find_or_create(experiment_id, logdir, info), logdir
        run = client.get_run(self.run_id)
        if run.info.status != "RUNNING":
            client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        for key in ("attempt", "world_size", "backend"):
            if key in info:
                client.set_tag(self.run_id, f"prefect_distrain.{key}", str(info[key]))
        # Params are write-once: log only the new ones (a restart logs the same config again).
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()
                  if k not in run.data.params]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(self.run_id, params=params[i:i + 100])

    def _find_or_create(self, experiment_id: str, run_url: str, info: Mapping) -> str:
        if "'" not in run_url:
            found = self.client.search_runs(
                [experiment_id], f"tags.`prefect_distrain.run_url` = '{run_url}'",
                max_results=1, order_by=["attributes.start_time DESC"])
            if found:
                return found[0].info.run_id
        tags = {**self.tags, "prefect_distrain.run_url": run_url}
        run = self.client.create_run(experiment_id, run_name=self.run_name or info.get("run_name"),
                                     tags=tags)
        return run.info.run_id

    @_stays_off_after_failure
    def handle_result(self, results: list[dict[str, Any]], **info: Any) -> None:
        from mlflow.entities import Metric

        metrics = _rank0(results)
        step = _step(metrics, info)
        if self.run_id is None or step is None:
            return
        stamp = metrics.get("_timestamp")
        millis = int((stamp if isinstance(stamp, (int, float)) else time.time()) * 1000)
        batch = [Metric(re.sub(r"[^\w\-./ ]", "_", k), v, millis, step)
                 for k, v in scalars(metrics).items()]
        for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    @_stays_off_after_failure
    def on_checkpoint_commit(self, checkpoint: Checkpoint, **info: Any) -> None:
        index = checkpoint.index if checkpoint.index is not None else info.get("index")
        if self.run_id is None or index is None:
            return
        url = redact_url(checkpoint.path)
        self.client.set_tag(self.run_id, f"checkpoint_{index}", url)
        if index >= self._latest:
            self._latest = index
            self.client.set_tag(self.run_id, "latest_checkpoint", url)
        if self.log_checkpoints == "artifacts":
            storage = self._storage  # the checkpoint carries no credentials; the run's do
            if storage is not None and checkpoint.path.startswith(storage.run_url + "/"):
                checkpoint = Checkpoint(checkpoint.path, storage.storage_options,
                                        checkpoint.manifest)
            local = checkpoint.to_directory()
            try:
                self.client.log_artifacts(self.run_id, local, f"checkpoints/checkpoint_{index}")
            finally:
                shutil.rmtree(local, ignore_errors=True)

    def finish_training(self, error: bool = False, **info: Any) -> None:
        """FAILED or FINISHED; a restart's ``start_training`` sets it RUNNING again."""
        if self.run_id is not None and not getattr(self, "_failed", False):
            self.client.set_terminated(self.run_id, "FAILED" if error else "FINISHED")


class WandbLogger(TrainingCallback):
    """A Weights & Biases run: the flattened config, rank 0's metrics at step
    ``_training_iteration``, and each committed checkpoint.

    ``mode`` goes to ``wandb.init`` unchanged: "offline" (the default: no account, no network;
    ``wandb sync <dir>`` uploads later), "online" (needs ``WANDB_API_KEY`` or ``wandb login`` on
    the driver), "disabled". ``log_checkpoints="path"`` puts the checkpoint URLs in the run's
    summary (``latest_checkpoint``, ``checkpoint_<index>``); ``"reference"`` also logs a
    ``model`` artifact that references the files in place (no upload, no checksum, so W&B never
    needs the storage's credentials). The console is not captured unless
    ``settings={"console": ...}`` says so: the driver's output belongs to the Prefect log.
    A restart resumes the same W&B run (same id, ``resume="allow"``); offline, that is a second
    run folder with that id, and ``wandb sync`` of both folders makes one run. W&B keeps steps
    increasing, so the steps a restart redoes may not be shown again.
    """

    def __init__(self, project: str = "prefect-distrain", mode: str = "offline",
                 dir: str | None = None, log_checkpoints: str = "path", **init_kwargs: Any):
        if log_checkpoints not in ("path", "reference"):
            raise ValueError(f"log_checkpoints={log_checkpoints!r}: use 'path' or 'reference'")
        _require("wandb", "wandb", type(self).__name__)
        self.project, self.mode, self.dir = project, mode, dir
        self.log_checkpoints, self.init_kwargs = log_checkpoints, init_kwargs
        self.init_kwargs.setdefault("settings", {"console": "off"})
        self.run: Any = None
        self.run_id: str | None = None
        self._name = "run"

    @_stays_off_after_failure
    def start_training(self, logdir: str, config: Any, **info: Any) -> None:
        if self.run is not None:
            return
        import wandb

        self._name = self.init_kwargs.get("name") or info.get("run_name") or "run"
        kwargs = {"project": self.project, "mode": self.mode, "dir": self.dir,
                  "name": self._name, "config": flatten(config), "reinit": "create_new",
                  **self.init_kwargs}
        if self.run_id is not None:  # a restart: the same W&B run
            kwargs.update(id=self.run_id, resume="allow")
        self.run = wandb.init(**kwargs)
        self.run_id = self.run.id

    @_stays_off_after_failure
    def handle_result(self, results: list[dict[str, Any]], **info: Any) -> None:
        metrics = _rank0(results)
        step = _step(metrics, info)
        values = scalars(metrics)
        if self.run is not None and step is not None and values:
            self.run.log(values, step=step)

    @_stays_off_after_failure
    def on_checkpoint_commit(self, checkpoint: Checkpoint, **info: Any) -> None:
        index = checkpoint.index if checkpoint.index is not None else info.get("index")
        if self.run is None or index is None:
            return
        url = redact_url(checkpoint.path)
        self.run.summary.update({"latest_checkpoint": url, f"checkpoint_{index}": url})
        if self.log_checkpoints == "reference":
            import wandb

            name = re.sub(r"[^\w\-.]", "_", f"{self._name}-checkpoint")
            artifact = wandb.Artifact(name, type="model",
                                      metadata={"index": index, "url": url,
                                                "metrics": scalars(checkpoint.metrics)})
            local = "://" not in url
            artifact.add_reference(f"file://{url}" if local else url, checksum=False)
            self.run.log_artifact(artifact, aliases=["latest", f"index-{index}"])

    def finish_training(self, error: bool = False, **info: Any) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish(exit_code=1 if error else 0)
