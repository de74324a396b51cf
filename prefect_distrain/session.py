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

Stops: when a callback that decides stops exactly (``TrainingCallback.exact_stop``, e.g.
``EarlyStopping``) is attached, each report also waits for the driver's verdict on its iteration,
so a stop decided at report N ends every rank at report N. A stop set by any other callback
names the highest iteration the driver has seen; every rank ends at its first report at or
after it.

With ``CheckpointConfig(mode="auto")`` the framework helpers (``pd.torch.prepare_*``) register
what they prepared here; the training data loader calls ``begin_pass`` before each pass over
the data, which commits their state as a checkpoint. A run resuming from such a checkpoint
replays the passes it holds with one batch each (so the loop's per-epoch code finds its
variables; their reports were delivered before and are dropped), then restores the state where
the next pass begins: the loop needs no checkpoint code.

This module never imports Prefect: workers stay light and start fast.
"""

from __future__ import annotations

import itertools
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from .checkpoint import Checkpoint
from .exceptions import ConfigurationError, StopTraining
from .fs import is_local
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


class AutoState(Protocol):
    """What a framework's helpers keep for ``CheckpointConfig(mode="auto")``."""

    def save(self, folder: str, rank: int) -> None:
        """Write the prepared objects' state (and this rank's random state) into ``folder``."""

    def resume_pass(self) -> None:
        """The first pass after the replay begins: restore everything saved with it (the
        replayed steps changed the weights and drew random numbers)."""


#: The metric that marks a report as an automatic checkpoint, holding the passes done.
AUTO_PASS_KEY = "_auto_checkpoint_pass"


