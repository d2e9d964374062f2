"""A model's architecture as data, and the model rebuilt from it.

A description holds the base architecture (a zoo name with its keyword
arguments, or a torchvision classifier), which convolutions are CPDBlocks at
which rank (and TuckerBlocks at which ranks), and the output width of every convolution after pruning.  That is
enough to recreate the exact module structure before loading weights, without
the original model object.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from norton.compression.graph import ROOT_TYPES, out_width
from norton.compression.pruning import restructure
from norton.core import CPDBlock, TuckerBlock, replace_module
from norton.errors import NortonError
from norton.models import create_model


def describe(model: nn.Module, input_size: list[int] | None = None) -> dict[str, Any]:
    """Plain data (str/int/float/list/dict) describing ``model``'s structure."""
    spec = getattr(model, "norton_spec", None)
    size = input_size or list(getattr(model, "default_input_size", []) or [])
    return {
        "base": dict(spec) if spec else None,
        "decomposed": {n: m.rank for n, m in model.named_modules() if isinstance(m, CPDBlock)},
        "tucker": {n: list(m.ranks) for n, m in model.named_modules() if isinstance(m, TuckerBlock)},
        "widths": {n: out_width(m) for n, m in model.named_modules() if isinstance(m, ROOT_TYPES)},
        "input_size": [int(s) for s in size],
    }


def build_base(base: dict[str, Any]) -> nn.Module:
    """The unpruned, undecomposed model a description starts from."""
    kwargs = {k: v for k, v in base.items() if k not in ("arch", "rank", "compress_rate", "backbone_ckpt")}
    return create_model(base["arch"], rank=0, **kwargs)


def rebuild(description: dict[str, Any], base_model: nn.Module | None = None) -> nn.Module:
    """The module structure of a description, with arbitrary weights.

    ``base_model`` replaces the zoo base for models that are not in the zoo (it
    is modified in place).
    """
    if base_model is None:
        if not description.get("base"):
            raise NortonError("this checkpoint's model is not from the norton zoo; pass the original (unpruned) model to rebuild it")
        model = build_base(description["base"])
    else:
        model = base_model
    modules = dict(model.named_modules())
    factored = [("decomposed", CPDBlock, "decomposes layer {!r}"), ("tucker", TuckerBlock, "factors layer {!r} by Tucker-2")]
    for key, block_type, what in factored:
        for name, ranks in description.get(key, {}).items():
            conv = modules.get(name)
            if not isinstance(conv, (nn.Conv2d, block_type)):
                raise NortonError(f"the checkpoint {what.format(name)}, which this model does not have as a convolution")
            if isinstance(conv, nn.Conv2d):
                ranks = ranks if isinstance(ranks, int) else tuple(ranks)  # a CP rank, or Tucker-2's pair
                block = block_type.like_conv(conv, ranks).requires_grad_(conv.weight.requires_grad)  # frozen stays frozen
                replace_module(model, name, block)
    if description.get("input_size"):  # the size the model was made for (a dataset's, not the zoo default)
        model.default_input_size = tuple(int(v) for v in description["input_size"])
    widths = description.get("widths", {})
    current = {n: out_width(m) for n, m in model.named_modules() if isinstance(m, ROOT_TYPES)}
    if widths and widths != current:
        size = description.get("input_size") or list(getattr(model, "default_input_size", []))
        if not size:
            raise NortonError("the checkpoint has no input size to trace the pruned model with")
        restructure(model, widths, torch.zeros(1, *size))
    return model
