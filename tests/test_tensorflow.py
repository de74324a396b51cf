"""The tensorflow backend: TF_CONFIG + MultiWorkerMirroredStrategy on 2 workers, with tf-keras
``model.fit`` and with a Keras 3 custom loop."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import assert_no_train_actors

import prefect_distrain as pd
from prefect_distrain.execution import warm_pool

pytestmark = pytest.mark.usefixtures("ray_cluster")


def digits_fit_loop(config):
    """model.fit on digits with ReportCheckpointCallback; optionally SIGKILLs rank 1 once
    (``kill``), or on attempt 0 makes a rank sleep for good at the start of an epoch
    (``stall``: [rank, epoch]) while its peer waits in the first batch's collective."""
    import signal

    import tensorflow as tf
    from sklearn.datasets import load_digits

    # config "direct": the strategy as Ray Train's examples make it
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if config.get("direct") \
        else pd.tensorflow.strategy()
    digits = load_digits()
    x, y = (digits.data / 16.0).astype("float32"), digits.target.astype("int64")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(
        32 * pd.get_context().get_world_size()).with_options(options)
    checkpoint = pd.get_checkpoint()
    with strategy.scope():
        if checkpoint:
            model = pd.tensorflow.load_model(checkpoint)
        else:
            tf.keras.utils.set_random_seed(0)
            model = tf.keras.Sequential([tf.keras.Input(shape=(64,)),
                                         tf.keras.layers.Dense(32, activation="relu"),
                                         tf.keras.layers.Dense(10)])
            model.compile(optimizer=tf.keras.optimizers.SGD(0.05, momentum=0.9),
                          loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=["accuracy"])

    class KillOnce(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            ctx = pd.get_context()
            if ctx.get_attempt() == 0 and [ctx.get_world_rank(), epoch] == config.get("stall"):
                time.sleep(3600)  # the peer never comes

        def on_train_batch_begin(self, batch, logs=None):
            ctx = pd.get_context()
            if [ctx.get_attempt(), ctx.get_world_rank(), self.epoch, batch] == config.get("kill"):
                os.kill(os.getpid(), signal.SIGKILL)

    start = pd.tensorflow.next_epoch(checkpoint)
    model.fit(data, epochs=config["epochs"], initial_epoch=start, verbose=0,
              callbacks=[pd.tensorflow.ReportCheckpointCallback(), KillOnce()])
    return {"weights": model.get_weights(), "started_at": start,
            "keras": tf.keras.Sequential.__module__, "tf_config": os.environ["TF_CONFIG"],
            "pid": os.getpid()}


class Recorder(pd.TrainingCallback):
    def __init__(self):
        self.results = []

    def handle_result(self, results, **info):
        self.results.append(results)


def test_model_fit_on_two_workers_keeps_weights_identical_and_again_on_a_warm_group(tmp_path):
    """The second run takes the first one's processes, whose TensorFlow set its collective
    runtime up for the first run's TF_CONFIG: it gets that TF_CONFIG again, and its strategy
    (made directly, as Ray Train's examples do) trains exactly as the first run did."""
    recorder = Recorder()
    results = []
    for name, direct in (("tf-fit", False), ("tf-fit-warm", True)):
        with pd.Trainer(backend="tensorflow", num_workers=2, keep_warm=True,
                        run=pd.RunConfig(name=name, storage=str(tmp_path))) as trainer:
            results.append(trainer.fit(digits_fit_loop, config={"epochs": 4, "direct": direct},
                                       callbacks=[recorder]))
    assert warm_pool.drain() == 1
    result, warm = results
    cold_workers, warm_workers = result.worker_results, warm.worker_results
    assert [r["pid"] for r in warm_workers] == [r["pid"] for r in cold_workers], "warm group"
    assert [r["tf_config"] for r in warm_workers] == [r["tf_config"] for r in cold_workers]
    for worker in warm_workers:  # the same weights as the cold run's, on every rank
        assert all(np.array_equal(a, b) for a, b in
                   zip(cold_workers[0]["weights"], worker["weights"]))
    assert [m["epoch"] for m in warm.metrics_history] == [0, 1, 2, 3]
    first, second = cold_workers
    assert all(np.array_equal(a, b) for a, b in zip(first["weights"], second["weights"]))
    assert first["keras"].startswith("tf_keras."), "tf.keras is tf-keras by default"
    assert '"index": 1' in second["tf_config"] and first["tf_config"].count(":") >= 2
    assert [[r["epoch"] for r in ranks] for ranks in recorder.results] == \
        [[e, e] for e in range(4)] * 2
    accuracy = [m["accuracy"] for m in result.metrics_history]
    assert accuracy[-1] > accuracy[0], f"accuracy did not rise: {accuracy}"
    assert result.checkpoint.index == 4
    assert sorted(result.checkpoint.manifest.files) == ["model.keras", "state.json"]
    assert result.checkpoint.manifest.ranks == [0], "only the chief's copy is committed"
    assert_no_train_actors()


def test_a_worker_killed_once_resumes_from_the_latest_checkpoint(tmp_path):
    run = pd.RunConfig(name="tf-killed", storage=str(tmp_path))
    with pd.Trainer(backend=pd.TensorflowConfig(), num_workers=2, run=run,
                    failure=pd.FailureConfig(max_failures=1)) as trainer:
        result = trainer.fit(digits_fit_loop, config={"epochs": 4, "kill": [0, 1, 2, 3]})
    assert result.failures == 1 and result.attempt == 1
    first, second = result.worker_results
    assert first["started_at"] in (1, 2), "resumed from a committed checkpoint, not from 0"
    assert all(np.array_equal(a, b) for a, b in zip(first["weights"], second["weights"]))
    assert [m["epoch"] for m in result.metrics_history] == [0, 1, 2, 3]
    attempts = trainer.checkpoints.attempts()
    assert [a["status"] for a in attempts] == ["failed", "completed"]
    assert attempts[1]["resumed_from"].endswith(f"checkpoint_{first['started_at']:06d}-a0")
    assert_no_train_actors()


def keras3_custom_loop(config):
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    world = pd.get_context().get_world_size()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x.sum(1, keepdims=True) > 0).astype("float32")
    global_batch = 16 * world
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch))
    with strategy.scope():
        tf.keras.utils.set_random_seed(0)
        model = tf.keras.Sequential([tf.keras.Input(shape=(8,)),
                                     tf.keras.layers.Dense(16, activation="tanh"),
                                     tf.keras.layers.Dense(1)])
        optimizer = tf.keras.optimizers.SGD(0.1)
        loss_fn = tf.keras.losses.BinaryCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.NONE)

    @tf.function
    def step(inputs):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(loss_fn(yb, model(xb, training=True)),
                                                  global_batch_size=global_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss
        losses = strategy.run(replica_step, args=inputs)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    for epoch in range(config["epochs"]):
        total = sum(float(step(batch)) for batch in data)
        pd.report({"epoch": epoch, "loss": total})
    return {"weights": [w.numpy() for w in model.weights], "keras": tf.keras.Sequential.__module__}


def test_a_collective_timeout_ends_the_attempt_and_the_restart_resumes(tmp_path):
    """Rank 1 never comes to epoch 1's first collective; with TensorflowConfig(timeout_s=5)
    (and hang detection off) rank 0's collective raises DeadlineExceededError: the runtime
    failing, so the group restarts from epoch 0's checkpoint and completes."""
    imported = "tensorflow" in sys.modules  # by another test of the session, or not
    run = pd.RunConfig(name="tf-timeout", storage=str(tmp_path))
    with pd.Trainer(backend=pd.TensorflowConfig(timeout_s=5), num_workers=2, run=run,
                    failure=pd.FailureConfig(max_failures=1, hang_timeout_s=None)) as trainer:
        result = trainer.fit(digits_fit_loop, config={"epochs": 3, "stall": [1, 1]})
        [first, second] = trainer.checkpoints.attempts()
    assert result.failures == 1
    assert [r["started_at"] for r in result.worker_results] == [1, 1]
    # The driver never imports TensorFlow: the error arrives as a WorkerError naming its type
    # (rebuilt as its own type only where this process had imported TensorFlow already).
    expected = "DeadlineExceededError: " if imported else \
        "WorkerError: tensorflow.python.framework.errors_impl.DeadlineExceededError: "
    assert first["status"] == "failed" and first["cause"].startswith(expected), first
    assert first["cause"].endswith("(on rank 0 of 2)"), first
    assert ("tensorflow" in sys.modules) == imported, "the run imported TensorFlow"
    assert second["resumed_from"].endswith("checkpoint_000001-a0")
    weights = [r["weights"] for r in result.worker_results]
    assert all(np.array_equal(a, b) for a, b in zip(*weights))
    assert_no_train_actors()


def test_keras3_custom_loop_under_strategy_run(tmp_path):
    with pd.Trainer(backend=pd.TensorflowConfig(keras="keras3"), num_workers=2,
                    run=pd.RunConfig(name="keras3", storage=str(tmp_path))) as trainer:
        result = trainer.fit(keras3_custom_loop, config={"epochs": 3})
    first, second = result.worker_results
    assert first["keras"].startswith("keras."), "keras3 keeps Keras 3"
    assert all(np.array_equal(a, b) for a, b in zip(first["weights"], second["weights"]))
    losses = [m["loss"] for m in result.metrics_history]
    assert losses[-1] < losses[0]
    assert_no_train_actors()


def test_bad_input(tmp_path):
    with pytest.raises(pd.ConfigurationError, match="keras='jax'.*'tf_keras'"):
        pd.TensorflowConfig(keras="jax")
    with pytest.raises(pd.ResourcesUnavailableError, match="use_gpu=True but the Ray cluster"):
        pd.Trainer(backend="tensorflow", num_workers=2, use_gpu=True).start()
    script = textwrap.dedent("""
        import sys
        import prefect_distrain as pd
        assert pd.TensorflowConfig().name == "tensorflow"
        assert "tensorflow" not in sys.modules, "importing prefect_distrain imported TensorFlow"
        sys.modules["tensorflow"] = None  # as if it were not installed
        try:
            pd.tensorflow
        except ImportError as error:
            print("ERROR:", error)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("ERROR: the tensorflow backend needs TensorFlow: "
            "pip install 'prefect-distrain[tensorflow]'") in done.stdout
