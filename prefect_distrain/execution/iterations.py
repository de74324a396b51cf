"""Reports become iterations, and checkpoints commits.

``Iterations`` pairs the ranks' reports by iteration number and hands each complete iteration
to the history and the callbacks; ``PendingCommits`` collects the files of each reported
checkpoint from the ranks that declared it and, once all are up, has the checkpoint manager
commit it (and tells the waiting sync reports).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ..checkpoints.fs import redact_url
from ..checkpoints.manager import upload_plan
from ..checkpoints.manifest import FileEntry
from ..exceptions import ConfigurationError, UnequalReportsError
from ..session.auto import AUTO_PASS_KEY
from .dispatch import Callbacks

if TYPE_CHECKING:
    from .controller import RunSpec
    from .worker_group import WorkerGroup

#: Rank-0 metrics are logged at INFO at most this often (plus every checkpoint), so a loop that
#: reports every step does not flood the run log.
_LOG_EVERY_S = 5.0


class PendingCommits:
    """Collects the files of each reported checkpoint from the ranks that declared it; once all
    are up, the checkpoint manager commits it. Manifests are the only truth: what is not
    committed does not exist."""

    def __init__(self, spec: RunSpec, group: WorkerGroup, callbacks: Callbacks,
                 logger: logging.Logger):
        self.spec = spec
        self.group = group
        self.callbacks = callbacks
        self.world_size = len(group)
        self.logger = logger
        self.waiting: dict[int, dict[str, Any]] = {}
        #: The index of the last checkpoint committed in this attempt.
        self.last_committed: int | None = None
        #: Checkpoints whose ranks were let upload without a plan (they never commit).
        self.released: set[int] = set()

    def retried(self, retries: int) -> None:
        """A rank's upload retries (counted for the attempt ledger)."""
        self.spec.checkpoints.retries.uploads += retries

    def uploaded(self, index: int, rank: int, files: dict[str, FileEntry],
                 skipped: dict[str, FileEntry]) -> None:
        entry = self.waiting.setdefault(index, {"files": {}})
        entry["files"][rank] = files
        entry.setdefault("skipped", {})[rank] = skipped
        self._commit_if_ready(index)

    def release(self, index: int, ranks: list[int]) -> None:
        """Let ranks waiting for the plan of a checkpoint that can't commit upload it whole."""
        if ranks and index not in self.released:
            self.released.add(index)
            self.group.plan_uploads(index, {r: [] for r in ranks})

    def plan(self, index: int, names_by_rank: dict[int, list[str]]) -> None:
        """Every rank reported checkpoint ``index``: keep the names each rank reported (its
        commit checks its uploads against them) and tell the ranks above 0 that wrote files
        which of them a lower rank uploads (they wait for this before uploading)."""
        self.waiting.setdefault(index, {"files": {}})["names"] = names_by_rank
        if self.world_size > 1:
            self.group.plan_uploads(index, upload_plan(names_by_rank))

    def declared(self, index: int, ranks: set[int], metrics: dict,
                 validate: bool | None = None, positions: dict[str, Any] | None = None
                 ) -> None:
        entry = self.waiting.setdefault(index, {"files": {}})
        entry["ranks"], entry["metrics"], entry["validate"] = ranks, metrics, validate
        entry["positions"] = positions
        self._commit_if_ready(index)

    def _commit_if_ready(self, index: int) -> None:
        entry = self.waiting[index]
        if "ranks" not in entry or set(entry["files"]) != entry["ranks"]:
            return
        del self.waiting[index]
        _check_uploaded_as_reported(index, entry)
        manager = self.spec.checkpoints
        manifest = manager.commit(index, self.spec.attempt, entry["files"], entry["metrics"],
                                  world_size=self.world_size, backend=self.spec.backend_name,
                                  skipped_by_rank=entry.get("skipped"),
                                  data_positions=entry.get("positions"))
        if self.spec.checkpoint_config.upload == "sync":
            self.group.acknowledge_commit(index, sorted(entry["files"]))
        checkpoint = manager.checkpoint(manifest)
        self.logger.info("Committed checkpoint %d: %s", index, redact_url(checkpoint.path))
        self.callbacks.call("on_checkpoint_commit", checkpoint.without_credentials(),
                            index=index, attempt=self.spec.attempt)
        self.last_committed = index
        validations = self.spec.validations
        if validations is not None and validations.wanted(entry["validate"]):
            validations.submit(manifest)

    def poll_validations(self) -> None:
        """Record the validations that ended and start waiting ones (every poll turn)."""
        if self.spec.validations is not None:
            self.spec.validations.poll()


def _check_uploaded_as_reported(index: int, entry: dict[str, Any]) -> None:
    """Each rank's uploaded and skipped files are the ones its report named: a folder that
    changed in between (files still being written by another thread) is never committed."""
    for rank, names in sorted(entry.get("names", {}).items()):
        went = set(entry["files"].get(rank, {})) | set(entry.get("skipped", {}).get(rank, {}))
        if went != set(names):
            missing, extra = sorted(set(names) - went), sorted(went - set(names))
            raise ConfigurationError(
                f"checkpoint {index}: rank {rank}'s folder changed between its report and its "
                f"upload (gone: {missing}, new: {extra}); it was not committed. Finish writing "
                "a checkpoint's files before report() (wait for your own async save first)")


