"""Stage ① of NORTON: replace every eligible convolution by a CPDBlock (or,
for the planner's Tucker-2 option, by a TuckerBlock)."""
from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from norton.core import (
    CPDBlock,
    TuckerBlock,
    cp_als,
    is_decomposable,
    nmse,
    replace_module,
)
from norton.core.tucker import HOOI_ITERATIONS
from norton.errors import NortonError


@dataclass
class LayerDecomposition:
    """What happened to one convolution."""

    name: str
    shape: tuple[int, int, int, int]  # (N, C, kh, kw)
    rank: int
    nmse: float  # mean over the layer's filters of ||W_n - Ŵ_n||² / ||W_n||²
    max_nmse: float
    iterations: int
    seconds: float  # a batch of equal-shape layers shares its time equally
    cost_ratio: float = 0.0  # MACs of the CPDBlock / MACs of the conv it replaces
    tucker: tuple[int, int] | None = None  # a TuckerBlock's (output, input) ranks; rank is then 0


@dataclass
class DecompositionReport:
    layers: list[LayerDecomposition] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # conv -> why it stayed dense (only_cheaper)

    @property
    def mean_nmse(self) -> float:
        """Filter-weighted mean NMSE over all decomposed layers."""
        total = sum(layer.shape[0] for layer in self.layers)
        if total == 0:
            return 0.0
        return sum(layer.nmse * layer.shape[0] for layer in self.layers) / total

    @property
    def seconds(self) -> float:
        return sum(layer.seconds for layer in self.layers)

    def table(self) -> str:
        """A fixed-width table, one row per layer, and a total line."""
        rows = [f"{'layer':<32} {'shape (N,C,kh,kw)':<22} {'rank':>4} {'NMSE':>10} {'max NMSE':>10} {'iters':>5} "
                f"{'sec':>7} {'MACs×':>6}"]
        for layer in self.layers:
            shape = "×".join(str(s) for s in layer.shape)
            rank = f"T{layer.tucker[0]}x{layer.tucker[1]}" if layer.tucker else layer.rank
            rows.append(
                f"{layer.name:<32} {shape:<22} {rank:>4} {layer.nmse:>10.4g} "
                f"{layer.max_nmse:>10.4g} {layer.iterations:>5} {layer.seconds:>7.3f} {layer.cost_ratio:>6.2f}"
                + ("  costlier than the conv" if layer.cost_ratio >= 1 else "")
            )
        for name, why in self.skipped.items():
            rows.append(f"{name:<32} kept dense: {why}")
        rows.append(
            f"{len(self.layers)} layers, mean NMSE {self.mean_nmse:.4g}, {self.seconds:.2f} s"
            + (f"; {len(self.skipped)} left dense (not cheaper factored)" if self.skipped else "")
        )
        costlier = sum(layer.cost_ratio >= 1 for layer in self.layers)
        if costlier:
            rows.append(f"{costlier} layer(s) cost more MACs factored than dense at their rank; "
                        "only_cheaper=True (--only-cheaper) keeps them dense")
        return "\n".join(rows)


def _check_names(model: nn.Module, names: Iterable[str], what: str, eligible: set[str]) -> None:
    all_names = {name for name, _ in model.named_modules()}
    for name in names:
        if name not in all_names:
            raise NortonError(f"{what}: the model has no module named {name!r}")
        if name not in eligible:
            raise NortonError(
                f"{what}: module {name!r} is not a decomposable convolution "
                "(needs nn.Conv2d with groups=1 and a kernel larger than 1×1)"
            )


def tucker_cost_ratio(conv: nn.Conv2d, ranks: tuple[int, int]) -> float:
    """MACs of the TuckerBlock over the conv's: the first 1×1 conv runs at the
    input resolution, the core and the last 1×1 conv at the strided one."""
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    (r_out, r_in), c, n = ranks, conv.in_channels, conv.out_channels
    return (sh * sw * c * r_in + r_out * r_in * kh * kw + r_out * n) / (n * c * kh * kw)


def cost_ratio(conv: nn.Conv2d, rank: int) -> float:
    """MACs of the rank-``rank`` CPDBlock over the conv's, for any input size:
    the 1×1 conv (C -> R·N) runs at the input resolution, the kh×1 and 1×kw
    depthwise convs at the strided ones."""
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    c = conv.in_channels
    return rank * (sh * sw * c + sw * kh + kw) / (c * kh * kw)


