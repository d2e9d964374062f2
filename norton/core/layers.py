"""Layers shared by the models and by pruning (which needs their pruners)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ChannelPadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad (or crop) channels.

    ⌊(out − in)/2⌋ channels go before the input and the rest after; when
    ``out < in`` both counts are negative and the middle ``out`` channels are kept.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.before = (out_channels - in_channels) // 2
        self.after = out_channels - in_channels - self.before

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, stride={self.stride}"
