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

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from norton.compression.attention import (
    attention_targets,
    prune_attentions,
    restructure_attentions,
    window_attentions,
    zero_positions,
)
from norton.compression.criteria import get_criterion
from norton.compression.graph import (
    ROOT_TYPES,
    GroupPruning,
    build_graph,
    collect_groups,
    out_width,
)
from norton.compression.removal import EmptyLayerError, apply_or_restore, apply_selection
from norton.compression.selection import (
    plan_selection,
    round_to_blocks,
    set_amount_targets,
    set_count_targets,
    set_dict_targets,
    set_global_targets,
    set_zoo_targets,
)
from norton.core import ChannelPadShortcut, count_macs, parse_compress_rate
from norton.core.surgery import as_args, output_shapes, unchanged_on_error
from norton.errors import NortonError

__all__ = ["GroupPruning", "PruneReport", "build_graph", "collect_groups", "prune", "prune_in_place", "restructure",
           "silenced_channels", "zero_channels", "zeroed_equivalent"]


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
    keep: Mapping[str, int] | None = None,
    global_ranking: bool = False,
    round_to: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> PruneReport:
    """Prune ``model`` in place and return what was kept.

    Give exactly one of: ``compress_rate`` — a zoo list or string (SPEC meaning,
    zoo models only) or a dict ``{module name: rate}``; ``amount`` — one rate for
    every prunable group; ``target_macs`` — the fraction of MACs to remove
    (a uniform amount is searched to within 1 percentage point); ``keep`` —
    ``{module name: filters to keep}`` (what a ``norton.plan`` gives).
    ``criterion``: pabs (default), vbd, csa (need CPDBlocks), l2, random, l1, fpgm.
    ``global_ranking`` (with ``amount`` or ``target_macs``): one ranking of all
    filters across layers (scores normalised per group) instead of the same
    rate in every layer; needs a per-filter score (l2, l1, fpgm, random).
    ``ignored_layers`` keep their output channels; their input channels still
    follow the layers that produce them (as in torch-pruning), so ignoring the
    classifier keeps the model's outputs and still prunes the block feeding it.
    ``round_to``: every pruned group keeps a multiple of this many filters (the
    nearest to its target; torch-pruning's name) — widths that GPUs' tensor
    cores (multiples of 8 in half precision) and CPUs' vector units run at full
    speed; with ``target_macs`` the search counts the rounded widths.
    """
    given = [x is not None for x in (compress_rate, amount, target_macs, keep)]
    if sum(given) != 1:
        raise NortonError("give exactly one of compress_rate, amount, target_macs or keep")
    get_criterion(criterion)  # unknown names fail before any work
    check_round_to(round_to)
    if global_ranking and amount is None and target_macs is None:
        raise NortonError("global_ranking decides the widths itself: give amount or target_macs, not a rate or counts")
    if amount is not None and not (isinstance(amount, (int, float)) and 0.0 <= amount < 1.0):
        raise NortonError(f"amount must be in [0, 1), got {amount!r}")
    if target_macs is not None:
        if not isinstance(target_macs, (int, float)) or not 0.0 < target_macs < 1.0:
            raise NortonError(f"target_macs must be a fraction in (0, 1), got {target_macs!r}")
        amount = _search_amount(model, example_inputs, target_macs, ignored_layers,
                                criterion if global_ranking else None, seed, round_to)

    graph = build_graph(model, example_inputs)  # first: it names an input the model rejects
    macs_before = count_macs(model, example_inputs)
    params_before = sum(p.numel() for p in model.parameters())
    _, shapes_before = run_forward(model, example_inputs)
    options = dict(compress_rate=compress_rate, amount=amount, keep=keep, criterion=criterion,
                   ignored_layers=ignored_layers, seed=seed, progress=progress, global_ranking=global_ranking,
                   round_to=round_to)
    try:
        with unchanged_on_error(model):  # a failure part-way leaves the model as it was
            groups, skipped = prune_in_place(model, example_inputs, graph=graph, **options)
            failure, shapes_after = run_forward(model, example_inputs)
            if failure:
                raise _BrokenForward(failure)
            if shapes_after != shapes_before:
                raise NortonError(
                    f"pruning would change the model's output shapes from {shapes_before} to {shapes_after}; "
                    "the model was left unchanged — pass the layers that produce the outputs as ignored_layers")
    except (_BrokenForward, EmptyLayerError) as broken:  # the model is back as it was: find the groups that
        # break it (or that torch-pruning refuses), keep them whole
        def check() -> str | None:
            failure, after = run_forward(model, example_inputs)
            if failure:
                return f"pruning it breaks the model's forward: {failure}"
            return None if after == shapes_before else f"pruning it changes the output shapes to {after}"

        with unchanged_on_error(model):
            groups, skipped = prune_in_place(model, example_inputs, graph=build_graph(model, example_inputs),
                                             check=check, **options)
            if run_forward(model, example_inputs) != (None, shapes_before):
                raise NortonError(f"after pruning, the model's forward fails: {broken}; pruning the groups one "
                                  "at a time did not avoid it — the model was left unchanged") from None
    return PruneReport(
        groups=groups,
        macs_before=macs_before,
        macs_after=count_macs(model, example_inputs),
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        skipped=skipped,
    )


