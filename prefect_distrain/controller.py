"""The driver loop of one run: start the function on every rank, collect reports as they come,
hand complete iterations to the callbacks, commit checkpoints once all their files are up, and
turn the first failure into one error.
"""

from __future__ import annotations

import contextlib
import inspect
import contextvars
import logging
import os
import pickle
import queue
import sys
import sysconfig
import threading
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import cloudpickle
import ray
from ray.exceptions import RayActorError, RayTaskError

from . import settings
from .callbacks import TrainingCallback
from .checkpoint import Checkpoint
from .config import CheckpointConfig
from .exceptions import (
    ConfigurationError,
    DistrainError,
    RemoteTraceback,
    UnequalReportsError,
    WorkerError,
    WorkerLostError,
)
from .logs import WorkerLogs
from .session import AUTO_PASS_KEY, TrainContext
from .checkpoint_manager import CheckpointManager
from .fs import redact_url
from .manifest import FileEntry
from .storage import RunStorage
from .worker_group import WorkerGroup

#: Rank-0 metrics are logged at INFO at most this often (plus every checkpoint), so a loop that
#: reports every step does not flood the run log.
_LOG_EVERY_S = 5.0


@dataclass
class RunSpec:
    """Everything one run needs, resolved and validated by the Trainer."""

    train_func: Callable
    #: The function pickled once, before anything starts (``serialize_train_function``).
    train_func_blob: bytes
    config: Any
    storage: RunStorage
    backend_name: str
    #: Commits, retention and the lease of the run (the only place that decides them).
    checkpoints: CheckpointManager
    checkpoint_config: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume_from: Checkpoint | None = None
    callbacks: list[TrainingCallback] = field(default_factory=list)
    attempt: int = 0
    #: Rank 0's reports, appended as iterations complete (kept by the caller across restarts).
    history: list[dict[str, Any]] = field(default_factory=list)
    #: Every rank's reports: one list (in rank order) per iteration, beside ``history``.
    history_all_ranks: list[list[dict[str, Any]]] = field(default_factory=list)
    #: One ``{name: DataIterator}`` per rank, split for this group's size.
    dataset_shards: list[dict[str, Any]] | None = None
    #: Asked after each commit while an elastic group runs small: may it grow now?
    can_scale_up: Callable[[], bool] | None = None
    #: The backend's own test for errors of its runtime (e.g. a collective timeout).
    is_backend_failure: Callable[[BaseException], bool] = lambda error: False
    fatal_exceptions: tuple[type[BaseException], ...] = ()
    logs: WorkerLogs | None = None

    @property
    def first_index(self) -> int:
        """Report (and checkpoint) numbers go on after the checkpoint the run resumes from."""
        resumed = self.resume_from.index if self.resume_from is not None else None
        latest = max((m.index for m in self.checkpoints.committed), default=0)
        return max(resumed or 0, latest) + 1


class ScaleUp(Exception):
    """The cluster can hold the full group again: restart it from the checkpoint just
    committed. Not a failure."""

    def __init__(self, index: int):
        super().__init__(f"scale up after checkpoint {index}")
        self.index = index


def serialize_train_function(fn: Callable) -> bytes:
    """Pickle the function once for all workers; say what it captured when that fails."""
    if not callable(fn):
        raise ConfigurationError(
            f"the training function must be callable, got {type(fn).__name__}: pass the "
            "function itself, e.g. train(train_loop), not train(train_loop())")
    try:
        with _by_value(sys.modules.get(getattr(fn, "__module__", None) or "")):
            return cloudpickle.dumps(fn)
    except Exception as error:
        culprits = ", ".join(_unpicklable_captures(fn)) or "an object that can't be pickled"
        raise ConfigurationError(
            f"the training function {getattr(fn, '__qualname__', fn)!r} can't be pickled to "
            f"send it to the Ray workers: it captures {culprits}. Create such objects inside "
            f"the function, or pass plain values through config=... ({error})") from error


_pickle_lock = threading.Lock()
_INSTALLED = tuple(os.path.realpath(p) + os.sep for p in {
    sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})


@contextlib.contextmanager
def _by_value(module: types.ModuleType | None) -> Iterator[None]:
    """Pickle a function of the user's own module (a flow file, a test module) by value, as
    ``__main__`` is: the workers may not have that module on their path. Installed packages
    stay references."""
    file = getattr(module, "__file__", None)
    if (module is None or not file or module.__name__ in ("__main__",)
            or os.path.realpath(file).startswith(_INSTALLED)
            or module.__name__.split(".")[0] == "prefect_distrain"):
        yield
        return
    with _pickle_lock:
        cloudpickle.register_pickle_by_value(module)
        try:
            yield
        finally:
            cloudpickle.unregister_pickle_by_value(module)


