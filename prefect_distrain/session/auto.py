"""``CheckpointConfig(mode="auto")`` on a worker: checkpoints with no code in the loop.

The framework helpers (``pd.torch.prepare_*``) register what they prepared as the ``state``;
the training data loader (the first one prepared, or the "train" dataset shard) calls
``begin_pass`` before each pass over the data, which commits that state as a checkpoint. A run
resuming from such a checkpoint replays the passes it holds with one batch each (so the loop's
per-epoch code finds its variables; their reports were delivered before and are dropped), then
restores the state where the next pass begins.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from typing import Any, Callable, Protocol

from ..checkpoints.checkpoint import Checkpoint

#: The metric that marks a report as an automatic checkpoint, holding the passes done.
AUTO_PASS_KEY = "_auto_checkpoint_pass"


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
                 report: Callable[[dict[str, Any], Checkpoint], None]):
        self.enabled = enabled
        self.resume = resume
        self.rank = rank
        self._report = report
        self.state: AutoState | None = None
        self.passes_begun = 0
        #: The passes the resume checkpoint holds (fixed while the function runs).
        self.passes_done_at_resume = int(resume.metrics.get(AUTO_PASS_KEY, 0)) \
            if enabled and resume is not None else 0
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
        if done == resumed_at and done > 0:
            if self.state is not None:
                self.state.resume_pass()
            self._last_pass = done
        elif done > 0:
            self._checkpoint(done)
        return False

    def finish(self) -> None:
        """The function returned: its final state is committed too."""
        from ..exceptions import StopTraining

        if self.passes_begun > max(self._last_pass, self.passes_done_at_resume):
            try:
                self._checkpoint(self.passes_begun)
            except StopTraining:
                pass  # committed all the same: the run ends here anyway

    def _checkpoint(self, passes_done: int) -> None:
        """Commit the registered state as it is after ``passes_done`` passes."""
        if not self.enabled or self.state is None:
            return
        folder = tempfile.mkdtemp(prefix=f"auto-checkpoint-{passes_done}-")
        try:
            self.state.save(folder, self.rank)
            self._report({**self._last_metrics, AUTO_PASS_KEY: passes_done},
                         Checkpoint.from_directory(folder))
            self._last_pass = passes_done
        finally:
            shutil.rmtree(folder, ignore_errors=True)


class TrainingShard:
    """The "train" dataset shard in mode "auto": each pass over it begins a pass (a checkpoint
    before it, or one batch while replaying passes done before a restart)."""

    def __init__(self, iterator: Any, auto: AutoCheckpoints):
        self._iterator = iterator
        self._auto = auto

    def __getattr__(self, name: str) -> Any:
        return getattr(self._iterator, name)

    def _pass(self, method: str, *args: Any, **kwargs: Any) -> Any:
        batches = getattr(self._iterator, method)(*args, **kwargs)
        if self._auto.begin_pass():
            return itertools.islice(batches, 1)  # replayed: one batch, its effect undone
        return batches

    def iter_batches(self, *args: Any, **kwargs: Any) -> Any:
        return self._pass("iter_batches", *args, **kwargs)

    def iter_torch_batches(self, *args: Any, **kwargs: Any) -> Any:
        return self._pass("iter_torch_batches", *args, **kwargs)

    def iter_rows(self, *args: Any, **kwargs: Any) -> Any:
        return self._pass("iter_rows", *args, **kwargs)
