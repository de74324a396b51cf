"""Driver-side callbacks: early stopping ends a run cleanly at the workers' next report, and a
slow callback never slows the training loop."""

from __future__ import annotations

import os
import tempfile
import time

import pytest

import prefect_distrain as pd

pytestmark = pytest.mark.usefixtures("ray_cluster")


def plateau_loop(config):
    """``val_loss`` falls until epoch 4, then stays flat; a checkpoint every epoch."""
    rank = pd.get_context().get_world_rank()
    for epoch in range(config["epochs"]):
        time.sleep(config.get("epoch_s", 0.2))
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                with open(os.path.join(folder, "epoch.txt"), "w") as handle:
                    handle.write(str(epoch))
            pd.report({"epoch": epoch, "val_loss": 1.0 / (1 + min(epoch, 4))},
                      checkpoint=pd.Checkpoint.from_directory(folder) if rank == 0 else None)
    return "ran every epoch"


def test_early_stopping_ends_a_plateaued_run_cleanly(tmp_path, caplog):
    stopper = pd.callbacks.EarlyStopping(metric="val_loss", mode="min", patience=3)
    recorder = Recorder()
    run = pd.RunConfig(name="plateau", storage=str(tmp_path))
    with pd.Trainer(num_workers=2, run=run, failure=pd.FailureConfig(max_failures=2)) as t:
        result = t.fit(plateau_loop, config={"epochs": 20}, callbacks=[stopper, recorder])
        attempts = t.checkpoints.attempts()
    # Epochs 0-4 improve (best at iteration 5), 5-7 do not: the stop is decided at epoch 7's
    # report, and every rank ends there.
    epochs = [m["epoch"] for m in result.metrics_history]
    assert epochs == list(range(8)), epochs
    assert recorder.seen == [(i, False) for i in range(1, 9)], "no rank reported further"
    assert "reported by some ranks" not in caplog.text
    assert result.stopped_early.startswith("early stopping: val_loss did not improve by more "
                                           "than 0 for 3 reports (best 0.2 at iteration 5)")
    assert result.failures == 0 and result.worker_results == [None, None]
    assert [a["status"] for a in attempts] == ["stopped"]
    # The checkpoint of the last epoch reported is committed (a sync report waits for it).
    assert result.checkpoint.index == epochs[-1] + 1
    with result.checkpoint.as_directory() as folder:
        assert open(os.path.join(folder, "epoch.txt")).read() == str(epochs[-1])


class Recorder(pd.TrainingCallback):
    """(iteration, partial) of every result it is handed."""

    def __init__(self):
        self.seen = []

    def handle_result(self, results, **info):
        self.seen.append((info["training_iteration"], bool(info.get("partial"))))


def fast_loop(config):
    """Reports a few milliseconds apart; ``loss`` falls until step ``plateau``, then stays."""
    rank = pd.get_context().get_world_rank()
    who = config["checkpoints"]
    for step in range(config["steps"]):
        time.sleep(0.002)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if who == "all" or (who in ("rank0", "async") and rank == 0):
                with open(os.path.join(folder, f"state_{rank}.txt"), "w") as handle:
                    handle.write(str(step))
                checkpoint = pd.Checkpoint.from_directory(folder)
            pd.report({"step": step, "loss": 1.0 / (1 + min(step, config["plateau"]))},
                      checkpoint=checkpoint)
    return "never stopped"


def test_a_stop_lands_at_the_decided_report_on_every_rank_ten_times_in_a_row(tmp_path, caplog):
    """Reports a few milliseconds apart, with a sync checkpoint on rank 0 only (the usual
    pattern), on every rank, async, or none: each run ends every rank at the report where
    EarlyStopping decided, and no rank reports further. One group serves the ten runs."""
    variants = ["rank0", "none", "async", "all"]
    for upload in ("sync", "async"):
        run = pd.RunConfig(name=f"fast-{upload}", storage=str(tmp_path))
        with pd.Trainer(num_workers=2, run=run,
                        checkpoint=pd.CheckpointConfig(upload=upload)) as t:
            for trial in range(10):
                checkpoints = variants[trial % 4]
                if (checkpoints == "async") != (upload == "async"):
                    continue
                plateau = 2 + trial % 3
                stopper = pd.callbacks.EarlyStopping(metric="loss", mode="min", patience=2)
                recorder = Recorder()
                result = t.fit(fast_loop, callbacks=[stopper, recorder], config={
                    "steps": 60, "plateau": plateau, "checkpoints": checkpoints})
                decided = plateau + 2  # the second report after the best one
                first = result.metrics_history[0]["_training_iteration"]  # goes on per run
                steps = [[r["step"] for r in ranks]
                         for ranks in result.metrics_history_all_ranks]
                assert steps == [[s, s] for s in range(decided + 1)], (trial, checkpoints, steps)
                assert recorder.seen == [(first + s, False) for s in range(decided + 1)], \
                    (trial, checkpoints)
                assert result.worker_results == [None, None], "both ended by the stop"
                assert result.stopped_early.startswith("early stopping: loss did not improve")
                if checkpoints != "none":
                    assert result.checkpoint.index == first + decided, "the stopping report's"
    assert "reported by some ranks" not in caplog.text


