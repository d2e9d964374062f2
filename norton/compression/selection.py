"""Which filters of every coupled group stay: targets (how many) and selection (which).

Targets come from a zoo compress rate, a ``{layer: rate}`` dict or one amount.
Selection scores the group with a criterion — factor-based (summed over the
group's CPDBlocks) or per-filter — and respects the fixed channel placement of
option-A (zero-padding) shortcuts.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from norton.compression.criteria import (
    get_criterion,
    greedy_eliminate,
    list_criteria,
    normalized_mean,
    top_scores,
)
from norton.compression.graph import CoupledGroup, out_width
from norton.core import ChannelPadShortcut, CPDBlock, TuckerBlock, is_decomposable
from norton.errors import NortonError
from norton.models import create_model


def _keep_count(total: int, rate: float, where: str) -> int:
    if not 0.0 <= rate < 1.0:
        raise NortonError(f"rate {rate!r} for {where} is outside [0, 1)")
    keep = int(total * (1.0 - rate))
    if keep < 1:
        raise NortonError(f"rate {rate!r} would remove every filter of {where} ({total} filters)")
    return keep


def set_zoo_targets(model: nn.Module, groups: list[CoupledGroup], compress_rate) -> None:
    spec = getattr(model, "norton_spec", None)
    if not spec:
        raise NortonError(
            "a compress-rate list needs a zoo model (norton.create_model); for other models "
            "give a dict {module name: rate}, an amount, or target_macs"
        )
    kwargs = {k: v for k, v in spec.items() if k not in ("arch", "rank", "compress_rate")}
    reference = create_model(spec["arch"], rank=0, compress_rate=compress_rate, **kwargs)
    for g in groups:
        target = out_width(reference.get_submodule(g.info.root))
        if target > g.info.total:
            raise NortonError(
                f"layer {g.info.root} has {g.info.total} filters, fewer than the {target} that "
                f"compress rate {compress_rate!r} asks for; was the model pruned already?"
            )
        g.target = target


def set_dict_targets(model: nn.Module, groups: list[CoupledGroup], rates: Mapping[str, float], skipped: Mapping[str, str]) -> None:
    """Targets from ``{module name: rate}`` (the fraction of its filters to remove)."""
    _set_named_targets(model, groups, rates, skipped, "rate",
                       lambda g, rate, name: _keep_count(g.info.total, float(rate), f"layer {name!r}"))


def set_count_targets(model: nn.Module, groups: list[CoupledGroup], keep: Mapping[str, int], skipped: Mapping[str, str]) -> None:
    """Targets from ``{module name: filters to keep}``."""
    def count(g: CoupledGroup, value, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= g.info.total:
            raise NortonError(f"keep[{name!r}] must be an integer from 1 to its {g.info.total} filters, got {value!r}")
        return value

    _set_named_targets(model, groups, keep, skipped, "filter count", count)


def _set_named_targets(model, groups, values: Mapping, skipped, what: str, to_count) -> None:
    by_layer = {name: g for g in groups for name in g.info.layers}
    modules = dict(model.named_modules())
    known = set(modules)
    for name, module in modules.items():  # a TuckerBlock's filters are those of its last conv
        if isinstance(module, TuckerBlock) and f"{name}.2" in by_layer:
            by_layer[name] = by_layer[f"{name}.2"]
    for g in groups:
        g.target = g.info.total
    chosen: dict[int, tuple[str, object]] = {}
    for name, value in values.items():
        if name not in known:
            raise NortonError(f"the model has no module named {name!r}")
        if name in skipped:
            raise NortonError(f"layer {name!r} cannot be pruned: {skipped[name]}")
        if name not in by_layer:
            raise NortonError(f"{name!r} is not a prunable convolution (Conv2d with groups=1, CPDBlock or TuckerBlock)")
        g = by_layer[name]
        if id(g) in chosen and chosen[id(g)][1] != value:
            other = chosen[id(g)][0]
            raise NortonError(
                f"{name!r} and {other!r} share their output channels (coupled by an add or concat) "
                f"but got different {what}s {value!r} and {chosen[id(g)][1]!r}"
            )
        chosen[id(g)] = (name, value)
        g.target = to_count(g, value, name)


def set_amount_targets(groups: list[CoupledGroup], amount: float) -> None:
    for g in groups:
        g.target = _keep_count(g.info.total, amount, f"layer {g.info.root!r}")


def set_global_targets(groups: list[CoupledGroup], amount: float, criterion: str, seed: int) -> None:
    """One ranking across every group (torch-pruning's global pruning): each
    group's filter scores divided by their mean, so that layers of different
    scale compare, then the lowest ``amount`` of all filters go — every group
    keeps at least one."""
    pooled: list[tuple[float, int]] = []
    for index, g in enumerate(groups):
        kind, values, _ = _group_scores(g, criterion, seed)
        if kind != "score":
            raise NortonError(f"a global ranking needs one score per filter, but criterion {criterion!r} compares "
                              f"filters within a layer ({kind}s of pairs); use l2, l1, fpgm or random, or rank per layer")
        scores = values.detach().to(device="cpu", dtype=torch.float64)
        scale = scores.abs().mean()
        pooled += [(float(v), index) for v in (scores / scale if scale > 0 else scores)]
    left = [g.info.total for g in groups]
    to_remove = round(amount * len(pooled))
    for _, index in sorted(pooled):
        if to_remove == 0:
            break
        if left[index] > 1:
            left[index] -= 1
            to_remove -= 1
    for g, width in zip(groups, left):
        g.target = width


# -- selection ----------------------------------------------------------------------------
def _dense_weight(module: nn.Module) -> Tensor:
    return module.dense_weight() if isinstance(module, CPDBlock) else module.weight


def _root_positions(g: CoupledGroup, module: nn.Module) -> tuple[list[int], list[int]] | None:
    """(the module's channels in the group, their positions among the group's
    channels), or None when the module's channels are the group's, one for one.
    A layer behind a split or a concatenation (MixNet's mixed convs, Res2Net's
    scales, a Ghost module's halves) carries only part of the group."""
    mapping: dict[int, int] = {}
    for m, is_out, idxs, root_idxs in g.members:
        if m is module and is_out:
            for i, r in zip(idxs, root_idxs):
                mapping.setdefault(int(i), int(r))
    channels = sorted(mapping)
    width = out_width(module)
    if channels == list(range(width)) == [mapping[c] for c in channels] and width == g.info.total:
        return None
    return channels, [mapping[c] for c in channels]


def _in_group(g: CoupledGroup, named_values) -> Tensor:
    """Per-layer scores (or pairwise matrices) as one, in the group's channel order."""
    values, positions = [], []
    for module, v in named_values:
        where = _root_positions(g, module)
        if where is not None:
            channels = torch.as_tensor(where[0], dtype=torch.long, device=v.device)
            v = v[channels][:, channels] if v.dim() == 2 else v[channels]
            where = where[1]
        values.append(v)
        positions.append(where)
    return normalized_mean(values, positions, size=g.info.total)


def _group_scores(g: CoupledGroup, criterion_name: str, seed: int):
    """(kind, matrix or scores, label) for the group under the criterion."""
    criterion = get_criterion(criterion_name)
    if criterion.on_group and criterion.per_weight and any(isinstance(m, CPDBlock) for _, m in g.convs):
        # torch-pruning's importances see plain layers only: score the CP filters' dense kernels instead
        with torch.no_grad():
            scores = _in_group(g, [(m, criterion.per_weight(_dense_weight(m))) for _, m in g.convs])
        return "score", scores, f"{criterion.name} (dense kernels)"
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
                matrix = _in_group(g, [(b, criterion.compute(b.factors())) for b in blocks])
            return criterion.kind, matrix, criterion.name
        plain = [(n, m) for n, m in g.convs if is_decomposable(m)]
        if plain:
            raise NortonError(
                f"criterion {criterion.name!r} needs CP factors but layer {plain[0][0]!r} is a plain "
                f"{plain[0][1].kernel_size[0]}×{plain[0][1].kernel_size[1]} conv; decompose the model "
                "first (norton.decompose) or use a criterion of the dense weights: "
                + ", ".join(repr(c) for c in list_criteria() if not get_criterion(c).needs_factors)
            )
        criterion = get_criterion("l2")  # 1×1 and depthwise convs have no CP factors: L2 norm, as in the paper
        label = "l2 (no CP factors)"
    else:
        label = criterion.name
    with torch.no_grad():
        scores = _in_group(g, [(m, criterion.compute(_dense_weight(m), seed=seed)) for _, m in g.convs])
    return "score", scores, label


def nearest_multiple(count: int, multiple: int, total: int) -> int:
    """``count`` of a group's ``total`` filters moved to the nearest positive
    multiple of ``multiple`` no larger than ``total`` (ties: the larger); below
    the first multiple, that multiple — or ``total`` when the group is smaller.
    A count of ``total`` or more stays as it is (the group kept whole)."""
    if multiple == 1 or count >= total:
        return count
    allowed = [w for w in (multiple * (count // multiple), multiple * -(-count // multiple)) if 0 < w <= total]
    return min(allowed, key=lambda w: (abs(w - count), -w)) if allowed else min(multiple, total)


def round_to_blocks(groups: list[CoupledGroup], round_to: int | None = None) -> None:
    """Kept widths the layers can run: a group cut into ``blocks`` equal blocks
    by grouped convs keeps a multiple of ``blocks`` channels, and with
    ``round_to`` every pruned group keeps a multiple of ``round_to`` as well
    (of their least common multiple) — the widths tensor cores and vector
    units run at full speed (torch-pruning's ``round_to``); see ``nearest_multiple``.
    The rounding error is carried from group to group (in model order), so that
    narrow groups, which can only take a few widths, do not all round the same
    way: the filters kept in all stay near what the targets asked for."""
    carry = 0.0
    for g in groups:
        if round_to and round_to > 1:
            if g.target >= g.info.total:
                continue
            wanted = g.target + carry
            g.target = nearest_multiple(max(1, min(round(wanted), g.info.total)), math.lcm(g.blocks, round_to),
                                        g.info.total)
            carry = wanted - g.target
        elif g.blocks > 1:  # blocks only (kept as it always was: Python's rounding)
            g.target = g.blocks * max(1, round(g.target / g.blocks))


def _fold_blocks(kind: str, values: Tensor, blocks: int) -> Tensor:
    """Scores (or pairwise matrix) of the positions inside a block, summed over the blocks."""
    size = values.shape[0] // blocks
    if kind == "score":
        return values.reshape(blocks, size).sum(0)
    return values.reshape(blocks, size, blocks, size).diagonal(dim1=0, dim2=2).sum(-1)


def _select(g: CoupledGroup, criterion: str, seed: int, *, protected=(), allowed=None, scores: dict | None = None
            ) -> tuple[list[int], str]:
    if g.target == g.info.total and not protected and allowed is None:
        return list(range(g.info.total)), "unpruned"
    scores = {} if scores is None else scores
    if g.info.root not in scores:
        scores[g.info.root] = _group_scores(g, criterion, seed)
    kind, values, label = scores[g.info.root]
    if g.blocks > 1:  # the same positions go from every block (torch-pruning's rule for grouped convs)
        if protected or allowed is not None:
            raise NortonError(f"group {g.info.root}: a grouped convolution and a fixed channel placement together "
                              "are not supported; pass its layers in ignored_layers")
        size = g.info.total // g.blocks
        folded = _fold_blocks(kind, values, g.blocks)
        count = g.target // g.blocks
        positions = (top_scores(folded, count) if kind == "score"
                     else greedy_eliminate(folded, count, similarity=kind == "similarity"))
        return [b * size + p for b in range(g.blocks) for p in positions], f"{label} (same in each of {g.blocks} blocks)"
    if kind == "score":
        return top_scores(values, g.target, protected=protected, allowed=allowed), label
    return greedy_eliminate(values, g.target, similarity=kind == "similarity", protected=protected, allowed=allowed), label


def _shortcut_edges(groups: list[CoupledGroup]) -> list[tuple[ChannelPadShortcut, CoupledGroup, CoupledGroup]]:
    """(shortcut, group of its input channels, group of its output channels)."""
    where_in, where_out = {}, {}
    for g in groups:
        for m, is_out, *_ in g.members:
            if isinstance(m, ChannelPadShortcut):
                (where_out if is_out else where_in)[m] = g
    return [(s, where_in[s], where_out[s]) for s in where_out if s in where_in]


def plan_selection(groups: list[CoupledGroup], criterion: str, seed: int = 0, progress: bool = False,
                   scores: dict | None = None) -> None:
    """Fill every group's ordered ``kept`` list.

    ``scores``: a dict that keeps each group's criterion scores (by root) from one
    call to the next — for many selections of the same unchanged groups at other
    filter counts (the planner's options).

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
            g.info.kept, g.info.criterion = _select(g, criterion, seed, scores=scores)
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
            kept, label = _select(g, criterion, seed, protected=shifted, scores=scores)
            free = [k for k in kept if k not in set(shifted)]
            g.info.kept = free[:before] + shifted + free[before:]
            g.info.criterion = label + " (+ shortcut placement)"
        elif id(p) not in pinned_order:
            chosen, label = _select(g, criterion, seed, allowed=shifted, scores=scores)
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