def _check_rank(name: str, rank: object, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < low:
        raise NortonError(f"{name} must be an integer >= {low}, got {rank!r}")
    return rank


@torch.no_grad()
def decompose(
    model: nn.Module,
    rank: int,
    *,
    layer_ranks: Mapping[str, int] | None = None,
    skip: Iterable[str] = (),
    only_cheaper: bool = False,
    progress: bool = True,
    **cp_options,
) -> DecompositionReport:
    """Replace, in place, every decomposable conv of ``model`` by a CPDBlock.

    ``layer_ranks`` overrides the rank per module name (0 keeps that conv dense);
    ``skip`` names convs to leave alone.  Depthwise, grouped and 1×1 convs are
    never touched.  ``only_cheaper`` keeps dense (and reports) every conv whose
    factored form would cost as many MACs or more (a 3-channel stem at rank ≥ 3,
    wide ranks on thin layers); the report gives every layer's MACs ratio.  ``cp_options`` go to ``cp_decompose`` (``n_iter_max``,
    ``tol``, ``init``, ``seed``).  Returns the per-layer report.
    """
    rank = _check_rank("rank", rank, allow_zero=False)
    layer_ranks = dict(layer_ranks or {})
    skip = set(skip)
    eligible = {name for name, m in model.named_modules() if is_decomposable(m)}
    _check_names(model, layer_ranks, "layer_ranks", eligible)
    _check_names(model, skip, "skip", eligible)
    for name, value in layer_ranks.items():
        _check_rank(f"layer_ranks[{name!r}]", value, allow_zero=True)

    todo = [
        (name, module, layer_ranks.get(name, rank))
        for name, module in model.named_modules()
        if name in eligible and name not in skip and layer_ranks.get(name, rank) > 0
    ]
    skipped = {}
    if only_cheaper:
        for name, module, r in todo:
            if cost_ratio(module, r) >= 1:
                skipped[name] = f"rank {r} would cost {cost_ratio(module, r):.2f}× its MACs"
        todo = [item for item in todo if item[0] not in skipped]
    # Layers of equal shape and rank are fitted in one batched CP-ALS call (every
    # filter has its own CPD, so this only saves per-call overhead).
    groups: dict[tuple, list[tuple[str, nn.Conv2d, int]]] = {}
    for item in todo:
        weight = item[1].weight
        groups.setdefault((tuple(weight.shape), item[2], weight.dtype, weight.device), []).append(item)
    rows: dict[str, LayerDecomposition] = {}
    blocks: dict[str, CPDBlock] = {}  # put in place only when every layer is done: all or nothing
    bar = tqdm(total=len(todo), desc="decompose", unit="layer", disable=not progress)
    for (shape, layer_rank, _, _), members in groups.items():
        start = time.perf_counter()
        weights = torch.cat([conv.weight for _, conv, _ in members])
        result = cp_als(weights, layer_rank, **cp_options)
        errors = nmse(weights, result.factors)
        seconds = (time.perf_counter() - start) / len(members)
        for k, (name, conv, _) in enumerate(members):
            part = slice(k * shape[0], (k + 1) * shape[0])
            block = CPDBlock.like_conv(conv, layer_rank)
            block.set_factors(tuple(f[part] for f in result.factors))
            block.copy_bias_from(conv)
            blocks[name] = block
            rows[name] = LayerDecomposition(name=name, shape=shape, rank=layer_rank, nmse=float(errors[part].mean()),
                                            max_nmse=float(errors[part].max()), iterations=result.n_iter,
                                            seconds=seconds, cost_ratio=cost_ratio(conv, layer_rank))
        bar.update(len(members))
    bar.close()
    for name, block in blocks.items():
        replace_module(model, name, block)
    return DecompositionReport(layers=[rows[name] for name, _, _ in todo], skipped=skipped)


@torch.no_grad()
def decompose_tucker(model: nn.Module, layer_ranks: Mapping[str, tuple[int, int]], *, progress: bool = False,
                     n_iter: int = HOOI_ITERATIONS) -> DecompositionReport:
    """Replace, in place, the named convs of ``model`` by TuckerBlocks at their
    (output, input) ranks — clamped to the conv's channels.  All or nothing:
    the blocks are put in place only when every layer is fitted."""
    eligible = {name for name, m in model.named_modules() if is_decomposable(m)}
    _check_names(model, layer_ranks, "tucker ranks", eligible)
    rows, blocks = [], {}
    for name, ranks in tqdm(layer_ranks.items(), desc="decompose (Tucker-2)", unit="layer", disable=not progress):
        conv = model.get_submodule(name)
        start = time.perf_counter()
        block = TuckerBlock.from_conv(conv, tuple(ranks), n_iter)
        weight = conv.weight.detach()
        error = ((block.dense_weight() - weight) ** 2).flatten(1).sum(1) / (weight ** 2).flatten(1).sum(1).clamp_min(1e-30)
        blocks[name] = block
        rows.append(LayerDecomposition(name=name, shape=tuple(weight.shape), rank=0, nmse=float(error.mean()),
                                       max_nmse=float(error.max()), iterations=n_iter, seconds=time.perf_counter() - start,
                                       cost_ratio=tucker_cost_ratio(conv, block.ranks), tucker=block.ranks))
    for name, block in blocks.items():
        replace_module(model, name, block)
    return DecompositionReport(layers=rows)
