"""A pipeline task writes parquet; training reads it through Ray Data shards; TorchMetrics
aggregates the evaluation across workers.

    python flows/data_pipeline.py

``write_digits`` (an ordinary Prefect task) writes the digits data set as parquet files to any
fsspec URL and returns the URLs. ``pd.train(datasets=...)`` reads them with Ray Data: each worker
streams its own disjoint share of the training set (``pd.get_dataset_shard("train")``) and of
the test set. Each rank scores its share of the test set with a TorchMetrics ``Accuracy``, whose
``compute()`` combines all ranks' counts: the reported ``test_accuracy`` is the accuracy on the
whole test set, while ``shard_accuracy`` (in ``result.metrics_all_ranks``) is each rank's own.
Checkpoints are ``CheckpointConfig(mode="auto")``: the loop has no checkpoint code.
"""

from __future__ import annotations

import os
import sys
import tempfile

from prefect import flow, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import prefect_distrain as pd  # noqa: E402

DEFAULT_STORAGE = os.path.join(tempfile.gettempdir(), "prefect-distrain")
PIXELS = [f"p{i}" for i in range(64)]


@task
def write_digits(storage: str, storage_options: dict | None = None, seed: int = 0,
                 files: int = 3) -> dict[str, str]:
    """The digits split into train and test parquet folders (``files`` files each, with an
    ``id`` column); returns their URLs."""
    import pandas as pd_
    from fsspec.core import url_to_fs
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    frame = pd_.DataFrame(digits.data / 16.0, columns=PIXELS).astype("float32")
    frame["label"] = digits.target
    frame["id"] = range(len(frame))
    # 1,796 of the 1,797 rows: 1,436 to train on and 360 to test, which 2 or 4 workers split
    # exactly (an equal split drops the rows that do not divide).
    train, test = train_test_split(frame.iloc[:1796], test_size=360, random_state=seed)
    urls = {}
    for name, part in (("train", train), ("test", test)):
        url = f"{storage.rstrip('/')}/datasets/digits-{seed}/{name}"
        fs, path = url_to_fs(url, **(storage_options or {}))
        fs.makedirs(path, exist_ok=True)
        size = -(-len(part) // files)
        for i in range(files):
            with fs.open(f"{path}/part-{i}.parquet", "wb") as handle:
                part.iloc[i * size:(i + 1) * size].to_parquet(handle, index=False)
        urls[name] = url
    return urls


def data_loop(config):
    import torch
    import torchmetrics

    pd.torch.enable_reproducibility(config.get("seed", 0))
    model = pd.torch.prepare_model(torch.nn.Sequential(
        torch.nn.Linear(64, config["hidden"]), torch.nn.ReLU(),
        torch.nn.Linear(config["hidden"], 10)))
    optimizer = pd.torch.prepare_optimizer(
        torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9))
    device = pd.torch.get_device()
    train_shard, test_shard = pd.get_dataset_shard("train"), pd.get_dataset_shard("test")
    ids_seen = []

    def tensors(batch):
        x = torch.stack([batch[p] for p in PIXELS], 1).float().to(device)
        return x, batch["label"].long().to(device)

    for epoch in range(config["epochs"]):
        model.train()
        total, count = 0.0, 0
        for batch in train_shard.iter_torch_batches(batch_size=32):
            if epoch == 0:
                ids_seen.extend(batch["id"].tolist())
            x, y = tensors(batch)
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            pd.torch.backward(loss)
            optimizer.step()
            total, count = total + loss.item() * len(y), count + len(y)
        model.eval()
        metric = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")
        metric = metric.to(device)
        correct, seen = 0, 0
        with torch.no_grad():
            for batch in test_shard.iter_torch_batches(batch_size=128):
                x, y = tensors(batch)
                predicted = model(x).argmax(1)
                metric.update(predicted, y)
                correct, seen = correct + (predicted == y).sum().item(), seen + len(y)
        pd.report({"epoch": epoch, "loss": total / max(count, 1),
                   "shard_accuracy": correct / max(seen, 1), "shard_size": seen,
                   "test_accuracy": metric.compute().item()})  # compute() syncs all ranks
    return {"train_ids": ids_seen}


@flow(name="digits-ray-data", log_prints=True)
def data_pipeline(storage: str = DEFAULT_STORAGE, storage_options: dict | None = None,
                  epochs: int = 5, num_workers: int = 2, hidden: int = 64) -> pd.TrainResult:
    urls = write_digits(storage, storage_options)
    result = pd.train(data_loop, config={"epochs": epochs, "hidden": hidden, "lr": 0.1},
                      datasets={"train": urls["train"], "test": urls["test"]},
                      scaling=pd.ScalingConfig(num_workers=num_workers),
                      run=pd.RunConfig(storage=storage, storage_options=storage_options or {},
                                       total=epochs),
                      checkpoint=pd.CheckpointConfig(mode="auto", num_to_keep=2))
    print(f"test accuracy over all workers {result.metrics['test_accuracy']:.3f}; per rank: "
          f"{[round(m['shard_accuracy'], 3) for m in result.metrics_all_ranks]}")
    return result


if __name__ == "__main__":
    data_pipeline()
