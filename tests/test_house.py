"""The house: every module imports first on its own, and the failure policy's rules
(docs/failures.md, "Failure classes") hold, row by row, without Ray."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import prefect_distrain
from prefect_distrain.execution.failure_policy import (
    Decision,
    Failure,
    classify,
    decide,
    is_retryable,
    should_resize,
)

MODULES = sorted(m.name for m in pkgutil.walk_packages(prefect_distrain.__path__,
                                                       "prefect_distrain."))


#: Third-party libraries the check's parent process imports before it forks one child per
#: module (none of ours: each child imports one of ours first). Not TensorFlow: its import
#: starts threads, and a fork keeps only the thread that forked.
PRELOADED = ("ray", "pydantic", "pydantic_settings", "fsspec", "numpy", "pandas", "pyarrow",
             "torch", "prefect", "rich", "typer")

_FORK_PER_MODULE = textwrap.dedent("""
    import importlib, importlib.util, json, os, sys, traceback
    preloaded, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for name in preloaded:
        if importlib.util.find_spec(name) is not None:  # extras may be missing
            importlib.import_module(name)
    assert not [m for m in sys.modules if m.startswith("prefect_distrain")]
    failed, running = {}, {}

    def reap():
        pid, status = os.wait()
        module, read = running.pop(pid)
        if status:
            failed[module] = os.read(read, 1 << 16).decode(errors="replace")[-2000:]
        os.close(read)

    for module in modules:
        if len(running) == 2:
            reap()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                importlib.import_module(module)
                os._exit(0)
            except BaseException:
                os.write(write, traceback.format_exc()[-2000:].encode())  # fits the pipe
                os._exit(1)
        os.close(write)
        running[pid] = (module, read)
    while running:
        reap()
    print(json.dumps(failed))
""")


@pytest.mark.timeout(900)
def test_every_module_imports_first_on_its_own():
    """A fresh interpreter per module (no import order to lean on, no cycle to trip on): a fork
    of one that holds only third-party libraries."""
    assert "prefect_distrain.integrations.trackers" in MODULES and len(MODULES) > 30
    done = subprocess.run([sys.executable, "-c", _FORK_PER_MODULE, json.dumps(PRELOADED),
                           json.dumps(MODULES)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failed, failed


# -- the failure policy -------------------------------------------------------------------------


def raised(**facts) -> Failure:
    """A ValueError raised on rank 1 of 2 after report 7, unless ``facts`` say otherwise."""
    return Failure(**{"kind": "raised", "type": "builtins.ValueError", "message": "bad row",
                      "ranks": (1,), "world_size": 2, "iteration": 7, **facts})


ROWS = [
    # (what happened, infrastructure?)
    (Failure(kind="lost", type="prefect_distrain.exceptions.WorkerLostError",
             message="rank 1's worker died", ranks=(1,), world_size=2), True),
    (Failure(kind="lost", type="prefect_distrain.exceptions.WorkerLostError", message="x",
             ranks=(0, 1), world_size=2, every_rank=True), True),  # a lost node: everyone
    (raised(runtime=True, every_rank=True, ranks=(0, 1)), True),   # a collective timed out
    (raised(retryable=True), True),        # a failed upload (CheckpointUploadError)
    (Failure(kind="driver", type="prefect_distrain.exceptions.StorageError",
             message="disk full", retryable=True), True),
    (Failure(kind="driver", type="prefect_distrain.exceptions.ResourcesUnavailableError",
             message="waited 120 s", retryable=True), True),       # a busy cluster
    (Failure(kind="driver", type="prefect_distrain.exceptions.TrainingHangError",
             message="ranks [0, 1] made no progress", retryable=True), True),
    (raised(), True),                      # some ranks but not all
    (raised(every_rank=True, ranks=(0, 1)), False),               # the same type everywhere
    (raised(fatal=True), False),           # in fatal_exceptions, even on one rank
    (raised(retryable=False), False),      # our own "bad input" (ConfigurationError)
    (Failure(kind="driver", type="prefect_distrain.exceptions.UnequalReportsError",
             message="ranks report unequally", retryable=False), False),
    (Failure(kind="driver", type="prefect_distrain.checkpoints.lease.LeaseLostError",
             message="taken over", retryable=False), False),
    (Failure(kind="driver", type="builtins.RuntimeError", message="a fatal callback",
             retryable=False), False),
    (Failure(kind="driver", type="prefect_distrain.exceptions.RunTimeoutError",
             message="the run's deadline passed", retryable=False), False),
]


@pytest.mark.parametrize("failure,infrastructure", ROWS)
def test_each_failure_class(failure, infrastructure):
    assert classify(failure)[0] is infrastructure
    expected = Decision.RESTART if infrastructure else Decision.RAISE
    assert decide(failure, None, restarts_done=0, max_failures=3) is expected


def test_a_failure_that_repeats_at_the_same_iteration_is_a_bug():
    """A ValueError on rank 1 only is infrastructure once; again at the same report iteration
    after a restart, it is the user's bug: no more restarts, and no Prefect retry."""
    first = raised()
    assert classify(first)[0] is True
    again = raised()
    infrastructure, why = classify(again, previous=first)
    assert infrastructure is False and why.startswith("it repeated after a restart")
    assert decide(again, first, restarts_done=1, max_failures=-1) is Decision.RAISE
    # Elsewhere, or with another message, it is not a repeat.
    assert classify(raised(iteration=8), previous=first)[0] is True
    assert classify(Failure(kind="raised", type="builtins.ValueError", message="other row",
                            ranks=(1,), world_size=2, iteration=7), previous=first)[0] is True
    # A worker lost twice at the same place is still bad luck (a node, a preemption).
    lost = Failure(kind="lost", type="WorkerLostError", message="died", iteration=7)
    assert classify(lost, previous=lost)[0] is True