def _unpicklable_captures(fn: Callable) -> list[str]:
    try:
        captured = inspect.getclosurevars(fn)
    except TypeError:
        return []
    found = []
    for kind, names in (("variable", captured.nonlocals), ("global", captured.globals)):
        for name, value in names.items():
            try:
                cloudpickle.dumps(value)
            except Exception:  # noqa: BLE001 - we are looking for exactly these
                found.append(f"{kind} {name!r} ({type(value).__module__}.{type(value).__qualname__})")
    return found


def takes_config(fn: Callable) -> bool:
    try:
        return len(inspect.signature(fn).parameters) > 0
    except (TypeError, ValueError):
        return True


class _Commits:
    """Collects the files of each reported checkpoint from the ranks that declared it; once all
    are up, the checkpoint manager commits it. Manifests are the only truth: what is not
    committed does not exist."""

    def __init__(self, spec: RunSpec, group: WorkerGroup, callbacks: _Callbacks,
                 logger: logging.Logger):
        self.spec = spec
        self.group = group
        self.callbacks = callbacks
        self.world_size = len(group)
        self.logger = logger
        self.waiting: dict[int, dict[str, Any]] = {}

    def uploaded(self, index: int, rank: int, files: dict[str, FileEntry]) -> None:
        self.waiting.setdefault(index, {"files": {}})["files"][rank] = files
        self._commit_if_ready(index)

    def declared(self, index: int, ranks: set[int], metrics: dict) -> None:
        entry = self.waiting.setdefault(index, {"files": {}})
        entry["ranks"], entry["metrics"] = ranks, metrics
        self._commit_if_ready(index)

    def _commit_if_ready(self, index: int) -> None:
        entry = self.waiting[index]
        if "ranks" not in entry or set(entry["files"]) != entry["ranks"]:
            return
        del self.waiting[index]
        manager = self.spec.checkpoints
        manifest = manager.commit(index, self.spec.attempt, entry["files"], entry["metrics"],
                                  world_size=self.world_size, backend=self.spec.backend_name)
        if self.spec.checkpoint_config.upload == "sync":
            self.group.acknowledge_commit(index, sorted(entry["files"]))
        checkpoint = manager.checkpoint(manifest)
        self.logger.info("Committed checkpoint %d: %s", index, redact_url(checkpoint.path))
        self.callbacks.call("on_checkpoint_commit", checkpoint.without_credentials(),
                            index=index, attempt=self.spec.attempt)
        if self.spec.can_scale_up is not None and self.spec.can_scale_up():
            raise ScaleUp(index)


