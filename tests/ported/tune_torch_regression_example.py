# Ported from Ray Train's example python/ray/train/examples/pytorch/tune_torch_regression_example.py
# (Ray 2.x, github.com/ray-project/ray at commit 1abd9874354566835e0612edb37b03c73595a1f7;
# later Ray releases dropped the file).
#
# Imports changed: `from ray import tune` -> `from prefect_distrain.ray import tune`,
# `from ray.train[.torch] import ...` -> `from prefect_distrain.ray.train[.torch] import ...`,
# `from ray.tune.tune_config import TuneConfig` and `from ray.tune.tuner import Tuner` ->
# `prefect_distrain.ray.tune.tune_config` / `prefect_distrain.ray.tune.tuner`, and Ray's own
# example module `ray.train.examples.pytorch.torch_regression_example` -> its port beside this
# file, `torch_regression_example` (`import ray` stays: that is Ray itself).
# Changed besides imports:
#   - result: `__main__` keeps tune_linear()'s return value in the module global `best_result`
#     (Ray's script drops it).
# Data: the ported torch_regression_example's synthetic table. Sizes are Ray's (--smoke-test:
# one sample on 2 workers).
import argparse

import ray
from torch_regression_example import get_datasets, train_func

from prefect_distrain.ray import tune
from prefect_distrain.ray.train import DataConfig, ScalingConfig
from prefect_distrain.ray.train.torch import TorchTrainer
from prefect_distrain.ray.tune.tune_config import TuneConfig
from prefect_distrain.ray.tune.tuner import Tuner


def tune_linear(num_workers, num_samples, use_gpu):
    train_dataset, val_dataset = get_datasets()

    config = {"lr": 1e-2, "hidden_size": 1, "batch_size": 4, "epochs": 3}

    trainer = TorchTrainer(
        train_loop_per_worker=train_func,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        datasets={"train": train_dataset, "validation": val_dataset},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )

    tuner = Tuner(
        trainer,
        param_space={
            "train_loop_config": {
                "lr": tune.loguniform(1e-4, 1e-1),
                "batch_size": tune.choice([4, 16, 32]),
                "epochs": 3,
            }
        },
        tune_config=TuneConfig(num_samples=num_samples, metric="loss", mode="min"),
    )
    result_grid = tuner.fit()
    best_result = result_grid.get_best_result()
    print(best_result)
    return best_result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        default=False,
        help="Finish quickly for testing.",
    )
    parser.add_argument(
        "--address", required=False, type=str, help="the address to use for Ray"
    )
    parser.add_argument(
        "--num-workers",
        "-n",
        type=int,
        default=2,
        help="Sets number of workers for training.",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=2,
        help="Sets number of samples for training.",
    )
    parser.add_argument(
        "--use-gpu", action="store_true", default=False, help="Use GPU for training."
    )

    args = parser.parse_args()

    if args.smoke_test:
        # 2 workers, 1 for trainer, 1 for datasets
        ray.init(num_cpus=4)
        best_result = tune_linear(num_workers=2, num_samples=1, use_gpu=False)
    else:
        ray.init(address=args.address)
        best_result = tune_linear(
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            num_samples=args.num_samples,
        )
