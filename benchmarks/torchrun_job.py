"""The benchmark job as plain PyTorch DDP, for ``torchrun --standalone --nproc-per-node 2``."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main(epochs: int, steps: int, folder: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    for epoch in range(epochs):
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        if rank == 0:
            os.makedirs(os.path.join(folder, f"checkpoint_{epoch}"), exist_ok=True)
            torch.save(model.state_dict(), os.path.join(folder, f"checkpoint_{epoch}", "model.pt"))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
