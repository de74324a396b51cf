"""The failure policy, in one place: from what happened to what to do. Pure: no Ray, no I/O.

```python
failure = Failure(kind="raised", type="builtins.ValueError", message="bad row", ranks=(1,),
                  world_size=2, iteration=7)
classify(failure)                          # (True, "only some ranks raised it")
decide(failure, previous=None, restarts_done=0, max_failures=3)   # Decision.RESTART
```
The rules (docs/failures.md, "Failure classes"):

- **Infrastructure** (a restart or a Prefect retry may cure it): a lost worker or node; the
  backend's runtime failing (a collective that timed out, a peer gone); our own errors that say
  so (a failed upload, a storage error on the driver, a busy cluster); an exception raised on
  some ranks but not all.
- **The user's bug** (never restarted, never retried): the same exception type on every rank;
  a type listed in ``FailureConfig.fatal_exceptions``; our own errors that say so (bad input,
  unequal report counts, a run taken over by another writer); and a failure that **repeats**
  after a restart: the same type and message, raised at the same report iteration.
- A restart follows an infrastructure failure while ``max_failures`` allows (-1: no limit);
  past it, the failure is raised as infrastructure (a Prefect retry may still cure it).
- A **preemption** (SIGTERM to a worker: a spot reclaim, a drain, an eviction) is nobody's
  fault: it restarts while ``max_preemption_failures`` allows, without using ``max_failures``.
  A **shutdown** (SIGTERM to the driver) is raised at once: the driver's process is ending, a
  restart would be killed with it; the run stays resumable (a Prefect retry may resume it).
- An elastic group that runs small **resizes** (restarts at full size from the checkpoint just
  committed) once the cluster holds the workers it misses. Not a failure: no budget used.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: The part of a failure's message compared (and kept in the attempt ledger).
MESSAGE_LIMIT = 1000


class Decision(enum.Enum):
    RESTART = "restart"  # start the group again from the latest committed checkpoint
    RESIZE = "resize"    # the same, at full size: the cluster holds the missing workers again
    RAISE = "raise"      # end the run with the error (retryable or not, see classify)


@dataclass(frozen=True)
class Failure:
    """What went wrong in an attempt, as plain facts.

    ``kind``: "lost" (a worker process or node died), "raised" (the training function raised),
    "driver" (the driver failed: storage, the lease, a misuse it detected), "preempted" (a
    worker was sent SIGTERM) or "shutdown" (the driver was). ``type`` is the
    exception's qualified name, ``ranks`` the failing ranks, ``iteration`` the last iteration
    the failing rank reported. ``every_rank`` is true when every rank raised this same type.
    ``fatal``: the type is in ``fatal_exceptions``; ``runtime``: the backend says its runtime
    failed; ``retryable``: our own error's verdict (None for the user's exceptions).
    """

    kind: str
    type: str
    message: str
    ranks: tuple[int, ...] = ()
    world_size: int = 1
    iteration: int | None = None
    every_rank: bool = False
    fatal: bool = False
    runtime: bool = False
    retryable: bool | None = None

    def repeats(self, previous: Failure | None) -> bool:
        """The same exception at the same place as the attempt before: a bug, not bad luck."""
        return (previous is not None and self.kind == previous.kind == "raised"
                and (self.type, self.message[:MESSAGE_LIMIT], self.iteration)
                == (previous.type, previous.message[:MESSAGE_LIMIT], previous.iteration))


def classify(failure: Failure, previous: Failure | None = None) -> tuple[bool, str]:
    """(True, why) for infrastructure, which a restart or a retry may cure; (False, why) for
    the user's bug. ``previous``: the failure of the attempt before, if it failed."""
    if failure.repeats(previous):
        return False, (f"it repeated after a restart: {failure.type.rsplit('.', 1)[-1]} at "
                       f"report iteration {failure.iteration} again")
    if failure.kind == "lost":
        return True, "a worker or its node was lost"
    if failure.kind == "preempted":
        return True, "a worker was preempted (SIGTERM)"
    if failure.kind == "shutdown":
        return True, "the driver was told to stop (SIGTERM); the run can resume"
    if failure.retryable is not None:
        return failure.retryable, "prefect-distrain's own error says so"
    if failure.runtime:
        return True, "the backend's runtime failed (a collective timed out or a peer is gone)"
    if failure.fatal:
        return False, "its type is in FailureConfig.fatal_exceptions"
    if failure.every_rank:
        return False, "every rank raised the same type"
    return True, "only some ranks raised it"


def decide(failure: Failure, previous: Failure | None, restarts_done: int,
           max_failures: int, preemptions_done: int = 0,
           max_preemptions: int = -1) -> Decision:
    """Restart the group, or raise the failure. Preemptions have their own budget."""
    if failure.kind == "shutdown":
        return Decision.RAISE
    if failure.kind == "preempted":
        within = max_preemptions == -1 or preemptions_done < max_preemptions
        return Decision.RESTART if within else Decision.RAISE
    infrastructure, _ = classify(failure, previous)
    if infrastructure and (max_failures == -1 or restarts_done < max_failures):
        return Decision.RESTART
    return Decision.RAISE


def should_resize(running: int, wanted: int, free_workers: int) -> bool:
    """An elastic group running ``running`` of ``wanted`` workers grows back when the cluster's
    free resources hold the missing ones (checked after each committed checkpoint)."""
    return running < wanted and free_workers >= wanted - running


def is_retryable(error: BaseException) -> bool:
    """Whether a raised error is infrastructure (for Prefect's ``retry_condition_fn``): the
    verdict ``classify`` gave it when it was raised, else our own error's."""
    return getattr(error, "retryable", False) is True
