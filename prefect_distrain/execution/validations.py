"""Validations off the training path: each committed checkpoint's ``pd.Validation`` runs as a
Ray task on resources of its own (a thread in local mode) while training goes on.

The driver submits a checkpoint right after its commit and looks at the running validations on
every turn of its poll loop (``poll``), so nothing here blocks a worker. At most
``max_in_flight`` run at once; the others wait in order. What a validation returns, its error
or its timeout goes into the checkpoint's validation record through the checkpoint manager
(the only writer of records); a validation never fails the training. The run waits for them
at its end (``finish``); a failed attempt leaves them running for the next, and a failed run
cancels them (``cancel``): their records still say "validating", and the next writer of the
run validates those checkpoints again.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import math
import threading
import time
from collections import deque
from typing import Any, Callable, Mapping

from ray import cloudpickle

from ..checkpoints.checkpoint import Checkpoint
from ..checkpoints.fs import redact_url
from ..checkpoints.lease import LeaseLostError
from ..checkpoints.manager import CheckpointManager
from ..checkpoints.manifest import Manifest
from ..checkpoints.validation import FAILED, VALIDATED, VALIDATING, ValidationRecord
from ..config import Validation
from .dispatch import Callbacks
from .pickling import serialize_train_function

#: How long ``finish`` sleeps between looks at the running validations.
_POLL_S = 0.2
_ERROR_LIMIT = 2000


def run_validation(fn: Callable | bytes, checkpoint: Checkpoint, config: Any
                   ) -> dict[str, Any]:
    """Call the validation function (in its Ray task, pickled, or on a thread); its metrics,
    checked."""
    if isinstance(fn, bytes):
        fn = cloudpickle.loads(fn)
    metrics = fn(checkpoint, config) if _takes_two(fn) else fn(checkpoint)
    if not isinstance(metrics, Mapping) or not all(isinstance(k, str) for k in metrics):
        raise TypeError(
            f"the validation function returned {type(metrics).__name__}, not a dict of metric "
            "name -> value: return e.g. {'val_accuracy': 0.93}")
    shown = {}
    for name, value in metrics.items():
        if name.startswith("_"):
            raise TypeError(f"the validation function returned {name!r}: names starting with "
                            "'_' are the run's own; give it another name")
        if hasattr(value, "item") and callable(value.item):  # a tensor or numpy scalar
            value = value.item()
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise TypeError(
                f"the validation function returned {name!r}={type(value).__name__}: metrics are "
                "numbers, strings, booleans or None")
        shown[name] = value if not isinstance(value, float) or math.isfinite(value) \
            else str(value)  # NaN and inf kept as text: JSON has no such numbers
    return shown


def _takes_two(fn: Callable) -> bool:
    """Whether ``fn`` takes (checkpoint, config), or the checkpoint only."""
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): the documented form
        return True
    return True


class _Running:
    def __init__(self, manifest: Manifest, future: concurrent.futures.Future,
                 ref: Any = None):
        self.manifest, self.future, self.ref = manifest, future, ref
        self.started = time.monotonic()


class Validations:
    """The validations of one run, across its attempts (see the module's docstring)."""

    def __init__(self, validation: Validation, manager: CheckpointManager, run_config: Any,
                 local: bool, logger: logging.Logger | logging.LoggerAdapter):
        self.validation = validation
        self.manager = manager
        self.config = validation.config if validation.config is not None else run_config
        self.local = local
        self.logger = logger
        self.attempt = 0
        self.callbacks: Callbacks | None = None
        self.queued: deque[Manifest] = deque()
        self.running: dict[str, _Running] = {}
        self._warned = False
        self._remote: Any = None  # the Ray task, and the function put once
        self._fn_ref: Any = None
        #: Pickled now (the user's modules by value): a function that can't be is refused
        #: before anything starts.
        self._fn_blob = None if local else serialize_train_function(
            validation.fn, "the validation function")

    def attach(self, callbacks: Callbacks | None, attempt: int) -> None:
        """The attempt whose callbacks hear of the validations that end from now on."""
        self.callbacks, self.attempt = callbacks, attempt

    def wanted(self, requested: bool | None) -> bool:
        """Whether a checkpoint reported with ``report(..., validate=requested)`` is
        validated."""
        return self.validation.every if requested is None else requested

    def submit(self, manifest: Manifest) -> None:
        """Validate a committed checkpoint: recorded as validating and kept from retention
        now, started when a slot is free."""
        if self._recorded(manifest, ValidationRecord.now(VALIDATING, attempt=self.attempt)):
            self.manager.validating.add(manifest.directory)
            self.queued.append(manifest)
            if len(self.queued) > 4 * self.validation.max_in_flight and not self._warned:
                self._warned = True
                self.logger.warning(
                    "Validations fall behind the checkpoints (%d waiting; each is kept until "
                    "validated): give them more room with Validation(max_in_flight=...) or "
                    "checkpoint less often", len(self.queued))
        self.poll()

    def resume(self) -> None:
        """Validate again what an earlier writer of the run left validating."""
        mine = set(self.running) | {m.directory for m in self.queued}
        for manifest in self.manager.unfinished_validations():
            if manifest.directory not in mine:
                self.logger.info("Checkpoint %d was left validating by an earlier attempt: "
                                 "validating it again", manifest.index)
                self.submit(manifest)

    def poll(self) -> None:
        """Record the validations that ended or ran out of time; start queued ones."""
        now = time.monotonic()
        for folder, running in list(self.running.items()):
            if running.future.done():
                del self.running[folder]
                self._ended(running)
            elif now - running.started > self.validation.timeout_s:
                del self.running[folder]
                stopped = self._cancel(running)
                self._record(running.manifest, ValidationRecord.now(
                    FAILED, error=f"timed out after {self.validation.timeout_s:g} s "
                                  f"(Validation(timeout_s=...)); {stopped}",
                    attempt=self.attempt))
        while self.queued and len(self.running) < self.validation.max_in_flight:
            manifest = self.queued.popleft()
            try:
                self.running[manifest.directory] = self._start(manifest)
            except Exception as error:  # noqa: BLE001 - recorded, never fails the training
                self._record(manifest, ValidationRecord.now(
                    FAILED, error=f"could not start: {self._scrub(error)}", attempt=self.attempt))

    @property
    def pending(self) -> int:
        return len(self.queued) + len(self.running)

    def finish(self, deadline: float | None = None,
               shutdown_requested: Callable[[], bool] | None = None) -> None:
        """Wait until every validation has ended (each within its ``timeout_s``); at the run's
        ``deadline`` or a SIGTERM the rest are cancelled, left validating for the next
        writer."""
        if self.pending:
            self.logger.info("Training is done; waiting for %d validation(s)", self.pending)
        while self.pending:
            self.poll()
            if not self.pending:
                break
            if (deadline is not None and time.monotonic() >= deadline) or (
                    shutdown_requested is not None and shutdown_requested()):
                self.logger.warning(
                    "%d validation(s) cancelled at the run's deadline or SIGTERM; their "
                    "checkpoints stay 'validating' and the run's next writer validates them "
                    "again", self.pending)
                self.cancel()
                break
            time.sleep(_POLL_S)

    def cancel(self) -> None:
        """Record what already ended, stop every running validation and drop the queued ones
        (their records say validating: the run's next writer validates them again)."""
        for folder, running in list(self.running.items()):
            if running.future.done():
                del self.running[folder]
                self._ended(running)
        for running in self.running.values():
            self._cancel(running)
        self.running.clear()
        self.queued.clear()

    # -- one validation ----------------------------------------------------------------------

    def _start(self, manifest: Manifest) -> _Running:
        checkpoint = self.manager.checkpoint(manifest)
        if self.local:  # a daemon thread: one that never returns can't hold the process
            future: concurrent.futures.Future = concurrent.futures.Future()

            def call() -> None:
                try:
                    future.set_result(run_validation(self.validation.fn, checkpoint,
                                                     self.config))
                except BaseException as error:  # noqa: BLE001 - handed to the driver
                    future.set_exception(error)

            threading.Thread(target=call, name=f"validation-{manifest.index}",
                             daemon=True).start()
            return _Running(manifest, future)
        import ray

        if self._remote is None:
            resources = dict(self.validation.task_resources)
            self._remote = ray.remote(run_validation).options(
                num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0),
                resources=resources or None, max_retries=0, name="validation")
            self._fn_ref = ray.put(self._fn_blob)
        ref = self._remote.remote(self._fn_ref, checkpoint, self.config)
        return _Running(manifest, ref.future(), ref)

    def _cancel(self, running: _Running) -> str:
        """Stop one validation; how, in words."""
        self.manager.validating.discard(running.manifest.directory)
        if running.ref is None:
            return "left running on its thread (local mode can't stop one), its result unused"
        import ray

        try:
            ray.cancel(running.ref, force=True)
        except Exception as error:  # noqa: BLE001 - it may have just ended
            self.logger.debug("Cancelling a validation: %s", error)
        return "it was cancelled"

    def _ended(self, running: _Running) -> None:
        try:
            metrics = running.future.result()
        except BaseException as error:  # noqa: BLE001 - recorded, never fails the training
            cause = getattr(error, "cause", None) or error
            record = ValidationRecord.now(FAILED, error=self._scrub(cause),
                                          attempt=self.attempt)
        else:
            record = ValidationRecord.now(VALIDATED, metrics, attempt=self.attempt)
        self._record(running.manifest, record)

    def _scrub(self, error: BaseException) -> str:
        """An error as text, without the run's credentials (URLs redacted, option values
        removed)."""
        text = redact_url(f"{type(error).__name__}: {error}".strip())
        for value in _secrets(self.manager.storage.storage_options):
            text = text.replace(value, "***")
        return text[-_ERROR_LIMIT:]

    def _recorded(self, manifest: Manifest, record: ValidationRecord) -> bool:
        """Write a record; a storage failure is logged, never fails the training (the lease
        lost still does)."""
        try:
            self.manager.record_validation(manifest, record)
            return True
        except LeaseLostError:
            raise
        except Exception as error:  # noqa: BLE001 - a record is not worth the training
            self.manager.validating.discard(manifest.directory)
            self.logger.warning("Could not record the validation of checkpoint %d (%s): %s",
                                manifest.index, record.status, self._scrub(error))
            return False

    def _record(self, manifest: Manifest, record: ValidationRecord) -> None:
        if not self._recorded(manifest, record):
            return
        checkpoint = self.manager.checkpoint(manifest)
        if record.status == VALIDATED:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in record.metrics.items())
            self.logger.info("Validated checkpoint %d: %s", manifest.index, shown or "no metrics")
        else:
            self.logger.warning("The validation of checkpoint %d failed (training goes on): %s",
                                manifest.index, record.error)
        if self.callbacks is not None:
            self.callbacks.call("on_checkpoint_validated", checkpoint.without_credentials(),
                                index=manifest.index, status=record.status,
                                error=record.error, kept=manifest in self.manager.committed)


_SECRET_NAMES = ("secret", "token", "password", "key", "credential", "sas", "session")


def _secrets(options: Mapping[str, Any]) -> list[str]:
    """The values of storage options whose names say they are secrets, nested ones too."""
    found = []
    for name, value in options.items():
        if isinstance(value, Mapping):
            found += _secrets(value)
        elif isinstance(value, str) and len(value) >= 4 \
                and any(word in str(name).lower() for word in _SECRET_NAMES):
            found.append(value)
    return found