def prune_in_place(model: nn.Module, example_inputs, *, compress_rate=None, amount: float | None = None,
                   keep: Mapping[str, int] | None = None, criterion: str = "pabs", ignored_layers=(), seed: int = 0,
                   progress: bool = False, graph=None, global_ranking: bool = False, check=None,
                   round_to: int | None = None) -> tuple[list[GroupPruning], dict[str, str]]:
    """The work of ``prune`` without its MACs and params report: (groups, skipped).
    With ``check`` (a callable returning None or a reason), a group after
    whose cut ``check`` gives a reason is put back and left whole with that
    reason (the groups are tested in bisected halves: ``apply_or_restore``)."""
    graph = build_graph(model, example_inputs) if graph is None else graph
    groups, skipped = collect_groups(model, graph, example_inputs, ignored_layers)
    compress_rate, keep, attention_keep = attention_targets(
        model, compress_rate=compress_rate, keep=keep, amount=None if global_ranking else amount,
        ignored_layers=ignored_layers)
    if keep is not None:
        set_count_targets(model, groups, keep, skipped)
    elif isinstance(compress_rate, Mapping):
        set_dict_targets(model, groups, compress_rate, skipped)
    elif compress_rate is not None:
        parse_compress_rate(compress_rate)  # a malformed string is named before anything else
        set_zoo_targets(model, groups, compress_rate)
    elif global_ranking:
        set_global_targets(groups, float(amount), criterion, seed)
    else:
        set_amount_targets(groups, float(amount))
    round_to_blocks(groups, round_to)
    plan_selection(groups, criterion, seed, progress)
    if check is None:
        apply_selection(graph, groups)
        reasons = {}
    else:
        reasons = apply_or_restore(graph, groups, check)
        skipped.update(reasons)
    kept = [g.info for g in groups if g.info.root not in reasons]
    return kept + prune_attentions(model, attention_keep, criterion, seed), skipped


class _BrokenForward(Exception):
    """Pruning left a model whose forward raises (the message says where)."""


