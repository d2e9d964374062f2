"""CIFAR ResNets (ResNet-20/56/110) with option-A (zero-padding) shortcuts.

``compress_rate`` layout (the published configs'): entry 0 = width of the first
conv, entries 1–2 = output width of stages 1 and 2 (stage 3's output is never
pruned), then one entry per basic block for its inner width — 3 + 3·n entries
for n blocks per stage.
"""
from __future__ import annotations

from torch import Tensor, nn

from norton.core import ChannelPadShortcut, fit_compress_rate
from norton.models.layers import conv, width
from norton.models.registry import register_model

STAGE_WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut.  The first block of every stage always
    has a ``ChannelPadShortcut`` (an identity while its widths match), so that
    pruning sees where one stage's channels are placed inside the next."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int, rank: int, first: bool) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, mid_channels, 3, rank=rank, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv(mid_channels, out_channels, 3, rank=rank, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        if first or stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = ChannelPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, *, rank: int, rates: list[float], num_classes: int, in_channels: int) -> None:
        super().__init__()
        stem = width(STAGE_WIDTHS[0], rates[0])
        stage_out = [width(STAGE_WIDTHS[0], rates[1]), width(STAGE_WIDTHS[1], rates[2]), STAGE_WIDTHS[2]]
        mid_rates = iter(rates[3:])
        self.conv1 = conv(in_channels, stem, 3, rank=rank, padding=1)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        channels = stem
        for s in range(3):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if s > 0 and b == 0 else 1
                mid = width(STAGE_WIDTHS[s], next(mid_rates))
                blocks.append(BasicBlock(channels, mid, stage_out[s], stride, rank, first=b == 0))
                channels = stage_out[s]
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.default_input_size = (in_channels, 32, 32)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _resnet(name: str, depth: int, rank: int, compress_rate, num_classes: int, in_channels: int) -> CifarResNet:
    n = (depth - 2) // 6
    rates = fit_compress_rate(compress_rate, 3 + 3 * n, name)
    return CifarResNet(n, rank=rank, rates=rates, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet_20(*, rank: int = 0, compress_rate=None, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (3 blocks per stage); ``compress_rate``: 12 entries."""
    return _resnet("resnet_20", 20, rank, compress_rate, num_classes, in_channels)


@register_model
def resnet_56(*, rank: int = 0, compress_rate=None, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (9 blocks per stage); ``compress_rate``: 30 entries."""
    return _resnet("resnet_56", 56, rank, compress_rate, num_classes, in_channels)


@register_model
def resnet_110(*, rank: int = 0, compress_rate=None, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 (18 blocks per stage); ``compress_rate``: 57 entries."""
    return _resnet("resnet_110", 110, rank, compress_rate, num_classes, in_channels)
