"""What a new user meets first: a bad input gets our error naming the fix, at once (never a
library's own TypeError, never a wall of RayTaskError), and the defaults never hang: a run
whose workers would leave Ray Data no CPU either gets one (a local Ray that ``train`` starts)
or fails at once naming the fix (an existing cluster)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import assert_no_train_actors

import prefect_distrain as pd

CONFIGS = [
    (lambda: pd.ScalingConfig(resources_per_worker="CPU"),
     r"resources_per_worker takes a dict .* e\.g\. resources_per_worker=\{'CPU': 2\}"),
    (lambda: pd.ScalingConfig(resources_per_worker={"CPU": 0}),
     r"leaves a worker with no resources, which Ray cannot place: give it some, e\.g\. "
     r"\{'CPU': 0\.5\}"),
    (lambda: pd.ScalingConfig(resources_per_worker={"CPU": True}),
     r"resources_per_worker\['CPU'\] is True; give resource names with numbers >= 0"),
    (lambda: pd.ScalingConfig(num_workers=2, min_workers=True),
     r"min_workers must be between 1 and num_workers=2 \(got True\)"),
    (lambda: pd.ScalingConfig(use_gpu="no"), r"use_gpu must be True or False \(got 'no'\)"),
    (lambda: pd.RunConfig(storage_options="key=abc"),
     r"storage_options takes a dict of fsspec options \(got a str\)"),
    (lambda: pd.FailureConfig(fatal_exceptions=[ValueError, "KeyError"]),
     r"fatal_exceptions takes exception classes .* e\.g\. fatal_exceptions=\(ValueError, "
     r"KeyError\)"),
    (lambda: pd.Trainer(backend=pd.TorchConfig(backend="nccl"), num_workers=1),
     r"TorchConfig\(backend='nccl'\) needs GPUs, but the workers have none: set use_gpu=True, "
     r"or use backend='gloo'"),
    (lambda: pd.Trainer(backend=pd.TorchConfig(backend="mpi"), num_workers=1),
     r"TorchConfig\(backend='mpi'\): use 'gloo', 'nccl', or None"),
]


@pytest.mark.parametrize("make,message", CONFIGS)
def test_a_bad_setting_is_refused_where_it_is_written(make, message):
    with pytest.raises(pd.ConfigurationError, match=message):
        make()


def test_forgiving_spellings_mean_what_they_say():
    """What a user plainly meant is taken: no storage options, fatal exceptions as a list or
    one class, Ray Train's (min, max) workers."""
    assert pd.ScalingConfig(num_workers=(2, 4)) == pd.ScalingConfig(num_workers=4,
                                                                   min_workers=2)
    with pytest.raises(pd.ConfigurationError, match=r"or \(min, max\) for an elastic group"):
        pd.ScalingConfig(num_workers=(1, 2, 3))
    assert pd.RunConfig(storage_options=None).storage_options == {}
    assert pd.FailureConfig(fatal_exceptions=[ValueError]).fatal_exceptions == (ValueError,)
    assert pd.FailureConfig(fatal_exceptions=KeyError).fatal_exceptions == (KeyError,)
    secret = pd.RunConfig(storage_options={"secret": "s3cr3t"})
    assert "s3cr3t" not in repr(secret)


async def async_loop(config):
    pd.report({"x": 1})


def locked_metric_loop(config):
    pd.report({"loss": 0.5, "lock": threading.Lock()})


def lock_returning_loop(config):
    pd.report({"loss": 0.5})
    return threading.Lock()


@pytest.mark.usefixtures("ray_cluster")
def test_bad_functions_callbacks_metrics_and_returns_name_the_fix(tmp_path):
    run = pd.RunConfig(name="bad", storage=str(tmp_path / "runs"))
    trainer = pd.Trainer(num_workers=1, run=run)
    # Refused before anything starts: no workers, nothing in storage.
    with pytest.raises(pd.ConfigurationError,
                       match=r"'async_loop' is `async def`: .* Make it a plain `def`"):
        trainer.fit(async_loop)
    with pytest.raises(pd.ConfigurationError,
                       match=r"callbacks takes a list of callbacks, got one PrintingCallback: "
                             r"use callbacks=\[PrintingCallback\(...\)\]"):
        trainer.fit(lock_returning_loop, callbacks=pd.PrintingCallback())
    assert not trainer.started and not os.path.exists(tmp_path / "runs")
    with trainer:
        # In the loop, at the report that carries it, naming the metric: the user's bug.
        with pytest.raises(TypeError, match=r"metric 'lock' \(_thread\.lock\) cannot be sent "
                                            r"to the driver .* report plain values") as caught:
            trainer.fit(locked_metric_loop)
        assert caught.value.retryable is False
        with pytest.raises(TypeError, match=r"the training function's return value "
                                            r"\(_thread\.lock\) cannot be sent to the driver"):
            trainer.fit(lock_returning_loop)
    assert_no_train_actors()


