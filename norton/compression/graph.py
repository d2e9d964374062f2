"""The coupled channel groups of a model, from torch-pruning's dependency graph.

A group is one set of output channels that must be pruned together (a conv
and its BatchNorm, both sides of a residual add, a concatenation, the inputs
of the consumers); norton keeps, per group, its convs and CPDBlocks, the
torch-pruning group and, after selection, the ordered kept channels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from norton.compression.pruners import CUSTOM_PRUNERS
from norton.core import CPDBlock
from norton.core.surgery import as_args, flatten_tensors
from norton.errors import NortonError

ROOT_TYPES = (nn.Conv2d, nn.Linear, CPDBlock)  # layers whose output channels (features) are pruned
_PASS_THROUGH = {tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.BN, tp.ops.OPTYPE.LN, tp.ops.OPTYPE.GN,
                 tp.ops.OPTYPE.IN, tp.ops.OPTYPE.PRELU, tp.ops.OPTYPE.RESHAPE}  # (a Linear on (b, h, w, c) views)
_LAYERS = {tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.DEPTHWISE_CONV, tp.ops.OPTYPE.LINEAR, tp.ops.OPTYPE.MHA}


def out_width(module: nn.Module) -> int:
    """Output channels of a conv / CPDBlock, output features of a Linear."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


@dataclass
class GroupPruning:
    """One set of coupled output channels and what was kept of it."""

    root: str  # first conv of the group, in network order
    layers: list[str]  # every conv / CPDBlock whose output channels form the group
    total: int
    kept: list[int] = field(default_factory=list)  # original indices, in their new order
    criterion: str = ""  # what decided: the criterion, "l2 (no CP factors)", "placement", "unpruned"

    @property
    def width(self) -> int:
        return len(self.kept)


def is_depthwise(module: nn.Module) -> bool:
    """A conv with one filter per input channel (groups = in = out channels): its
    channels are pruned together with the channels that feed it."""
    return isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels == module.out_channels


def is_grouped(module: nn.Module) -> bool:
    """A conv with ``groups`` > 1 that is not depthwise (ResNeXt, RegNet)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and not is_depthwise(module)


def modules_feeding_output(model: nn.Module, example_inputs) -> set[nn.Module]:
    """Modules whose output tensor *is* (shares storage with) a model output:
    their channels are the model's output channels and must not change."""
    produced: list[tuple[Tensor, nn.Module]] = []  # tensors kept alive so storages are not reused

    def hook(module, _inputs, output):
        produced.extend((t, module) for t in flatten_tensors(output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(*as_args(example_inputs))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    out_storages = {t.untyped_storage().data_ptr() for t in flatten_tensors(outputs)}
    return {m for t, m in produced if t.untyped_storage().data_ptr() in out_storages}


def build_graph(model: nn.Module, example_inputs) -> tp.DependencyGraph:
    """torch-pruning's dependency graph with norton's pruners, traced in eval mode
    (so tracing never touches BatchNorm statistics).  Frozen parameters are
    traced too: torch-pruning follows autograd, which skips them otherwise."""
    was_training = model.training
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, customized_pruners=CUSTOM_PRUNERS, verbose=False
            )
    except NortonError:
        raise
    except Exception as err:  # tracing failures come from arbitrary user models
        _raise_trace_error(model, example_inputs, err)
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)


def _raise_trace_error(model: nn.Module, example_inputs, err: Exception) -> None:
    """Say whether the model rejects the example input or only the tracing failed."""
    try:
        with torch.no_grad():
            model(*as_args(example_inputs))
    except Exception as plain:  # noqa: BLE001 - any failure of a user model's forward is reported
        raise NortonError(
            f"the model's forward fails on the given example input ({type(plain).__name__}: {plain}); "
            "pass example_inputs the model's forward accepts"
        ) from None
    raise NortonError(
        f"torch-pruning could not trace the channel dependencies of this model ({type(err).__name__}: {err}); "
        "its forward runs on the example input, so an operation inside the model is not supported by the tracer — "
        "the model was not changed; decomposition without pruning still works"
    ) from None


