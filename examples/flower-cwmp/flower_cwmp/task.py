"""The model, the data and the training loop: ordinary PyTorch, nothing of CWMP."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from cwmp.apps.federated.data import dirichlet_partition, load_dataset
from energyprof.models import build_model


def make_model(name: str) -> nn.Module:
    """energyprof's built-in ``mlp`` or ``cnn``, shaped for 8x8 digits, with fixed initial weights."""
    if name not in ("mlp", "cnn"):
        raise ValueError(f"model must be 'mlp' or 'cnn', got {name!r}")
    return build_model(name, in_channels=1, image_size=8, num_classes=10, seed=0)


@lru_cache(maxsize=1)
def digits():
    """scikit-learn's digits (ships with it, no download): a fixed 80/20 train/test split."""
    data = load_dataset("digits")
    return (torch.from_numpy(data.x_train), torch.from_numpy(data.y_train),
            torch.from_numpy(data.x_test), torch.from_numpy(data.y_test))


def partition(partition_id: int, num_partitions: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One client's share of the training split: Dirichlet(alpha) label skew, seeded."""
    x, y, _, _ = digits()
    parts = dirichlet_partition(y.numpy(), num_partitions, alpha, seed=0, min_size=10)
    idx = torch.from_numpy(parts[partition_id])
    return x[idx], y[idx]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, lr: float,
          seed: int = 0) -> float:
    """Plain SGD, shuffled by a generator seeded with ``seed``; returns the last batch's loss."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss = torch.zeros(())
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())
