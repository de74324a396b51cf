"""A local filesystem that fails, or kills its process, after k files: storage faults on demand.

Registered as protocol ``flaky`` in the driver and, from inside the training function, in the
workers (fsspec's registry is per process). The fault is armed per process through class
attributes, so a test arms it only on the attempt that must fail.

Probes (off unless a test sets them, per process like the fault): ``probe_uploads`` holds each
``put`` at a gate file or until a condition holds, and counts the puts in flight at once;
``record_removals`` lists every ``rm`` / ``rm_file`` in order.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem


class FlakyFileSystem(LocalFileSystem):
    protocol = ("flaky",)
    root_marker = "/"
    #: After this many files were written, the next one fails (None: never).
    fail_after: int | None = None
    #: "raise" an OSError, or "kill" the process with SIGKILL.
    mode = "raise"
    written = 0
    failed = threading.Event()

    # -- probes (see ``probe_uploads`` and ``record_removals``) --------------------------------
    #: A folder of gate files: the n-th ``put`` of this process (from 1) waits until
    #: ``<gates>/<n>`` exists, so a test decides when each upload may go on.
    gates: str | None = None
    #: Holds every ``put`` until this returns True or another ``put`` starts in this process.
    hold_until: Callable[[], bool] | None = None
    #: How long a held ``put`` waits before it fails with an OSError that says why.
    hold_cap_s = 60.0
    puts_started = 0
    puts_done = 0
    in_flight = 0
    max_in_flight = 0
    #: ("rm" | "rm_file", path) of every removal in this process, in order, while a list.
    removals: list | None = None
    _puts = threading.Condition()

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("flaky://"):
            path = path[len("flaky://"):]
        return LocalFileSystem._strip_protocol(path)

    def put_file(self, lpath, rpath, **kwargs):
        cls = type(self)
        if cls.fail_after is not None and cls.written >= cls.fail_after:
            if cls.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            cls.failed.set()
            raise OSError(f"injected storage failure after {cls.written} files")
        super().put_file(lpath, rpath, **kwargs)
        cls.written += 1

    def put(self, lpath, rpath, *args, **kwargs):
        """One upload (all files of a checkpoint): counted, and held while a probe says so."""
        cls = type(self)
        with cls._puts:
            cls.puts_started += 1
            number = cls.puts_started
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
            cls._puts.notify_all()
        try:
            cls._hold(number)
            return super().put(lpath, rpath, *args, **kwargs)
        finally:
            with cls._puts:
                cls.in_flight -= 1
                cls.puts_done += 1
                cls._puts.notify_all()

    @classmethod
    def _hold(cls, number: int) -> None:
        deadline = time.monotonic() + cls.hold_cap_s
        if cls.gates is not None:
            gate = os.path.join(cls.gates, str(number))
            while not os.path.exists(gate):  # a file another thread creates: poll it
                if time.monotonic() > deadline:
                    raise OSError(f"upload {number} waited {cls.hold_cap_s:g} s for its gate "
                                  f"file {gate}, which is opened only after report() returned: "
                                  "report() waited for this upload")
                time.sleep(0.02)
        if cls.hold_until is not None:
            with cls._puts:
                while not (cls.in_flight > 1 or cls.hold_until()):
                    if time.monotonic() > deadline:
                        raise OSError(f"upload {number} was held {cls.hold_cap_s:g} s and its "
                                      "condition never came true")
                    cls._puts.wait(0.02)

    def _record(self, operation: str, path) -> None:
        removals = type(self).removals
        if removals is not None:
            for one in path if isinstance(path, (list, tuple)) else [path]:
                removals.append((operation, self._strip_protocol(one)
                                 if isinstance(one, str) else one))

    def rm_file(self, path):
        self._record("rm_file", path)
        return super().rm_file(path)

    def rm(self, path, recursive=False, maxdepth=None):
        self._record("rm", path)
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)


def arm(fail_after: int | None, mode: str = "raise") -> None:
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.fail_after = fail_after
    FlakyFileSystem.mode = mode
    FlakyFileSystem.written = 0
    FlakyFileSystem.failed.clear()


def probe_uploads(gates: str | None = None, hold_until: Callable[[], bool] | None = None,
                  cap_s: float = 60.0) -> type[FlakyFileSystem]:
    """In this process: reset the put counters and hold each put at its gate file in ``gates``
    and/or until ``hold_until()`` (or another put starts), for at most ``cap_s`` seconds."""
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    cls = FlakyFileSystem
    with cls._puts:
        cls.gates, cls.hold_until, cls.hold_cap_s = gates, hold_until, cap_s
        cls.puts_started = cls.puts_done = cls.in_flight = cls.max_in_flight = 0
    return cls


def record_removals() -> list:
    """Start listing this process's removals; the list fills as they happen."""
    FlakyFileSystem.removals = []
    return FlakyFileSystem.removals


def stop_recording() -> None:
    FlakyFileSystem.removals = None
