"""Train on an existing Ray cluster of several machines, reached through a ``RayCluster`` block
(address and auth token), with checkpoints in a ``CheckpointStorage`` block (e.g. S3).

    prefect --no-prompt deploy --prefect-file deployments/cluster.yaml --all
    prefect worker start --pool cluster-process         # from the repository root
    prefect deployment run 'digits-on-cluster/digits-cluster'

    python deployments/cluster_flow.py                  # once, here, with the blocks below

The blocks are made once (docs/multi-machine.md):

    RayCluster(address="10.0.0.5:6379",
               auth_token="<the head's ~/.ray/auth_token>").save("prod-ray")
    CheckpointStorage(url="s3://models/runs",
                      secret_options={"key": ..., "secret": ...}).save("prod-checkpoints")

The training function needs nothing from this repository on the cluster: it is sent by value,
and its data set ships with scikit-learn (every node needs torch and scikit-learn, e.g. through
the block's ``runtime_env={"pip": [...]}`` or the nodes' image). Every worker returns where it
ran, so the flow's log shows how the group spread over the machines.
"""

from __future__ import annotations

import os
import socket
import tempfile

from prefect import flow

import prefect_distrain as pd
from prefect_distrain.blocks import CheckpointStorage, RayCluster


def cluster_loop(config):
    """Digits, data-parallel: each worker trains on its share and reports the test accuracy;
    rank 0 commits a checkpoint per epoch. Returns where the worker ran."""
    import ray
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.25, random_state=0)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    torch.manual_seed(0)
    device = pd.torch.get_device()  # the worker's GPU with use_gpu=True, else the CPU
    model = pd.torch.prepare_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)))
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    loader = pd.torch.prepare_data_loader(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(as_x(x_train), as_y(y_train)), batch_size=32,
        shuffle=True))
    loss_fn = nn.CrossEntropyLoss()
    context = pd.get_context()
    rank = context.get_world_rank()
    for epoch in range(config["epochs"]):
        model.train()
        for xb, yb in loader:  # batches already on the device
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            predicted = model(as_x(x_test).to(device)).argmax(1).cpu()
        metrics = {"epoch": epoch, "loss": loss.item(),
                   "accuracy": (predicted == as_y(y_test)).float().mean().item()}
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                plain = model.module if hasattr(model, "module") else model
                torch.save({"model": plain.state_dict(), "epoch": epoch},
                           os.path.join(folder, "state.pt"))
            pd.report(metrics,
                      checkpoint=pd.Checkpoint.from_directory(folder) if rank == 0 else None)
    return {"rank": rank, "node_rank": context.get_node_rank(),
            "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "device": str(device)}


@flow(name="digits-on-cluster", log_prints=True)
def train_on_cluster(cluster: str = "prod-ray", storage: str = "prod-checkpoints",
                     epochs: int = 3, num_workers: int = 2, use_gpu: bool = False,
                     resources_per_worker: dict[str, float] | None = None,
                     placement_strategy: str = "SPREAD") -> dict:
    """``cluster``, ``storage``: names of a RayCluster and a CheckpointStorage block.
    ``use_gpu``: one GPU per worker (``resources_per_worker`` e.g. {"CPU": 4, "GPU": 1});
    ``placement_strategy``: SPREAD puts the workers on different machines where it can,
    STRICT_SPREAD always (or fails), PACK fills one machine first."""
    result = pd.train(
        cluster_loop, config={"epochs": epochs, "lr": 0.05},
        scaling=pd.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                 resources_per_worker=resources_per_worker,
                                 placement_strategy=placement_strategy),
        run=pd.RunConfig(storage=CheckpointStorage.load(storage), total=epochs),
        checkpoint=pd.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="accuracy",
                                       checkpoint_score_order="max"),
        ray_cluster=RayCluster.load(cluster))
    workers = result.worker_results
    for worker in workers:
        print(f"rank {worker['rank']} ran on node {worker['node_id'][:12]} (node rank "
              f"{worker['node_rank']}, host {worker['host']}, {worker['device']})")
    nodes = sorted({worker["node_id"] for worker in workers})
    print(f"{len(workers)} workers on {len(nodes)} node(s); run {result.run_name}: test "
          f"accuracy {result.metrics['accuracy']:.3f}")
    return {"run": result.run_name, "accuracy": result.metrics["accuracy"], "nodes": nodes}


if __name__ == "__main__":
    train_on_cluster()
