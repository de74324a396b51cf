"""The session of one worker: numbered reports to the driver, the driver's answers.

``report(metrics)`` is **not a barrier**: it hands the metrics to the worker's outbox and
returns, never waiting for other ranks or for the driver. The driver pairs the reports of all
ranks by their iteration number, so every rank must call ``report`` the same number of times.

With a checkpoint, ``report`` first takes the files (uploader.py). With ``upload="sync"`` (the
default) it copies them into storage and then waits until the driver has **committed** the
checkpoint, which needs every rank's report of the same iteration: so a checkpoint report
waits for the slowest rank, and once it returns the checkpoint survives any crash. With
``"async"`` the upload and the commit follow in the background. Either way the folder may be
deleted or changed as soon as ``report`` returns.

Stops: when a callback that decides stops exactly (``TrainingCallback.exact_stop``, e.g.
``EarlyStopping``) is attached, each report also waits for the driver's verdict on its
iteration, so a stop decided at report N ends every rank at report N. A stop set by any other
callback names the highest iteration the driver has seen; every rank ends at its first report
at or after it.

Preemption: SIGTERM to the worker (``preempt``, from the actor's signal handler) or to the
driver (``preempt`` through the actor) makes ``preemption_requested()`` True; the rank's next
report commits its checkpoint and ends the function.

This module never imports Prefect: workers stay light and start fast.
"""

from __future__ import annotations

import contextlib
import pickle
import queue
import threading
import time
from typing import Any, Callable, Iterator, Mapping

from ray import cloudpickle

from ..checkpoints.checkpoint import Checkpoint
from ..checkpoints.storage import RunStorage
from ..exceptions import ConfigurationError, StopTraining
from .auto import AUTO_PASS_KEY, AutoCheckpoints
from .context import TrainContext, any_rank
from .uploader import Uploader


