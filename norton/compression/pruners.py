"""torch-pruning extension point: how norton's own layers lose channels.

The dependency graph (``torch_pruning.DependencyGraph``) finds which layers are
coupled; these pruners do the surgery on a ``CPDBlock`` (all R rank terms of a
filter go together, rank-major layout kept) and on the option-A
``ChannelPadShortcut`` (only its widths change; the placement rule is fixed),
and on torchvision's ``FrozenBatchNorm2d``.
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from norton.core import ChannelPadShortcut, CPDBlock


def _select(param: nn.Parameter, dim: int, index: Sequence[int]) -> nn.Parameter:
    index_t = torch.as_tensor(list(index), dtype=torch.long, device=param.device)
    new = nn.Parameter(param.data.index_select(dim, index_t), requires_grad=param.requires_grad)
    if param.grad is not None:
        new.grad = param.grad.index_select(dim, index_t)
    return new


def _keep(total: int, removed: Sequence[int]) -> list[int]:
    removed = set(int(i) for i in removed)
    return [i for i in range(total) if i not in removed]


def select_cpd_out_channels(block: CPDBlock, keep: Sequence[int]) -> None:
    """Keep filters ``keep`` (in that order) with all their rank terms."""
    n = block.out_channels
    rows = [r * n + k for r in range(block.rank) for k in keep]
    block.pointwise = _select(block.pointwise, 0, rows)
    block.vertical = _select(block.vertical, 0, rows)
    block.horizontal = _select(block.horizontal, 0, rows)
    if block.bias is not None:
        block.bias = _select(block.bias, 0, keep)
    block.out_channels = len(keep)


def select_cpd_in_channels(block: CPDBlock, keep: Sequence[int]) -> None:
    block.pointwise = _select(block.pointwise, 1, keep)
    block.in_channels = len(keep)


class CPDBlockPruner(tp.pruner.function.BasePruningFunc):
    TARGET_MODULES = (CPDBlock,)

    def prune_out_channels(self, layer: CPDBlock, idxs: Sequence[int]) -> CPDBlock:
        select_cpd_out_channels(layer, _keep(layer.out_channels, idxs))
        return layer

    def prune_in_channels(self, layer: CPDBlock, idxs: Sequence[int]) -> CPDBlock:
        select_cpd_in_channels(layer, _keep(layer.in_channels, idxs))
        return layer

    def get_out_channels(self, layer: CPDBlock) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: CPDBlock) -> int:
        return layer.in_channels


class ChannelPadShortcutPruner(tp.pruner.function.BasePruningFunc):
    """Input and output widths are independent (no intra-layer coupling): the
    selection code places channels so that the fixed centred padding holds."""

    TARGET_MODULES = (ChannelPadShortcut,)

    def prune_out_channels(self, layer: ChannelPadShortcut, idxs: Sequence[int]) -> ChannelPadShortcut:
        layer.__init__(layer.in_channels, layer.out_channels - len(idxs), layer.stride)
        return layer

    def prune_in_channels(self, layer: ChannelPadShortcut, idxs: Sequence[int]) -> ChannelPadShortcut:
        layer.__init__(layer.in_channels - len(idxs), layer.out_channels, layer.stride)
        return layer

    def get_out_channels(self, layer: ChannelPadShortcut) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ChannelPadShortcut) -> int:
        return layer.in_channels


class FrozenBatchNormPruner(tp.pruner.function.BasePruningFunc):
    """torchvision's FrozenBatchNorm2d (detection bodies): its statistics are
    buffers, which torch-pruning's BatchNorm pruner does not know."""

    TARGET_MODULES = (FrozenBatchNorm2d,)

    def prune_out_channels(self, layer: FrozenBatchNorm2d, idxs: Sequence[int]) -> FrozenBatchNorm2d:
        keep = torch.as_tensor(_keep(layer.weight.shape[0], idxs), dtype=torch.long, device=layer.weight.device)
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(layer, name, getattr(layer, name).index_select(0, keep))
        return layer

    prune_in_channels = prune_out_channels  # one channel in, one out: coupled

    def get_out_channels(self, layer: FrozenBatchNorm2d) -> int:
        return layer.weight.shape[0]

    get_in_channels = get_out_channels


def split_offsets(sizes: Sequence[int]) -> list[int]:
    """Where each chunk of a split with these sizes starts, and the total."""
    return [0, *itertools.accumulate(sizes)]


class SplitPruner(tp.ops.SplitPruner):
    """A traced ``split`` / ``chunk`` losing channels: its chunk sizes shrink
    and its offsets follow them.  torch-pruning's (1.6) shrinks the sizes (in
    place, in the list it traced) and keeps the old offsets, so the next group
    through that split was cut at the traced positions (MixNet: the second
    half's cut landed in the first half)."""

    def prune_out_channels(self, layer, idxs: Sequence[int]) -> None:
        if layer.split_sizes is None:
            return
        offsets = split_offsets(layer.split_sizes)
        sizes = list(layer.split_sizes)
        for idx in idxs:
            sizes[bisect.bisect_right(offsets, int(idx)) - 1] -= 1
        layer.split_sizes = sizes
        layer.offsets = split_offsets(sizes)

    prune_in_channels = prune_out_channels


CUSTOM_PRUNERS = {CPDBlock: CPDBlockPruner(), ChannelPadShortcut: ChannelPadShortcutPruner(),
                  FrozenBatchNorm2d: FrozenBatchNormPruner()}
