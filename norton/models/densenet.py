"""DenseNet-40 for 32×32 images (growth 12, three dense blocks of 12 layers).

``compress_rate`` layout (the published configs'): entry 0 unused (the first conv
keeps its 24 channels), then 12 growth-rate entries for dense block 1, 1 for
transition 1, 12, 1, 12 — 39 entries.  A dense layer at rate r adds
``int(12·(1−r))`` channels; a transition keeps ``int(in·(1−r))``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from norton.core import fit_compress_rate
from norton.models.layers import conv, width
from norton.models.registry import register_model

GROWTH = 12
LAYERS_PER_BLOCK = 12


class DenseLayer(nn.Module):
    """BN → ReLU → 3×3 conv, output concatenated to the input."""

    def __init__(self, in_channels: int, growth: int, rank: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=False)
        self.conv1 = conv(in_channels, growth, 3, rank=rank, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv1(self.relu(self.bn1(x)))], dim=1)


class Transition(nn.Module):
    """BN → ReLU → 1×1 conv → 2×2 average pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.avgpool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.avgpool(self.conv1(self.relu(self.bn1(x))))


class DenseNet40(nn.Module):
    def __init__(self, *, rank: int, rates: list[float], num_classes: int, in_channels: int) -> None:
        super().__init__()
        channels = 2 * GROWTH
        self.conv1 = conv(in_channels, channels, 3, rank=rank, padding=1)
        pos = 1
        for block in range(1, 4):
            layers = []
            for _ in range(LAYERS_PER_BLOCK):
                growth = width(GROWTH, rates[pos])
                layers.append(DenseLayer(channels, growth, rank))
                channels += growth
                pos += 1
            setattr(self, f"dense{block}", nn.Sequential(*layers))
            if block < 3:
                out = width(channels, rates[pos])
                setattr(self, f"trans{block}", Transition(channels, out))
                channels = out
                pos += 1
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.default_input_size = (in_channels, 32, 32)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.trans1(self.dense1(x))
        x = self.trans2(self.dense2(x))
        x = self.relu(self.bn(self.dense3(x)))
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def densenet_40(*, rank: int = 0, compress_rate=None, num_classes: int = 10, in_channels: int = 3) -> DenseNet40:
    """DenseNet-40 (growth 12); ``compress_rate``: 39 entries, entry 0 unused."""
    rates = fit_compress_rate(compress_rate, 1 + 3 * LAYERS_PER_BLOCK + 2, "densenet_40")
    return DenseNet40(rank=rank, rates=rates, num_classes=num_classes, in_channels=in_channels)
