"""Building blocks shared by the zoo models."""
from __future__ import annotations

from torch import nn

from norton.core import CPDBlock
from norton.errors import NortonError


def conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    rank: int,
    stride: int = 1,
    padding: int = 0,
    bias: bool = False,
) -> nn.Module:
    """A k×k convolution: ``nn.Conv2d`` at rank 0, a ``CPDBlock`` otherwise.

    1×1 convolutions are never factored (a rank-R CPD of a 1×1 filter saves nothing).
    """
    if rank == 0 or kernel_size == 1:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
    return CPDBlock(in_channels, out_channels, rank, kernel_size, stride=stride, padding=padding, bias=bias)


def width(channels: int, rate: float) -> int:
    """Channels kept at a compress rate: ``int(channels · (1 − rate))``, at least 1."""
    kept = int(channels * (1.0 - rate))
    if kept < 1:
        raise NortonError(f"compress rate {rate!r} leaves no channel of {channels}; use a smaller rate")
    return kept
