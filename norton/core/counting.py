"""MACs and parameter counts (the paper's convention).

MACs = multiply–accumulates of conv and linear layers for one image, i.e.
``torch.utils.flop_counter.FlopCounterMode`` total / 2.  A CPDBlock counts as its
three factored convs.  Params = every parameter of the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from norton.core.cpd_block import plan_override
from norton.core.surgery import as_args, batch_size_of
from norton.errors import NortonError


@dataclass(frozen=True)
class Complexity:
    macs: int
    params: int


def input_shape(model: nn.Module, input_size: int | tuple[int, ...] | None) -> tuple[int, int, int]:
    """(C, H, W) of one input image: ``input_size`` as H=W or (H, W) or (C, H, W),
    or the model's ``default_input_size``."""
    default = getattr(model, "default_input_size", None)
    if input_size is None:
        if default is None:
            raise NortonError("input_size is needed: this model has no default_input_size")
        return tuple(default)
    channels = default[0] if default is not None else 3
    size = (input_size,) if isinstance(input_size, int) else tuple(input_size)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size) or len(size) not in (1, 2, 3):
        raise NortonError(f"input size must be H (square), (H, W) or (C, H, W) of positive ints, got {input_size!r}")
    if len(size) == 1:
        return (channels, size[0], size[0])
    if len(size) == 2:
        return (channels, *size)
    return size


def conv_output_size(conv: nn.Conv2d, in_size) -> tuple[int, int]:
    """(height, width) of ``conv``'s output for an input of spatial size ``in_size[-2:]``."""
    height, width = in_size[-2:]
    if conv.padding == "same":  # nn.Conv2d allows it with stride 1 only: the output keeps the input's size
        return height, width
    padding = (0, 0) if conv.padding == "valid" else conv.padding
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, padding, conv.dilation
    return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs=None, *, input_size: int | tuple[int, ...] | None = None) -> int:
    """MACs per sample of one forward pass: on ``example_inputs`` (divided by their
    batch size), or on one zero image of ``input_size`` (default: the model's).

    The paper's convention: a CPDBlock costs its factored form, whatever plan runs it.
    """
    if example_inputs is None:
        param = next(model.parameters(), None)
        example_inputs = torch.zeros(1, *input_shape(model, input_size),
                                     device=param.device if param is not None else None,
                                     dtype=param.dtype if param is not None else None)
    was_training = model.training
    model.eval()
    try:
        with plan_override(model, "separable"), FlopCounterMode(display=False) as counter:
            model(*as_args(example_inputs))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2 // batch_size_of(example_inputs)


def complexity(model: nn.Module, input_size: int | tuple[int, ...] | None = None) -> Complexity:
    """MACs (one image) and parameter count of ``model``."""
    return Complexity(macs=count_macs(model, input_size=input_size), params=count_params(model))
