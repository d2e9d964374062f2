"""Model surgery: remove the channels not kept, then put the kept ones in order.

torch-pruning's pruners (and norton's, for CPDBlock, the option-A shortcut and
FrozenBatchNorm2d) cut every coupled layer; reordering follows the selection's
planned order so that option-A shortcuts place channels where the original did.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import Tensor, nn

from norton.compression.graph import CoupledGroup
from norton.compression.pruners import select_cpd_in_channels, select_cpd_out_channels
from norton.core import ChannelPadShortcut, CPDBlock
from norton.errors import NortonError


class EmptyLayerError(NortonError):
    """torch-pruning refuses a group's removal: a coupled layer would lose every channel."""


def _permute(module: nn.Module, is_out: bool, perm: list[int]) -> None:
    index = torch.as_tensor(perm, dtype=torch.long)

    def take(t: Tensor, dim: int) -> Tensor:
        return t.index_select(dim, index.to(t.device))

    with torch.no_grad():
        if isinstance(module, CPDBlock):
            (select_cpd_out_channels if is_out else select_cpd_in_channels)(module, perm)
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            depthwise = isinstance(module, nn.Conv2d) and module.groups > 1
            dim = 0 if (is_out or depthwise) else 1
            module.weight.data = take(module.weight.data, dim)
            if dim == 0 and module.bias is not None:
                module.bias.data = take(module.bias.data, 0)
        elif isinstance(module, (nn.modules.batchnorm._NormBase,)) or type(module).__name__ == "FrozenBatchNorm2d":
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(module, name, None)
                if t is not None:
                    t.data = take(t.data, 0)
        elif isinstance(module, ChannelPadShortcut) or not list(module.parameters(recurse=False)):
            return
        else:
            raise NortonError(f"cannot reorder the channels of a {type(module).__name__}")


def apply_selection(graph: tp.DependencyGraph, groups: list[CoupledGroup], before_cut=None) -> None:
    """Remove the channels not kept, then put the kept ones in their planned order.
    Frozen parameters stay frozen (torch-pruning's pruners make new, trainable ones).
    ``before_cut(group)`` sees every torch-pruning group just before it is cut."""
    frozen = {(module, name) for g in groups for module, *_ in g.members
              for name, p in module.named_parameters(recurse=False) if not p.requires_grad}
    _apply_selection(graph, groups, before_cut)
    for module, name in frozen:
        getattr(module, name).requires_grad_(False)
    refresh_split_sizes(graph.model)


def _split_containers(model: nn.Module):
    """Modules that split their input by stored sizes between their child
    layers (timm's MixedConv2d: ``torch.split(x, self.splits)``, one child conv
    per chunk)."""
    for module in model.modules():
        splits = getattr(module, "splits", None)
        children = list(module.children())
        if (isinstance(splits, list) and splits and all(isinstance(v, int) for v in splits)
                and len(children) == len(splits) and all(isinstance(c, nn.Conv2d) for c in children)):
            yield module, children


def refresh_split_sizes(model: nn.Module) -> None:
    """Stored split sizes follow the pruned child layers, as do the container's
    ``in_channels`` / ``out_channels``: torch-pruning updates the layers, not the
    numbers a forward splits by."""
    for module, children in _split_containers(model):
        module.splits = [c.in_channels for c in children]
        for side in ("in_channels", "out_channels"):
            if isinstance(getattr(module, side, None), int):
                setattr(module, side, sum(getattr(c, side) for c in children))


ONE_BY_ONE = 4  # a failing part this small is tested group by group (bisecting it would take more checks)


