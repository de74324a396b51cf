"""What the training function calls on a worker: ``report``, ``get_checkpoint``, ``get_context``.

``report(metrics)`` is **not a barrier**: it hands the metrics to the worker's outbox and
returns, never waiting for other ranks or for the driver. The driver pairs the reports of all
ranks by their iteration number, so every rank must call ``report`` the same number of times.

With a checkpoint, ``report`` first takes the files. With ``upload="sync"`` (the default) it
copies them into storage and then waits until the driver has **committed** the checkpoint, which
needs every rank's report of the same iteration: so a checkpoint report waits for the slowest
rank, and once it returns the checkpoint survives any crash. With ``"async"`` it moves the
files out of the directory into a staging folder beside it (a rename, instant however large;
a copy where a rename can't) and returns; the upload and the commit follow in the background.
Either way the directory may be deleted or changed as soon as ``report`` returns.

This module never imports Prefect: workers stay light and start fast.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from .checkpoint import Checkpoint
from .storage import RunStorage


@dataclass(frozen=True)
class WorkerInfo:
    """Where a worker sits in the group; fixed while the group lives."""

    world_rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    node_ip: str


@dataclass(frozen=True)
class TrainContext:
    """Ray Train's ``TrainContext``: the worker's ranks, the run, and the restart attempt."""

    info: WorkerInfo
    experiment_name: str
    storage_url: str
    attempt: int = 0
    backend: str = ""

    def get_world_rank(self) -> int:
        return self.info.world_rank

    def get_world_size(self) -> int:
        return self.info.world_size

    def get_local_rank(self) -> int:
        return self.info.local_rank

    def get_local_world_size(self) -> int:
        return self.info.local_world_size

    def get_node_rank(self) -> int:
        return self.info.node_rank

    def get_experiment_name(self) -> str:
        return self.experiment_name

    def get_storage(self) -> str:
        """The run's folder (URL) in storage."""
        return self.storage_url

    def get_attempt(self) -> int:
        """0 on the first start of the worker group, then 1, 2, ... after each restart."""
        return self.attempt


@dataclass
class _Session:
    context: TrainContext
    storage: RunStorage
    checkpoint: Checkpoint | None
    #: Reports are numbered across the whole run (all attempts): a restart that resumes from
    #: checkpoint 3 numbers its first report 4. A checkpoint's index is its report's number.
    iteration: int = 0
    upload: str = "sync"
    outbox: queue.Queue = field(default_factory=queue.Queue)
    last_report_time: float = field(default_factory=time.time)
    _uploader: threading.Thread | None = None
    _upload_error: BaseException | None = None
    _committed: int = 0
    _commits: threading.Condition = field(default_factory=threading.Condition)

    def report(self, metrics: Mapping[str, Any], checkpoint: Checkpoint | None) -> None:
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"report() takes a dict of metrics, got {type(metrics).__name__}: "
                "call report({'loss': loss}) (use {} to report only a checkpoint)"
            )
        if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
            raise TypeError(
                "report(checkpoint=...) takes a prefect_distrain.Checkpoint, got "
                f"{type(checkpoint).__name__}: use Checkpoint.from_directory(path)"
            )
        bad_keys = [k for k in metrics if not isinstance(k, str)]
        if bad_keys:
            raise TypeError(f"report() metric names must be strings, got {bad_keys!r}")
        now = time.time()
        self.iteration += 1
        result = dict(metrics)
        result["_timestamp"] = int(now)
        result["_time_this_iter_s"] = now - self.last_report_time
        result["_training_iteration"] = self.iteration
        self.last_report_time = now
        self._raise_failed_upload()
        if checkpoint is None:
            self.outbox.put(("report", {"metrics": result, "checkpoint": None}))
            return
        index = self.iteration
        rank, attempt = self.context.get_world_rank(), self.context.get_attempt()
        if self.upload == "sync":
            files = self.storage.upload(checkpoint.path, index, attempt, rank)
            self.outbox.put(("report", {"metrics": result,
                                        "checkpoint": {"index": index, "files": files}}))
            with self._commits:
                self._commits.wait_for(lambda: self._committed >= index)
            return
        self.wait_for_upload()  # at most one upload in flight per rank
        self._raise_failed_upload()
        staged = _take_files(checkpoint.path, index)
        self.outbox.put(("report", {"metrics": result,
                                    "checkpoint": {"index": index, "files": None}}))
        self._uploader = threading.Thread(
            target=self._upload_in_background, args=(staged, index, attempt, rank),
            name=f"checkpoint-upload-{index}", daemon=True)
        self._uploader.start()

    def _upload_in_background(self, staged: str, index: int, attempt: int, rank: int) -> None:
        try:
            files = self.storage.upload(staged, index, attempt, rank)
            self.outbox.put(("persisted", {"index": index, "files": files}))
        except BaseException as error:  # noqa: BLE001 - raised by the next report() / finish()
            self._upload_error = error
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def acknowledge_commit(self, index: int) -> None:
        """The driver committed checkpoint ``index``: a sync ``report`` waiting on it returns."""
        with self._commits:
            self._committed = max(self._committed, index)
            self._commits.notify_all()

    def wait_for_upload(self) -> None:
        if self._uploader is not None:
            self._uploader.join()
            self._uploader = None

    def _raise_failed_upload(self) -> None:
        error, self._upload_error = self._upload_error, None
        if error is not None:
            raise error

    def finish(self) -> None:
        """After the training function returns: its last upload must land or fail loudly."""
        self.wait_for_upload()
        self._raise_failed_upload()


def _take_files(folder: str, index: int) -> str:
    """Move the reported files to a staging folder beside them (a rename: instant, however
    large), or copy those a rename can't move (another filesystem, no write access). Either
    way, what the training function writes there next can't change the checkpoint."""
    source = os.path.abspath(folder)
    try:
        staged = tempfile.mkdtemp(prefix=f".checkpoint-{index}-", dir=os.path.dirname(source))
    except OSError:
        staged = tempfile.mkdtemp(prefix=f"checkpoint-{index}-")
    for name in os.listdir(source):
        src, dst = os.path.join(source, name), os.path.join(staged, name)
        try:
            os.rename(src, dst)
        except OSError:
            if os.path.isdir(src):
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
    return staged


_current: _Session | None = None
_lock = threading.Lock()


def _set_session(session: _Session | None) -> None:
    global _current
    with _lock:
        _current = session


def _session(caller: str) -> _Session:
    if _current is None:
        raise RuntimeError(
            f"prefect_distrain.{caller}() was called outside a training function. Call it "
            "inside the function you pass to prefect_distrain.train(...) or Trainer.run(...)"
        )
    return _current


def report(metrics: Mapping[str, Any], checkpoint: Checkpoint | None = None) -> None:
    """Send metrics (and optionally a checkpoint) from this worker to the driver.

    Without a checkpoint: returns at once. With one: returns once it is committed (sync upload,
    waiting for every rank's report of this iteration) or staged locally (async upload).
    Every rank must call it the same number of times.
    """
    _session("report").report(metrics, checkpoint)


def get_checkpoint() -> Checkpoint | None:
    """The committed checkpoint to resume from (``resume_from_checkpoint``), or None on a fresh
    run. Fixed while the function runs, like Ray Train's."""
    return _session("get_checkpoint").checkpoint


def get_context() -> TrainContext:
    """This worker's ranks, the run's name and storage, and the restart attempt."""
    return _session("get_context").context
