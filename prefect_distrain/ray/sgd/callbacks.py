"""RaySGD's ``ray.sgd.callbacks`` over prefect_distrain's callbacks.

``SGDCallback`` is ``prefect_distrain.TrainingCallback`` (same hooks: ``start_training``,
``handle_result(results, **info)``, ``finish_training``) that, like RaySGD's, never sees the
reports ``sgd.save_checkpoint`` makes (they carry ``_sgd_checkpoint``); so neither do its
subclasses here: ``PrintCallback`` (``PrintingCallback``), ``JsonLoggerCallback`` (one JSON line
of results per report) and ``TBXLoggerCallback`` (``TensorBoardLogger``).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Iterable

from ...callbacks import PrintingCallback, TrainingCallback
from ...checkpoints.fs import filesystem, is_local
from ...exceptions import ConfigurationError
from ...integrations.trackers import TensorBoardLogger

__all__ = ["CHECKPOINT_KEY", "JsonLoggerCallback", "PrintCallback", "SGDCallback",
           "TBXLoggerCallback"]

#: The metric that marks the report of an ``sgd.save_checkpoint`` call.
CHECKPOINT_KEY = "_sgd_checkpoint"


def _skipping_checkpoint_reports(handle_result: Callable) -> Callable:
    @functools.wraps(handle_result)
    def handle(self: Any, results: list[dict[str, Any]], **info: Any) -> Any:
        if any(isinstance(r, dict) and r.get(CHECKPOINT_KEY) for r in results or []):
            return None
        return handle_result(self, results, **info)

    handle.skips_sgd_checkpoints = True  # type: ignore[attr-defined]
    return handle


class SGDCallback(TrainingCallback):
    """RaySGD's ``SGDCallback``: a ``TrainingCallback`` whose ``handle_result`` (its own or an
    inherited one) skips the reports of ``sgd.save_checkpoint``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not getattr(cls.handle_result, "skips_sgd_checkpoints", False):
            cls.handle_result = _skipping_checkpoint_reports(cls.handle_result)


class PrintCallback(SGDCallback, PrintingCallback):
    """Prints each report's results (every rank's) as one JSON line."""


class TBXLoggerCallback(SGDCallback, TensorBoardLogger):
    """RaySGD's TensorBoard logger: ``TensorBoardLogger``, event files in the run's folder
    (``<logdir>/run_NNN/tensorboard``). ``workers_to_log``: 0 (rank 0) or None (every rank,
    as ``rank_<N>/<metric>``)."""

    def __init__(self, logdir: str | None = None, workers_to_log: int | None = 0):
        if logdir is not None:
            raise ConfigurationError(
                "TBXLoggerCallback writes into the run's folder (<Trainer logdir>/run_NNN/"
                "tensorboard); give the folder as Trainer(logdir=...) instead")
        if workers_to_log not in (0, None):
            raise ConfigurationError(
                f"TBXLoggerCallback(workers_to_log={workers_to_log!r}): use 0 (rank 0) or None "
                "(every rank)")
        super().__init__(all_ranks=workers_to_log is None)


class JsonLoggerCallback(SGDCallback):
    """Writes each report's results as one JSON line (a list: the logged workers' results) to
    ``<logdir>/<filename>``: the run's folder (``<Trainer logdir>/run_NNN``) unless ``logdir``
    (a local path or an fsspec URL) is given. ``workers_to_log``: a rank, a list of ranks, or
    None for every rank. A new run starts the file afresh; a restart of the same run goes on
    appending (the reports it redoes appear again). On object stores the file is rewritten at
    most every ``flush_every_s`` and at the end of each attempt."""

    def __init__(self, logdir: str | None = None, filename: str | None = None,
                 workers_to_log: int | Iterable[int] | None = 0, flush_every_s: float = 10.0):
        if isinstance(workers_to_log, int):
            workers_to_log = [workers_to_log]
        if workers_to_log is not None:
            workers_to_log = list(workers_to_log)
            if not all(isinstance(w, int) and not isinstance(w, bool) for w in workers_to_log):
                raise TypeError("All elements of workers_to_log must be integers.")
        self.logdir, self.filename = logdir, filename or "results.json"
        self.workers_to_log, self.flush_every_s = workers_to_log, flush_every_s
        #: Where the results go (a local path or a URL path), once training started.
        self.log_path: str | None = None
        self._fs: Any = None
        self._run: str | None = None
        self._pending: list[str] = []
        self._text = ""
        self._written_at = 0.0

    def start_training(self, logdir: str, config: Any, **info: Any) -> None:
        storage = info.get("storage")
        if self.logdir is not None:
            fs, root = filesystem(os.fspath(self.logdir), {})
        else:
            fs, root = storage.filesystem() if storage is not None else filesystem(logdir, {})
        path = f"{root.rstrip('/')}/{self.filename}"
        if (path, info.get("run_name")) == (self.log_path, self._run):
            return  # a restart of the same run: go on appending
        self._fs, self.log_path, self._run = fs, path, info.get("run_name")
        self._pending, self._text = [], ""
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(path, b"")
        self._written_at = time.monotonic()

    def handle_result(self, results: list[dict[str, Any]], **info: Any) -> None:
        if self._fs is None:
            return
        logged = results if self.workers_to_log is None else \
            [results[i] for i in self.workers_to_log if i < len(results)]
        self._pending.append(json.dumps(logged, default=str) + "\n")
        if is_local(self._fs) or time.monotonic() - self._written_at >= self.flush_every_s:
            self._write()

    def finish_training(self, error: bool = False, **info: Any) -> None:
        if self._fs is not None:
            self._write()

    def _write(self) -> None:
        lines, self._pending = "".join(self._pending), []
        if is_local(self._fs):  # append
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(lines)
        else:  # object stores cannot append: the whole file again
            self._text += lines
            self._fs.pipe_file(self.log_path, self._text.encode("utf-8"))
        self._written_at = time.monotonic()
