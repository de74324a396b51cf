# Ported from Ray Train's example python/ray/train/examples/pytorch/torch_quick_start.py
# (Ray 2.60.0, the copy installed in .venv: ray/train/examples/pytorch/torch_quick_start.py).
#
# Imports changed: `import ray.train.torch` -> `from prefect_distrain import ray` plus
# `import prefect_distrain.ray.train.torch` (so `ray.train.torch.*` and `ray.train.*` below
# resolve to ours); in `__main__`, `ray.train[.torch]` -> `prefect_distrain.ray.train[.torch]`.
# Changed besides imports:
#   - data: get_dataset() builds a small synthetic FashionMNIST look-alike (1024 images of
#     28x28 in 10 classes) instead of downloading FashionMNIST (torchvision imports dropped).
#   - size: ScalingConfig(num_workers=4) -> 2.
# ruff: noqa: E402, I001 - Ray's layout (its file says `isort: skip_file`)

# __torch_setup_begin__
import torch
import torch.nn as nn
from torch.utils.data import DataLoader


def get_dataset():
    # Ray: datasets.FashionMNIST(root="/tmp/data", train=True, download=True,
    #                            transform=ToTensor())
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (1024,), generator=generator)
    prototypes = torch.rand(10, 1, 28, 28, generator=generator)
    images = (prototypes[labels] + 0.3 * torch.rand(1024, 1, 28, 28, generator=generator)) / 1.3
    return torch.utils.data.TensorDataset(images, labels)

class NeuralNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )

    def forward(self, inputs):
        inputs = self.flatten(inputs)
        logits = self.linear_relu_stack(inputs)
        return logits
# __torch_setup_end__

# __torch_single_begin__
def train_func():
    num_epochs = 3
    batch_size = 64

    dataset = get_dataset()
    dataloader = DataLoader(dataset, batch_size=batch_size)

    model = NeuralNetwork()

    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    for epoch in range(num_epochs):
        for inputs, labels in dataloader:
            optimizer.zero_grad()
            pred = model(inputs)
            loss = criterion(pred, labels)
            loss.backward()
            optimizer.step()
        print(f"epoch: {epoch}, loss: {loss.item()}")
# __torch_single_end__

# __torch_distributed_begin__
import prefect_distrain.ray.train.torch  # noqa: F401 - Ray: import ray.train.torch
from prefect_distrain import ray

def train_func_distributed():
    num_epochs = 3
    batch_size = 64

    dataset = get_dataset()
    dataloader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    dataloader = ray.train.torch.prepare_data_loader(dataloader)

    model = NeuralNetwork()
    model = ray.train.torch.prepare_model(model)

    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    for epoch in range(num_epochs):
        if ray.train.get_context().get_world_size() > 1:
            dataloader.sampler.set_epoch(epoch)

        for inputs, labels in dataloader:
            optimizer.zero_grad()
            pred = model(inputs)
            loss = criterion(pred, labels)
            loss.backward()
            optimizer.step()
        print(f"epoch: {epoch}, loss: {loss.item()}")
# __torch_distributed_end__


if __name__ == "__main__":
    # __torch_single_run_begin__
    train_func()
    # __torch_single_run_end__

    # __torch_trainer_begin__
    from prefect_distrain.ray.train import ScalingConfig
    from prefect_distrain.ray.train.torch import TorchTrainer

    # For GPU Training, set `use_gpu` to True.
    use_gpu = False

    trainer = TorchTrainer(
        train_func_distributed,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=use_gpu)
    )

    results = trainer.fit()
    # __torch_trainer_end__
