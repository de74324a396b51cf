"""What a training run asks for: frozen, validated values with no I/O.

Validation happens at construction, so that a bad value fails in the flow that wrote it instead
of minutes later on a worker. Plain frozen dataclasses (as in Ray Train) rather than pydantic
models: a pydantic model is iterable, and Prefect's ``.map()`` would iterate over it.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .checkpoints.fs import absolute_url
from .exceptions import ConfigurationError

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

def default_storage() -> str:
    """PREFECT_DISTRAIN_STORAGE, else ~/prefect_distrain_results (like Ray's ~/ray_results)."""
    from .settings import settings

    return settings().storage or os.path.join(os.path.expanduser("~"), "prefect_distrain_results")


@dataclass(frozen=True)
class ScalingConfig:
    """How many training processes to run and what each one holds.

    Each worker is one Ray actor in one placement-group bundle. A worker asks for 1 CPU by
    default (plus 1 GPU with ``use_gpu``), the same as Ray Train, so that ``num_workers`` workers
    fit on a laptop whose Ray counts its cores.

    ``min_workers`` makes the group elastic: it starts (and restarts after a loss) with as many
    workers as the cluster holds, down to ``min_workers``, and grows back to ``num_workers`` at
    the next committed checkpoint once the cluster can hold them again. ``num_workers=(min,
    max)``, as Ray Train takes it, is ``num_workers=max, min_workers=min``.

    ``num_workers=0`` is local mode: the function runs in this process as the one rank, with
    the same reports, checkpoints and artifacts and no Ray started (for pdb and for unit tests
    of a loop; no process group, no Ray Data shards).

    ``concurrency_limit``: the name of a Prefect global concurrency limit (``prefect gcl create
    gpus --limit 8``) whose slots count what the run holds: one per worker, or one per GPU with
    ``use_gpu``. ``train`` waits for the slots before it starts the workers and gives them back
    when it ends, so flows that share a Ray cluster queue instead of oversubscribing it. Only
    ``train`` (the Prefect task) takes them; a missing limit is an error that names it.
    """

    num_workers: int | tuple[int, int] = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: str = "PACK"
    min_workers: int | None = None
    concurrency_limit: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, (tuple, list)):  # Ray Train's (min, max)
            if len(self.num_workers) != 2 or self.min_workers is not None:
                raise ConfigurationError(
                    f"num_workers={self.num_workers!r}: give one number, or (min, max) for an "
                    "elastic group (and then no min_workers)")
            least, most = self.num_workers
            object.__setattr__(self, "num_workers", most)
            object.__setattr__(self, "min_workers", least)
        if not isinstance(self.use_gpu, bool):
            raise ConfigurationError(
                f"use_gpu must be True or False (got {self.use_gpu!r})")
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) \
                or self.num_workers < 0:
            raise ConfigurationError(
                f"num_workers must be an integer of at least 1, or 0 to run the function in "
                f"this process (got {self.num_workers!r}): set ScalingConfig(num_workers=N) to "
                "the number of training processes you want")
        if self.local and (self.min_workers is not None or self.use_gpu):
            raise ConfigurationError(
                "num_workers=0 runs the function in this process on its CPU, with no Ray: "
                "drop min_workers and use_gpu, or give num_workers=1 or more")
        if self.min_workers is not None and (
                not isinstance(self.min_workers, int) or isinstance(self.min_workers, bool)
                or not 1 <= self.min_workers <= self.num_workers):
            raise ConfigurationError(
                f"min_workers must be between 1 and num_workers={self.num_workers} (got "
                f"{self.min_workers!r}); leave it None for a group of fixed size")
        if self.concurrency_limit is not None and (
                not isinstance(self.concurrency_limit, str) or not self.concurrency_limit.strip()):
            raise ConfigurationError(
                f"concurrency_limit must name a Prefect global concurrency limit (got "
                f"{self.concurrency_limit!r}), e.g. concurrency_limit='gpus'")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigurationError(
                f"placement_strategy {self.placement_strategy!r} is not one of "
                f"{', '.join(PLACEMENT_STRATEGIES)}")
        resources = self.resources_per_worker
        if resources is not None and not isinstance(resources, dict):
            raise ConfigurationError(
                f"resources_per_worker takes a dict of Ray resource name -> amount per worker "
                f"(got {resources!r}), e.g. resources_per_worker={{'CPU': 2}}")
        for name, amount in (resources or {}).items():
            if not isinstance(name, str) or not isinstance(amount, (int, float)) \
                    or isinstance(amount, bool) or amount < 0:
                raise ConfigurationError(
                    f"resources_per_worker[{name!r}] is {amount!r}; give resource names with "
                    f"numbers >= 0, e.g. {{'CPU': 2}}")
        if not self.worker_resources:
            raise ConfigurationError(
                f"resources_per_worker={resources!r} leaves a worker with no resources, which Ray "
                "cannot place: give it some, e.g. {'CPU': 0.5}, or leave CPU out for the "
                "default of 1")
        if (self.resources_per_worker or {}).get("GPU", 0) > 0 and not self.use_gpu:
            raise ConfigurationError(
                "resources_per_worker asks for GPUs but use_gpu is False: set use_gpu=True "
                "so that the backend places the model on the GPU")

    @property
    def slots(self) -> int:
        """The concurrency slots the group holds: its GPUs with ``use_gpu``, else its
        workers."""
        gpus = self.worker_resources.get("GPU", 0.0)
        return max(1, math.ceil(gpus * self.num_workers)) if gpus else self.num_workers

    @property
    def local(self) -> bool:
        """Local mode: the function runs in the calling process (``num_workers=0``)."""
        return self.num_workers == 0

    @property
    def least_workers(self) -> int:
        """The smallest group training may run with."""
        return self.min_workers or self.num_workers

    @property
    def worker_resources(self) -> dict[str, float]:
        """The Ray resources of one worker's bundle."""
        resources = {"CPU": 1.0}
        if self.use_gpu:
            resources["GPU"] = 1.0
        resources.update({k: float(v) for k, v in (self.resources_per_worker or {}).items()})
        return {k: v for k, v in resources.items() if v > 0}


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def run_name_part(fn: Any, fallback: str = "train") -> str:
    """A function's name as it may appear in a run's name (letters, digits, '.', '_', '-')."""
    name = "".join(c if c.isalnum() or c in "._-" else "_"
                   for c in getattr(fn, "__name__", fallback))
    return name.strip("_") or fallback


