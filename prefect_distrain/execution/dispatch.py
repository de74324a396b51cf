"""The run's callbacks, called on the driver in threads of their own.

A slow callback never holds up reports or commits: hooks go into a queue and run in order, in
the caller's context (Prefect's run context reaches the artifacts a callback makes). Callbacks
that decide stops exactly (``exact_stop``) have a lane of their own, whose verdict on each
iteration the workers wait for; the others' lane never holds anything up.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
from typing import Any, Callable

from ..callbacks import TrainingCallback


class Callbacks:
    """The callbacks of one attempt, in two lanes (see the module's docstring): the exact-stop
    callbacks' verdicts go to the workers through ``on_verdict``, the others' stop through
    ``on_stop``. A fatal callback's exception waits here for the driver loop to raise."""

    def __init__(self, callbacks: list[TrainingCallback], logger: logging.Logger,
                 on_stop: Callable[[str], None],
                 on_verdict: Callable[[int, str | None], None]):
        self.logger = logger
        self.error: BaseException | None = None
        self.stop_reason: str | None = None
        self._lock = threading.Lock()
        judges = [c for c in callbacks if c.exact_stop]
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
    def __init__(self, owner: Callbacks, callbacks: list[TrainingCallback],
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
