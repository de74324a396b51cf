"""The Ray actor behind each rank: it runs the training function in a thread and streams the
function's outbox (reports, log lines, finished uploads, the outcome) back to the driver as a
Ray streaming generator, so reports reach the driver while training runs, without polling.

The actor has two threads: one for ``run``, one for the driver's short calls beside it (a
commit acknowledged, a verdict, a stop, a backend hook). Its process's main thread handles
SIGTERM: a preemption (see ``_on_sigterm``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator

import ray
from ray import cloudpickle

from ..exceptions import StopTraining
from ..logs import capture
from ..session import Session, set_current_session
from ..session.context import WorkerInfo, new_run, set_worker_info
from ..session.core import check_sendable

#: How long a worker gathers plain reports and log lines into one message to the driver. Each
#: message is a Ray object; one per report would cost more CPU than a small training step.
BATCH_WINDOW_S = 0.05


class TrainWorker:
    """The actor behind each rank. Holds no training state between runs but its ranks."""

    session: Session | None = None

    def __init__(self, in_process: bool = False) -> None:
        #: In the caller's own process (local mode): its signals and its output stay its own.
        self.in_process = in_process
        # Ray creates an actor on its process's main thread: the only one that may set a
        # signal handler. Ray's own (exit at once) is kept for a second SIGTERM.
        self._ray_sigterm: Any = None
        #: What a warm worker goes back to between runs (``rest``): the environment it started
        #: with, before any backend or training function changed it.
        self._env_at_start = dict(os.environ)
        if not in_process and threading.current_thread() is threading.main_thread():
            self._ray_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """A preemption (a spot reclaim, a node drain, an eviction): the training function
        hears of it (``preemption_requested()``), and so does the driver; its next report
        commits and ends it. The process ends after the grace period in any case; at once if
        nothing is training or on a second SIGTERM."""
        session = self.session
        if session is None or session.preempted.is_set():
            if callable(self._ray_sigterm):
                self._ray_sigterm(signum, frame)
            sys.exit(128 + signum)
        session.preempt(f"SIGTERM to rank {session.context.get_world_rank()} (pid "
                        f"{os.getpid()})", tell_driver=True)
        threading.Thread(target=_end_after, args=(session.preemption_grace_s + 5.0,),
                         daemon=True, name="preemption-grace").start()

    def metadata(self) -> dict[str, Any]:
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def set_info(self, info: WorkerInfo) -> None:
        set_worker_info(info)

    def rest(self) -> None:
        """Between two runs of a warm group (warm_pool.py): no session, and the environment
        the process started with (a backend sets its own again at the next start)."""
        self.session = None
        set_current_session(None)
        new_run()
        for key in set(os.environ) - set(self._env_at_start):
            del os.environ[key]
        os.environ.update(self._env_at_start)
        gc.collect()  # the last run's model, optimizer and data go now, not during the next

    def execute(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def acknowledge_commit(self, index: int) -> None:
        """Wakes a sync report waiting for checkpoint ``index`` to be committed."""
        if (session := self.session) is not None:  # else the run has ended
            session.acknowledge_commit(index)

    def plan_upload(self, index: int, skip: list[str]) -> None:
        """Which of its files of checkpoint ``index`` this rank leaves to a lower rank."""
        if (session := self.session) is not None:  # else the run has ended
            session.plan_upload(index, skip)

    def judge(self, iteration: int, stop_reason: str | None) -> None:
        """The verdict on ``iteration`` that its report waits for."""
        if (session := self.session) is not None:  # else the run has ended
            session.judge(iteration, stop_reason)

    def request_stop(self, reason: str, at: int) -> None:
        """The training function ends at report ``at`` (or its next)."""
        if (session := self.session) is not None:  # else the run has ended
            session.request_stop(reason, at)

    def preempt(self, why: str) -> None:
        """The driver was sent SIGTERM: this rank checkpoints and ends as if it had been."""
        if (session := self.session) is not None:
            session.preempt(why, tell_driver=False)

    def stacks(self) -> str:
        """Every thread's Python stack, the training function's first (for a hang's forensics;
        a thread blocked in a collective shows the call it is blocked in)."""
        frames = sys._current_frames()
        threads = sorted(threading.enumerate(),
                         key=lambda t: (not t.name.startswith("train-loop"), t.name))
        parts = []
        for thread in threads:
            frame = frames.get(thread.ident)
            if frame is None or thread.ident == threading.get_ident():
                continue
            parts.append(f"Thread {thread.name!r}:\n" + "".join(traceback.format_stack(frame)))
        return "\n".join(parts)

    def run(self, fn_blob: bytes, pass_config: bool, config: Any,
            session_args: dict[str, Any]) -> Iterator:
        """Run the training function in a thread and yield its outbox: reports, log lines and
        finished uploads, then one ``("done", value)`` or ``("error", description)``."""
        new_run()
        session = Session(**session_args)
        self.session = session
        set_current_session(session)
        rank = session.context.get_world_rank()

        def target() -> None:
            try:
                fn = cloudpickle.loads(fn_blob)
                with contextlib.nullcontext() if self.in_process else capture(session.outbox):
                    try:
                        value = fn(config) if pass_config else fn()
                    except StopTraining:
                        value = None  # a callback stopped the run: not a failure
                check_sendable(value, "the training function's return value", "return plain "
                               "data (numbers, lists, dicts, tensors, arrays) or checkpoint it")
                session.finish()
                session.outbox.put(("done", value))
            except BaseException as error:  # noqa: BLE001 - every outcome must reach the driver
                session.outbox.put(("error", describe_error(error, rank)))

        threading.Thread(target=target, name=f"train-loop-rank-{rank}", daemon=True).start()
        ended = threading.Event()
        if session.progress_every_s:
            threading.Thread(target=_tell_progress, args=(session, ended), daemon=True,
                             name=f"progress-rank-{rank}").start()
        try:
            while True:
                batch = _next_batch(session.outbox)
                yield batch
                if batch[-1][0] in ("done", "error"):
                    return
        finally:
            ended.set()
            set_current_session(None)
            self.session = None


_heap_frozen = False


def freeze_heap() -> None:
    """Once per worker process, after its backend's first setup (backend_setup.py): what it
    holds then, the framework's and Ray's modules, lives as long as the process. Frozen, full
    collections skip it: the rest's between warm runs (0.08-0.12 s -> 0.03 s with torch) and
    the training's. No run has started: its arguments and garbage stay collectable."""
    global _heap_frozen
    if not _heap_frozen:
        gc.freeze()
        _heap_frozen = True