@dataclass(frozen=True)
class RunConfig:
    """Where a run keeps its checkpoints.

    ``name`` is the folder under ``storage`` that holds the run (default: the training
    function's name and the start time). Two calls with the same name and storage are the same
    run: that is how a retry finds what the attempt before it committed. ``storage`` is a local
    path, any fsspec URL, or a storage block (anything with ``fsspec_storage()``, such as
    ``prefect_distrain.blocks.CheckpointStorage``, which keeps credentials as secrets);
    ``storage_options`` go to fsspec unchanged and are never shown.

    A run has one writer at a time (a lease in its folder): a second ``train`` of the same run
    fails at once naming the first, unless that one is gone (its lease expired, its process on
    this host ended, or this is a Prefect retry of its task run). ``takeover=True`` takes the
    run over from a writer you know is gone; one that is still alive stops committing.

    ``timeout_s``: a deadline for the whole ``train`` call (restarts included): when it passes,
    every rank stops at its next report (a checkpoint in flight is committed first), or is
    ended after ``PREFECT_DISTRAIN_STOP_GRACE_S``, and the run fails with ``RunTimeoutError``.

    ``total``: what ``progress_key`` of rank 0's reports counts up to (default: the number of
    reports), for the Prefect progress artifact and the terminal progress bar.
    ``other_ranks_log_level``: rank 0's log lines and prints reach the run log from INFO up,
    other ranks' from this level up (all ranks' last lines are kept for a failure's summary).
    """

    name: str | None = None
    storage: Any = field(default_factory=default_storage)
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    total: int | None = None
    progress_key: str = "_training_iteration"
    other_ranks_log_level: str = "WARNING"
    takeover: bool = False
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.storage_options is None:  # "no options", as fsspec reads it
            object.__setattr__(self, "storage_options", {})
        if not isinstance(self.storage_options, dict):  # its value may hold secrets: not shown
            raise ConfigurationError(
                f"storage_options takes a dict of fsspec options (got a "
                f"{type(self.storage_options).__name__}), e.g. storage_options={{'key': ..., "
                "'secret': ...}}")
        if self.timeout_s is not None and (
                not isinstance(self.timeout_s, (int, float)) or isinstance(self.timeout_s, bool)
                or self.timeout_s <= 0):
            raise ConfigurationError(
                f"timeout_s must be a positive number of seconds, or None for no deadline (got "
                f"{self.timeout_s!r})")
        if not isinstance(self.takeover, bool):
            raise ConfigurationError(f"takeover must be True or False (got {self.takeover!r})")
        if self.name is not None and not (isinstance(self.name, str)
                                          and _RUN_NAME.match(self.name)):
            raise ConfigurationError(
                f"run name {self.name!r} is not usable as a folder name: use letters, digits, "
                "'.', '_' and '-' (at most 128, starting with a letter or digit)")
        if self.total is not None and (not isinstance(self.total, int) or self.total < 1):
            raise ConfigurationError(
                f"total must be a positive number of steps (got {self.total!r})")
        if not isinstance(logging.getLevelName(self.other_ranks_log_level), int):
            raise ConfigurationError(
                f"other_ranks_log_level {self.other_ranks_log_level!r} is not a logging level: "
                "use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        if hasattr(self.storage, "fsspec_storage"):
            return
        if not isinstance(self.storage, str) or not self.storage.strip():
            raise ConfigurationError(
                f"storage {self.storage!r} is not usable: give a local path, an fsspec URL or "
                "a storage block (prefect_distrain.blocks.CheckpointStorage)")

    def resolved_storage(self) -> tuple[str, dict[str, Any]]:
        """(URL, storage options): a block's own options first, then ``storage_options``. A
        relative local path is made absolute here, once, against this process's directory."""
        if isinstance(self.storage, str):
            return absolute_url(self.storage), dict(self.storage_options)
        url, options = self.storage.fsspec_storage()
        return absolute_url(url), {**options, **self.storage_options}


@dataclass(frozen=True)
class Validation:
    """How committed checkpoints are validated off the training path.

    After a checkpoint commits, ``fn(checkpoint, config)`` (or ``fn(checkpoint)``) runs as a Ray
    task on ``resources`` of its own (default 1 CPU), at most ``max_in_flight`` at a time, while
    training goes on; in local mode (``num_workers=0``) it runs on a thread. Its dict of metrics
    is added to the checkpoint's metrics (a validated value replaces a reported one of the same
    name, as in Ray Train) in a record beside the manifest, ``_validations/<folder>.json``,
    which never changes the committed manifest. ``config``: what ``fn`` is given (default: the
    run's ``config``). ``every``: validate every committed checkpoint (default), or only those
    reported with ``report(..., validate=True)``; ``validate=False`` skips one.

    A checkpoint's status goes committed -> validating -> validated, or validation failed (``fn``
    raised, returned something other than a dict, or ran past ``timeout_s``): recorded, never a
    failure of the training. The run ends once every validation has ended (at its deadline or a
    SIGTERM the rest are cancelled and validated again by the run's next writer). Retention and
    the best checkpoints may score by a validated metric; a checkpoint being validated is kept.
    ``report(..., validate=True)`` on a report without a checkpoint (another rank's) does
    nothing.
    """

    fn: Any
    config: Any = None
    resources: dict[str, float] | None = None
    max_in_flight: int = 1
    every: bool = True
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigurationError(
                f"Validation(fn=...) takes a function fn(checkpoint, config) -> dict of metrics, "
                f"got {type(self.fn).__name__}")
        resources = self.resources
        if resources is not None and (not isinstance(resources, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                and v >= 0 for k, v in resources.items())):
            raise ConfigurationError(
                f"Validation(resources={resources!r}): give a dict of Ray resource name -> "
                "amount, e.g. {'CPU': 1} or {'CPU': 1, 'GPU': 1}")
        if not isinstance(self.max_in_flight, int) or isinstance(self.max_in_flight, bool) \
                or self.max_in_flight < 1:
            raise ConfigurationError(
                f"Validation(max_in_flight={self.max_in_flight!r}): how many validations may run "
                "at once, at least 1")
        if not isinstance(self.every, bool):
            raise ConfigurationError(f"Validation(every={self.every!r}): True or False")
        if not isinstance(self.timeout_s, (int, float)) or isinstance(self.timeout_s, bool) \
                or self.timeout_s <= 0:
            raise ConfigurationError(
                f"Validation(timeout_s={self.timeout_s!r}): a positive number of seconds that "
                "one validation may take")

    @property
    def task_resources(self) -> dict[str, float]:
        """The Ray resources of one validation task."""
        resources = {"CPU": 1.0, **{k: float(v) for k, v in (self.resources or {}).items()}}
        return {k: v for k, v in resources.items() if v > 0}


@dataclass(frozen=True)
class CheckpointConfig:
    """Which checkpoints to keep and how they reach storage.

    ``num_to_keep``: keep this many (the best by ``checkpoint_score_attribute`` if given, else
    the newest) plus always the latest; None keeps all. ``checkpoint_score_order``: "max" or
    "min". ``upload``: "sync" makes ``report`` return once the files are in storage; "async"
    returns once they are copied aside locally and uploads in the background (one upload in
    flight per rank; a failure is raised by the next ``report`` and at the end of the run).
    Sync is the default because its failures surface where they happen.

    ``upload_retries``: a checkpoint upload, a manifest or a ledger record that fails with a
    transient storage error (a timeout, a dropped connection, throttling, a 5xx, expired
    credentials) is written again on a fresh client, up to this many times, after pauses that
    double from 0.5 s up to ``upload_backoff_max_s`` (with jitter); then it fails the attempt
    as infrastructure.

    ``validate``: a ``Validation`` run on committed checkpoints off the training path.

    ``mode="auto"``: when the loop prepared its model, optimizer and training data loader with
    ``pd.torch.prepare_model`` / ``prepare_optimizer`` / ``prepare_data_loader``, their state is
    committed before each pass over the training data (and once more when the function
    returns); a restart runs the passes already done with one batch each (their reports are
    dropped), then restores that state and goes on, with no checkpoint code in the loop. The
    first loader prepared (or the "train" dataset shard) is the training data; other state (an
    LR scheduler stepped per batch) is not saved. ``every_n_batches``: also commit it every this
    many batches within a pass, with the data loader's position (session/positions.py), so a
    restart goes on mid-pass: with a torch loader, the same weights as a run that never stopped.
    ``"manual"`` (default): only what the loop reports.

    Every rank may report a checkpoint with the same file names (as Ray's examples do): each
    name is uploaded once, by the lowest rank that wrote it. Copies that differ keep that
    rank's with a warning (``rank_conflicts="warn"``, Ray's behaviour) or fail the run
    (``"fail"``).
    """

    num_to_keep: int | None = None
    checkpoint_score_attribute: str | None = None
    checkpoint_score_order: str = "max"
    upload: str = "sync"
    mode: str = "manual"
    upload_retries: int = 5
    upload_backoff_max_s: float = 20.0
    rank_conflicts: str = "warn"
    validate: Validation | None = None
    every_n_batches: int | None = None

    def __post_init__(self) -> None:
        if self.every_n_batches is not None and (
                not isinstance(self.every_n_batches, int) or isinstance(self.every_n_batches, bool)
                or self.every_n_batches < 1 or self.mode != "auto"):
            raise ConfigurationError(
                f"every_n_batches={self.every_n_batches!r}: give a whole number >= 1 with "
                "mode='auto' (with mode='manual', report a checkpoint as often as you like)")
        if self.validate is not None and not isinstance(self.validate, Validation):
            raise ConfigurationError(
                f"CheckpointConfig(validate=...) takes a pd.Validation(fn, ...), got "
                f"{type(self.validate).__name__}")
        if self.num_to_keep is not None and (
                not isinstance(self.num_to_keep, int) or self.num_to_keep < 1):
            raise ConfigurationError(
                f"num_to_keep must be at least 1 (got {self.num_to_keep!r}); use None to keep "
                "every checkpoint")
        if self.checkpoint_score_order not in ("max", "min"):
            raise ConfigurationError(
                f"checkpoint_score_order {self.checkpoint_score_order!r}: use 'max' (higher is "
                "better, e.g. accuracy) or 'min' (lower is better, e.g. loss)")
        if self.upload not in ("sync", "async"):
            raise ConfigurationError(f"upload {self.upload!r}: use 'sync' or 'async'")
        if not isinstance(self.upload_retries, int) or isinstance(self.upload_retries, bool) \
                or self.upload_retries < 0:
            raise ConfigurationError(
                f"upload_retries must be a whole number >= 0 (got {self.upload_retries!r}); 0 "
                "fails a checkpoint at its first storage error")
        if not isinstance(self.upload_backoff_max_s, (int, float)) \
                or self.upload_backoff_max_s <= 0:
            raise ConfigurationError(
                f"upload_backoff_max_s must be a positive number of seconds (got "
                f"{self.upload_backoff_max_s!r})")
        if self.rank_conflicts not in ("warn", "fail"):
            raise ConfigurationError(
                f"rank_conflicts {self.rank_conflicts!r}: use 'warn' (keep the lowest rank's "
                "copy of a file several ranks wrote differently) or 'fail'")
        if self.mode not in ("manual", "auto"):
            raise ConfigurationError(
                f"mode {self.mode!r}: use 'auto' (checkpoint the prepared model, optimizer and "
                "data loader before each pass) or 'manual' (only what report() is given)")
        if self.mode == "auto" and self.checkpoint_score_attribute is not None:
            raise ConfigurationError(
                "mode='auto' keeps the newest checkpoints: drop checkpoint_score_attribute, or "
                "report scored checkpoints yourself with mode='manual'")


@dataclass(frozen=True)
class FailureConfig:
    """How many times the worker group restarts within one ``train`` call.

    A restart follows an infrastructure failure only: a lost worker or node, a collective that
    timed out, a failed checkpoint upload, or an exception raised on some ranks but not all. The
    user's bug -- the same exception type on every rank, or a type listed in
    ``fatal_exceptions`` -- is raised at once. ``max_failures=-1`` restarts without limit.
    Default 0, as in Ray Train: a failure goes to Prefect, whose retries resume from the latest
    checkpoint. The rules are those of ``execution/failure_policy.py``.

    ``hang_timeout_s``: when a rank makes no progress (no report, no step through a prepared
    data loader or optimizer, no upload, not waiting for the driver) for this long, the attempt
    hangs: every rank's stack goes to the run's forensics and the attempt fails as
    ``TrainingHangError`` (infrastructure: restarted, retried). A rank quiet for half of it is
    logged as a straggler. 600 s by default: longer than a slow first step or a long
    evaluation between reports, far shorter than torch's 30-minute collective timeout. None
    turns it off.

    Preemption: SIGTERM to a worker (a spot reclaim, a node drain, an eviction) makes
    ``pd.get_context().preemption_requested()`` True on every rank; each rank's next
    ``report`` commits its checkpoint and ends the function, within ``preemption_grace_s``
    (25 s: inside Kubernetes' default 30 s before SIGKILL), and the group restarts from that
    checkpoint. Such restarts count against ``max_preemption_failures`` (-1: no limit), not
    ``max_failures``. SIGTERM to the driver does the same and then ends the run, resumable.
    """

    max_failures: int = 0
    fatal_exceptions: tuple[type[BaseException], ...] = ()
    hang_timeout_s: float | None = 600.0
    preemption_grace_s: float = 25.0
    max_preemption_failures: int = -1

    def __post_init__(self) -> None:
        if self.hang_timeout_s is not None and (
                not isinstance(self.hang_timeout_s, (int, float))
                or isinstance(self.hang_timeout_s, bool) or self.hang_timeout_s <= 0):
            raise ConfigurationError(
                f"hang_timeout_s must be a positive number of seconds, or None to turn hang "
                f"detection off (got {self.hang_timeout_s!r})")
        if not isinstance(self.preemption_grace_s, (int, float)) \
                or isinstance(self.preemption_grace_s, bool) or self.preemption_grace_s <= 0:
            raise ConfigurationError(
                f"preemption_grace_s must be a positive number of seconds (got "
                f"{self.preemption_grace_s!r}): the time a preempted run has to commit")
        if not isinstance(self.max_preemption_failures, int) \
                or isinstance(self.max_preemption_failures, bool) \
                or self.max_preemption_failures < -1:
            raise ConfigurationError(
                f"max_preemption_failures must be -1 (no limit), 0 or more (got "
                f"{self.max_preemption_failures!r})")
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ConfigurationError(
                f"max_failures must be -1 (no limit), 0 or more (got {self.max_failures!r})")
        fatal = self.fatal_exceptions
        if isinstance(fatal, type):  # one class, as ``except`` takes it
            fatal = (fatal,)
        if isinstance(fatal, (list, set, frozenset)):
            fatal = tuple(fatal)
        if not isinstance(fatal, tuple) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in fatal):
            raise ConfigurationError(
                f"fatal_exceptions takes exception classes (got {self.fatal_exceptions!r}), "
                "e.g. fatal_exceptions=(ValueError, KeyError)")
        object.__setattr__(self, "fatal_exceptions", fatal)

    def may_restart(self, failures: int) -> bool:
        return self.max_failures == -1 or failures < self.max_failures