class _Iterations:
    """Pairs the reports of all ranks by iteration number."""

    def __init__(self, world_size: int, spec: RunSpec, commits: _Commits,
                 callbacks: _Callbacks, logger: logging.Logger):
        self.world_size = world_size
        self.callbacks = callbacks
        self.commits = commits
        self.logger = logger
        self.pending: dict[int, dict[int, dict]] = {}
        self.history = spec.history
        self.history_all_ranks = spec.history_all_ranks
        self.first = spec.first_index
        #: The last iteration each rank reported, and the highest of them (an asynchronous
        #: stop ends every rank at its first report from there on).
        self.last: dict[int, int] = {}
        self.highest = self.first - 1
        self._last_log = 0.0

    def add(self, rank: int, report: dict[str, Any]) -> None:
        iteration = report["metrics"]["_training_iteration"]
        self.last[rank] = iteration
        self.highest = max(self.highest, iteration)
        checkpoint = report["checkpoint"]
        if checkpoint is not None and checkpoint["files"] is not None:  # a sync upload
            self.commits.uploaded(checkpoint["index"], rank, checkpoint["files"])
        ranks = self.pending.setdefault(iteration, {})
        ranks[rank] = report
        if len(ranks) == self.world_size:
            self._deliver(iteration)

    def _deliver(self, iteration: int) -> None:
        reports = self.pending.pop(iteration)
        results = [reports[r]["metrics"] for r in sorted(reports)]
        with_checkpoint = {r for r, report in reports.items() if report["checkpoint"]}
        automatic = AUTO_PASS_KEY in results[0]  # not a result of the user's loop
        if not automatic:
            if 0 in reports:
                self.history.append(reports[0]["metrics"])
            self.history_all_ranks.append(results)
        if with_checkpoint:  # may raise ScaleUp, after the history has this iteration
            self.commits.declared(iteration, with_checkpoint, results[0])
        if automatic:
            return
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            shown = {k: v for k, v in results[0].items() if not k.startswith("_")}
            self.logger.info("Iteration %d: %s", iteration, shown)
        self.callbacks.call("handle_result", results, training_iteration=iteration)

    def stranded(self, finished: dict[int, int]) -> UnequalReportsError | None:
        """The error for an iteration that can never complete while a rank waits in its report
        (for the checkpoint's commit or the stop verdict): a rank whose function returned never
        reported it."""
        for iteration in sorted(self.pending):
            gone = sorted(r for r, last in finished.items() if last < iteration)
            waiting = sorted(r for r, report in self.pending[iteration].items()
                             if report["awaits_verdict"] or (
                                 report["checkpoint"] and report["checkpoint"]["files"]))
            if gone and waiting:
                counts = {r: self.last.get(r, self.first - 1) - self.first + 1
                          for r in range(self.world_size)}
                shown = ", ".join(f"rank {r}: {n}" for r, n in counts.items())
                return UnequalReportsError(
                    f"ranks {gone} returned without the report of iteration {iteration}, which "
                    f"ranks {waiting} wait for in report() (a checkpoint to commit or the "
                    f"callbacks' verdict needs every rank's report); reports made: {shown}. "
                    "Every rank must call report() the same number of times: report on every "
                    "rank, with checkpoint=None where a rank has nothing to save",
                    counts=counts)
        return None

    def flush(self, stopped: bool) -> None:
        """Deliver what some ranks reported and others did not, marked ``partial``: never
        committed, not in the history. A misuse, unless a stop that no report waited for
        ended the ranks at different reports."""
        for iteration in sorted(self.pending):
            reports = self.pending.pop(iteration)
            missing = sorted(set(range(self.world_size)) - set(reports))
            self.logger.log(
                logging.INFO if stopped else logging.WARNING,
                "Iteration %d was reported by some ranks but not by ranks %s%s", iteration,
                missing, " (the stop reached the ranks at different reports)" if stopped else
                ": every rank must call report() the same number of times")
            results = [reports[r]["metrics"] if r in reports else {}
                       for r in range(self.world_size)]
            if AUTO_PASS_KEY not in next(iter(reports.values()))["metrics"]:
                self.callbacks.call("handle_result", results, training_iteration=iteration,
                                    partial=True, missing_ranks=missing)


class _Callbacks:
    """Runs the callbacks' hooks on the driver in threads of their own, in the caller's context
    (Prefect's run context reaches artifacts made there), so that a slow callback never holds
    up reports or commits.

    Two lanes, each calling its callbacks' hooks in order: the callbacks that decide stops
    exactly (``exact_stop``), whose verdict on each iteration goes to the workers
    (``on_verdict``) and which every report waits for; and the others, whose stop goes to the
    workers through ``on_stop``. A fatal callback's exception waits here for the driver loop to
    raise."""

    def __init__(self, callbacks: list[TrainingCallback], logger: logging.Logger,
                 on_stop: Callable[[str], None],
                 on_verdict: Callable[[int, str | None], None]):
        self.callbacks = callbacks
        self.logger = logger
        self.error: BaseException | None = None
        self.stop_reason: str | None = None
        self._lock = threading.Lock()
        judges = [c for c in callbacks if c.exact_stop]
        self.judged = bool(judges)
        others = [c for c in callbacks if not c.exact_stop]
        self._lanes = ([_Lane(self, judges, on_verdict, "judges")] if judges else []) + \
                      ([_Lane(self, others, None, "others", on_stop)] if others else [])

    def call(self, hook: str, *args: Any, **kwargs: Any) -> None:
        for lane in self._lanes:
            lane.queue.put((hook, args, kwargs))

    def failed(self, error: BaseException) -> None:
        with self._lock:
            self.error = self.error or error

    def stopped(self, reason: str) -> bool:
        """Record the run's stop; True for the first one."""
        with self._lock:
            if self.stop_reason is not None:
                return False
            self.stop_reason = reason
        self.logger.info("Stopping the run: %s", reason)
        return True

    def close(self) -> None:
        """Run what is queued (callbacks see every result), then end the threads."""
        for lane in self._lanes:
            lane.queue.put(None)
        for lane in self._lanes:
            lane.thread.join()