def run_forward(model: nn.Module, example_inputs) -> tuple[str | None, list[tuple[int, ...]] | None]:
    """One eval-mode forward on ``example_inputs``: (None, the output shapes) when
    it runs; otherwise (the error and the innermost module it came from — e.g.
    an attention block that reshapes by a head size stored at construction, None)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return None, output_shapes(model(*as_args(example_inputs)))
    except Exception as err:  # noqa: BLE001 - any failure of a user model's forward is reported
        names = {id(m): n for n, m in model.named_modules()}
        where, tb = None, err.__traceback__
        while tb is not None:
            module = tb.tb_frame.f_locals.get("self")
            if isinstance(module, nn.Module) and id(module) in names:
                where = (f"{names[id(module)]} ({type(module).__name__})" if names[id(module)]
                         else f"the model's {tb.tb_frame.f_code.co_name} ({type(module).__name__})")
            tb = tb.tb_next
        return f"{type(err).__name__}: {err}" + (f" in {where}" if where else ""), None
    finally:
        model.train(was_training)


def check_round_to(round_to) -> None:
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise NortonError(f"round_to must be a positive integer (e.g. 8) or None, got {round_to!r}")


def _search_amount(model: nn.Module, example_inputs, target: float, ignored_layers, global_criterion: str | None = None,
                   seed: int = 0, round_to: int | None = None) -> float:
    """Amount whose pruning removes ``target`` of the MACs (±1 point): the same
    rate in every layer, or, with ``global_criterion``, that share of all
    filters by one ranking across layers."""
    base = count_macs(model, example_inputs)

    def removed(amount: float) -> float:
        trial = copy.deepcopy(model)
        mapping = dict(zip(model.modules(), trial.modules()))
        # a throwaway copy: the worker alone, without prune's rollback copy and output checks
        prune_in_place(trial, example_inputs, amount=amount, criterion=global_criterion or "random", seed=seed,
                       ignored_layers=[mapping[m] for m in ignored_layers], global_ranking=global_criterion is not None,
                       round_to=round_to)
        return 1.0 - count_macs(trial, example_inputs) / base

    groups, _ = collect_groups(model, build_graph(model, example_inputs), example_inputs, ignored_layers)
    if not groups:
        raise NortonError("target_macs: the model has no prunable layer")
    if global_criterion is None:  # the most that keeps 1 filter everywhere
        low, high = 0.0, 1.0 - 1.0 / min(g.info.total for g in groups)
    else:
        low, high = 0.0, 1.0 - len(groups) / sum(g.info.total for g in groups)
    upper = high
    most = removed(high)
    if most < target - 0.01:
        least = f"{round_to} filters (round_to)" if round_to and round_to > 1 else "one filter"
        raise NortonError(f"target_macs {target} is out of reach: keeping {least} per prunable layer removes {most:.1%} "
                          "of the MACs")
    best = high
    closest = (abs(most - target), high)
    for _ in range(20):
        mid = (low + high) / 2
        got = removed(mid)
        if abs(got - target) <= 0.005:
            return mid
        closest = min(closest, (abs(got - target), mid))
        if got < target:
            low = mid
        else:
            high, best = mid, mid
    if not (round_to and round_to > 1):
        return best  # the least amount that reached the target
    # rounded widths move in steps that bisection can step over: a finer scan around the closest amount
    around = closest[1]
    for i in range(-20, 21):
        amount = min(max(around + 0.002 * i, 0.0), upper)
        closest = min(closest, (abs(removed(amount) - target), amount))
        if closest[0] <= 0.005:
            break
    return closest[1]


_ACROSS_CHANNELS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_PER_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)


def zeroed_equivalent(model: nn.Module, report: PruneReport, example_inputs,
                      also_removed: Mapping[str, Sequence[int]] | None = None) -> nn.Module:
    """A copy of ``model`` as it was before the pruning that ``report``
    describes, in which every channel that pruning removed is made exactly zero
    where it is produced and after every BatchNorm of its group (forward hooks
    on those layers; the weights are untouched).  Where removed channels
    contribute nothing further (activations with f(0) = 0), the pruned model
    computes what this copy computes: a check that pruning cut what it said it
    would.  A cut group that passes through a normalisation across channels
    (LayerNorm, GroupNorm, RMSNorm: their statistics change with the width) has
    no such copy: a NortonError names it.  ``also_removed``: more channels
    (group root -> channel indices) to zero."""
    zeroed = copy.deepcopy(model).eval()
    groups, _ = collect_groups(zeroed, build_graph(zeroed, example_inputs), example_inputs)
    kept = {g.root: set(g.kept) for g in report.groups}
    for root, channels in (also_removed or {}).items():
        kept[root] -= set(channels)
    for name, attention in window_attentions(zeroed).items():  # narrowed heads: zero rows of q, k, v
        if name in kept:
            zero_positions(attention, set(range(attention.qkv.out_features // 3)) - kept[name])
    zero_channels(groups, kept)
    return zeroed


def zero_channels(groups, kept: Mapping[str, set[int]]) -> list:
    """Forward hooks on the layers of ``groups`` (collected on the model they
    belong to) that make every channel outside ``kept[root]`` exactly zero where
    it is produced and after every BatchNorm of its group — what pruning those
    channels computes, without surgery.  Groups not in ``kept`` are left alone.
    Returns the hook handles (``handle.remove()`` undoes them).  A cut group that
    passes through a normalisation across channels has no such form: NortonError."""
    return [_Hooked(module, module.register_forward_hook(zeroing))
            for module, zeroing in silenced_channels(groups, kept).items()]


def silenced_channels(groups, kept: Mapping[str, set[int]]) -> dict[nn.Module, ZeroChannels]:
    """The layers whose outputs ``zero_channels`` changes, each with the callable
    ``(module, inputs, output) -> output`` (a forward hook's signature) that zeroes the
    channels outside ``kept`` in its output: for running the model with the same
    effect and no hooks (the planner's probes on several threads)."""
    silenced: dict[nn.Module, set[int]] = {}
    for g in groups:
        if g.info.root not in kept:
            continue
        removed = set(range(g.info.total)) - set(kept[g.info.root])
        across = [type(m).__name__ for m, *_ in g.members if isinstance(m, _ACROSS_CHANNELS)]
        if removed and across:
            raise NortonError(f"no zeroed equivalent: group {g.info.root} lost {len(removed)} of {g.info.total} channels "
                              f"and passes through a {across[0]}, which normalises across them")
        for module, is_out, idxs, root_idxs in g.members:
            # where the group's channels are produced — by its layers, or copied in from another group by an
            # option-A shortcut — and after each of its BatchNorms
            if isinstance(module, _PER_CHANNEL_NORMS) or (is_out and isinstance(module, (*ROOT_TYPES, ChannelPadShortcut))):
                # one group channel may be several of a layer's (a concatenation of copies)
                silenced.setdefault(module, set()).update(i for i, r in zip(idxs, root_idxs) if r in removed)
    return {module: ZeroChannels(sorted(channels), -1 if isinstance(module, nn.Linear) else 1)
            for module, channels in silenced.items() if channels}


class _Hooked:
    """A hook's handle and the layer it is on."""

    def __init__(self, module: nn.Module, handle) -> None:
        self.module, self.handle = module, handle

    def remove(self) -> None:
        self.handle.remove()


class ZeroChannels:
    """A forward hook that zeroes some channels of a layer's output."""

    def __init__(self, channels: list[int], dim: int):
        self.channels, self.dim = torch.tensor(channels, dtype=torch.long), dim

    def __call__(self, module: nn.Module, inputs, output: Tensor) -> Tensor:
        return output.index_fill(self.dim, self.channels.to(output.device), 0.0)


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
        size, per_block = g.info.total // g.blocks, target // g.blocks  # grouped convs: the same in every block
        g.info.kept = [b * size + p for b in range(g.blocks) for p in range(per_block)] if g.blocks > 1 else list(range(target))
    apply_selection(graph, groups)
    restructure_attentions(model, widths)
    got = {n: out_width(m) for n, m in model.named_modules() if isinstance(m, ROOT_TYPES)}
    wrong = next((n for n, w in widths.items() if got.get(n) != w), None)
    if wrong is not None:
        raise NortonError(f"cannot rebuild the pruned architecture: layer {wrong!r} has {got.get(wrong)} filters, the record says {widths[wrong]}")