@dataclass
class _Session:
    context: TrainContext
    storage: RunStorage
    checkpoint: Checkpoint | None
    #: Reports are numbered across the whole run (all attempts): a restart that resumes from
    #: checkpoint 3 numbers its first report 4. A checkpoint's index is its report's number.
    iteration: int = 0
    upload: str = "sync"
    #: name -> this rank's DataIterator of each dataset given to the run.
    datasets: dict[str, Any] = field(default_factory=dict)
    checkpoint_mode: str = "manual"
    outbox: queue.Queue = field(default_factory=queue.Queue)
    last_report_time: float = field(default_factory=time.time)
    _uploader: threading.Thread | None = None
    _upload_error: BaseException | None = None
    #: Every report waits for the driver's verdict on its iteration (an exact-stop callback
    #: is attached); the verdicts and the commits acknowledged so far.
    await_verdicts: bool = False
    _committed: int = 0
    _judged: int = 0
    _driver: threading.Condition = field(default_factory=threading.Condition)
    #: mode="auto": the helpers' state, the passes begun over the training data, and the
    #: passes the resume checkpoint holds (replayed with one batch each).
    auto_state: AutoState | None = None
    passes_begun: int = 0
    training_loader_claimed: bool = False
    _last_metrics: dict[str, Any] = field(default_factory=dict)
    _last_auto_pass: int = 0
    #: Set by the driver when a callback stopped the run: the report numbered ``stop_at`` (or
    #: the next one, if this rank is past it) ends the function.
    stop_reason: str | None = None
    stop_at: int | None = None

    #: mode="auto": the passes the resume checkpoint holds (fixed while the function runs).
    passes_done_at_resume: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.checkpoint_mode == "auto" and self.checkpoint is not None:
            self.passes_done_at_resume = int(self.checkpoint.metrics.get(AUTO_PASS_KEY, 0))

    @property
    def replaying(self) -> bool:
        """Between a restart and the first pass the resume checkpoint does not hold."""
        return self.passes_begun <= self.passes_done_at_resume and self.passes_done_at_resume > 0

    def begin_pass(self) -> bool:
        """The training data loader starts a pass. True: a pass done before the restart,
        replayed with one batch; False: a real pass (checkpointed first in mode "auto")."""
        done = self.passes_begun
        self.passes_begun += 1
        resumed_at = self.passes_done_at_resume
        if done < resumed_at:
            return True
        if done == resumed_at and done > 0:
            if self.auto_state is not None:
                self.auto_state.resume_pass()
            self._last_auto_pass = done
        elif done > 0:
            self.auto_checkpoint(done)
        return False

    def auto_checkpoint(self, passes_done: int) -> None:
        """Commit the registered state as it is after ``passes_done`` passes."""
        if self.checkpoint_mode != "auto" or self.auto_state is None:
            return
        folder = tempfile.mkdtemp(prefix=f"auto-checkpoint-{passes_done}-")
        try:
            self.auto_state.save(folder, self.context.get_world_rank())
            self.report({**self._last_metrics, AUTO_PASS_KEY: passes_done},
                        Checkpoint.from_directory(folder))
            self._last_auto_pass = passes_done
        finally:
            shutil.rmtree(folder, ignore_errors=True)

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
        if self.replaying:
            return  # a pass done before the restart: its report was delivered then
        if self.checkpoint_mode == "auto" and AUTO_PASS_KEY not in metrics:
            self._last_metrics = {k: v for k, v in metrics.items() if not k.startswith("_")}
        now = time.time()
        self.iteration += 1
        result = dict(metrics)
        result["_timestamp"] = int(now)
        result["_time_this_iter_s"] = now - self.last_report_time
        result["_training_iteration"] = self.iteration
        self.last_report_time = now
        self._raise_failed_upload()
        self._send(result, checkpoint)
        if self.await_verdicts and AUTO_PASS_KEY not in result:  # automatic: nobody judges it
            self._wait_for_driver(lambda: self._judged >= self.iteration)
        if self.stop_at is not None and self.iteration >= self.stop_at:
            raise StopTraining(self.stop_reason)

    def _send(self, result: dict[str, Any], checkpoint: Checkpoint | None) -> None:
        awaits = self.await_verdicts and AUTO_PASS_KEY not in result
        if checkpoint is None:
            self.outbox.put(("report", {"metrics": result, "checkpoint": None,
                                        "awaits_verdict": awaits}))
            return
        index = self.iteration
        rank, attempt = self.context.get_world_rank(), self.context.get_attempt()
        folder, ours = self._source(checkpoint)
        if self.upload == "sync":
            try:
                files = self.storage.upload(folder, index, attempt, rank)
            finally:
                if ours:
                    shutil.rmtree(folder, ignore_errors=True)
            self.outbox.put(("report", {"metrics": result, "awaits_verdict": awaits,
                                        "checkpoint": {"index": index, "files": files}}))
            self._wait_for_driver(lambda: self._committed >= index)
            return
        self.wait_for_upload()  # at most one upload in flight per rank
        self._raise_failed_upload()
        staged = folder if ours else _take_files(folder, index, move=not self._protected(
            checkpoint, folder))
        self.outbox.put(("report", {"metrics": result, "awaits_verdict": awaits,
                                    "checkpoint": {"index": index, "files": None}}))
        self._uploader = threading.Thread(
            target=self._upload_in_background, args=(staged, index, attempt, rank),
            name=f"checkpoint-upload-{index}", daemon=True)
        self._uploader.start()

    def _source(self, checkpoint: Checkpoint) -> tuple[str, bool]:
        """The local folder to upload the reported checkpoint from, and whether it is a copy
        of our own (to remove afterwards). A checkpoint in remote storage (``get_checkpoint()``
        on S3, say) is downloaded first, its files verified."""
        fs, path = checkpoint.location()
        if not is_local(fs):
            return checkpoint.to_directory(tempfile.mkdtemp(prefix="checkpoint-source-")), True
        if not os.path.isdir(path):
            raise ConfigurationError(
                f"report(checkpoint=...): {path!r} is not a directory. Write the files into a "
                "folder and pass Checkpoint.from_directory(folder)")
        return path, False

    def _protected(self, checkpoint: Checkpoint, folder: str) -> bool:
        """Files that must stay where they are: a committed checkpoint's, or anything in the
        run's storage. Async uploads copy these instead of moving them."""
        return checkpoint.manifest is not None or self.storage.contains(folder)

    def _upload_in_background(self, staged: str, index: int, attempt: int, rank: int) -> None:
        try:
            files = self.storage.upload(staged, index, attempt, rank)
            self.outbox.put(("persisted", {"index": index, "files": files}))
        except BaseException as error:  # noqa: BLE001 - raised by the next report() / finish()
            self._upload_error = error
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def _wait_for_driver(self, done: Callable[[], bool]) -> None:
        with self._driver:
            self._driver.wait_for(done)

    def acknowledge_commit(self, index: int) -> None:
        """The driver committed checkpoint ``index``: a sync ``report`` waiting on it returns."""
        with self._driver:
            self._committed = max(self._committed, index)
            self._driver.notify_all()

    def judge(self, iteration: int, stop_reason: str | None) -> None:
        """The driver's verdict on ``iteration``: go on, or stop there. Verdicts may arrive out
        of order (the actor serves them on a second thread), so they only ever move forward."""
        with self._driver:
            if stop_reason is not None:
                self._stop(stop_reason, iteration)
            self._judged = max(self._judged, iteration)
            self._driver.notify_all()

    def request_stop(self, reason: str, at: int) -> None:
        """A stop that no report waited for: end at report ``at``, or the next one if past it."""
        with self._driver:
            self._stop(reason, at)

    def _stop(self, reason: str, at: int) -> None:
        if self.stop_at is None or at < self.stop_at:
            self.stop_at, self.stop_reason = at, reason

    def wait_for_upload(self) -> None:
        if self._uploader is not None:
            self._uploader.join()
            self._uploader = None

    def _raise_failed_upload(self) -> None:
        error, self._upload_error = self._upload_error, None
        if error is not None:
            raise error

    def finish(self) -> None:
        """After the training function returns: in mode "auto" its final state is committed;
        its last upload must land or fail loudly."""
        if self.passes_begun > max(self._last_auto_pass, self.passes_done_at_resume):
            try:
                self.auto_checkpoint(self.passes_begun)
            except StopTraining:
                pass  # committed all the same: the run ends here anyway
        self.wait_for_upload()
        self._raise_failed_upload()


