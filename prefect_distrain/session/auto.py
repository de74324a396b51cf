"""``CheckpointConfig(mode="auto")`` on a worker: checkpoints with no code in the loop.

The framework helpers (``pd.torch.prepare_*``) register what they prepared as the ``state``;
the training data loader (the first one prepared, or the "train" dataset shard) calls
``begin_pass`` before each pass over the data, which commits that state as a checkpoint (and
``after_batch`` within a pass, every ``every_n_batches``). A run resuming from such a checkpoint
replays the passes it holds with one batch each (so the loop's per-epoch code finds its
variables; their reports were delivered before and are dropped), then restores the state where
the next pass begins, or where it stopped within it: the data loader then goes on from the
checkpoint's data position (session/positions.py).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from typing import Any, Callable, Protocol

from ..checkpoints.checkpoint import Checkpoint

#: The metric that marks a report as an automatic checkpoint, holding the passes done.
AUTO_PASS_KEY = "_auto_checkpoint_pass"
#: With it: the batches of the next pass done, for a checkpoint taken within that pass.
AUTO_BATCHES_KEY = "_auto_checkpoint_batches"


class AutoState(Protocol):
    """What a framework's helpers keep for ``CheckpointConfig(mode="auto")``."""

    def save(self, folder: str, rank: int) -> None:
        """Write the prepared objects' state (and this rank's random state) into ``folder``."""

    def resume_pass(self) -> None:
        """The first pass after the replay begins: restore everything saved with it (the
        replayed steps changed the weights and drew random numbers)."""


class AutoCheckpoints:
    """The passes over the training data of one worker, and their automatic checkpoints."""

    def __init__(self, enabled: bool, resume: Checkpoint | None, rank: int,
                 report: Callable[[dict[str, Any], Checkpoint], None],
                 every_n_batches: int | None = None):
        self.enabled = enabled
        self.every_n_batches = every_n_batches if enabled else None
        self.resume = resume
        self.rank = rank
        self._report = report
        self.state: AutoState | None = None
        self.passes_begun = 0
        #: The passes the resume checkpoint holds (fixed while the function runs).
        self.passes_done_at_resume = _count(resume.metrics.get(AUTO_PASS_KEY)) \
            if enabled and resume is not None else 0
        #: The batches of the next pass it holds too (a checkpoint taken within that pass).
        self.batches_at_resume = _count(resume.metrics.get(AUTO_BATCHES_KEY)) \
            if enabled and resume is not None else 0
        #: Set when the pass the checkpoint stopped in begins again: the data loader says
        #: whether it could go on from the checkpoint's position.
        self.restored_mid_pass = False
        self._loader_claimed = False
        self._last_metrics: dict[str, Any] = {}
        self._last_pass = 0

    @property
    def replaying(self) -> bool:
        """Between a restart and the first pass the resume checkpoint does not hold."""
        return 0 < self.passes_done_at_resume and self.passes_begun <= self.passes_done_at_resume

    def claim_training_loader(self) -> bool:
        """True for the first loader (or "train" shard) asking: it is the training data."""
        first, self._loader_claimed = not self._loader_claimed, True
        return first

    def note(self, metrics: dict[str, Any]) -> None:
        """A report of the loop: its metrics go with the next automatic checkpoint."""
        if self.enabled and AUTO_PASS_KEY not in metrics:
            self._last_metrics = {k: v for k, v in metrics.items() if not k.startswith("_")}

    def begin_pass(self) -> bool:
        """The training data loader starts a pass. True: a pass done before the restart,
        replayed with one batch; False: a real pass (checkpointed first in mode "auto")."""
        done = self.passes_begun
        self.passes_begun += 1
        resumed_at = self.passes_done_at_resume
        if done < resumed_at:
            return True
        if done == resumed_at and (done > 0 or self.batches_at_resume > 0):
            if self.state is not None:
                self.state.resume_pass()
            self.restored_mid_pass = self.batches_at_resume > 0
            self._last_pass = done
        elif done > 0:
            self._checkpoint(done)
        return False

    def went_on(self, continued: bool, what: str) -> None:
        """The training data began the pass a mid-pass checkpoint stopped in: ``continued``
        from its position, or else (its positions could not be applied) from the beginning,
        which trains that pass's first batches a second time: said in the log."""
        if self.restored_mid_pass and not continued:
            logging.getLogger("prefect_distrain").warning(
                "Resumed within pass %d from a checkpoint taken after %d of its batches, but "
                "%s could not go on from its data position: the pass starts from its "
                "beginning, and its first %d batches are trained a second time",
                self.passes_done_at_resume, self.batches_at_resume, what,
                self.batches_at_resume)
        self.restored_mid_pass = False

    def after_batch(self, batches: int) -> None:
        """The loop came back for the next batch of the pass, done with ``batches`` of it (its
        step on the last one is over): every ``every_n_batches``, a checkpoint within the
        pass. The training data calls it only while it knows its position."""
        every = self.every_n_batches
        if every and batches % every == 0 and not self.replaying:
            self._checkpoint(self.passes_begun - 1, batches)

    def finish(self) -> None:
        """The function returned: its final state is committed too."""
        from ..exceptions import StopTraining

        if self.passes_begun > max(self._last_pass, self.passes_done_at_resume):
            try:
                self._checkpoint(self.passes_begun)
            except StopTraining:
                pass  # committed all the same: the run ends here anyway

    def _checkpoint(self, passes_done: int, batches: int = 0) -> None:
        """Commit the registered state as it is after ``passes_done`` passes (and ``batches``
        of the next)."""
        if not self.enabled or self.state is None:
            return
        folder = tempfile.mkdtemp(prefix=f"auto-checkpoint-{passes_done}-{batches}-")
        marks = {AUTO_PASS_KEY: passes_done, **({AUTO_BATCHES_KEY: batches} if batches else {})}
        try:
            self.state.save(folder, self.rank)
            self._report({**self._last_metrics, **marks}, Checkpoint.from_directory(folder))
            if not batches:
                self._last_pass = passes_done
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _count(value: object) -> int:
    """A pass or batch count from a checkpoint's metrics (0 unless a whole number >= 0)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
