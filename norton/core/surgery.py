"""Small helpers for working on a model's modules and forward calls."""
from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

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


@contextmanager
def unchanged_on_error(model: nn.Module) -> Iterator[None]:
    """Run a block of in-place surgery on ``model`` all or nothing: if it
    raises (or is interrupted), every module of ``model`` gets back the state it
    had when the block began, so the caller's model is never left half-changed.
    The modules keep their identity (a reference a user holds stays valid);
    their parameters and buffers are the saved copies."""
    originals = list(model.modules())
    saved = copy.deepcopy(model)
    restored = {id(s): o for s, o in zip(saved.modules(), originals)}
    try:
        yield
    except BaseException:
        for original, state in zip(originals, saved.modules()):
            contents = dict(state.__dict__)
            contents["_modules"] = {k: None if v is None else restored.get(id(v), v) for k, v in state._modules.items()}
            original.__dict__.clear()
            original.__dict__.update(contents)
            original.__class__ = type(state)  # surgery may swap a module's class (a pruned attention's)
        raise


def output_shapes(outputs) -> list[tuple[int, ...]]:
    """The shape of every tensor a forward call returned, in order, without the
    first dimension: the part of the interface that channel surgery must keep
    (the first is the batch, or the number of a detector's detections, which
    depends on the weights)."""
    return [tuple(t.shape[1:]) for t in flatten_tensors(outputs)]