class _Lane:
    def __init__(self, owner: _Callbacks, callbacks: list[TrainingCallback],
                 on_verdict: Callable[[int, str | None], None] | None, name: str,
                 on_stop: Callable[[str], None] | None = None):
        self.owner, self.callbacks = owner, callbacks
        self.on_verdict, self.on_stop = on_verdict, on_stop
        self.queue: queue.Queue = queue.Queue()
        context = contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self._serve,), daemon=True,
                                       name=f"prefect-distrain-callbacks-{name}")
        self.thread.start()

    def _serve(self) -> None:
        owner = self.owner
        while (item := self.queue.get()) is not None:
            hook, args, kwargs = item
            if owner.error is not None and hook != "finish_training":
                continue  # a fatal callback failed: the run is ending
            for callback in self.callbacks:
                try:
                    _call(callback, hook, owner.logger, *args, **kwargs)
                except BaseException as error:  # noqa: BLE001 - raised by the driver loop
                    owner.failed(error)
            reason = next((c.stop_training for c in self.callbacks if c.stop_training), None)
            first = reason is not None and owner.stopped(reason)
            if first and self.on_stop is not None:
                self.on_stop(reason)
            if self.on_verdict is not None and hook == "handle_result" \
                    and not kwargs.get("partial"):
                self.on_verdict(kwargs["training_iteration"], reason)


def _call(callback: TrainingCallback, hook: str, logger: logging.Logger, *args, **kwargs) -> None:
    try:
        getattr(callback, hook)(*args, **kwargs)
    except Exception:
        if callback.fatal_errors:
            raise
        logger.exception("Callback %s.%s failed; training goes on", type(callback).__name__, hook)


@dataclass
class RunOutcome:
    returns: list[Any]
    #: Why a callback stopped the run early, if one did.
    stopped: str | None = None


def run_training(group: WorkerGroup, spec: RunSpec, logger: logging.Logger) -> RunOutcome:
    """Run the function on every worker of a started group until all return or one fails.

    On failure the group is killed (a survivor may hang in a collective) and the error of the
    lowest failing rank is raised: the user's own exception type, with the worker's traceback
    as its cause.
    """
    fn_ref = ray.put(spec.train_func_blob)
    session_args = [
        {
            "context": TrainContext(info=m.info, experiment_name=spec.storage.name,
                                    storage_url=spec.storage.run_url, attempt=spec.attempt,
                                    backend=spec.backend_name),
            "storage": spec.storage,
            "checkpoint": spec.resume_from,
            "iteration": spec.first_index - 1,
            "upload": spec.checkpoint_config.upload,
            "checkpoint_mode": spec.checkpoint_config.mode,
            "datasets": spec.dataset_shards[m.info.world_rank] if spec.dataset_shards else {},
            "await_verdicts": any(c.exact_stop for c in spec.callbacks),
        }
        for m in group.members
    ]
    iterations: _Iterations
    callbacks = _Callbacks(spec.callbacks, logger,
                           on_stop=lambda reason: group.request_stop(reason, iterations.highest),
                           on_verdict=group.judge)
    commits = _Commits(spec, group, callbacks, logger)
    iterations = _Iterations(len(group), spec, commits, callbacks, logger)
    # The storage (with its options) for trackers that write into the run's folder.
    callbacks.call("start_training", redact_url(spec.storage.run_url), spec.config,
                   world_size=len(group), backend=spec.backend_name, run_name=spec.storage.name,
                   attempt=spec.attempt, storage=spec.storage)
    config = spec.config if spec.config is not None else {}
    generators = group.run(fn_ref, takes_config(spec.train_func), config, session_args)
    world_size = len(group)
    try:
        returns, errors, unfinished = _collect(generators, iterations, commits, callbacks,
                                               spec.logs, spec.checkpoints)
        if errors:
            raise _worker_failure(errors, world_size, spec)
        iterations.flush(stopped=callbacks.stop_reason is not None)
        if unfinished:  # stopped, but these ranks never reached a report (e.g. in a collective)
            logger.warning("Ranks %s did not stop within %g s of the stop; ending them",
                           unfinished, settings.settings().stop_grace_s)
            group.shutdown()
    except BaseException:
        group.shutdown()  # a survivor may hang in a collective: kill, don't wait
        callbacks.call("finish_training", error=True)
        callbacks.close()
        raise
    for index in sorted(commits.waiting):
        logger.warning("Checkpoint %d was not committed: not every rank reported it", index)
    callbacks.call("finish_training", error=False)
    callbacks.close()
    if callbacks.error is not None:
        raise callbacks.error
    return RunOutcome(returns, callbacks.stop_reason)


#: How often the driver loop looks at the callbacks (a fatal error, a stop) and the run's lease
#: while it waits for the workers.
_POLL_S = 0.5


