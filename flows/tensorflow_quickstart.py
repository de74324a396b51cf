"""TensorFlow quickstart: two Ray workers train a digits classifier with Keras ``model.fit``
under MultiWorkerMirroredStrategy, as one Prefect task.

    python flows/tensorflow_quickstart.py

The backend sets TF_CONFIG on each worker, so the strategy forms its cluster by itself, and
starts the workers with tf-keras as ``tf.keras`` (its ``fit`` works under this strategy).
Batch sizes: the strategy splits each *global* batch over the workers, so the dataset is
batched with ``per_worker_batch * world_size`` (the seeds' rule) and each worker computes on
``per_worker_batch`` samples a step. ReportCheckpointCallback reports every epoch's logs and
commits a checkpoint of the chief's model; a restart (or a Prefect retry) continues from it.
"""

from __future__ import annotations

import os
import tempfile

from prefect import flow

import prefect_distrain as pd


def train_loop(config):
    import numpy as np
    import tensorflow as tf
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    strategy = pd.tensorflow.strategy()  # MultiWorkerMirroredStrategy over the run's workers
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    global_batch = config["batch_size"] * pd.get_context().get_world_size()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
             .shuffle(len(x_train), seed=0).batch(global_batch).with_options(options))
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(global_batch) \
        .with_options(options)

    checkpoint = pd.get_checkpoint()
    with strategy.scope():
        if checkpoint:
            model = pd.tensorflow.load_model(checkpoint)
        else:
            tf.keras.utils.set_random_seed(0)
            model = tf.keras.Sequential([
                tf.keras.Input(shape=(64,)),
                tf.keras.layers.Dense(config["hidden"], activation="relu"),
                tf.keras.layers.Dense(10),
            ])
            model.compile(
                optimizer=tf.keras.optimizers.SGD(config["lr"], momentum=0.9),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
    history = model.fit(train, validation_data=test, epochs=config["epochs"],
                        initial_epoch=pd.tensorflow.next_epoch(checkpoint), verbose=0,
                        callbacks=[pd.tensorflow.ReportCheckpointCallback(
                            metrics={"loss": "loss", "accuracy": "val_accuracy"})])
    return {"rank": pd.get_context().get_world_rank(),
            "weights": [np.asarray(w) for w in model.get_weights()],
            "accuracy": history.history.get("val_accuracy", [None])[-1]}


@flow(name="digits-tensorflow-quickstart", log_prints=True)
def tensorflow_quickstart(epochs: int = 8, num_workers: int = 2) -> float:
    result = pd.train(
        train_loop,
        backend="tensorflow",          # or pd.TensorflowConfig(keras="tf_keras")
        config={"epochs": epochs, "lr": 0.05, "batch_size": 32, "hidden": 64},
        scaling=pd.ScalingConfig(num_workers=num_workers),
        run=pd.RunConfig(storage=os.environ.get(
            "QUICKSTART_STORAGE", os.path.join(tempfile.gettempdir(), "prefect-distrain"))),
        checkpoint=pd.CheckpointConfig(num_to_keep=2),
    )
    for metrics in result.metrics_history:
        print(f"epoch {metrics['epoch']}: loss {metrics['loss']:.4f}  "
              f"test accuracy {metrics['accuracy']:.3f}")
    print(f"Final test accuracy: {result.metrics['accuracy']:.3f}")
    return result.metrics["accuracy"]


if __name__ == "__main__":
    tensorflow_quickstart()
