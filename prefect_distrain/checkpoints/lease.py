"""One live writer per run: a lease in the run's folder, claimed by an exclusive create.

```python
lease = RunLease(storage, holder_identity(), timeout_s=60)
lease.acquire()          # RunInUseError naming the holder when another writer is alive
...                      # a heartbeat thread renews it; lease.check() before every commit
lease.release()
```
Generations ``_lease/lease_000001.json``, ``lease_000002.json``... : the highest is the lease.
Taking it is creating the next generation exclusively, so of two writers taking it at once
exactly one wins. A writer may take it when it is released, when the holder is provably gone
(its heartbeat is older than the timeout, or it ran on this host and its process is gone), when
it is a Prefect retry of the holder's own task run, or when told to (``RunConfig(takeover=True)``).
A writer that finds a newer generation than its own has lost the run: it commits and deletes
nothing more (``LeaseLostError``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from ..exceptions import DistrainError
from .fs import redact_url

logger = logging.getLogger("prefect_distrain")

LEASE = "_lease"
#: Generations kept besides the current one (the rest are pruned by the holder).
_KEEP = 3


class RunInUseError(DistrainError):
    """Another live writer holds the run (the same run name and storage)."""

    def __init__(self, message: str, *, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, {"holder": self.holder}))


class LeaseLostError(DistrainError):
    """Another writer took this run over while it trained: this one stopped committing."""


def _rebuild(cls, args, state):
    return cls(*args, **state)


def holder_identity(**prefect: Any) -> dict[str, Any]:
    """Who writes: host, pid and the process's start time (a reused pid is told apart), plus
    Prefect's flow and task run ids where there are some."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": _process_start(os.getpid()),
            **{k: str(v) for k, v in prefect.items() if v is not None}}


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _gone(holder: dict) -> bool:
    """True when the holder ran on this host and its process no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    started = _process_start(holder["pid"])
    if started is None:
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return holder.get("started") is not None and started != holder["started"]


def takeover_reason(current: dict, me: dict, now: float, timeout_s: float,
                    force: bool = False) -> str | None:
    """Why ``me`` may take the lease that ``current`` holds, or None if it may not."""
    if current.get("released"):
        return "it was released"
    if force:
        return "takeover=True"
    if me.get("task_run_id") and current.get("task_run_id") == me.get("task_run_id"):
        return "this is a Prefect retry of the task run that holds it"
    age = now - float(current.get("heartbeat_at", 0.0))
    if age > timeout_s:
        return f"its last heartbeat is {age:.0f} s old (more than {timeout_s:g} s)"
    if _gone(current):
        return f"its process {current.get('pid')} on this host is gone"
    return None


def describe(holder: dict, now: float) -> str:
    where = f"pid {holder.get('pid')} on {holder.get('host')}"
    if holder.get("flow_run_id"):
        where += f", flow run {holder['flow_run_id']}"
    if holder.get("task_run_id"):
        where += f", task run {holder['task_run_id']}"
    age = now - float(holder.get("heartbeat_at", now))
    return f"{where} (last heartbeat {age:.0f} s ago)"


class RunLease:
    """This writer's lease on a run (see the module's docstring)."""

    def __init__(self, storage: Any, identity: dict[str, Any], timeout_s: float,
                 force: bool = False):
        self.storage = storage
        self.identity = identity
        self.timeout_s = timeout_s
        self.force = force
        self.generation: int | None = None
        self.lost: str | None = None
        self._record: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and giving back ------------------------------------------------------------

    def acquire(self) -> int:
        """Take the lease or raise RunInUseError naming the live holder."""
        for _ in range(5):  # another writer may win a generation while we look
            current_gen, current = self._current()
            now = time.time()
            if current is not None:
                reason = takeover_reason(current, self.identity, now, self.timeout_s, self.force)
                if reason is None:
                    raise RunInUseError(
                        f"run {redact_url(self.storage.run_url)!r} is being written by "
                        f"{describe(current, now)}. Wait for it to end, or let this one take "
                        f"over: RunConfig(takeover=True) if that writer is gone (its lease "
                        f"expires {self.timeout_s:g} s after its last heartbeat, "
                        "PREFECT_DISTRAIN_LEASE_TIMEOUT_S)", holder=current)
                if not current.get("released"):
                    logger.warning("Taking over run %r from %s: %s", self.storage.run_name,
                                   describe(current, now), reason)
            generation = current_gen + 1
            record = {**self.identity, "generation": generation, "run": self.storage.run_name,
                      "acquired_at": now, "heartbeat_at": now, "released": False}
            if self.storage.create_json(record, LEASE, _name(generation)):
                self.generation, self._record = generation, record
                self._prune(generation)
                self._thread = threading.Thread(target=self._beat, daemon=True,
                                                name="prefect-distrain-lease")
                self._thread.start()
                return generation
        raise RunInUseError(f"run {redact_url(self.storage.run_url)!r}: other writers keep "
                            "taking its lease; is something retrying in a loop?")

    def release(self) -> None:
        """Give the run back (the next writer takes it at once). Never raises."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.generation is None or self.lost:
            return
        try:
            self.storage.write_json({**self._record, "released": True,
                                     "heartbeat_at": time.time()}, LEASE, _name(self.generation))
        except Exception as error:  # noqa: BLE001 - it expires by itself
            logger.warning("Could not release the lease of run %r (%s); it expires after %g s",
                           self.storage.run_name, error, self.timeout_s)

    # -- while training --------------------------------------------------------------------

    def check(self) -> None:
        """Raise LeaseLostError if another writer took the run over. Called before every
        commit and deletion: a writer that lost the run touches nothing more."""
        if self.generation is None:
            return
        if self.lost is None:
            newer, record = self._current()
            if newer > self.generation:
                self.lost = f"writer {describe(record or {}, time.time())} took it over"
        if self.lost is not None:
            raise LeaseLostError(f"run {self.storage.run_name!r} was taken over while this writer "
                                 f"trained ({self.lost}): it commits and deletes nothing more")

    def raise_if_lost(self) -> None:
        """LeaseLostError if the heartbeat found the run taken over (no storage access)."""
        if self.lost is not None:
            self.check()

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            try:
                self.check()
                self._record["heartbeat_at"] = time.time()
                self.storage.write_json(self._record, LEASE, _name(self.generation))
            except LeaseLostError:
                return
            except Exception as error:  # noqa: BLE001 - storage hiccup: try at the next beat
                logger.warning("Lease heartbeat of run %r failed: %s", self.storage.run_name, error)

    # -- reading ---------------------------------------------------------------------------

    def _current(self) -> tuple[int, dict | None]:
        """The highest generation and its record (None: never leased). Records are written
        atomically, so an unreadable one was damaged: it counts as expired."""
        generations = [g for g in map(_generation, self.storage.names(LEASE)) if g]
        if not generations:
            return 0, None
        top = max(generations)
        return top, self.storage.read_json(LEASE, _name(top)) or {"heartbeat_at": 0.0}

    def _prune(self, generation: int) -> None:
        for old in map(_generation, self.storage.names(LEASE)):
            if old and old < generation - _KEEP:
                try:
                    self.storage.filesystem()[0].rm_file(self.storage.path(LEASE, _name(old)))
                except FileNotFoundError:
                    pass


def _name(generation: int) -> str:
    return f"lease_{generation:06d}.json"


def _generation(name: str) -> int | None:
    if name.startswith("lease_") and name.endswith(".json") and name[6:-5].isdigit():
        return int(name[6:-5])
    return None