@pytest.mark.parametrize("max_failures,restarts_done,expected", [
    (0, 0, Decision.RAISE), (1, 0, Decision.RESTART), (1, 1, Decision.RAISE),
    (3, 2, Decision.RESTART), (-1, 1000, Decision.RESTART)])
def test_the_restart_budget(max_failures, restarts_done, expected):
    assert decide(raised(), None, restarts_done, max_failures) is expected


def test_preemptions_have_their_own_budget_and_the_drivers_is_never_restarted():
    """A worker's SIGTERM restarts within max_preemption_failures whatever max_failures says;
    the driver's is raised at once (its process is ending), retryable."""
    preempted = Failure(kind="preempted", type="prefect_distrain.exceptions.PreemptionError",
                        message="SIGTERM to rank 1", ranks=(1,), retryable=True)
    assert classify(preempted, previous=preempted)[0] is True, "never a repeat: nobody's bug"
    assert decide(preempted, None, restarts_done=0, max_failures=0) is Decision.RESTART
    assert decide(preempted, None, 0, 0, preemptions_done=2,
                  max_preemptions=2) is Decision.RAISE
    assert decide(preempted, None, 0, 0, preemptions_done=1000,
                  max_preemptions=-1) is Decision.RESTART
    shutdown = Failure(kind="shutdown", type="prefect_distrain.exceptions.PreemptionError",
                       message="SIGTERM to the driver", retryable=True)
    assert classify(shutdown)[0] is True
    assert decide(shutdown, None, 0, max_failures=-1) is Decision.RAISE


def test_an_elastic_group_grows_back_when_the_cluster_holds_the_missing_workers():
    assert should_resize(running=2, wanted=4, free_workers=2) is True
    assert should_resize(running=2, wanted=4, free_workers=1) is False
    assert should_resize(running=4, wanted=4, free_workers=8) is False


def test_prefects_retry_condition_reads_the_verdict_on_the_error():
    error = ValueError("bad row")
    assert is_retryable(error) is False  # nothing said: not retried
    error.retryable = True
    assert is_retryable(error) is True
