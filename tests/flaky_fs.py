"""A local filesystem that fails, or kills its process, after k files: storage faults on demand.

Registered as protocol ``flaky`` in the driver and, from inside the training function, in the
workers (fsspec's registry is per process). The fault is armed per process through class
attributes, so a test arms it only on the attempt that must fail.
"""

from __future__ import annotations

import os
import signal
import threading

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


def arm(fail_after: int | None, mode: str = "raise") -> None:
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.fail_after = fail_after
    FlakyFileSystem.mode = mode
    FlakyFileSystem.written = 0
    FlakyFileSystem.failed.clear()
