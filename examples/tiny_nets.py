"""A user's own network and dataset, plugged into approxrun by ``_target_`` (README, "Your own model
and data"). Run from this repository's root (so that ``examples`` is importable)::

    python -m approxrun model._target_=examples.tiny_nets.small_cnn +model.width=8 \\
        dataset._target_=examples.tiny_nets.stripes +dataset.train_size=512

Nothing here knows about approxrun: the network is a plain ``nn.Module`` whose Conv2d/Linear layers
approxrun converts, the data are plain torch datasets of (image [C, H, W], label) pairs.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import TensorDataset


def small_cnn(num_classes: int, in_channels: int = 1, width: int = 8) -> nn.Module:
    """Two 3x3 convolutions with pooling and a linear classifier, for any image size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * width, num_classes))


def stripes(train_size: int = 512, test_size: int = 256, classes: int = 4, image_size: int = 12,
            noise: float = 0.6, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Grey images of stripes at ``classes`` orientations with random phase, plus Gaussian noise;
    the label is the orientation. Returns (train, test); approxrun infers classes, channels and size."""
    generator = torch.Generator().manual_seed(seed)
    coords = torch.arange(image_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def make(n: int) -> TensorDataset:
        labels = torch.randint(0, classes, (n,), generator=generator)
        angles = labels.float() * math.pi / classes
        phases = torch.rand(n, generator=generator) * 2 * math.pi
        waves = (torch.cos(angles)[:, None, None] * cols + torch.sin(angles)[:, None, None] * rows)
        images = torch.sin(waves * 1.3 + phases[:, None, None])
        images = images + noise * torch.randn(n, image_size, image_size, generator=generator)
        return TensorDataset(images.unsqueeze(1), labels)

    return make(train_size), make(test_size)
