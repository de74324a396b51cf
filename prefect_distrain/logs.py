"""Worker logs in the driver's log (the Prefect task run's), independent of Ray's stdout.

On a worker, ``capture`` sends every ``logging`` record at INFO or above and every line the
training function prints to the worker's outbox, which the driver already reads. On the driver,
``WorkerLogs`` logs rank 0's lines at their level and the other ranks' from
``other_ranks_level`` up (default WARNING, so N ranks do not flood the run log), each with its
rank; it keeps the last lines of every rank for the run summary of a failed run.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import queue
import sys
from typing import Iterator

#: Lines kept per rank for crash forensics.
TAIL_LINES = 30
#: Loggers of the machinery itself, not the user's.
_OWN_LOGGERS = ("ray", "prefect_distrain", "urllib3", "botocore", "s3fs", "fsspec", "asyncio")


class _OutboxHandler(logging.Handler):
    def __init__(self, outbox: queue.Queue):
        super().__init__(logging.INFO)
        self.outbox = outbox
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(_OWN_LOGGERS):
            return
        try:
            self.outbox.put(("log", {"level": record.levelno, "message": self.format(record)}))
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


class _PrintedLines(io.TextIOBase):
    """A stdout/stderr stand-in: complete lines go to the outbox, and to the real stream."""

    def __init__(self, outbox: queue.Queue, stream, level: int):
        self.outbox, self.stream, self.level = outbox, stream, level
        self.partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.stream.write(text)
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            if line.strip():
                self.outbox.put(("log", {"level": self.level, "message": line}))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()


@contextlib.contextmanager
def capture(outbox: queue.Queue) -> Iterator[None]:
    """On a worker, while the training function runs: logging records and prints to the
    outbox. The root logger is lowered to INFO so that ``logging.info`` is not dropped before
    it reaches a handler."""
    root = logging.getLogger()
    handler = _OutboxHandler(outbox)
    level = root.level
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout = _PrintedLines(outbox, stdout, logging.INFO)
    sys.stderr = _PrintedLines(outbox, stderr, logging.WARNING)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        root.removeHandler(handler)
        root.setLevel(level)


class WorkerLogs:
    """The driver's side: log each worker line once, with its rank; keep every rank's tail."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter,
                 other_ranks_level: int = logging.WARNING):
        self.logger = logger
        self.other_ranks_level = other_ranks_level
        self.tails: dict[int, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=TAIL_LINES))

    def add(self, rank: int, line: dict) -> None:
        level, message = line["level"], line["message"]
        self.tails[rank].append(f"{logging.getLevelName(level)} {message}")
        if rank == 0 or level >= self.other_ranks_level:
            self.logger.log(level, "[rank %d] %s", rank, message)
