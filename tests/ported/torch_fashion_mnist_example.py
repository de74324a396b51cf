# Ported from Ray Train's example python/ray/train/examples/pytorch/torch_fashion_mnist_example.py
# (Ray 2.60.0, the copy installed in .venv).
#
# Imports changed: `import ray.train` -> `from prefect_distrain import ray` (the body's
# `ray.train.*` and `ray.train.torch.*`), `from ray.train[.torch] import ...` ->
# `from prefect_distrain.ray.train[.torch] import ...`.
# Changed besides imports:
#   - data: get_dataloaders() builds small synthetic FashionMNIST look-alikes (1024 train and
#     256 test images of 28x28 in 10 classes) instead of downloading FashionMNIST under a
#     FileLock (torchvision and filelock imports dropped with the download).
#   - tqdm is not installed here: `tqdm` is a pass-through stand-in defined below.
#   - size: "epochs": 10 -> 2; `__main__` trains on num_workers=2, use_gpu=False (was 4, True).
#   - result: train_fashion_mnist() returns its result (`return result` added) and `__main__`
#     keeps it in the module global `result`.
from typing import Dict

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prefect_distrain import ray
from prefect_distrain.ray.train import ScalingConfig
from prefect_distrain.ray.train.torch import TorchTrainer


def tqdm(iterable, desc=None):  # stand-in: tqdm is not installed here
    return iterable


def synthetic_fashion_mnist(train):  # stand-in for datasets.FashionMNIST(..., download=True)
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.rand(10, 1, 28, 28, generator=generator)
    if not train:
        generator.manual_seed(1)
    size = 1024 if train else 256
    labels = torch.randint(0, 10, (size,), generator=generator)
    images = (prototypes[labels] + 0.5 * torch.rand(size, 1, 28, 28, generator=generator)) / 1.5
    # transforms.Compose([ToTensor(), Normalize((0.28604,), (0.32025,))])
    return TensorDataset((images - 0.28604) / 0.32025, labels)


def get_dataloaders(batch_size):
    # Training and test data: synthetic here (Ray downloads FashionMNIST under a FileLock)
    training_data = synthetic_fashion_mnist(train=True)
    test_data = synthetic_fashion_mnist(train=False)

    # Create data loaders
    train_dataloader = DataLoader(training_data, batch_size=batch_size, shuffle=True)
    test_dataloader = DataLoader(test_data, batch_size=batch_size)

    return train_dataloader, test_dataloader


# Model Definition
class NeuralNetwork(nn.Module):
    def __init__(self):
        super(NeuralNetwork, self).__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(512, 10),
            nn.ReLU(),
        )

    def forward(self, x):
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits


def train_func_per_worker(config: Dict):
    ray.train.torch.enable_reproducibility()

    lr = config["lr"]
    epochs = config["epochs"]
    batch_size = config["batch_size_per_worker"]

    # Get dataloaders inside the worker training function
    train_dataloader, test_dataloader = get_dataloaders(batch_size=batch_size)

    # [1] Prepare Dataloader for distributed training
    # Shard the datasets among workers and move batches to the correct device
    # =======================================================================
    train_dataloader = ray.train.torch.prepare_data_loader(train_dataloader)
    test_dataloader = ray.train.torch.prepare_data_loader(test_dataloader)

    model = NeuralNetwork()

    # [2] Prepare and wrap your model with DistributedDataParallel
    # Move the model to the correct GPU/CPU device
    # ============================================================
    model = ray.train.torch.prepare_model(model)

    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    # Model training loop
    for epoch in range(epochs):
        if ray.train.get_context().get_world_size() > 1:
            # Required for the distributed sampler to shuffle properly across epochs.
            train_dataloader.sampler.set_epoch(epoch)

        model.train()
        for X, y in tqdm(train_dataloader, desc=f"Train Epoch {epoch}"):
            pred = model(X)
            loss = loss_fn(pred, y)

            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        model.eval()
        test_loss, num_correct, num_total = 0, 0, 0
        with torch.no_grad():
            for X, y in tqdm(test_dataloader, desc=f"Test Epoch {epoch}"):
                pred = model(X)
                loss = loss_fn(pred, y)

                test_loss += loss.item()
                num_total += y.shape[0]
                num_correct += (pred.argmax(1) == y).sum().item()

        test_loss /= len(test_dataloader)
        accuracy = num_correct / num_total

        # [3] Report metrics to Ray Train
        # ===============================
        ray.train.report(metrics={"loss": test_loss, "accuracy": accuracy})


def train_fashion_mnist(num_workers=2, use_gpu=False):
    global_batch_size = 32

    train_config = {
        "lr": 1e-3,
        "epochs": 2,
        "batch_size_per_worker": global_batch_size // num_workers,
    }

    # Configure computation resources
    scaling_config = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu)

    # Initialize a Ray TorchTrainer
    trainer = TorchTrainer(
        train_loop_per_worker=train_func_per_worker,
        train_loop_config=train_config,
        scaling_config=scaling_config,
    )

    # [4] Start distributed training
    # Run `train_func_per_worker` on all workers
    # =============================================
    result = trainer.fit()
    print(f"Training result: {result}")
    return result


if __name__ == "__main__":
    result = train_fashion_mnist(num_workers=2, use_gpu=False)