def test_a_stop_without_exact_stop_ends_every_rank_at_or_after_the_decision(tmp_path, caplog):
    """``EarlyStopping(exact=False)``: reports never wait for the verdict. Rank 0 waits for its
    commits while rank 1 runs ahead; the stop names the highest iteration seen, so rank 0 goes
    on to it instead of stopping early and leaving rank 1 alone in a collective."""
    stopper = pd.callbacks.EarlyStopping(metric="loss", mode="min", patience=2, exact=False)
    recorder = Recorder()
    with pd.Trainer(num_workers=2, run=pd.RunConfig(name="loose", storage=str(tmp_path))) as t:
        result = t.fit(fast_loop, callbacks=[stopper, recorder],
                       config={"steps": 200, "plateau": 2, "checkpoints": "rank0"})
    complete = [i for i, partial in recorder.seen if not partial]
    assert complete == list(range(1, len(complete) + 1)) and complete[-1] >= 5
    assert result.stopped_early and result.worker_results == [None, None]
    assert [m["step"] for m in result.metrics_history] == list(range(len(complete)))
    # Ranks that ran past the others' last report are shown as partial, not as a misuse.
    assert all(i > complete[-1] for i, partial in recorder.seen if partial)
    assert "every rank must call report() the same number of times" not in caplog.text


def uneven_loop(config):
    """Rank 1 reports once less than rank 0, whose last report carries a checkpoint."""
    rank = pd.get_context().get_world_rank()
    for step in range(3 if rank == 0 else 2):
        with tempfile.TemporaryDirectory() as folder:
            open(os.path.join(folder, "w.txt"), "w").write(str(step))
            checkpoint = pd.Checkpoint.from_directory(folder)
            pd.report({"step": step},
                      checkpoint=checkpoint if rank == 0 and config["checkpoint"] else None)
    return rank


@pytest.mark.parametrize("waits_for", ["commit", "verdict"])
def test_unequal_report_counts_fail_at_once_naming_the_ranks(tmp_path, waits_for):
    """Rank 0 waits in its third report (for the commit, or for the stop verdict) that rank 1
    never makes: the run fails with the counts instead of hanging, as the user's bug."""
    callbacks = [pd.callbacks.EarlyStopping(metric="nothing")] if waits_for == "verdict" else []
    run = pd.RunConfig(name=f"uneven-{waits_for}", storage=str(tmp_path))
    with pd.Trainer(num_workers=2, run=run, failure=pd.FailureConfig(max_failures=2)) as t:
        with pytest.raises(pd.UnequalReportsError,
                           match=r"ranks \[1\] returned without the report of iteration 3, which "
                                 r"ranks \[0\] wait for .* reports made: rank 0: 3, rank 1: 2"
                           ) as caught:
            t.fit(uneven_loop, callbacks=callbacks,
                  config={"checkpoint": waits_for == "commit"})
        attempts = t.checkpoints.attempts()
    assert caught.value.counts == {0: 3, 1: 2} and caught.value.retryable is False
    assert [a["status"] for a in attempts] == ["failed"], "a bug: not restarted"


class Blocked(pd.TrainingCallback):
    """Holds the callbacks' thread in its first call until the training function has returned
    on every rank (a file each writes last), for at most a minute."""

    def __init__(self, folder):
        self.folder, self.seen, self.released = folder, [], None

    def handle_result(self, results, **info):
        if self.released is None:
            deadline = time.monotonic() + 60
            while len(os.listdir(self.folder)) < len(results) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.released = len(os.listdir(self.folder)) == len(results)
        self.seen.append(info["training_iteration"])


def step_loop(config):
    """Reports (with a sync checkpoint of rank 0's when ``config["checkpoint"]``), then writes
    its file into ``config["done"]``."""
    rank = pd.get_context().get_world_rank()
    for step in range(config["steps"]):
        time.sleep(0.05)  # the step's own work
        with tempfile.TemporaryDirectory() as folder:
            open(os.path.join(folder, "w.txt"), "w").write(str(step))
            checkpoint = pd.Checkpoint.from_directory(folder)
            pd.report({"step": step},
                      checkpoint=checkpoint if config.get("checkpoint") and rank == 0 else None)
    if config.get("done"):
        open(os.path.join(config["done"], f"rank-{rank}"), "w").close()
    return step


@pytest.mark.parametrize("checkpoint", [False, True], ids=["reports", "sync-commits"])
def test_a_blocked_callback_holds_up_neither_reports_nor_commits(tmp_path, checkpoint):
    """The callback waits in its first call until every rank's function has returned: that
    happens only if no report (nor a sync checkpoint's commit) waited for the callbacks."""
    done = tmp_path / "done"
    done.mkdir()
    blocked = Blocked(str(done))
    run = pd.RunConfig(name="blocked", storage=str(tmp_path / "runs"))
    with pd.Trainer(num_workers=2, run=run) as t:
        result = t.fit(step_loop, config={"steps": 6, "checkpoint": checkpoint,
                                          "done": str(done)}, callbacks=[blocked])
    assert blocked.released is True, "a report or a commit waited for the callback"
    assert blocked.seen == [1, 2, 3, 4, 5, 6], "the callback still saw every result, in order"
    assert result.worker_results == [5, 5]
    if checkpoint:
        assert result.checkpoint.index == 6


class Broken(pd.TrainingCallback):
    def handle_result(self, results, **info):
        raise RuntimeError("tracker down")


class BrokenFatal(Broken):
    fatal_errors = True


def test_a_callback_error_is_logged_unless_fatal(tmp_path, caplog):
    run = pd.RunConfig(name="broken", storage=str(tmp_path))
    with pd.Trainer(num_workers=1, run=run) as t:
        result = t.fit(step_loop, config={"steps": 3}, callbacks=[Broken()])
        assert len(result.metrics_history) == 3
        assert "Callback Broken.handle_result failed; training goes on" in caplog.text
        with pytest.raises(RuntimeError, match="tracker down"):
            t.fit(step_loop, config={"steps": 50}, callbacks=[BrokenFatal()])