DATA_SCRIPT = textwrap.dedent("""
    import os, sys
    import pandas
    import ray
    import ray._private.utils
    import prefect_distrain as pd

    folder = sys.argv[1]
    os.makedirs(folder + "/rows")
    for part in range(2):
        pandas.DataFrame({"id": range(part * 50, part * 50 + 50)}).to_parquet(
            f"{folder}/rows/part-{part}.parquet")

    def loop(config):
        rows = sum(len(b["id"]) for b in pd.get_dataset_shard("train").iter_batches())
        return rows, ray.cluster_resources()["CPU"]

    def fit():
        run = pd.RunConfig(name=f"data-{ray.is_initialized()}", storage=folder + "/runs")
        with pd.Trainer(num_workers=2, run=run) as trainer:
            return trainer.fit(loop, datasets={"train": folder + "/rows"}).worker_results

    # An existing cluster of 2 CPUs that the 2 workers fill: refused at once.
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        fit()
    except pd.ResourcesUnavailableError as error:
        print("REFUSED:", error)
    ray.shutdown()
    # A machine of 2 CPUs, as Ray counts them, where train starts the local Ray: one more.
    ray._private.utils.get_num_cpus = lambda *args, **kwargs: 2
    print("ROWS:", fit())
    print("RAY LEFT RUNNING:", ray.is_initialized())
""")


def test_a_data_run_on_a_full_machine_gets_a_cpu_or_is_refused_at_once(tmp_path):
    """The run that hung for good: 2 workers on 2 CPUs reading parquet with Ray Data."""
    done = subprocess.run([sys.executable, "-c", DATA_SCRIPT, str(tmp_path)],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    refused = [line for line in done.stdout.splitlines() if line.startswith("REFUSED:")]
    assert refused and refused[0].startswith(
        "REFUSED: datasets= needs a CPU for Ray Data's read tasks, but the 2 workers (and the "
        "task that runs train) take 2 of the cluster's 2 CPUs"), done.stdout[-3000:]
    assert "resources_per_worker={'CPU': 0.5}" in refused[0]
    # Every row read, on a local Ray of 3 logical CPUs, shut down when train ended.
    assert "ROWS: [(50, 3.0), (50, 3.0)]" in done.stdout, done.stdout[-3000:]
    assert "RAY LEFT RUNNING: False" in done.stdout


def test_a_trainer_never_shut_down_exits_quietly(tmp_path):
    """The seeds' first sample starts a trainer and never shuts it down: Ray is given back at
    exit, before Python tears itself down (no "Exception ignored" traceback)."""
    script = textwrap.dedent(f"""
        import prefect_distrain as pd

        def loop():
            pd.report({{"x": 1}})
            return 1

        trainer = pd.Trainer(num_workers=2, run=pd.RunConfig(name="x", storage={str(tmp_path)!r}))
        trainer.start()
        print("RESULT:", trainer.run(loop))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "RESULT: [1, 1]" in done.stdout, done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-3000:]


def test_train_outside_a_flow_says_nothing_about_a_missing_flow_run(tmp_path):
    """Prefect drops a task's last log line outside a flow with a warning; ``train``'s is
    dropped quietly (other tasks keep Prefect's behaviour)."""
    script = textwrap.dedent(f"""
        import prefect_distrain as pd
        from prefect import task

        def loop():
            pd.report({{"x": 1}})

        result = pd.train(loop, run=pd.RunConfig(storage={str(tmp_path)!r}))
        print("METRICS:", result.metrics["x"])

        @task
        def other():
            return 2

        print("OTHER:", other())
    """)
    # -W always: the other task's warning comes from the same line as train's would
    done = subprocess.run([sys.executable, "-W", "always", "-c", script], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "METRICS: 1" in done.stdout, done.stderr[-3000:]
    warned = [line for line in done.stderr.splitlines() if "without a flow run id" in line]
    assert len(warned) == 1 and "'prefect.task_runs'" in warned[0], done.stderr[-3000:]


def test_each_worker_line_reaches_the_terminal_once(tmp_path):
    """Our [rank N] line, without Ray's (TrainWorker pid=...) echo of the same print."""
    script = textwrap.dedent(f"""
        import logging
        import prefect_distrain as pd

        logging.basicConfig(level=logging.INFO)

        def loop():
            print("hello from rank", pd.get_context().get_world_rank())
            pd.report({{"x": 1}})

        run = pd.RunConfig(storage={str(tmp_path)!r}, other_ranks_log_level="INFO")
        with pd.Trainer(num_workers=2, run=run) as trainer:
            trainer.fit(loop)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    for rank in (0, 1):
        assert output.count(f"hello from rank {rank}") == 1, output[-3000:]
    assert "(TrainWorker pid=" not in output, output[-3000:]
