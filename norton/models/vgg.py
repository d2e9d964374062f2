"""VGG-16/19 with BatchNorm for 32×32 inputs (the CIFAR variant of the published configs); the last
pool averages whatever the features leave (2×2 at 32×32, as published), so other sizes run too.

Module names follow the published checkpoints: ``features.conv{i}`` /
``features.norm{i}`` with ``i`` the position in the layer config (pools
included), and a head ``classifier.linear1`` → ``norm1`` (BatchNorm1d) → ReLU →
``linear2``.  Convolutions carry a bias.  ``compress_rate`` has one entry per conv.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from norton.core import fit_compress_rate
from norton.models.layers import conv, width
from norton.models.registry import register_model

CONFIGS = {
    "vgg_16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg_19_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class VGG(nn.Module):
    def __init__(self, config: list, *, rank: int, rates: list[float], num_classes: int, in_channels: int) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        convs = iter(rates)
        for i, item in enumerate(config):
            if item == "M":
                layers[f"pool{i}"] = nn.MaxPool2d(kernel_size=2, stride=2)
                continue
            out = width(item, next(convs))
            layers[f"conv{i}"] = conv(channels, out, 3, rank=rank, padding=1, bias=True)
            layers[f"norm{i}"] = nn.BatchNorm2d(out)
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
            channels = out
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = the published 2×2 average pool at 32×32, and fits any size
        self.classifier = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(channels, 512),
                norm1=nn.BatchNorm1d(512),
                relu1=nn.ReLU(inplace=True),
                linear2=nn.Linear(512, num_classes),
            )
        )
        self.default_input_size = (in_channels, 32, 32)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


def _vgg(name: str, rank: int, compress_rate, num_classes: int, in_channels: int) -> VGG:
    config = CONFIGS[name]
    n_convs = sum(1 for item in config if item != "M")
    rates = fit_compress_rate(compress_rate, n_convs, name)
    return VGG(config, rank=rank, rates=rates, num_classes=num_classes, in_channels=in_channels)


@register_model
def vgg_16_bn(*, rank: int = 0, compress_rate=None, num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-16-BN for 32×32 images; ``compress_rate``: 13 entries, one per conv."""
    return _vgg("vgg_16_bn", rank, compress_rate, num_classes, in_channels)


@register_model
def vgg_19_bn(*, rank: int = 0, compress_rate=None, num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-19-BN for 32×32 images; ``compress_rate``: 16 entries, one per conv.

    Its published configs are for CIFAR-100, hence 100 classes by default."""
    return _vgg("vgg_19_bn", rank, compress_rate, num_classes, in_channels)
