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

from norton.compression.pruners import CUSTOM_PRUNERS, SplitPruner, split_offsets
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


class _ViewShapes(torch.overrides.TorchFunctionMode):
    """Records, for every view / reshape of the traced forward, its input and
    output shapes, keyed by the output's autograd node (what torch-pruning's
    graph keeps of it)."""

    def __init__(self):
        super().__init__()
        self.shapes: dict[Any, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.internal: set[Any] = set()  # views inside a layer norton prunes itself (a CPDBlock's rank sum)
        self.concat_sizes: dict[Any, tuple[int, int, list[int]]] = {}  # concatenations: (dim, ndim, part sizes)
        self.inside = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fn = getattr(out, "grad_fn", None) if isinstance(out, Tensor) else None
        name = fn.name().lower() if fn is not None else ""
        if ("view" in name or "reshape" in name) and args and isinstance(args[0], Tensor):
            if self.inside:
                self.internal.add(fn)
            else:
                self.shapes[fn] = (tuple(args[0].shape), tuple(out.shape))
        elif "catbackward" in name and args and not self.inside:
            dim = (kwargs or {}).get("dim", args[1] if len(args) > 1 else 0)
            parts = [t for t in args[0] if isinstance(t, Tensor)]
            if parts and isinstance(dim, int):
                dim %= out.dim()
                self.concat_sizes[fn] = (dim, out.dim(), [int(t.shape[dim]) for t in parts])
        return out

    def enter(self, *_):
        self.inside += 1

    def leave(self, *_):
        self.inside -= 1


def _splits_channels(before: tuple[int, ...], after: tuple[int, ...]) -> bool:
    """A view that cuts the channel dimension into two (a channel shuffle's
    (b, c, h, w) -> (b, g, c/g, h, w)) or joins two into it (the way back)."""
    def cut(a, b):
        return len(b) == len(a) + 1 and b[0] == a[0] and b[1] * b[2] == a[1] and b[3:] == a[2:] and 1 < b[1] < a[1]
    return len(before) >= 3 and len(after) >= 3 and (cut(before, after) or cut(after, before))


_CHANNELS_LAST = (tp.ops.OPTYPE.LINEAR, tp.ops.OPTYPE.LN, tp.ops.OPTYPE.MHA)
_CHANNELS_FIRST = (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.DEPTHWISE_CONV, tp.ops.OPTYPE.BN, tp.ops.OPTYPE.GN)


def _permuted_layout(node) -> str | None:
    """"last" after a permute / transpose that moves dimension 1 to the end (a
    conv's channels become tokens' features, as in ViT's patch embedding),
    "first" after one that brings the last dimension to 1, else None."""
    fn = node.grad_fn
    dims = getattr(fn, "_saved_dims", None)
    if dims is not None and "permute" in fn.name().lower() and len(dims) > 2:
        dims = [d % len(dims) for d in dims]
        return "last" if dims[-1] == 1 else "first" if dims[1] == len(dims) - 1 else None
    pair = {getattr(fn, "_saved_dim0", None), getattr(fn, "_saved_dim1", None)}
    if "transpose" in type(fn).__name__.lower() and 1 in pair and None not in pair:
        return "last"  # (n, c, l) -> (n, l, c)
    return None


def _channels_first(node) -> bool:
    """Whether the nearest layer upstream of a node (breadth first, through any
    op) is a conv or a BatchNorm (an (n, c, h, w) tensor) rather than a Linear
    or a LayerNorm (features in the last dimension)."""
    frontier, seen = list(node.inputs), set()
    for _ in range(40):
        layers = {n.type for n in frontier if n.type in _CHANNELS_LAST + _CHANNELS_FIRST}
        layers |= {layout for n in frontier if (layout := _permuted_layout(n)) is not None}
        if layers:
            return not layers & {*_CHANNELS_LAST, "last"}
        seen.update(frontier)
        frontier = [i for n in frontier for i in n.inputs if i not in seen]
        if not frontier:
            break
    return False


def _view_kind(before: tuple[int, ...], after: tuple[int, ...], channels_first: bool) -> str:
    """How a view moves channels, for torch-pruning: "shuffle" (it cuts the
    channel dimension, or joins two into it), "same" (channels stay where they
    are: size-1 dimensions added or removed, as (n, c, 1, 1) -> (n, c), or a
    view of the leading dimensions of channels-last features), "mixed" (channels-last features cut or joined, as
    attention heads are: torch-pruning would map them one to one) or "tracer"
    (torch-pruning's own mapping: flattening an (n, c, h, w) tensor)."""
    if [d for d in before if d != 1] == [d for d in after if d != 1]:
        return "same"  # only size-1 dimensions come or go
    if _splits_channels(before, after):
        return "shuffle"
    if channels_first:
        return "tracer"
    return "same" if before[-1] == after[-1] else "mixed"


class _Graph(tp.DependencyGraph):
    """torch-pruning's graph, with the channel shuffles found.  Its tracer maps a
    view that cuts the channel dimension (ShuffleNet's shuffle) with a division
    by zero, or as if channels stayed in place; norton records these views
    (``norton_unmapped``) and traces them as plain element-wise ops, so that the
    groups through them are found — and left whole — and every other group of
    the model can be pruned.  Views of channels-last features are recorded and
    traced the same way: torch-pruning reads dimension 1 as the channels, so it
    mapped Swin's window partition as a flatten (millions of indices, minutes)
    and attention heads one to one; a view of the leading dimensions only keeps
    the channels in place and is no reason to leave a group whole."""

    def __init__(self):
        super().__init__()
        self.REGISTERED_PRUNERS[tp.ops.OPTYPE.SPLIT] = SplitPruner()
        pruners = [*self.REGISTERED_PRUNERS.values(), *self.CUSTOMIZED_PRUNERS.values()]
        self._in_channel_pruning_fn = {p.prune_in_channels for p in pruners if p is not None}
        self._out_channel_pruning_fn = {p.prune_out_channels for p in pruners if p is not None}

    def _trace(self, model, example_inputs, forward_fn, output_transform):
        views = _ViewShapes()
        custom = tuple(t for t in CUSTOM_PRUNERS if isinstance(t, type))
        handles = [h for m in model.modules() if isinstance(m, custom)
                   for h in (m.register_forward_pre_hook(views.enter), m.register_forward_hook(views.leave))]
        try:
            with views:
                module2node = super()._trace(model, example_inputs, forward_fn, output_transform)
        finally:
            for h in handles:
                h.remove()
        self.norton_view_shapes, self.norton_internal_views = views.shapes, views.internal
        self.norton_concat_sizes = views.concat_sizes
        return module2node

    def _build_dependency(self, module2node):
        self.norton_unmapped = {}  # op -> "shuffle", "mixed" or "split"
        for node in module2node.values():
            if node.type == tp.ops.OPTYPE.CONCAT and node.grad_fn in self.norton_concat_sizes:
                self._size_concat(node, *self.norton_concat_sizes[node.grad_fn])
            if node.type != tp.ops.OPTYPE.RESHAPE or node.grad_fn in self.norton_internal_views:
                continue
            shapes = self.norton_view_shapes.get(node.grad_fn)
            first = _channels_first(node)
            if shapes is None:  # a view inside an op (F.linear / matmul on 3-d input fold the leading dimensions)
                kind = "tracer" if first else "same"
            else:
                kind = _view_kind(*shapes, first)
            if kind != "tracer":
                node.type = tp.ops.OPTYPE.ELEMENTWISE
            if kind in ("shuffle", "mixed"):
                self.norton_unmapped[node.module] = kind
        return super()._build_dependency(module2node)

    @staticmethod
    def _size_concat(node, dim: int, ndim: int, sizes: list[int]) -> None:
        """A concatenation's part widths from the trace (torch-pruning guesses
        them from the producers, and fails when one cannot be told: DPN's dual
        paths).  Channels are dimension 1, or the last one of channels-last
        features (Swin's patch merging: torch-pruning read that dim, -1, as a
        huge number and failed); a concatenation along any other dimension
        keeps every channel where it is, as an element-wise op does."""
        if dim == 0 or len(sizes) < 2:  # the batch (torch-pruning joins the model's outputs so): its own
            return
        channels = 1 if _channels_first(node) or ndim == 2 else ndim - 1
        if dim != channels:
            node.type = tp.ops.OPTYPE.ELEMENTWISE
        elif len(sizes) == len(node.inputs):
            node.module.concat_sizes = list(sizes)


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
            graph = _Graph().build_dependency(
                model, example_inputs=example_inputs, customized_pruners=CUSTOM_PRUNERS, verbose=False
            )
        _fix_split_chunks(graph)
        return graph
    except NortonError:
        raise
    except Exception as err:  # tracing failures come from arbitrary user models
        _raise_trace_error(model, example_inputs, err)
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)


