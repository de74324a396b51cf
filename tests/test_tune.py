"""Sweeps as Prefect flows: the best learning rate found among trials run 2 at a time, a bad
trial stopped early by ASHA, a trial killed for good recorded as failed, and a Prefect retry
that reuses the finished trials."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import load_flow
from prefect import flow
from prefect.runtime import flow_run

import prefect_distrain as pd
from prefect_distrain.prefect.artifacts import artifact_key

pytestmark = pytest.mark.usefixtures("ray_cluster", "prefect_server")


def read_table(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key])))


def test_sweep_of_four_trials_two_at_a_time_finds_the_best_learning_rate(tmp_path):
    # No Prefect retry: a first try that failed would hide behind it.
    sweep = load_flow("sweep").sweep.with_options(retries=0)
    result = sweep(storage=str(tmp_path), epochs=3, early_stopping=False)
    trials = result.trials
    assert len(trials) == 4 and {t["status"] for t in trials} == {"completed"}
    best = max(trials, key=lambda t: t["final"])
    assert result.best_config == best["config"] and result.best_trial == best["trial"]
    assert [t["final"] for t in trials] == sorted((t["final"] for t in trials), reverse=True)
    assert result.best_metrics["accuracy"] == best["final"] > 0.9
    # Never more than 2 trials at once.
    events = sorted([(t["started"], 1) for t in trials] + [(t["ended"], -1) for t in trials])
    running, peak = 0, 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak <= 2
    # Each trial is a run of its own, with its checkpoints, under the sweep's folder.
    sweep_dir = tmp_path / result.sweep
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.startswith("trial_")) == \
        [f"trial_{i:03d}" for i in range(4)]
    assert result.best_checkpoint.path.startswith(str(sweep_dir / best["trial"]))
    [table] = read_table(f"{artifact_key(result.sweep)}-trials")
    assert '"final accuracy"' in table.data and "trial_" in table.data


def tiny_loop(config):
    """lr 0 never learns; a negative lr stands for a trial whose worker dies every time."""
    import tempfile

    import torch

    if config["lr"] < 0:
        os.kill(os.getpid(), signal.SIGKILL)
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x.sum(1, keepdim=True)
    model = pd.torch.prepare_model(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    for epoch in range(config["epochs"]):
        for _ in range(5):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"epoch": epoch}, os.path.join(folder, "state.pt"))
            pd.report({"epoch": epoch, "loss": loss.item()},
                      checkpoint=pd.Checkpoint.from_directory(folder))


def test_asha_stops_a_bad_trial_and_a_dead_trial_is_recorded_failed(tmp_path):
    result = pd.tune(tiny_loop, search_space={"lr": pd.grid([0.1, 0.05, 0.0, -1.0])},
                     config={"epochs": 6}, metric="loss", mode="min", max_concurrent_trials=2,
                     scheduler=pd.ASHAScheduler(grace_period=1, reduction_factor=2, max_t=6),
                     scaling=pd.ScalingConfig(num_workers=1),
                     run=pd.RunConfig(name="asha", storage=str(tmp_path)))
    by_lr = {t["config"]["lr"]: t for t in result.trials}
    bad, dead = by_lr[0.0], by_lr[-1.0]
    # Its trial starts after a good one has finished: at the first rung (report 1) it is not
    # in the best half, and it ends right there.
    assert bad["status"] == "stopped" and bad["reports"] == 1, bad
    assert bad["stopped_because"].startswith("ASHA: loss at _training_iteration=1 ")
    assert bad["checkpoint"] is not None, "a stopped trial keeps its checkpoints"
    assert os.listdir(tmp_path / "asha" / bad["trial"] / "_manifests")
    assert dead["status"] == "failed" and dead["error"].startswith("WorkerLostError")
    assert result.best_config["lr"] in (0.1, 0.05)
    assert result.trials[-1] is dead, "failed trials sort last"


def test_asha_stops_a_trial_at_the_rung_it_judged_ten_times_in_a_row(tmp_path):
    """The scheduler as the sweep uses it, on a warm group, reports milliseconds apart: a trial
    worse than the one before it at rung r ends every rank at report r."""
    from prefect_distrain.integrations.schedulers import TrialSupervisor

    def quick(config):
        for step in range(1, 13):
            pd.report({"loss": config["loss"](step) if callable(config["loss"]) else
                       config["loss"] * step})

    with pd.Trainer(num_workers=2, run=pd.RunConfig(name="rungs", storage=str(tmp_path))) as t:
        for trial in range(10):
            rung = [1, 2, 4][trial % 3]
            asha = pd.ASHAScheduler(grace_period=1, reduction_factor=2, max_t=12)
            asha.bind("loss", "min")
            # A good trial first: loss 1 at every step, recorded at every rung.
            good = t.fit(quick, config={"loss": lambda step: 1.0},
                         callbacks=[TrialSupervisor(asha, "good")])
            assert good.stopped_early == "ASHA: reached max_t=12"
            # Then one that is as good until its rung, and worse there.
            worse_from = rung
            bad = t.fit(quick, config={"loss": lambda step, w=worse_from: 1.0 if step < w else 9.0},
                        callbacks=[TrialSupervisor(asha, "bad")])
            assert [m["loss"] for m in bad.metrics_history][-1] == 9.0
            first = bad.metrics_history[0]["_training_iteration"]
            assert len(bad.metrics_history) == rung, (trial, rung, bad.metrics_history)
            assert [len(ranks) for ranks in bad.metrics_history_all_ranks] == [2] * rung
            assert bad.stopped_early.startswith(
                f"ASHA: loss at _training_iteration={first + rung - 1:g} ")


def test_a_prefect_retry_of_the_flow_reuses_finished_trials(tmp_path):
    @flow(retries=1, retry_delay_seconds=0)
    def sweep_then_fail_once():
        result = pd.tune(tiny_loop, search_space={"lr": pd.grid([0.1, 0.05])},
                         config={"epochs": 2}, metric="loss", mode="min",
                         scaling=pd.ScalingConfig(num_workers=1),
                         run=pd.RunConfig(storage=str(tmp_path)))
        if flow_run.run_count == 1:
            raise RuntimeError("the flow failed after its sweep")
        return result

    result = sweep_then_fail_once()
    assert [t.get("reused") for t in result.trials] == [True, True]
    assert {t["status"] for t in result.trials} == {"completed"}
    assert len(os.listdir(tmp_path)) == 1, "one sweep folder: the retry found the same one"


def test_a_sweep_outside_a_flow_is_new_each_time_unless_named(tmp_path):
    """Called twice outside a flow, the same sweep trains twice (a changed function must not
    find the old results); with a name, the second call reuses the first one's trials."""
    def sweep(**run):
        return pd.tune(tiny_loop, search_space={"lr": pd.grid([0.1])}, config={"epochs": 1},
                       metric="loss", mode="min", scaling=pd.ScalingConfig(num_workers=1),
                       run=pd.RunConfig(storage=str(tmp_path), **run))

    first, second = sweep(), sweep()
    assert first.sweep != second.sweep
    assert [t.get("reused") for t in second.trials] == [None]
    named = [sweep(name="kept"), sweep(name="kept")]
    assert [[t.get("reused") for t in r.trials] for r in named] == [[None], [True]]
    assert "kept" in os.listdir(tmp_path) and len(os.listdir(tmp_path)) == 3


def test_bad_search_spaces_name_the_fix():
    with pytest.raises(pd.ConfigurationError, match="search_space takes a dict"):
        pd.tune(tiny_loop, search_space=["lr"], metric="loss")
    with pytest.raises(pd.ConfigurationError, match=r"values go at the top level"):
        pd.tune(tiny_loop, search_space={"opt": {"lr": pd.grid([1, 2])}}, metric="loss")
    with pytest.raises(pd.ConfigurationError, match=r"search_space\['lr'\] has no values"):
        pd.tune(tiny_loop, search_space={"lr": pd.grid([])}, metric="loss")