def apply_or_restore(graph: tp.DependencyGraph, groups: list[CoupledGroup], check: Callable[[], str | None]
                     ) -> dict[str, str]:
    """Cut ``groups`` in order, leaving whole each one whose cut makes ``check``
    give a reason (or that torch-pruning refuses); returns those reasons by
    group root.  The groups are tested in halves, bisected where a half fails,
    so a model with few bad groups takes a few checks instead of one per
    group; a failing half is put back exactly as it was (same module objects).
    A single group is decided given every group before it that was cut, as a
    one-at-a-time pass would; a half is kept when it works as a whole."""
    reasons: dict[str, str] = {}

    def split(part: list[CoupledGroup]) -> None:  # ``part`` fails as a whole
        pieces = [[g] for g in part] if len(part) <= ONE_BY_ONE else [part[:len(part) // 2], part[len(part) // 2:]]
        for piece in pieces:
            settle(piece)

    def settle(part: list[CoupledGroup]) -> None:
        reason = _cut_or_restore(graph, part, check)
        if reason is not None and len(part) == 1:
            reasons[part[0].info.root] = reason
        elif reason is not None:
            split(part)

    # the caller knows that cutting every group at once fails: start with the pieces
    if len(groups) > 1:
        split(list(groups))
    elif groups:
        settle(list(groups))
    return reasons


def _cut_or_restore(graph: tp.DependencyGraph, groups: list[CoupledGroup], check: Callable[[], str | None]) -> str | None:
    """Cut every group of ``groups``; if torch-pruning refuses one or ``check``
    then gives a reason, put every module the cuts touched back as it was and
    return the reason."""
    saved = {}
    members = [m for g in groups for m, *_ in g.members]
    containers = list(_split_containers(graph.model))

    def snapshot(group) -> None:  # the group as torch-pruning cuts it now (earlier cuts can change it)
        targets = [dep.target.module for dep, _ in group] + members
        loose = [t for t in targets if isinstance(t, nn.Parameter)]  # a ViT's class token, position embedding
        layers = [t for t in targets if isinstance(t, nn.Module) and id(t) not in saved]
        owners = [m for m in graph.model.modules() if any(p is t for p in m._parameters.values() for t in loose)
                  ] if loose else []
        touched = [sub for m in layers for sub in m.modules()]  # a pruner may cut a member's children too
        touched += [c for c, children in containers  # (MultiheadAttention's out_proj)
                    if any(m in children for m in layers)]  # stored split sizes
        for module in touched + owners:
            if id(module) not in saved:
                state = {k: list(v) if isinstance(v, list) else v  # a pruner may edit a stored list in place
                         for k, v in module.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
                saved[id(module)] = (module, state, copy.deepcopy(module._parameters),
                                     copy.deepcopy(module._buffers))

    def restore() -> None:
        for module, state, parameters, buffers in saved.values():
            module.__dict__.update(state)
            module._parameters, module._buffers = parameters, buffers

    try:
        apply_selection(graph, groups, before_cut=snapshot)
    except EmptyLayerError as refused:  # the refused group was not cut; those before it in the list were
        restore()
        return str(refused)
    reason = check()
    if reason:
        restore()
    return reason


def _apply_selection(graph: tp.DependencyGraph, groups: list[CoupledGroup], before_cut=None) -> None:
    for g in groups:
        keep = g.info.kept
        removed = sorted(set(range(g.info.total)) - set(keep))
        if removed:
            pruner = graph.get_pruner_of_module(g.root_module)
            group = graph.get_pruning_group(g.root_module, pruner.prune_out_channels, removed)
            if not graph.check_pruning_group(group):
                raise EmptyLayerError(_empty_layer_message(graph, group, g, len(removed)))
            if before_cut is not None:
                before_cut(group)
            group.prune()
        ordered = sorted(keep)
        if keep != ordered:
            position = {k: i for i, k in enumerate(ordered)}
            perm = [position[k] for k in keep]
            seen = set()
            for module, is_out, idxs, root_idxs in g.members:
                key = (id(module), is_out)
                if key in seen:
                    continue
                seen.add(key)
                if idxs != root_idxs:
                    raise NortonError(f"cannot reorder the channels of group {g.info.root}: they pass through a concatenation")
                _permute(module, is_out, perm)


def _empty_layer_message(graph: tp.DependencyGraph, group, g: CoupledGroup, removed: int) -> str:
    """Name the coupled layer that the removal would empty, and what to do."""
    for dep, idxs in group:
        module = dep.target.module
        side = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
        channels = (graph.get_out_channels if side == "out" else graph.get_in_channels)(module)
        if channels is not None and channels <= len(idxs):
            name = getattr(dep.target, "_name", None) or "(unnamed)"
            what = f"parameter of shape {tuple(module.shape)}" if hasattr(module, "shape") else type(module).__name__
            return (f"pruning {removed} of {g.info.total} filters of {g.info.root} would remove all {channels} "
                    f"{side}put channels of the coupled layer {name} ({what}): its channels map to "
                    f"{g.info.root}'s through a reshape or split (e.g. attention heads or a channel shuffle), "
                    f"which torch-pruning's tracer does not follow exactly; pass {g.info.root} in ignored_layers "
                    "(or lower its rate)")
    return f"pruning {removed} of {g.info.total} filters of {g.info.root} would leave a coupled layer empty"