class Session:
    """What the training function on one worker talks to (through ``pd.report`` & co)."""

    def __init__(self, context: TrainContext, storage: RunStorage, resume_from: Checkpoint | None,
                 iteration: int = 0, upload: str = "sync", datasets: dict[str, Any] | None = None,
                 checkpoint_mode: str = "manual", await_verdicts: bool = False,
                 progress_every_s: float | None = None, preemption_grace_s: float = 25.0,
                 validates: bool = False, auto_every_n_batches: int | None = None):
        self.context = context
        #: Whether the run has a validation function (``report(..., validate=True)`` needs one).
        self.validates = validates
        #: The training data (``pd.torch.prepare_data_loader``'s loader or the training
        #: dataset's shard), whose position goes with every report (session/positions.py).
        self.data_loader: Any = None
        self.storage = storage
        #: The checkpoint to resume from (``get_checkpoint()``), fixed while the function runs.
        self.resume_from = resume_from
        #: Reports are numbered across the whole run (all attempts): a restart that resumes
        #: from checkpoint 3 numbers its first report 4. A checkpoint's index is its report's.
        self.iteration = iteration
        #: name -> this rank's DataIterator of each dataset given to the run.
        self.datasets = dict(datasets or {})
        #: Every report waits for the driver's verdict on its iteration.
        self.await_verdicts = await_verdicts
        self.outbox: queue.Queue = queue.Queue()
        rank = context.get_world_rank()
        self.uploader = Uploader(
            storage, upload, rank, context.get_attempt(), self.outbox,
            self._wait_for_plan if rank > 0 and context.get_world_size() > 1 else None)
        self.auto = AutoCheckpoints(checkpoint_mode == "auto", resume_from, rank, self.report,
                                    every_n_batches=auto_every_n_batches)
        self.last_report_time = time.time()
        #: Set by the driver when a callback stopped the run: the report numbered ``stop_at``
        #: (or the next one, if this rank is past it) ends the function.
        self.stop_reason: str | None = None
        self.stop_at: int | None = None
        self._committed = 0
        self._judged = 0
        #: The driver's upload plans: checkpoint index -> the names a lower rank uploads.
        self._plans: dict[int, list[str]] = {}
        self._driver = threading.Condition()
        #: Progress for the driver's hang detection: reports and steps through prepared data
        #: loaders, and what the rank waits for when it is busy outside the training code.
        self.progress = 0
        self.busy: str | None = None
        #: How often the worker tells the driver its progress (None: hang detection is off).
        self.progress_every_s = progress_every_s
        #: Set once this rank (or the driver) was told to stop by SIGTERM; after the grace
        #: period the worker's process ends even if the driver did not end it.
        self.preempted = threading.Event()
        self.preemption_grace_s = preemption_grace_s

    def preempt(self, why: str, tell_driver: bool) -> None:
        """SIGTERM reached this worker (``tell_driver``: the driver does not know yet) or the
        driver: ``preemption_requested()`` turns True."""
        if self.preempted.is_set():
            return
        self.preempted.set()
        if tell_driver:
            self.outbox.put(("preempted", {"why": why}))

    def preemption_requested(self) -> bool:
        """Whether any rank was preempted, agreed by all ranks where the backend can (see
        ``TrainContext.preemption_requested``). Once True, the next report is the last."""
        requested = self.preempted.is_set()
        agree = any_rank()
        if agree is not None and self.context.get_world_size() > 1:
            requested = agree(requested)
        if requested:
            self.preempted.set()
            with self._driver:
                self._stop("the run was preempted (SIGTERM)", self.iteration + 1)
        return requested

    def step(self) -> None:
        """A training step went by (a batch of a prepared loader): progress, for the driver."""
        self.progress += 1

    @contextlib.contextmanager
    def busy_with(self, what: str) -> Iterator[None]:
        """Outside the training code (an upload, a wait for the driver): not a hang."""
        self.busy = what
        try:
            yield
        finally:
            self.busy = None
            self.progress += 1

    # -- the training function's side ------------------------------------------------------

    def report(self, metrics: Mapping[str, Any], checkpoint: Checkpoint | None,
               validate: bool | None = None) -> None:
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"report() takes a dict of metrics, got {type(metrics).__name__}: "
                "call report({'loss': loss}) (use {} to report only a checkpoint)")
        if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
            raise TypeError(
                "report(checkpoint=...) takes a prefect_distrain.Checkpoint, got "
                f"{type(checkpoint).__name__}: use Checkpoint.from_directory(path)")
        if validate is not None and not isinstance(validate, bool):
            raise TypeError(f"report(validate=...) takes True, False or None, got {validate!r}")
        if validate and not self.validates:
            raise ConfigurationError(
                "report(..., validate=True) but the run has no validation function: give it "
                "one with CheckpointConfig(validate=pd.Validation(fn))")
        bad_keys = [k for k in metrics if not isinstance(k, str)]
        if bad_keys:
            raise TypeError(f"report() metric names must be strings, got {bad_keys!r}")
        _check_sendable(metrics)
        if self.auto.replaying:
            return  # a pass done before the restart: its report was delivered then
        self.progress += 1
        self.auto.note(dict(metrics))
        now = time.time()
        self.iteration += 1
        result = dict(metrics)
        result["_timestamp"] = int(now)
        result["_time_this_iter_s"] = now - self.last_report_time
        result["_training_iteration"] = self.iteration
        self.last_report_time = now
        self.uploader.raise_failed()
        self._send(result, checkpoint, validate)
        if self.await_verdicts and AUTO_PASS_KEY not in result:  # automatic: nobody judges it
            self._wait_for_driver(lambda: self._judged >= self.iteration)
        if self.stop_at is not None and self.iteration >= self.stop_at:
            raise StopTraining(self.stop_reason)

    def _send(self, result: dict[str, Any], checkpoint: Checkpoint | None,
              validate: bool | None = None) -> None:
        awaits = self.await_verdicts and AUTO_PASS_KEY not in result
        # Where this rank is in its training data (session/positions.py), for the manifest.
        position = self.data_loader.position() if self.data_loader is not None else None
        if checkpoint is None:
            self.outbox.put(("report", {"metrics": result, "upload": None,
                                        "awaits_verdict": awaits, "position": position}))
            return
        index = self.iteration
        sync = self.uploader.mode == "sync"
        with self.busy_with(f"staging checkpoint {index}"):
            staged = self.uploader.stage(index, checkpoint)
        self.outbox.put(("report", {"metrics": result, "awaits_verdict": awaits,
                                    "position": position,
                                    "upload": {"index": index, "names": staged.names,
                                               "sync": sync, "validate": validate,
                                               "retries": self.uploader.take_retries()}}))
        with self.busy_with(f"uploading checkpoint {index}"):
            self.uploader.upload(staged)
        if sync:  # returns once committed
            self._wait_for_driver(lambda: self._committed >= index)

    def finish(self) -> None:
        """After the training function returns: in mode "auto" its final state is committed;
        its last upload must land or fail loudly."""
        self.auto.finish()
        with self.busy_with("waiting for its last upload"):
            self.uploader.wait()
        self.uploader.raise_failed()

    # -- the driver's side (called on the actor's second thread) -----------------------------

    def acknowledge_commit(self, index: int) -> None:
        """The driver committed checkpoint ``index``: a sync ``report`` waiting on it returns."""
        with self._driver:
            self._committed = max(self._committed, index)
            self._driver.notify_all()

    def plan_upload(self, index: int, skip: list[str]) -> None:
        """The driver's plan for this rank's files of checkpoint ``index``: skip those named
        (a lower rank uploads them)."""
        with self._driver:
            self._plans[index] = list(skip)
            self._driver.notify_all()

    def _wait_for_plan(self, index: int) -> list[str]:
        """(The caller says what it is busy with: this may run on the upload thread.)"""
        with self._driver:
            self._driver.wait_for(lambda: index in self._plans)
            return self._plans.pop(index)

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

    def _wait_for_driver(self, done: Callable[[], bool]) -> None:
        with self.busy_with("waiting for the driver"), self._driver:
            self._driver.wait_for(done)


def _check_sendable(metrics: Mapping[str, Any]) -> None:
    """Metrics travel to the driver pickled: one that cannot is named here, in the loop, not
    as a serialization error of the worker's stream. Plain pickle first (microseconds)."""
    try:
        pickle.dumps(dict(metrics), protocol=pickle.HIGHEST_PROTOCOL)
        return
    except Exception:  # noqa: BLE001 - cloudpickle (what Ray uses) may still manage
        pass
    for key, value in metrics.items():
        check_sendable(value, f"metric {key!r}", "report plain values, e.g. numbers, strings, "
                       "lists or dicts of them (loss.item() rather than a tensor with a graph)")


def check_sendable(value: Any, what: str, fix: str) -> None:
    """``TypeError`` naming ``what`` and ``fix`` when ``value`` cannot travel to the driver."""
    try:
        cloudpickle.dumps(value)
    except Exception as error:  # noqa: BLE001 - named below
        raise TypeError(
            f"{what} ({type(value).__module__}.{type(value).__qualname__}) cannot be sent to "
            f"the driver ({error}): {fix}") from None