@dataclass
class CoupledGroup:
    """One coupled group while it is being pruned: the report entry, every member
    (in- and out-channel), the convs that produce its channels, and the target width."""

    info: GroupPruning
    root_module: nn.Module
    members: list[tuple[nn.Module, bool, list[int], list[int]]]  # (module, is_out, its idxs, root idxs)
    convs: list[tuple[str, nn.Module]]  # output-channel convs / CPDBlocks / Linears with names
    target: int = 0
    dependencies: Any = None  # the torch-pruning group, for criteria that score it whole
    blocks: int = 1  # >1: the channels feed or leave a grouped conv; every block of total/blocks loses the same ones


def conv_blocks(members) -> int:
    """How many equal blocks a group's channels fall into for the grouped
    (non-depthwise) convs among its members: the least common multiple of their
    ``groups`` (1 when there is none).  Removing the same positions from every
    block keeps each conv group's share of channels equal, as ``groups`` needs."""
    counts = [m.groups for m, *_ in members if is_grouped(m)]
    return math.lcm(*counts) if counts else 1


def _feeds_a_layer(node, depth: int = 0) -> bool:
    """Whether a layer's outputs reach another conv / Linear / attention through
    element-wise ops, norms and reshapes only (an MLP's hidden layer, not a
    prediction head)."""
    for out in node.outputs:
        if out.type in _LAYERS or isinstance(out.module, CPDBlock):
            return True
        if out.type in _PASS_THROUGH and depth < 8 and _feeds_a_layer(out, depth + 1):
            return True
    return False


def _all_groups(graph: tp.DependencyGraph):
    """torch-pruning's groups rooted at every conv / CPDBlock, then at every
    hidden Linear layer not already in one (MLP widths).  Linears that end in a
    head (a classifier, a detector's box predictor) start no group: their
    outputs are the model's, and tracing through a detector's box decoding is
    slow in torch-pruning."""
    visited = set()
    for group in graph.get_all_groups(root_module_types=(nn.Conv2d, CPDBlock)):
        visited.update(item.dep.target.module for item in group if graph.is_out_channel_pruning_fn(item.dep.handler))
        yield group
    for module, node in list(graph.module2node.items()):
        if isinstance(module, nn.Linear) and module not in visited and _feeds_a_layer(node):
            group = graph.get_pruning_group(module, tp.prune_linear_out_channels, list(range(module.out_features)))
            visited.update(item.dep.target.module for item in group
                           if graph.is_out_channel_pruning_fn(item.dep.handler))
            yield group


def collect_groups(model: nn.Module, graph: tp.DependencyGraph, example_inputs, ignored_layers=()) -> tuple[list[CoupledGroup], dict[str, str]]:
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    output_modules = modules_feeding_output(model, example_inputs)
    ignored = set(ignored_layers)
    groups, skipped = [], {}
    for group in _all_groups(graph):
        members, convs = [], []
        for item in group:
            dep, module = item.dep, item.dep.target.module
            if not isinstance(module, nn.Module):
                continue
            is_out = graph.is_out_channel_pruning_fn(dep.handler)
            members.append((module, is_out, list(item.idxs), list(item.root_idxs)))
            if is_out and isinstance(module, ROOT_TYPES) and module in names:
                convs.append((names[module], module))
        if not convs:
            continue
        convs.sort(key=lambda nc: order[nc[0]])
        root_name, root = convs[0]
        total = out_width(root)
        reason = None
        if any(m in ignored for m, is_out, *_ in members if is_out):  # an ignored layer keeps its outputs;
            reason = "ignored layer"  # its inputs follow the layers that produce them (torch-pruning's rule)
        elif any(isinstance(m, tp.ops._OutputOp) for m, *_ in members) or any(
                m in output_modules for m, is_out, *_ in members if is_out):
            reason = "its channels are model outputs"  # e.g. a conv classifier followed by pooling
        blocks = conv_blocks(members)
        if not reason and blocks > 1 and (total % blocks or any(
                idxs != root_idxs for m, _, idxs, root_idxs in members if is_grouped(m))):
            reason = (f"its {total} channels do not split into the {blocks} equal blocks its grouped convolutions need"
                      if total % blocks else "its channels reach a grouped convolution through a concatenation")
        if reason:
            skipped[root_name] = reason
            continue
        info = GroupPruning(root=root_name, layers=[n for n, _ in convs], total=total)
        groups.append(CoupledGroup(info=info, root_module=root, members=members, convs=convs, dependencies=group,
                                   blocks=blocks))
    groups.sort(key=lambda g: order[g.info.root])
    return groups, skipped
