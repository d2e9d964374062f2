"""Small helpers for working on a model's modules and forward calls."""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn


def is_decomposable(module: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` with groups=1 and a kernel larger than 1×1."""
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.kernel_size[0] * module.kernel_size[1] > 1
    )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def as_args(example_inputs) -> tuple:
    """Positional arguments of the forward call: a tuple is unpacked, anything
    else (a tensor, or a detector's list of images) is the one argument."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def batch_size_of(example_inputs) -> int:
    """Samples in ``example_inputs``: the first dimension of the first tensor
    argument, the length of a list of images, or 1."""
    first = as_args(example_inputs)[0]
    if isinstance(first, Tensor) and first.dim() > 0:
        return first.shape[0]
    if isinstance(first, (list, tuple)):
        return max(len(first), 1)
    return 1


def flatten_tensors(obj) -> list[Tensor]:
    """Every tensor inside nested lists, tuples and dicts, in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in flatten_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in flatten_tensors(v)]
    return []