def _chunk_of(split_node, out_node) -> int | None:
    """Which output of a split the consumer ``out_node`` reads (autograd's edge
    number), or None when it reads none directly or several."""
    fn = out_node.grad_fn
    chunks = {nr for f, nr in (getattr(fn, "next_functions", None) or ()) if f is split_node.grad_fn}
    return chunks.pop() if len(chunks) == 1 else None


def _chunk_sizes(node) -> None:
    """A ``chunk`` / equal ``split`` on channels: its chunk sizes from the split
    size autograd saved (torch-pruning 1.6 guesses them from the consumers, and
    takes a concatenation's whole width for the chunk that feeds it)."""
    fn = node.grad_fn
    size, dim, shape = (getattr(fn, name, None) for name in ("_saved_split_size", "_saved_dim", "_saved_self_sym_sizes"))
    if not (isinstance(size, int) and size > 0 and dim == 1 and shape and len(shape) > 1):
        return
    total = int(shape[1])
    sizes = [size] * (total // size) + ([total % size] if total % size else [])
    node.module.split_sizes = sizes
    node.module.offsets = split_offsets(sizes)


def _fix_split_chunks(graph: tp.DependencyGraph) -> None:
    """Put every channel split's consumers in the order of the chunks they read.
    torch-pruning (1.6) maps the n-th consumer it traced to the n-th chunk, but
    the trace finds consumers in its own order: in timm's MixedConv2d the first
    half of the channels was mapped to the second conv — a silently wrong cut
    when both halves are pruned alike.  autograd records the chunk on each
    edge.  A split whose consumers do not read one chunk each (a chunk read
    twice or not at all) is listed in ``graph.norton_unmapped``: groups
    through it are left whole."""
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.SPLIT:
            continue
        _chunk_sizes(node)
        chunks = [_chunk_of(node, out) for out in node.outputs]
        if sorted(c for c in chunks if c is not None) == list(range(len(chunks))):
            node.outputs = [out for _, out in sorted(zip(chunks, node.outputs), key=lambda pair: pair[0])]
        else:
            graph.norton_unmapped[node.module] = "split"


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


def all_groups(graph: tp.DependencyGraph):
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


_UNMAPPED = {
    "shuffle": "a channel shuffle (a view that cuts the channel dimension)",
    "mixed": "a view that cuts or joins its features (e.g. into attention heads)",
    "split": "a split whose chunks torch-pruning cannot map",
}


def _group_root(group, members, convs) -> tuple[str, nn.Module, int]:
    """(name, module, channel count) of the layer a group is addressed by: the
    first layer in network order whose output channels are the group's, one
    for one.  Torch-pruning indexes a group by the channels of the layer it was
    found from; a layer behind a split or a concatenation (MixNet's two
    expansion convs, one per half of a mixed depthwise conv) carries only part
    of them and cannot stand for the group."""
    first = group[0].dep.target.module
    total = out_width(first) if isinstance(first, ROOT_TYPES) else len(group[0].idxs)
    full = {id(m) for m, is_out, idxs, root_idxs in members
            if is_out and idxs == root_idxs and len(set(idxs)) == total}
    for name, module in convs:
        if id(module) in full and out_width(module) == total:
            return name, module, total
    return convs[0][0], convs[0][1], total


def _inconsistent(members, total: int) -> bool:
    """Whether torch-pruning's index mapping of a group cannot be right: a layer
    given more channels than it has, or one channel twice, or channels outside
    the group (its tracer loses count through some splits, e.g. Res2Net's)."""
    for m, is_out, idxs, root_idxs in members:
        width = out_width(m) if is_out and isinstance(m, ROOT_TYPES) else None
        if (len(set(idxs)) != len(idxs) or len(idxs) != len(root_idxs) or any(not 0 <= r < total for r in root_idxs)
                or (width is not None and (len(idxs) > width or any(not 0 <= i < width for i in idxs)))):
            return True
    return False


def tied_blocks(group, total: int) -> int | None:
    """How many equal blocks a group's channels fall into because one channel of
    a layer is several channels of the group (1 when none is), or None when
    such ties follow no block pattern.

    A Ghost module concatenates a conv's outputs with a depthwise conv of them:
    where that concatenation is the group, the conv's channel j is group channels
    j and C/2 + j.  torch-pruning keeps one entry per layer, so it lists the conv
    at one of the two and its BatchNorm (or activation) at the other, and a cut
    removes different channels from each (GhostNet came out silently wrong).
    Along every edge that keeps channels in place (no concatenation, split or
    flatten between its ends) both ends must map a channel to the same group
    channel; where they do not, the two group channels are one channel of the
    model.  When the ties pair channel p of every block of total/b channels with
    the same p of the others, the group is pruned as b blocks (the same positions
    go from each, as for grouped convs) and every layer loses the same channels
    whichever entry torch-pruning kept."""
    entries = {(item.dep.target.module, item.dep.handler): dict(zip(item.idxs, item.root_idxs)) for item in group}
    parent = list(range(total))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for item in group:
        dep = item.dep
        if any(m is not None for m in dep.index_mapping):  # indices move between the two ends
            continue
        source = entries.get((dep.source.module, dep.trigger))
        if source is None:
            continue
        for local, root in zip(item.idxs, item.root_idxs):
            other = source.get(local)
            if other is not None and other != root and 0 <= other < total and 0 <= root < total:
                parent[find(root)] = find(other)
    classes: dict[int, list[int]] = {}
    for position in range(total):
        classes.setdefault(find(position), []).append(position)
    sizes = {len(c) for c in classes.values()}
    if sizes == {1}:
        return 1
    if len(sizes) != 1:
        return None
    blocks = sizes.pop()
    size = total // blocks
    regular = total % blocks == 0 and all(c == [c[0] + k * size for k in range(blocks)] for c in classes.values())
    return blocks if regular else None


def collect_groups(model: nn.Module, graph: tp.DependencyGraph, example_inputs, ignored_layers=()) -> tuple[list[CoupledGroup], dict[str, str]]:
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    output_modules = modules_feeding_output(model, example_inputs)
    ignored = set(ignored_layers)
    groups, skipped = [], {}
    for group in all_groups(graph):
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
        root_name, root, total = _group_root(group, members, convs)
        reason = None
        unmapped = [graph.norton_unmapped[m] for m, *_ in members if m in getattr(graph, "norton_unmapped", {})]
        if unmapped:
            reason = f"its channels pass through {_UNMAPPED[unmapped[0]]}, so it is left whole"
        elif _inconsistent(members, total) or not any(m is root and is_out and idxs == root_idxs
                                                    for m, is_out, idxs, root_idxs in members):
            reason = ("torch-pruning's tracer maps its channels inconsistently (through a split or a concatenation "
                      "it does not follow), so it is left whole")
        elif any(m in ignored for m, is_out, *_ in members if is_out):  # an ignored layer keeps its outputs;
            reason = "ignored layer"  # its inputs follow the layers that produce them (torch-pruning's rule)
        elif any(isinstance(m, tp.ops._OutputOp) for m, *_ in members) or any(
                m in output_modules for m, is_out, *_ in members if is_out):
            reason = "its channels are model outputs"  # e.g. a conv classifier followed by pooling
        blocks, ties = conv_blocks(members), 1 if reason else tied_blocks(group, total)  # a group left whole: no need
        if ties is None:
            reason = ("one channel of a layer is several channels of the group in no regular pattern "
                      "(torch-pruning would cut the layer and its BatchNorm at different channels), so it is left whole")
        elif ties > 1:
            blocks = math.lcm(blocks, ties)
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
