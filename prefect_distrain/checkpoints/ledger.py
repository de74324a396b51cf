"""The attempt ledger: ``<run>/_attempts/attempt_NNNNN.json``, one record per start of the worker
group, across restarts and Prefect retries.

```python
ledger = AttemptLedger(storage, lease=3)
record = ledger.begin(world_size=2, resumed_from=checkpoint, restart_cause=None)
...
ledger.end(record, "completed", cause=None, last_reported=12)
```
Each record is claimed by creating it exclusively, so two writers never get one attempt number
(and never write into each other's checkpoint folders, which carry it). A record says how the
attempt started (why, from which checkpoint, how many reported steps it redoes) and how it
ended; the checkpoint manager reads it to know which attempts are over.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable

from ..exceptions import StorageError
from .checkpoint import Checkpoint
from .fs import redact_url
from .storage import ATTEMPTS, RunStorage, driver_io

#: How a driver killed before it could record an outcome shows in the next record.
LOST_DRIVER = "the driver was lost (no outcome recorded)"


class AttemptLedger:
    """The attempts of one run, as seen and written by its lease holder."""

    def __init__(self, storage: RunStorage, lease: int | None = None,
                 on_retry: Callable[[], None] | None = None):
        self.storage = storage
        self.lease = lease
        self.on_retry = on_retry

    def records(self) -> list[dict[str, Any]]:
        """Every readable record, by attempt number (an unreadable one is logged, skipped)."""
        return read_attempts(self.storage)

    def begin(self, *, world_size: int, resumed_from: Checkpoint | None,
              restart_cause: str | None, at_least: int = 0,
              data: dict[str, Any] | None = None) -> dict[str, Any]:
        """Claim the next attempt number (at least ``at_least``) and write its first record;
        ``data``: the fingerprints of the datasets it trains on (data_fingerprint.py)."""
        resumed_index = resumed_from.index if resumed_from is not None and resumed_from.index \
            else 0
        records = self.records()
        record = {"started_at": now_iso(), "world_size": world_size,
                  "resumed_from": redact_url(resumed_from.path) if resumed_from else None,
                  **_why(records, resumed_index, restart_cause), "status": "running",
                  "lease": self.lease}
        if data:
            record["data"] = data
        used = [r["attempt"] for r in records]
        used += [attempt for _, _, attempt in self.storage.checkpoint_folders()]
        attempt = max([at_least - 1, *used], default=-1) + 1
        for _ in range(100):
            claimed = {**record, "attempt": attempt}
            with driver_io("claiming an attempt", self.storage):
                if self.storage.create_json(claimed, ATTEMPTS, _name(attempt),
                                            on_retry=self.on_retry):
                    return claimed
            attempt += 1
        raise StorageError(f"could not claim an attempt of run {self.storage.run_name!r}: 100 "
                           "numbers in a row were taken")

    def end(self, record: dict[str, Any], status: str, cause: str | None,
            last_reported: int | None) -> dict[str, Any]:
        """Rewrite this writer's own record with how the attempt ended."""
        ended = {**record, "status": status, "ended_at": now_iso(), "cause": cause,
                 "last_reported": last_reported}
        with driver_io("writing the attempt ledger", self.storage):
            self.storage.write_json(ended, ATTEMPTS, _name(record["attempt"]),
                                    on_retry=self.on_retry)
        return ended


def _why(records: list[dict[str, Any]], resumed_index: int,
         restart_cause: str | None) -> dict[str, Any]:
    """Why an attempt starts and how many reported steps it must do again."""
    previous = records[-1] if records else None
    if previous is None or previous.get("status") in ("completed", "stopped"):
        return {"restarted_because": restart_cause, "steps_redone": 0}
    cause = restart_cause or previous.get("cause") or LOST_DRIVER
    last = previous.get("last_reported")
    return {"restarted_because": cause,
            "steps_redone": None if not isinstance(last, int) else max(0, last - resumed_index)}


def read_attempts(storage: RunStorage) -> list[dict[str, Any]]:
    """The attempt ledger of a run, by attempt number; unreadable records are skipped."""
    records = []
    for name in storage.names(ATTEMPTS):
        if name.startswith("attempt_") and name.endswith(".json"):
            record = storage.read_json(ATTEMPTS, name)
            if record is not None and isinstance(record.get("attempt"), int):
                records.append(record)
    return sorted(records, key=lambda a: a["attempt"])


def attempt_record(checkpoint: Checkpoint) -> dict[str, Any] | None:
    """The ledger record of the attempt that committed a checkpoint (of any run), or None
    (a folder no run committed, or a record that is gone)."""
    if checkpoint.manifest is None:
        return None
    run_url, _, _ = checkpoint.path.rstrip("/").rpartition("/")
    storage_url, _, run_name = run_url.rpartition("/")
    if not storage_url or not run_name:
        return None
    storage = RunStorage(storage_url, run_name, checkpoint.storage_options)
    return storage.read_json(ATTEMPTS, _name(checkpoint.manifest.attempt))


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _name(attempt: int) -> str:
    return f"attempt_{attempt:05d}.json"