def _collect(generators: list, iterations: _Iterations, commits: _Commits,
             callbacks: _Callbacks, logs: WorkerLogs | None, checkpoints: CheckpointManager
             ) -> tuple[list[Any], dict[int, Any], list[int]]:
    """Read every rank's outbox until each returns or fails; after the first failure, wait
    only a short window for the other ranks' outcomes, and after a stop, the grace period."""
    pending = {gen: rank for rank, gen in enumerate(generators)}
    returns: list[Any] = [None] * len(generators)
    errors: dict[int, Any] = {}
    finished: dict[int, int] = {}  # rank -> its last iteration, once its function returned
    gather_deadline: float | None = None
    while pending:
        if callbacks.error is not None:
            raise callbacks.error
        checkpoints.check_lease(look=False)
        if callbacks.stop_reason is not None and gather_deadline is None:
            gather_deadline = time.monotonic() + settings.settings().stop_grace_s
        wait = _POLL_S
        if gather_deadline is not None:
            wait = min(wait, max(0.0, gather_deadline - time.monotonic()))
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
        if not ready:
            if gather_deadline is not None and time.monotonic() >= gather_deadline:
                break  # the other ranks' outcomes did not come within the window
            continue
        for gen in ready:
            rank = pending[gen]
            try:
                batch = ray.get(next(gen))
            except StopIteration:
                del pending[gen]
                continue
            except RayActorError as error:
                batch = [("error", WorkerLostError(
                    f"rank {rank}'s worker died (actor or node lost): {error}", rank=rank))]
            except RayTaskError as error:
                batch = [("error", error.as_instanceof_cause())]
            for kind, payload in batch:
                if kind == "report":
                    iterations.add(rank, payload)
                elif kind == "log":
                    if logs is not None:
                        logs.add(rank, payload)
                elif kind == "persisted":
                    commits.uploaded(payload["index"], rank, payload["files"])
                else:
                    del pending[gen]
                    if kind == "done":
                        returns[rank] = payload
                        finished[rank] = iterations.last.get(rank, iterations.first - 1)
                    else:
                        errors[rank] = payload
                        if gather_deadline is None:
                            gather_deadline = time.monotonic() + settings.settings().error_gather_timeout_s
            if finished and not errors and (stranded := iterations.stranded(finished)):
                raise stranded
    return returns, errors, sorted(pending.values())


def _worker_failure(errors: dict[int, Any], world_size: int, spec: RunSpec) -> BaseException:
    """One exception for the run, marked ``retryable`` unless it is the user's bug.

    A lost worker explains whatever its peers raised, so it wins. Otherwise the lowest rank's
    exception is raised with its own type; it is a bug (not retried) when every rank raised the
    same type or the type is listed as fatal, and infrastructure when the backend or this
    package says so (a collective timeout, a failed upload) or when only some ranks failed.
    """
    lost = [e for e in errors.values() if isinstance(e, WorkerLostError)]
    if lost:
        error = lost[0]
        others = sorted(r for r, e in errors.items() if e is not error)
        if others and hasattr(error, "add_note"):
            error.add_note(f"Ranks {others} failed too, most likely because of it.")
        return error
    rank = min(errors)
    described = errors[rank]
    if not isinstance(described, dict):  # e.g. a return value Ray could not serialize
        return described
    failed = sorted(errors)
    where = f"rank {rank} of {world_size} (pid {described['pid']} on {described['node_ip']})"
    also = f"; ranks {failed} raised" if len(failed) > 1 else ""
    cause = RemoteTraceback(f"\nTraceback on {where}:\n{described['traceback']}")
    error: BaseException | None = None
    if described["pickled"] is not None:
        try:
            error = pickle.loads(described["pickled"])
        except Exception:  # noqa: BLE001 - its type may exist only on the worker
            error = None
    if error is None:
        error = WorkerError(f"{described['type']}: {described['message']} (on {where}{also})",
                            rank=rank, exc_type=described["type"],
                            traceback=described["traceback"])
    elif hasattr(error, "add_note"):
        error.add_note(f"Raised in the training function on {where}{also}.")
    error.__cause__ = cause
    error.__suppress_context__ = True
    same_everywhere = (len(errors) == world_size and all(
        isinstance(e, dict) and e["type"] == described["type"] for e in errors.values()))
    if isinstance(error, DistrainError) or spec.is_backend_failure(error):
        retryable = bool(getattr(error, "retryable", True))
    else:
        retryable = not (same_everywhere or isinstance(error, spec.fatal_exceptions))
    for name, value in (("rank", rank), ("ranks", failed), ("retryable", retryable)):
        try:
            setattr(error, name, value)
        except AttributeError:  # an exception type with __slots__
            pass
    return error


def is_infrastructure_failure(error: BaseException) -> bool:
    """True for failures a restart or a Prefect retry may cure; False for the user's bug."""
    return getattr(error, "retryable", False) is True