def _take_files(folder: str, index: int, move: bool = True) -> str:
    """Move the reported files to a staging folder beside them (a rename: instant, however
    large), or copy them when they must stay (``move=False``) or a rename can't move them
    (another filesystem, no write access). Either way, what the training function writes
    there next can't change the checkpoint."""
    source = os.path.abspath(folder)
    staged = None
    if move:
        try:
            staged = tempfile.mkdtemp(prefix=f".checkpoint-{index}-",
                                      dir=os.path.dirname(source))
        except OSError:
            pass
    staged = staged or tempfile.mkdtemp(prefix=f"checkpoint-{index}-")
    for name in os.listdir(source):
        src, dst = os.path.join(source, name), os.path.join(staged, name)
        try:
            if not move:
                raise OSError("copied, not moved")
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

    Once a callback has stopped the run (e.g. ``EarlyStopping``), it sends this report and
    then raises ``StopTraining``, which ends the training function cleanly.
    Without a checkpoint: returns at once. With one: returns once it is committed (sync upload,
    waiting for every rank's report of this iteration) or staged locally (async upload).
    Every rank must call it the same number of times.
    """
    _session("report").report(metrics, checkpoint)


def get_checkpoint() -> Checkpoint | None:
    """The committed checkpoint to resume from (``resume_from_checkpoint``), or None on a fresh
    run. Fixed while the function runs, like Ray Train's."""
    return _session("get_checkpoint").checkpoint


def get_dataset_shard(name: str = "train") -> Any:
    """This worker's share of the dataset ``name`` given to ``train(datasets=...)``: a Ray
    ``DataIterator`` (``iter_torch_batches``, ``iter_batches``, ``iter_rows``). Split datasets
    give each rank a disjoint share; the others reach every rank whole."""
    session = _session("get_dataset_shard")
    if name not in session.datasets:
        given = ", ".join(repr(n) for n in sorted(session.datasets)) or "none"
        raise KeyError(
            f"no dataset {name!r} was given to this run (given: {given}): pass it with "
            f"train(..., datasets={{{name!r}: ray_dataset_or_url}})")
    shard = session.datasets[name]
    if name == "train" and session.checkpoint_mode == "auto" \
            and not session.training_loader_claimed:
        session.training_loader_claimed = True
        session.datasets[name] = shard = _TrainingShard(shard, session)
    return shard


class _TrainingShard:
    """The "train" shard in mode "auto": each pass over it begins a pass of the session (a
    checkpoint before it, or one batch while replaying passes done before a restart)."""

    def __init__(self, iterator: Any, session: _Session):
        self._iterator = iterator
        self._session = session

    def __getattr__(self, name: str) -> Any:
        return getattr(self._iterator, name)

    def _pass(self, method: str, *args: Any, **kwargs: Any) -> Any:
        batches = getattr(self._iterator, method)(*args, **kwargs)
        if self._session.begin_pass():
            return itertools.islice(batches, 1)  # replayed: one batch, its effect undone
        return batches

    def iter_batches(self, *args: Any, **kwargs: Any) -> Any:
        return self._pass("iter_batches", *args, **kwargs)

    def iter_torch_batches(self, *args: Any, **kwargs: Any) -> Any:
        return self._pass("iter_torch_batches", *args, **kwargs)

    def iter_rows(self, *args: Any, **kwargs: Any) -> Any:
        return self._pass("iter_rows", *args, **kwargs)


def get_context() -> TrainContext:
    """This worker's ranks, the run's name and storage, and the restart attempt."""
    return _session("get_context").context
