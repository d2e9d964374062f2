"""ResNet-50 for ImageNet in torchvision's layout (module and state-dict names),
so torchvision ResNet-50 weights load at rank 0 and rate 0.

``compress_rate`` layout (the published configs'): entry 0 = stem width,
entries 1–3 = output width of stages 1–3 (stage 4 is never pruned), then 16
entries, one per bottleneck, for its inner (mid) width — 20 entries.  Only the
3×3 convolutions become CPDBlocks at rank > 0.
"""
from __future__ import annotations

from torch import Tensor, nn

from norton.core import fit_compress_rate
from norton.models.layers import conv, width
from norton.models.registry import register_model

STAGE_OUT = (256, 512, 1024, 2048)
BLOCKS = (3, 4, 6, 3)


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int, rank: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = conv(mid_channels, mid_channels, 3, rank=rank, stride=stride, padding=1)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, *, rank: int, rates: list[float], num_classes: int, in_channels: int) -> None:
        super().__init__()
        stem = width(64, rates[0])
        stage_out = [width(c, r) for c, r in zip(STAGE_OUT[:3], rates[1:4])] + [STAGE_OUT[3]]
        mid_rates = iter(rates[4:])
        self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = stem
        for s, (n_blocks, out) in enumerate(zip(BLOCKS, stage_out)):
            blocks = []
            for b in range(n_blocks):
                stride = 2 if s > 0 and b == 0 else 1
                mid = width(STAGE_OUT[s] // 4, next(mid_rates))
                blocks.append(Bottleneck(channels, mid, out, stride, rank))
                channels = out
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.default_input_size = (in_channels, 224, 224)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def resnet_50(*, rank: int = 0, compress_rate=None, num_classes: int = 1000, in_channels: int = 3) -> ResNet50:
    """ResNet-50 (torchvision layout); ``compress_rate``: 20 entries."""
    rates = fit_compress_rate(compress_rate, 4 + sum(BLOCKS), "resnet_50")
    return ResNet50(rank=rank, rates=rates, num_classes=num_classes, in_channels=in_channels)