def _end_after(seconds: float) -> None:
    """The end of a preemption's grace period: SIGTERM again, which Ray's handler obeys."""
    time.sleep(seconds)
    os.kill(os.getpid(), signal.SIGTERM)


def _tell_progress(session: Session, ended: threading.Event) -> None:
    """Every few seconds, the rank's progress for the driver's hang detection: sent when it
    moved, or while the rank is busy outside the training code."""
    told = -1
    while not ended.wait(session.progress_every_s):
        count, busy = session.progress, session.busy
        if count != told or busy is not None:
            session.outbox.put(("progress", {"count": count, "busy": busy}))
            told = count


def _next_batch(outbox: queue.Queue) -> list[tuple[str, Any]]:
    """The next items of the outbox, in order. Waits the batch window for more, unless an item
    is urgent: the end of the function, or a report that the training function waits on."""
    batch = [outbox.get()]
    if not any(_urgent(item) for item in batch):
        time.sleep(BATCH_WINDOW_S)
    while True:
        try:
            batch.append(outbox.get_nowait())
        except queue.Empty:
            return batch


def _urgent(item: tuple[str, Any]) -> bool:
    kind, payload = item
    return kind in ("done", "error", "persisted", "preempted") or (
        kind == "report" and (payload["upload"] is not None or payload["awaits_verdict"]))


def describe_error(error: BaseException, rank: int) -> dict[str, Any]:
    """Everything the driver needs to re-raise a worker's exception, as plain data."""
    try:
        pickled = cloudpickle.dumps(error)
    except Exception:  # noqa: BLE001 - an exception that can't travel still gets reported
        pickled = None
    return {
        "rank": rank,
        "type": f"{type(error).__module__}.{type(error).__qualname__}",
        "message": str(error),
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        "pickled": pickled,
        "pid": os.getpid(),
        "node_ip": ray.util.get_node_ip_address(),
    }
