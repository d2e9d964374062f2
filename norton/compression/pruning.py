"""Stage ② of NORTON: structured filter pruning of any model.

torch-pruning's ``DependencyGraph`` finds the coupled channel groups (residual
adds, concatenations, BatchNorm, heads); norton decides per group which filters
stay, with a factor-based criterion on the group's CPDBlocks (summed over the
coupled layers) or the filters' L2 norm where there are no factors, and respects
the fixed channel placement of option-A (zero-padding) shortcuts.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from tqdm.auto import tqdm

from norton.compression.criteria import (
    get_criterion,
    greedy_eliminate,
    normalized_sum,
    top_scores,
)
from norton.compression.pruners import (
    CUSTOM_PRUNERS,
    select_cpd_in_channels,
    select_cpd_out_channels,
)
from norton.core import ChannelPadShortcut, CPDBlock, count_macs, parse_compress_rate
from norton.core.surgery import as_args, flatten_tensors
from norton.errors import NortonError
from norton.models import create_model

ROOT_TYPES = (nn.Conv2d, CPDBlock)


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


@dataclass
class PruneReport:
    groups: list[GroupPruning]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    skipped: dict[str, str] = field(default_factory=dict)  # root -> why the group was left whole

    def widths(self) -> dict[str, int]:
        """Kept channels per group root: enough to rebuild the pruned architecture."""
        return {g.root: g.width for g in self.groups}

    def table(self) -> str:
        rows = [f"{'group (root layer)':<34} {'kept/total':>11} {'layers':>6}  criterion"]
        for g in self.groups:
            rows.append(f"{g.root:<34} {g.width:>5}/{g.total:<5} {len(g.layers):>6}  {g.criterion}")
        for root, why in self.skipped.items():
            rows.append(f"{root:<34} {'—':>11} {'':>6}  not pruned: {why}")
        rows.append(
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({100 * (1 - self.macs_after / max(self.macs_before, 1)):.2f}% ↓); "
            f"params {self.params_before:,} -> {self.params_after:,} "
            f"({100 * (1 - self.params_after / max(self.params_before, 1)):.2f}% ↓)"
        )
        return "\n".join(rows)


# -- graph ------------------------------------------------------------------------------
def _modules_feeding_output(model: nn.Module, example_inputs) -> set[nn.Module]:
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
        raise NortonError(
            f"the model cannot be traced with the given example input ({type(err).__name__}: {err}); "
            "pass example_inputs the model's forward accepts"
        ) from None
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)


@dataclass
class _Group:
    info: GroupPruning
    root_module: nn.Module
    members: list[tuple[nn.Module, bool, list[int], list[int]]]  # (module, is_out, its idxs, root idxs)
    convs: list[tuple[str, nn.Module]]  # output-channel convs / CPDBlocks with names
    target: int = 0
    dependencies: Any = None  # the torch-pruning group, for criteria that score it whole


def collect_groups(model: nn.Module, graph: tp.DependencyGraph, example_inputs, ignored_layers=()) -> tuple[list[_Group], dict[str, str]]:
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    output_modules = _modules_feeding_output(model, example_inputs)
    ignored = set(ignored_layers)
    groups, skipped = [], {}
    for group in graph.get_all_groups(root_module_types=ROOT_TYPES):
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
        total = root.out_channels
        reason = None
        if any(m in ignored for m, is_out, *_ in members if is_out):  # an ignored layer keeps its outputs;
            reason = "ignored layer"  # its inputs follow the layers that produce them (torch-pruning's rule)
        elif any(m in output_modules for m, is_out, *_ in members if is_out):
            reason = "its channels are model outputs"
        elif any(isinstance(m, nn.Conv2d) and 1 < m.groups for m, *_ in members):
            reason = "grouped convolution"
        if reason:
            skipped[root_name] = reason
            continue
        info = GroupPruning(root=root_name, layers=[n for n, _ in convs], total=total)
        groups.append(_Group(info=info, root_module=root, members=members, convs=convs, dependencies=group))
    groups.sort(key=lambda g: order[g.info.root])
    return groups, skipped


# -- targets ------------------------------------------------------------------------------
def _keep_count(total: int, rate: float, where: str) -> int:
    if not 0.0 <= rate < 1.0:
        raise NortonError(f"rate {rate!r} for {where} is outside [0, 1)")
    keep = int(total * (1.0 - rate))
    if keep < 1:
        raise NortonError(f"rate {rate!r} would remove every filter of {where} ({total} filters)")
    return keep


def _zoo_targets(model: nn.Module, groups: list[_Group], compress_rate) -> None:
    spec = getattr(model, "norton_spec", None)
    if not spec:
        raise NortonError(
            "a compress-rate list needs a zoo model (norton.create_model); for other models "
            "give a dict {module name: rate}, an amount, or target_macs"
        )
    kwargs = {k: v for k, v in spec.items() if k not in ("arch", "rank", "compress_rate")}
    reference = create_model(spec["arch"], rank=0, compress_rate=compress_rate, **kwargs)
    for g in groups:
        target = reference.get_submodule(g.info.root).out_channels
        if target > g.info.total:
            raise NortonError(
                f"layer {g.info.root} has {g.info.total} filters, fewer than the {target} that "
                f"compress rate {compress_rate!r} asks for; was the model pruned already?"
            )
        g.target = target


def _dict_targets(model: nn.Module, groups: list[_Group], rates: Mapping[str, float], skipped: Mapping[str, str]) -> None:
    by_layer = {name: g for g in groups for name in g.info.layers}
    known = {n for n, _ in model.named_modules()}
    for g in groups:
        g.target = g.info.total
    chosen: dict[int, tuple[str, float]] = {}
    for name, rate in rates.items():
        if name not in known:
            raise NortonError(f"the model has no module named {name!r}")
        if name in skipped:
            raise NortonError(f"layer {name!r} cannot be pruned: {skipped[name]}")
        if name not in by_layer:
            raise NortonError(f"{name!r} is not a prunable convolution (Conv2d with groups=1 or CPDBlock)")
        g = by_layer[name]
        if id(g) in chosen and chosen[id(g)][1] != rate:
            other = chosen[id(g)][0]
            raise NortonError(
                f"{name!r} and {other!r} share their output channels (coupled by an add or concat) "
                f"but got different rates {rate!r} and {chosen[id(g)][1]!r}"
            )
        chosen[id(g)] = (name, rate)
        g.target = _keep_count(g.info.total, float(rate), f"layer {name!r}")


def _amount_targets(groups: list[_Group], amount: float) -> None:
    for g in groups:
        g.target = _keep_count(g.info.total, amount, f"layer {g.info.root!r}")


# -- selection ----------------------------------------------------------------------------
def _dense_weight(module: nn.Module) -> Tensor:
    return module.dense_weight() if isinstance(module, CPDBlock) else module.weight


def _group_scores(g: _Group, criterion_name: str, seed: int):
    """(kind, matrix or scores, label) for the group under the criterion."""
    criterion = get_criterion(criterion_name)
    if criterion.on_group:
        with torch.no_grad():
            scores = criterion.compute(g.dependencies)
        if scores.numel() != g.info.total:
            raise NortonError(f"criterion {criterion.name!r} gave {scores.numel()} scores for the {g.info.total} channels of {g.info.root}")
        return "score", scores, criterion.name
    if criterion.needs_factors:
        blocks = [m for _, m in g.convs if isinstance(m, CPDBlock)]
        if blocks:
            with torch.no_grad():
                matrix = normalized_sum([criterion.compute(b.factors()) for b in blocks])
            return criterion.kind, matrix, criterion.name
        plain = [(n, m) for n, m in g.convs if m.kernel_size[0] * m.kernel_size[1] > 1]
        if plain:
            raise NortonError(
                f"criterion {criterion.name!r} needs CP factors but layer {plain[0][0]!r} is a plain "
                f"{plain[0][1].kernel_size[0]}×{plain[0][1].kernel_size[1]} conv; decompose the model "
                "first (norton.decompose) or use criterion 'l2' or 'random'"
            )
        criterion = get_criterion("l2")  # 1×1 convs have no CP factors: L2 norm, as in the paper
        label = "l2 (no CP factors)"
    else:
        label = criterion.name
    with torch.no_grad():
        scores = normalized_sum([criterion.compute(_dense_weight(m), seed=seed) for _, m in g.convs])
    return "score", scores, label


def _select(g: _Group, criterion: str, seed: int, *, protected=(), allowed=None) -> tuple[list[int], str]:
    if g.target == g.info.total and not protected and allowed is None:
        return list(range(g.info.total)), "unpruned"
    kind, values, label = _group_scores(g, criterion, seed)
    if kind == "score":
        return top_scores(values, g.target, protected=protected, allowed=allowed), label
    return greedy_eliminate(values, g.target, similarity=kind == "similarity", protected=protected, allowed=allowed), label


def _shortcut_edges(groups: list[_Group]) -> list[tuple[ChannelPadShortcut, _Group, _Group]]:
    """(shortcut, group of its input channels, group of its output channels)."""
    where_in, where_out = {}, {}
    for g in groups:
        for m, is_out, *_ in g.members:
            if isinstance(m, ChannelPadShortcut):
                (where_out if is_out else where_in)[m] = g
    return [(s, where_in[s], where_out[s]) for s in where_out if s in where_in]


def plan_selection(groups: list[_Group], criterion: str, seed: int = 0, progress: bool = False) -> None:
    """Fill every group's ordered ``kept`` list.

    Across an option-A shortcut P -> Q (fixed offset ``off`` of P's channels
    inside Q), the pruned shortcut places P's kept channels centred in Q, so:
    if Q keeps at least as many channels as P, P's kept channels (shifted by
    ``off``) are pinned in the middle of Q and the rest of Q is chosen by the
    criterion; if Q keeps fewer, Q is chosen among P's kept channels and P is
    reordered so that they sit in its middle (or, when P's order is itself
    pinned, Q takes P's middle).  The result computes what the original model
    computes on the kept channels.
    """
    incoming = {id(q): (s, p) for s, p, q in _shortcut_edges(groups)}
    pinned_order: set[int] = set()  # groups whose order is constrained
    for g in tqdm(groups, desc="select", unit="group", disable=not progress):
        edge = incoming.get(id(g))
        if edge is None:
            g.info.kept, g.info.criterion = _select(g, criterion, seed)
            continue
        shortcut, p = edge
        off = shortcut.before
        w_p, w_q = p.target, g.target
        before = (w_q - w_p) // 2
        shifted = [k + off for k in p.info.kept]
        if any(not 0 <= s < g.info.total for s in shifted):
            raise NortonError(f"shortcut into {g.info.root}: channels do not fit the original placement")
        pinned_order.add(id(g))
        if w_q >= w_p:
            kept, label = _select(g, criterion, seed, protected=shifted)
            free = [k for k in kept if k not in set(shifted)]
            g.info.kept = free[:before] + shifted + free[before:]
            g.info.criterion = label + " (+ shortcut placement)"
        elif id(p) not in pinned_order:
            chosen, label = _select(g, criterion, seed, allowed=shifted)
            sources = [c - off for c in chosen]
            rest = [k for k in p.info.kept if k not in set(sources)]
            crop = -before
            p.info.kept = rest[:crop] + sources + rest[crop:]
            pinned_order.add(id(p))
            g.info.kept = chosen
            g.info.criterion = label + " (+ shortcut placement)"
        else:
            crop = -before
            g.info.kept = [k + off for k in p.info.kept[crop:crop + w_q]]
            g.info.criterion = "placement (forced by the shortcut)"


# -- surgery ------------------------------------------------------------------------------
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


def apply_selection(graph: tp.DependencyGraph, groups: list[_Group]) -> None:
    """Remove the channels not kept, then put the kept ones in their planned order.
    Frozen parameters stay frozen (torch-pruning's pruners make new, trainable ones)."""
    frozen = {(module, name) for g in groups for module, *_ in g.members
              for name, p in module.named_parameters(recurse=False) if not p.requires_grad}
    _apply_selection(graph, groups)
    for module, name in frozen:
        getattr(module, name).requires_grad_(False)


def _apply_selection(graph: tp.DependencyGraph, groups: list[_Group]) -> None:
    for g in groups:
        keep = g.info.kept
        removed = sorted(set(range(g.info.total)) - set(keep))
        if removed:
            pruner = graph.get_pruner_of_module(g.root_module)
            group = graph.get_pruning_group(g.root_module, pruner.prune_out_channels, removed)
            if not graph.check_pruning_group(group):
                raise NortonError(f"pruning {len(removed)} of {g.info.total} filters of {g.info.root} would leave a layer empty")
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


# -- the entry point -----------------------------------------------------------------------
def prune(
    model: nn.Module,
    compress_rate: str | Sequence[float] | Mapping[str, float] | None = None,
    *,
    amount: float | None = None,
    example_inputs,
    criterion: str = "pabs",
    ignored_layers: Sequence[nn.Module] = (),
    target_macs: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> PruneReport:
    """Prune ``model`` in place and return what was kept.

    Give exactly one of: ``compress_rate`` — a zoo list or string (SPEC meaning,
    zoo models only) or a dict ``{module name: rate}``; ``amount`` — one rate for
    every prunable group; ``target_macs`` — the fraction of MACs to remove
    (a uniform amount is searched to within 1 percentage point).
    ``criterion``: pabs (default), vbd, csa (need CPDBlocks), l2, random, l1, fpgm.
    ``ignored_layers`` keep their output channels; their input channels still
    follow the layers that produce them (as in torch-pruning), so ignoring the
    classifier keeps the model's outputs and still prunes the block feeding it.
    """
    given = [x is not None for x in (compress_rate, amount, target_macs)]
    if sum(given) != 1:
        raise NortonError("give exactly one of compress_rate, amount or target_macs")
    get_criterion(criterion)  # unknown names fail before any work
    if amount is not None and not (isinstance(amount, (int, float)) and 0.0 <= amount < 1.0):
        raise NortonError(f"amount must be in [0, 1), got {amount!r}")
    if target_macs is not None:
        if not isinstance(target_macs, (int, float)) or not 0.0 < target_macs < 1.0:
            raise NortonError(f"target_macs must be a fraction in (0, 1), got {target_macs!r}")
        amount = _search_amount(model, example_inputs, target_macs, ignored_layers)

    graph = build_graph(model, example_inputs)  # first: it names an input the model rejects
    macs_before = count_macs(model, example_inputs)
    params_before = sum(p.numel() for p in model.parameters())
    groups, skipped = collect_groups(model, graph, example_inputs, ignored_layers)
    if isinstance(compress_rate, Mapping):
        _dict_targets(model, groups, compress_rate, skipped)
    elif compress_rate is not None:
        parse_compress_rate(compress_rate)  # a malformed string is named before anything else
        _zoo_targets(model, groups, compress_rate)
    else:
        _amount_targets(groups, float(amount))
    plan_selection(groups, criterion, seed, progress)
    apply_selection(graph, groups)
    return PruneReport(
        groups=[g.info for g in groups],
        macs_before=macs_before,
        macs_after=count_macs(model, example_inputs),
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        skipped=skipped,
    )


def _search_amount(model: nn.Module, example_inputs, target: float, ignored_layers) -> float:
    """Uniform amount whose pruning removes ``target`` of the MACs (±1 point)."""
    base = count_macs(model, example_inputs)

    def removed(amount: float) -> float:
        trial = copy.deepcopy(model)
        mapping = dict(zip(model.modules(), trial.modules()))
        prune(trial, amount=amount, example_inputs=example_inputs, criterion="random",
              ignored_layers=[mapping[m] for m in ignored_layers])
        return 1.0 - count_macs(trial, example_inputs) / base

    groups, _ = collect_groups(model, build_graph(model, example_inputs), example_inputs, ignored_layers)
    if not groups:
        raise NortonError("target_macs: the model has no prunable layer")
    low, high = 0.0, 1.0 - 1.0 / min(g.info.total for g in groups)  # the most that keeps 1 filter everywhere
    most = removed(high)
    if most < target - 0.01:
        raise NortonError(f"target_macs {target} is out of reach: keeping one filter per prunable layer removes {most:.1%} of the MACs")
    best = high
    for _ in range(20):
        mid = (low + high) / 2
        got = removed(mid)
        if abs(got - target) <= 0.005:
            return mid
        if got < target:
            low = mid
        else:
            high, best = mid, mid
    return best


def restructure(model: nn.Module, widths: Mapping[str, int], example_inputs) -> None:
    """Prune ``model`` to the recorded output ``widths`` of its convolutions
    (weights arbitrary: they are loaded afterwards).  Used to rebuild a pruned
    architecture from a checkpoint."""
    graph = build_graph(model, example_inputs)
    groups, _ = collect_groups(model, graph, example_inputs)
    for g in groups:
        target = widths.get(g.info.root, g.info.total)
        if not 1 <= target <= g.info.total:
            raise NortonError(f"recorded width {target} of {g.info.root} does not fit its {g.info.total} filters")
        g.target = target
        g.info.kept = list(range(target))
    apply_selection(graph, groups)
    got = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, ROOT_TYPES)}
    wrong = next((n for n, w in widths.items() if got.get(n) != w), None)
    if wrong is not None:
        raise NortonError(f"cannot rebuild the pruned architecture: layer {wrong!r} has {got.get(wrong)} filters, the record says {widths[wrong]}")
