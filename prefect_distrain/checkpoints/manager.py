"""The checkpoint lifecycle of a run, in one place: what is committed, kept, latest, best and
resumed from; which folders are torn and may go.

```python
manager = CheckpointManager(storage, checkpoint_config, logger)
manager.open(identity, timeout_s=60)       # the run's lease, its committed manifests
resume = manager.resume_point("latest")    # a verified Checkpoint, or None
manager.commit(index, attempt, files_by_rank, metrics, world_size=2, backend="torch")
manager.close()
```
Rules, each kept here only:

- **Committed** means a valid manifest exists (manifest.py validates it; an invalid one is
  reported and skipped, never deleted). A commit needs the files of every rank that declared
  the checkpoint; one with no files at all is refused. A name several ranks write is uploaded
  by the lowest of them (``upload_plan``); copies that differ keep that rank's, with a warning
  or, with ``rank_conflicts="fail"``, an error (``merge_files``).
- **Best** (``best_first``): a finite score under the score attribute, higher or lower first by
  the order; NaN, infinite, missing or non-numeric scores are never best and come after every
  real score, newest first. Retention, the result's ``best_checkpoints``, ``best_checkpoint``
  and the sweeps all use this one ordering.
- **Scored** by the metrics reported with a checkpoint and those its validation returned
  (``pd.Validation``; a validated value replaces a reported one of the same name).
- **Kept** (``num_to_keep``): the first N by that ordering, plus always the latest, the
  checkpoint this run resumed from, those being validated, and those a model alias points at or
  pointed at just before (``pd.promote`` pins them). Deleting removes the manifest first, then
  the validation record and the files.
- **Validated** off the training path (``execution/validations.py`` runs them): the record
  beside the manifest says validating, then validated or validation failed; the manifest never
  changes. A validation a failed attempt left unfinished is run again by the next.
- **One writer** per run: a lease (lease.py); commits and deletions check it first.
- **Torn** folders (no manifest at all) are removed only by the lease holder, and only those of
  attempts that are provably over: recorded as ended, or run by a writer that released the run
  or whose lease expired or whose process is gone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Iterable, NamedTuple, TypeVar

from .. import settings
from ..config import CheckpointConfig
from ..exceptions import ConfigurationError
from .checkpoint import Checkpoint
from .fs import redact_url
from .lease import LEASE, RunLease, takeover_reason
from .ledger import read_attempts
from .manifest import FileEntry, Manifest, ManifestError, parse_dirname
from .retry import RetryCounts
from .storage import MANIFESTS, PINS, RunStorage, driver_io, pinned_folder
from .validation import VALIDATING, ValidationRecord

T = TypeVar("T")


def score(metrics: dict[str, Any], attribute: str | None) -> float | None:
    """A checkpoint's score: the finite number reported under ``attribute``; None when it is
    missing, NaN, infinite or not a number (never best)."""
    value = metrics.get(attribute) if attribute is not None else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def best_first(items: Iterable[T], attribute: str | None, order: str = "max") -> list[T]:
    """Manifests or Checkpoints (anything with ``metrics`` and ``index``), best first: real
    scores by ``order`` ("max": higher is better), ties newest first; the unscored after them,
    newest first. Without an attribute: newest first."""
    def key(item: Any) -> tuple:
        value = score(item.metrics, attribute)
        if value is None:
            return (1, 0.0, -(item.index or 0))
        return (0, -value if order == "max" else value, -(item.index or 0))

    return sorted(items, key=key)


class _Scored(NamedTuple):
    index: int
    metrics: dict[str, Any]
    directory: str


def retained(manifests: list[Manifest], num_to_keep: int | None, attribute: str | None,
             order: str, protected: set[str] = frozenset(),
             validations: dict[str, ValidationRecord] | None = None) -> list[Manifest]:
    """The manifests to keep (see the module's rules), in their given order; ``validations``
    (by folder) add their metrics to the scores."""
    if num_to_keep is None or not manifests:
        return list(manifests)
    validations = validations or {}
    scored = [_Scored(m.index, {**m.metrics, **(validations[m.directory].metrics
                                                if m.directory in validations else {})},
                      m.directory) for m in manifests]
    keep = {m.directory for m in best_first(scored, attribute, order)[:num_to_keep]}
    keep.add(latest(manifests).directory)
    keep |= set(protected)
    return [m for m in manifests if m.directory in keep]


def latest(manifests: Iterable[Manifest]) -> Manifest | None:
    return max(manifests, key=lambda m: (m.index, m.attempt), default=None)


def merge_files(index: int, files_by_rank: dict[int, dict[str, FileEntry]],
                skipped_by_rank: dict[int, dict[str, FileEntry]] | None = None,
                conflicts: str = "warn", logger: logging.Logger | None = None
                ) -> dict[str, FileEntry]:
    """Every rank's files of one checkpoint. A name that several ranks wrote was uploaded by
    the lowest of them only (the others skipped it: ``skipped_by_rank``); the same contents
    are stored once, different ones keep the lowest rank's copy with a warning, or fail the
    run with ``conflicts="fail"``."""
    files: dict[str, FileEntry] = {}
    for rank in sorted(files_by_rank):
        for name, entry in files_by_rank[rank].items():
            if name in files:  # uploaded twice: the workers did not follow the driver's plan
                raise ConfigurationError(
                    f"ranks {files[name].rank} and {rank} both uploaded {name!r} into "
                    f"checkpoint {index}")
            files[name] = entry
    differing: dict[str, list[int]] = {}
    for rank, skipped in sorted((skipped_by_rank or {}).items()):
        for name, entry in skipped.items():
            kept = files.get(name)
            if kept is not None and kept.sha256 != entry.sha256:
                differing.setdefault(name, [kept.rank]).append(rank)
    if differing:
        shown = "; ".join(f"{name!r} from ranks {ranks}" for name, ranks in
                          sorted(differing.items()))
        message = (f"checkpoint {index}: ranks wrote files of the same name with different "
                   f"contents ({shown})")
        if conflicts == "fail":
            raise ConfigurationError(
                f"{message}. Give each rank's files their own names (e.g. f'shard_{{rank}}.pt'),"
                " or report them from one rank only")
        (logger or logging.getLogger("prefect_distrain")).warning(
            "%s: kept the lowest rank's copy of each. Give each rank's files their own names "
            "if they all matter (CheckpointConfig(rank_conflicts='fail') makes this an error)",
            message)
    if not files:
        raise ConfigurationError(
            f"checkpoint {index} has no files: every rank that reported it passed an empty "
            "folder. Write the state into the folder before report(), or report the metrics "
            "without a checkpoint")
    return files


def upload_plan(names_by_rank: dict[int, list[str]]) -> dict[int, list[str]]:
    """Which of its files each rank above 0 skips: the names a lower rank writes too (the
    lowest rank uploads each name; ``merge_files`` compares the copies)."""
    seen: set[str] = set()
    plan: dict[int, list[str]] = {}
    for rank in sorted(names_by_rank):
        names = names_by_rank[rank]
        if rank > 0:
            plan[rank] = sorted(seen.intersection(names))
        seen.update(names)
    return plan


class CheckpointManager:
    """The checkpoints of one run, as one writer sees them (see the module's rules)."""

    def __init__(self, storage: RunStorage, config: CheckpointConfig | None = None,
                 logger: logging.Logger | logging.LoggerAdapter | None = None):
        self.storage = storage
        self.config = config or CheckpointConfig()
        self.logger = logger or logging.getLogger("prefect_distrain")
        self.lease: RunLease | None = None
        self.committed: list[Manifest] = []
        #: The validation records of the committed checkpoints, by folder.
        self.validations: dict[str, ValidationRecord] = {}
        #: Folders whose validation waits or runs now, in this process (kept from retention;
        #: the validation runner adds them as it takes each).
        self.validating: set[str] = set()
        self.protected: set[str] = set()
        #: The storage retries of this run's writers so far (retry.py).
        self.retries = RetryCounts()
        self._swept: set[int] = set()

    # -- the writer ------------------------------------------------------------------------

    def open(self, identity: dict[str, Any], timeout_s: float, takeover: bool = False) -> None:
        """Take the run's lease (RunInUseError if another writer is alive) and read what is
        committed."""
        self.lease = RunLease(self.storage, identity, timeout_s, force=takeover)
        self.lease.acquire()
        self.refresh()

    def close(self) -> None:
        if self.lease is not None:
            self.lease.release()

    def refresh(self) -> list[Manifest]:
        """Read the run's committed manifests again (after a restart: what the attempt
        before committed), saying which files in ``_manifests`` are not valid ones."""
        with driver_io("reading the manifests", self.storage):
            manifests, problems = self.storage.read_manifests()
            validations, more = self.storage.read_validations()
        for problem in problems + more:
            self.logger.warning("Skipping %s; it is left as it is", problem)
        self.committed = manifests
        self.validations = {m.directory: record for m in manifests
                            if (record := validations.get(m.directory)) is not None
                            and record.belongs_to(m)}
        return manifests

    def check_lease(self, look: bool = True) -> None:
        """LeaseLostError once another writer took the run over. ``look=False``: only what the
        lease's heartbeat has already seen (no storage access, for the driver's poll loop)."""
        if self.lease is not None:
            self.lease.check() if look else self.lease.raise_if_lost()

    def attempts(self) -> list[dict[str, Any]]:
        """The run's attempt ledger (ledger.py), by attempt number."""
        return read_attempts(self.storage)

    # -- reading checkpoints ---------------------------------------------------------------

    def checkpoint(self, manifest: Manifest) -> Checkpoint:
        return self.storage.checkpoint(manifest, self.validations.get(manifest.directory))

    def checkpoints(self) -> list[Checkpoint]:
        """Every committed checkpoint with its validation status, oldest first."""
        return [self.checkpoint(m) for m in self.committed]

    def latest(self) -> Checkpoint | None:
        manifest = latest(self.committed)
        return self.checkpoint(manifest) if manifest else None

    def best_checkpoints(self) -> list[Checkpoint]:
        return best_first(self.checkpoints(), self.config.checkpoint_score_attribute,
                          self.config.checkpoint_score_order)

    def resume_point(self, value: Checkpoint | str | None) -> Checkpoint | None:
        """What ``resume_from_checkpoint`` names: None, "latest", a path/URL or a Checkpoint;
        verified or refused. A checkpoint of this run is protected from retention."""
        resume = self._resolve(value)
        ours = f"{self.storage.run_url}/{resume.manifest.directory}" \
            if resume is not None and resume.manifest is not None else None
        if ours is not None and resume.path.rstrip("/") == ours:
            self.protected = {resume.manifest.directory}
        return resume

    def _resolve(self, value: Checkpoint | str | None) -> Checkpoint | None:
        if value is None:
            return None
        if value == "latest":
            found = self.latest()
            if found is None:
                self.logger.info("Run %r has no committed checkpoint yet: starting fresh",
                                 self.storage.run_name)
            else:
                self.logger.info("Resuming run %r from its latest checkpoint, %d",
                                 self.storage.run_name, found.index)
            return found
        if isinstance(value, str):
            if not value.strip():
                raise ConfigurationError(
                    "resume_from_checkpoint='' names no checkpoint: pass None (start fresh), "
                    "'latest', a checkpoint's path/URL or a Checkpoint")
            value = Checkpoint(value, self.storage.storage_options)
        if not isinstance(value, Checkpoint):
            raise ConfigurationError(
                "resume_from_checkpoint takes a Checkpoint, a path/URL or 'latest', got "
                f"{type(value).__name__}")
        if not value.storage_options and self.storage.storage_options:
            value = Checkpoint(value.path, self.storage.storage_options, value.manifest)
        shown = redact_url(value.path)
        fs, path = value.location()
        if not fs.isdir(path):
            raise ConfigurationError(
                f"resume_from_checkpoint={shown!r}: no such checkpoint directory. Pass "
                "result.checkpoint of an earlier run, the path of a checkpoint folder, or "
                "'latest'")
        if value.manifest is not None:
            return value
        parent, _, name = path.rstrip("/").rpartition("/")
        manifest_path = f"{parent}/{MANIFESTS}/{name}.json"
        if fs.exists(manifest_path):
            try:
                manifest = Manifest.from_json(fs.cat_file(manifest_path), f"{name}.json")
            except ManifestError as error:
                raise ConfigurationError(f"resume_from_checkpoint={shown!r}: {error}") from None
            return Checkpoint(value.path, value.storage_options, manifest)
        if parse_dirname(name) is not None and fs.isdir(f"{parent}/{MANIFESTS}"):
            raise ConfigurationError(
                f"resume_from_checkpoint={shown!r} is a checkpoint folder of a run with no "
                "manifest: it was never committed (torn by a failure) or its manifest was "
                "removed, so its files can't be verified. Resume from a committed checkpoint "
                "(e.g. 'latest')")
        if not fs.ls(path, detail=False):
            raise ConfigurationError(f"resume_from_checkpoint={shown!r} is an empty folder")
        self.logger.info("Resuming from %s, a folder with no manifest: its files are used as "
                         "they are, unverified", shown)
        return value

    # -- committing and keeping ------------------------------------------------------------

    def commit(self, index: int, attempt: int, files_by_rank: dict[int, dict[str, FileEntry]],
               metrics: dict[str, Any], *, world_size: int, backend: str,
               skipped_by_rank: dict[int, dict[str, FileEntry]] | None = None,
               data_positions: dict[str, Any] | None = None) -> Manifest:
        """Write the manifest of a checkpoint whose files every declaring rank has uploaded,
        then remove torn folders (once per attempt) and apply retention."""
        attribute = self.config.checkpoint_score_attribute
        # With a validation, the score may be one of the metrics it returns.
        if attribute is not None and attribute not in metrics and self.config.validate is None:
            shown = sorted(k for k in metrics if not k.startswith("_"))
            raise ConfigurationError(
                f"checkpoint_score_attribute {attribute!r} is not in the metrics reported with "
                f"checkpoint {index} (reported: {', '.join(shown) or 'none'}): report it with "
                "every checkpoint, or change CheckpointConfig(checkpoint_score_attribute=...)")
        files = merge_files(index, files_by_rank, skipped_by_rank, self.config.rank_conflicts,
                            self.logger)
        self.check_lease()
        manifest = Manifest.new(index, attempt, files, metrics=metrics, world_size=world_size,
                                backend=backend,
                                lease=self.lease.generation if self.lease else None,
                                data_positions=data_positions)
        with driver_io(f"committing checkpoint {index}", self.storage):
            self.storage.write_manifest(manifest, on_retry=self.retries.driver_retried)
        self.committed.append(manifest)
        if attempt not in self._swept:
            self._swept.add(attempt)
            self.remove_torn(attempt)
        self.apply_retention()
        return manifest

    # -- validations ------------------------------------------------------------------------

    def unfinished_validations(self) -> list[Manifest]:
        """Committed checkpoints whose records say validating: an earlier writer started them
        and never ended (its attempt failed or its process died), unless this writer runs or
        queues them now (the caller knows)."""
        return [m for m in self.committed
                if (record := self.validations.get(m.directory)) is not None
                and record.status == VALIDATING]

    def record_validation(self, manifest: Manifest, record: ValidationRecord) -> None:
        """Write where a committed checkpoint's validation stands (under the lease; nothing
        for one retention deleted); once it ended, the checkpoint may be scored by its metrics
        and retention looks again."""
        if record.status != VALIDATING:
            self.validating.discard(manifest.directory)
        if manifest not in self.committed:
            return
        record = dataclasses.replace(record, committed_at=manifest.committed_at)
        self.check_lease()
        with driver_io(f"recording the validation of checkpoint {manifest.index}",
                       self.storage):
            self.storage.write_validation(manifest.directory, record,
                                          on_retry=self.retries.driver_retried)
        self.validations[manifest.directory] = record
        if record.status != VALIDATING:
            attribute = self.config.checkpoint_score_attribute
            if record.metrics and attribute is not None \
                    and attribute not in {**manifest.metrics, **record.metrics}:
                self.logger.warning(
                    "checkpoint_score_attribute %r is neither reported with checkpoint %d nor "
                    "returned by its validation (%s): it is never best. Return it from the "
                    "validation function or report it", attribute, manifest.index,
                    ", ".join(sorted(record.metrics)))
            self.apply_retention()

    def pinned(self) -> set[str]:
        """The folders a model alias points at now or pointed at just before (``pd.promote``
        pins them in ``_pins/``): kept whatever the retention."""
        with driver_io("reading the model aliases' pins", self.storage):
            names = self.storage.names(PINS)
        return {folder for name in names if (folder := pinned_folder(name)) is not None}

    def apply_retention(self) -> None:
        if self.config.num_to_keep is None:
            return
        keep = retained(self.committed, self.config.num_to_keep,
                        self.config.checkpoint_score_attribute,
                        self.config.checkpoint_score_order,
                        self.protected | self.validating | self.pinned(), self.validations)
        gone = [m for m in self.committed if m not in keep]
        if gone:
            self.check_lease()
        for manifest in gone:
            with driver_io(f"deleting checkpoint {manifest.index}", self.storage):
                self.storage.delete_checkpoint(manifest)
            self.validations.pop(manifest.directory, None)
        self.committed = keep

    def torn_folders(self, current_attempt: int) -> list[str]:
        """The folders that have no manifest at all, of attempts that are provably over (see
        the module's rules): what ``remove_torn`` removes."""
        manifests = set(self.storage.names(MANIFESTS))
        dead = self.dead_attempts(current_attempt)
        return [name for name, _, attempt in self.storage.checkpoint_folders()
                if f"{name}.json" not in manifests and attempt in dead]

    def remove_torn(self, current_attempt: int) -> list[str]:
        """Remove ``torn_folders``. Returns their names."""
        self.check_lease()
        removed = []
        for name in self.torn_folders(current_attempt):
            with driver_io("removing a torn folder", self.storage):
                self.storage.remove_folder(name)
            removed.append(name)
        if removed:
            self.logger.info("Removed torn checkpoint folders of earlier attempts: %s",
                             ", ".join(removed))
        return removed

    def dead_attempts(self, current_attempt: int) -> set[int]:
        """Attempts (other than ours) that can write nothing more."""
        records = {a["attempt"]: a for a in self.attempts()}
        folders = {attempt for _, _, attempt in self.storage.checkpoint_folders()}
        now, mine = time.time(), self.lease.generation if self.lease else None
        # Without a lease of our own (a look from outside): the writers' own timeout.
        timeout = self.lease.timeout_s if self.lease else settings.settings().lease_timeout_s
        dead = set()
        for attempt in (set(records) | folders) - {current_attempt}:
            record = records.get(attempt)
            if record is None or record.get("status") != "running":
                dead.add(attempt)  # ended, or from before attempts had records
            elif record.get("lease") is None or record.get("lease") == mine:
                dead.add(attempt)  # a writer without a lease, or an earlier attempt of ours
            else:
                holder = self.storage.read_json(LEASE, f"lease_{record['lease']:06d}.json")
                if holder is None or takeover_reason(holder, {}, now, timeout) is not None:
                    dead.add(attempt)
        return dead


# -- other runs' checkpoints ------------------------------------------------------------------


def committed_checkpoints(run: Any) -> list[Checkpoint]:
    """The committed checkpoints of a run (a RunConfig with a name), oldest first."""
    return run_storage(run).checkpoints()


def latest_checkpoint(run: Any) -> Checkpoint | None:
    """The latest committed checkpoint of another run (a RunConfig with a name), e.g. to
    warm-start a new run from it: ``resume_from_checkpoint=pd.latest_checkpoint(prod)``."""
    return max(run_storage(run).checkpoints(), key=lambda c: (c.index, c.manifest.attempt),
               default=None)


def best_checkpoint(run: Any, metric: str, mode: str = "min") -> Checkpoint | None:
    """The committed checkpoint of another run with the best ``metric`` (``mode`` "min" or
    "max"); checkpoints without a real value of the metric (missing, NaN) are never chosen."""
    if mode not in ("min", "max"):
        raise ConfigurationError(f"mode {mode!r}: use 'min' or 'max'")
    ordered = best_first(run_storage(run).checkpoints(), metric, mode)
    if not ordered or score(ordered[0].metrics, metric) is None:
        return None
    return ordered[0]


def run_storage(run: Any) -> RunStorage:
    if getattr(run, "name", None) is None:
        raise ConfigurationError("give the run to read from a name: RunConfig(name='prod', ...)")
    url, options = run.resolved_storage()
    return RunStorage(url, run.name, options)