def _positions(reports: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """Every rank's position in its training data, as a manifest keeps them (a chain whose
    ``base`` all ranks share), or None unless every rank has one."""
    positions = [reports[r].get("position") for r in sorted(reports)]
    if not all(positions):
        return None
    chain: dict[str, Any] = {"ranks": {r: p["at"] for r, p in enumerate(positions)}}
    if positions[0].get("base"):
        chain["base"] = positions[0]["base"]
    return chain


class Iterations:
    """Pairs the reports of all ranks by iteration number."""

    def __init__(self, world_size: int, spec: RunSpec, commits: PendingCommits,
                 callbacks: Callbacks, logger: logging.Logger):
        self.world_size = world_size
        self.callbacks = callbacks
        self.commits = commits
        self.logger = logger
        self.pending: dict[int, dict[int, dict]] = {}
        self.history = spec.history
        self.first = spec.first_index
        #: The last iteration each rank reported, and the highest of them (an asynchronous
        #: stop ends every rank at its first report from there on).
        self.last: dict[int, int] = {}
        self.highest = self.first - 1
        self._last_log = 0.0

    def add(self, rank: int, report: dict[str, Any]) -> None:
        iteration = report["metrics"]["_training_iteration"]
        self.last[rank] = iteration
        self.highest = max(self.highest, iteration)
        upload = report["upload"]
        if upload is not None:
            self.commits.retried(upload["retries"])
        ranks = self.pending.setdefault(iteration, {})
        ranks[rank] = report
        if len(ranks) == self.world_size:
            self._deliver(iteration)

    def _deliver(self, iteration: int) -> None:
        reports = self.pending.pop(iteration)
        results = [reports[r]["metrics"] for r in sorted(reports)]
        with_checkpoint = {r for r, report in reports.items() if report["upload"]}
        automatic = AUTO_PASS_KEY in results[0]  # not a result of the user's loop
        if not automatic:
            self.history.add(results)
        if with_checkpoint:
            self.commits.plan(iteration, {r: reports[r]["upload"]["names"]
                                          for r in sorted(with_checkpoint)})
            self.commits.declared(iteration, with_checkpoint, results[0],
                                  reports[min(with_checkpoint)]["upload"].get("validate"),
                                  _positions(reports))
        if automatic:
            return
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            shown = {k: v for k, v in results[0].items() if not k.startswith("_")}
            self.logger.info("Iteration %d: %s", iteration, shown)
        self.callbacks.call("handle_result", results, training_iteration=iteration)

    def stranded(self, finished: dict[int, int]) -> UnequalReportsError | None:
        """The error for an iteration that can never complete while a rank waits in its report
        (for the checkpoint's commit or the stop verdict): a rank whose function returned never
        reported it. Only iterations past a finished rank's last can be stranded: the others
        are not looked at (with many ranks, many iterations wait for the slowest one)."""
        floor = min(finished.values(), default=None)
        if floor is None:
            return None
        for iteration in sorted(i for i in self.pending if i > floor):
            gone = sorted(r for r, last in finished.items() if last < iteration)
            reports = self.pending[iteration]
            if gone and self.callbacks.stop_reason is not None:
                # A stop reached the ranks at different reports: an async upload past it
                # waits for its plan only; it goes up whole and is never committed.
                self.commits.release(iteration, [
                    r for r, report in reports.items()
                    if r > 0 and report["upload"] and not report["upload"]["sync"]])
            # A sync upload waits for the commit; a rank above 0 for its upload plan.
            waiting = sorted(r for r, report in reports.items()
                             if report["awaits_verdict"] or (report["upload"] and (
                                 report["upload"]["sync"] or (
                                     r > 0 and iteration not in self.commits.released))))
            if gone and waiting:
                counts = {r: self.last.get(r, self.first - 1) - self.first + 1
                          for r in range(self.world_size)}
                shown = ", ".join(f"rank {r}: {n}" for r, n in counts.items())
                return UnequalReportsError(
                    f"ranks {gone} returned without the report of iteration {iteration}, which "
                    f"ranks {waiting} wait for in report() (a checkpoint to commit or the "
                    f"callbacks' verdict needs every rank's report); reports made: {shown}. "
                    "Every rank must call report() the same number of times: report on every "
                    "rank, with checkpoint=None where a rank has nothing to save",
                    counts=counts)
        return None

    def flush(self, stopped: bool) -> None:
        """Deliver what some ranks reported and others did not, marked ``partial``: never
        committed, not in the history. A misuse, unless a stop that no report waited for
        ended the ranks at different reports."""
        for iteration in sorted(self.pending):
            reports = self.pending.pop(iteration)
            missing = sorted(set(range(self.world_size)) - set(reports))
            self.logger.log(
                logging.INFO if stopped else logging.WARNING,
                "Iteration %d was reported by some ranks but not by ranks %s%s", iteration,
                missing, " (the stop reached the ranks at different reports)" if stopped else
                ": every rank must call report() the same number of times")
            results = [reports[r]["metrics"] if r in reports else {}
                       for r in range(self.world_size)]
            if AUTO_PASS_KEY not in next(iter(reports.values()))["metrics"]:
                self.callbacks.call("handle_result", results, training_iteration=iteration,
                                    partial=True, missing_ranks=missing)
