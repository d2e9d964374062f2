"""The budget planner: NORTON configured for a MACs or speed-up target.

For every decomposable conv the planner chooses a CP rank, a Tucker-2 pair of
ranks (an option beyond the published method, ``forms``) or "dense"; for every
coupled group of filters (see ``graph``) how many filters stay.  Each option is
scored by the damage it does alone — the divergence of the model's outputs on
calibration images from the uncompressed model's, after BatchNorm
re-estimation — and a global allocation picks the options of least total damage
whose cost meets the target.  Cost is MACs (exact, counted per layer), or for a
speed-up target the latency of each layer's fastest execution plan timed on
this machine (a fitted per-shape model); a speed-up plan is then deployed and
timed against the deployed uncompressed model, and the budget moved until the
measured speed-up meets the target.  The search space holds CP-only (every filter kept) and
pruning-only (every layer dense), so the plan is never forced into a worse
corner than either.

The result is a :class:`Plan`: a value that prints as a table, goes into
checkpoints as plain data and is applied by ``Plan.apply`` (decompose, then
prune).
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from norton.compression.criteria import get_criterion
from norton.compression.decomposition import (
    DecompositionReport,
    decompose,
    decompose_tucker,
)
from norton.compression.graph import build_graph, collect_groups, is_depthwise
from norton.compression.pruning import PruneReport, prune, prune_in_place
from norton.compression.recovery import recover as refit
from norton.compression.trial import distill_trial, split_calibration
from norton.core import (
    CPDBlock,
    TuckerBlock,
    batch_statistics,
    conv_output_size,
    count_macs,
    is_decomposable,
    replace_module,
)
from norton.core.plans import block_inputs, time_call, time_plans
from norton.core.surgery import flatten_tensors
from norton.deployment import compare_latency, deploy, time_tucker
from norton.errors import NortonError

RANK_OPTIONS = (1, 2, 3, 4, 6, 8, 12, 16)
FORMS = ("cp", "tucker2")  # factored forms a layer may take besides dense
# Tucker-2 options: both ranks this fraction of the layer's (output, input) channels
TUCKER_FRACTIONS = (3 / 4, 1 / 2, 3 / 8, 1 / 4, 3 / 16, 1 / 8)
KEEP_STEPS = 8  # a group may keep 1/8, 2/8, …, 8/8 of its filters
ALLOCATIONS = ("best", "greedy", "lagrangian")
FINE_KEEP_OPTIONS = 64  # per group, for the allocation (damages interpolated between the measured ones)
TRIAL_STEPS = 0  # distillation steps before a whole candidate's damage is measured (allocation best)
FILL_TOLERANCE = 0.005  # a plan's cost ends within half a point of the full cost below its budget


# -- the value -----------------------------------------------------------------------------
@dataclass
class LayerRow:
    name: str
    rank: int  # CP rank; 0 = kept dense (or Tucker-2)
    filters: int  # filters the layer keeps
    total: int
    macs: int  # of this layer in the planned model
    latency_ms: float | None  # predicted, on the latency batch
    damage: float  # measured damage of its chosen rank alone
    tucker: list[int] | None = None  # Tucker-2 (output, input) ranks, if the layer takes that form


@dataclass
class Plan:
    """Per-layer ranks and per-group filter counts for one target."""

    target: str  # "macs" (fraction of MACs removed) or "speedup"
    value: float
    ranks: dict[str, int]  # every decomposable conv: its CP rank, 0 = dense or Tucker-2
    keep: dict[str, int]  # every prunable group, by its root layer: filters kept
    totals: dict[str, int]  # every prunable group: filters before
    criterion: str
    allocation: str
    seed: int
    macs_before: int
    macs_after: int  # predicted by the per-layer counts (exact for the MACs convention)
    latency_before_ms: float | None = None  # predicted, speed-up targets only
    latency_after_ms: float | None = None
    damage: float = 0.0  # sum of the chosen options' measured damages
    rows: list[LayerRow] = field(default_factory=list)
    group_damage: dict[str, float] = field(default_factory=dict)
    measured_speedup: float | None = None  # speed-up targets: of the deployed plan, timed when planned
    tucker: dict[str, list[int]] = field(default_factory=dict)  # layers factored by Tucker-2: (output, input) ranks
    recover: bool = False  # pruning damage measured after norton.recover: apply the plan with it
    # allocation "best": every candidate plan built whole, and its measured damage
    # (after trial_steps steps of distillation, if any, on held-out calibration images)
    candidates: dict[str, float] = field(default_factory=dict)
    trial_steps: int = 0
    # MACs targets, allocation best: every distinct candidate as a plan of its own (Plan.to_dict form),
    # by candidate name — what norton.select_plan fine-tunes briefly and compares on validation data
    alternatives: dict[str, dict] = field(default_factory=dict)
    selection: dict[str, float] = field(default_factory=dict)  # norton.select_plan: validation top-1 per candidate

    def alternative(self, name: str) -> Plan:
        """The candidate plan ``name`` of ``alternatives``, as a Plan (its own alternatives: the same)."""
        if name not in self.alternatives:
            raise NortonError(f"no candidate plan {name!r}; this plan has: {', '.join(self.alternatives) or 'none'}")
        other = Plan.from_dict(self.alternatives[name])
        other.alternatives = dict(self.alternatives)
        return other

    @property
    def macs_reduction(self) -> float:
        return 1.0 - self.macs_after / self.macs_before

    def table(self) -> str:
        timed = self.latency_after_ms is not None
        head = f"{'layer':<30} {'rank':>5} {'filters':>11} {'MACs':>12} {'damage':>9}"
        lines = [head + (f" {'ms':>8}" if timed else "")]
        for r in self.rows:
            form = f"T{r.tucker[0]}x{r.tucker[1]}" if r.tucker else ("dense" if r.rank == 0 else r.rank)
            line = (f"{r.name:<30} {form:>5} {r.filters:>5}/{r.total:<5} "
                    f"{r.macs:>12,} {r.damage:>9.4f}")
            lines.append(line + (f" {r.latency_ms:>8.3f}" if timed else ""))
        pruned = {root: f"{self.keep[root]}/{self.totals[root]}" for root in self.totals if self.keep[root] < self.totals[root]}
        if pruned:
            lines.append("groups pruned (root: kept/total, damage): " + ", ".join(
                f"{root} {text} ({self.group_damage.get(root, 0.0):.4f})" for root, text in pruned.items()))
        if self.recover:
            lines.append("pruning damage measured after least-squares recovery (norton.recover): apply with it")
        if self.selection:
            lines.append("candidate plans, validation top-1 after a brief fine-tuning: " + ", ".join(
                f"{name} {top1:.2f}" for name, top1 in sorted(self.selection.items(), key=lambda kv: -kv[1])))
        if self.candidates:
            after = f" after {self.trial_steps} distillation steps" if self.trial_steps else ""
            lines.append(f"candidate plans, measured damage{after}: " + ", ".join(
                f"{name} {damage:.4f}" for name, damage in sorted(self.candidates.items(), key=lambda kv: kv[1])))
        goal = f"{self.value:.0%} fewer MACs" if self.target == "macs" else f"{self.value:g}× speed-up"
        lines.append(f"target {goal}: MACs {self.macs_before:,} -> {self.macs_after:,} "
                     f"({100 * self.macs_reduction:.2f}% ↓)"
                     + (f", predicted latency {self.latency_before_ms:.2f} -> {self.latency_after_ms:.2f} ms "
                        f"({self.latency_before_ms / self.latency_after_ms:.2f}×)" if timed else "")
                     + (f", measured deployed {self.measured_speedup:.2f}×" if self.measured_speedup else "")
                     + f"; predicted damage {self.damage:.4f} ({self.allocation}, {self.criterion} selection)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Plan:
        try:
            data = dict(data)
            data["rows"] = [LayerRow(**r) for r in data.get("rows", [])]
            return cls(**data)
        except TypeError as err:
            raise NortonError(f"not a norton plan: {err}") from None

    def decompose(self, model: nn.Module, *, progress: bool = False, **cp_options) -> DecompositionReport:
        """Stage ①: replace the planned convs of ``model`` by CPDBlocks (or
        TuckerBlocks) at their ranks, in place."""
        layers = {n for n, m in model.named_modules() if is_decomposable(m)}
        if layers != set(self.ranks):
            different = sorted(set(self.ranks) ^ layers)
            raise NortonError(f"this plan was made for another model: layer {different[0]!r} "
                              f"{'is not a decomposable conv of this model' if different[0] in self.ranks else 'is not in the plan'}")
        cp_options.setdefault("seed", self.seed)
        report = decompose(model, max([1, *self.ranks.values()]), layer_ranks=self.ranks, progress=progress, **cp_options)
        if self.tucker:
            report.layers += decompose_tucker(model, {n: tuple(r) for n, r in self.tucker.items()},
                                              progress=progress).layers
        return report

    def prune(self, model: nn.Module, example_inputs, *, progress: bool = False) -> PruneReport:
        """Stage ②: prune every planned group of ``model`` to its filter count, in place."""
        keep = {root: k for root, k in self.keep.items() if k < self.totals[root]}
        return prune(model, keep=keep, example_inputs=example_inputs, criterion=self.criterion, seed=self.seed,
                     progress=progress)

    def apply(self, model: nn.Module, example_inputs, *, progress: bool = False, **cp_options
              ) -> tuple[DecompositionReport, PruneReport]:
        """Decompose ``model`` at the planned ranks, then prune it to the planned
        filter counts, in place.  The model must be the one planned for."""
        return self.decompose(model, progress=progress, **cp_options), self.prune(model, example_inputs, progress=progress)


# -- calibration ---------------------------------------------------------------------------
def _batches(data, device: torch.device | None) -> list[Tensor]:
    """Calibration images as a list of batches: a tensor of images, or an
    iterable of tensors or (images, labels) pairs."""
    if isinstance(data, Tensor):
        items = [data]
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        items = [x[0] if isinstance(x, (tuple, list)) else x for x in data]
    else:
        raise NortonError(f"calibration data must be a tensor of images or batches of them, got {type(data).__name__}")
    if not items or not all(isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] > 0 for x in items):
        raise NortonError("calibration data must hold at least one non-empty batch of image tensors (N, C, H, W)")
    return [x.to(device) if device is not None else x for x in items]


class _Probe:
    """Damage of a changed model: divergence of its outputs from the reference
    model's on the calibration batches, every BatchNorm normalising with the
    batch's own statistics (BN re-estimation and evaluation in one pass; the
    reference is computed the same way, so an unchanged model has damage 0)."""

    def __init__(self, model: nn.Module, batches: list[Tensor]):
        self.batches = batches
        self.reference = [self._outputs(model, x) for x in batches]

    @staticmethod
    @torch.no_grad()
    def _outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
        with batch_statistics(model):
            return [t.detach().to(torch.float64) for t in flatten_tensors(model(x))]

    @torch.no_grad()
    def damage(self, model: nn.Module) -> float:
        total = 0.0
        for x, ref in zip(self.batches, self.reference):
            for got, want in zip(self._outputs(model, x), ref):
                if want.dim() == 2:  # logits: KL(reference || changed), mean over images
                    total += float(F.kl_div(F.log_softmax(got, 1), F.log_softmax(want, 1), log_target=True,
                                            reduction="batchmean"))
                else:
                    total += float(((got - want) ** 2).sum() / (want ** 2).sum().clamp_min(1e-30))
        return total / len(self.batches)


# -- costs ---------------------------------------------------------------------------------
@dataclass
class _Layer:
    name: str
    module: nn.Module
    in_size: tuple[int, ...]  # one sample's input shape
    out_groups: list[tuple[str, float]] = field(default_factory=list)  # (group root, channels per group filter)
    in_groups: list[tuple[str, float]] = field(default_factory=list)

    @property
    def full(self) -> tuple[int, int]:
        m = self.module
        return (m.out_features, m.in_features) if isinstance(m, nn.Linear) else (m.out_channels, m.in_channels)


def layer_macs(module: nn.Module, rank: int | tuple[int, int], n: int, c: int, in_size: Sequence[int]) -> int:
    """MACs of ``module`` (a Conv2d or Linear, groups=1) with ``n`` outputs and
    ``c`` inputs, as a dense layer (``rank`` 0), a CPDBlock of that rank or a
    TuckerBlock of ``rank`` = (output, input) ranks, on one input of
    ``in_size`` — what ``count_macs`` counts, without running it."""
    if isinstance(module, nn.Linear):
        return math.prod(in_size[:-1]) * c * n
    kh, kw = module.kernel_size
    height, width = in_size[-2:]
    out_h, out_w = conv_output_size(module, in_size)
    if isinstance(rank, tuple):  # 1×1 (c -> r_in) at the input resolution, core and 1×1 (r_out -> n) at the output's
        r_out, r_in = rank
        return height * width * c * r_in + out_h * out_w * (r_out * r_in * kh * kw + r_out * n)
    if rank == 0:
        per_filter = 1 if is_depthwise(module) else c // module.groups  # a depthwise conv's width follows n
        return n * per_filter * kh * kw * out_h * out_w
    # the three factored convs: 1×1 (c -> R·n), kh×1 depthwise (stride sh), 1×kw depthwise (stride sw)
    return height * width * c * rank * n + rank * n * kh * out_h * width + rank * n * kw * out_h * out_w


def form_of(option: int | tuple[int, int]) -> str:
    """A layer option's form: "dense" (0), "cp" (a rank) or "tucker2" (a pair of ranks)."""
    return "tucker2" if isinstance(option, tuple) else ("cp" if option else "dense")


def layer_elements(module: nn.Module, n: int, c: int, in_size: Sequence[int]) -> int:
    """Values read and written by the layer for one input: its input (``c``
    channels) and its output (``n`` channels) — the memory traffic that bounds
    a small layer's speed as much as its MACs do."""
    if isinstance(module, nn.Linear):
        return math.prod(in_size[:-1]) * (c + n)
    out_h, out_w = conv_output_size(module, in_size)
    return c * in_size[-2] * in_size[-1] + n * out_h * out_w


def fit_nonnegative(features: list[list[float]], seconds: list[float]) -> list[float]:
    """Least-squares coefficients ≥ 0: the best fit over the subsets of features
    whose unconstrained fit has no negative coefficient (a few features only)."""
    a, y = torch.tensor(features, dtype=torch.float64), torch.tensor(seconds, dtype=torch.float64)
    best, best_error = [0.0] * a.shape[1], float("inf")
    for subset in range(1, 2 ** a.shape[1]):
        cols = [j for j in range(a.shape[1]) if subset >> j & 1]
        coef = torch.linalg.lstsq(a[:, cols], y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        if (coef < 0).any():
            continue
        error = float(((a[:, cols] @ coef - y) ** 2).sum())
        if error < best_error:
            best_error, best = error, [0.0] * a.shape[1]
            for j, value in zip(cols, coef.tolist()):
                best[j] = value
    return best


class _CostModel:
    """Cost of the model for any choice of ranks and kept filters, as a constant
    plus the sum of its convs' and linears' costs: MACs (counted), or seconds.
    Seconds come from a model per layer shape and rank — a + b·MACs + d·values
    moved, coefficients ≥ 0 fitted to the fastest execution plan timed on
    ``batch`` images at four widths (full, half the outputs, half the inputs, a
    quarter of both) — so that filter counts never timed get a smooth estimate
    instead of one noisy timing each."""

    def __init__(self, layers: dict[str, _Layer], measure: str, batch: int, device, dtype):
        self.layers, self.measure, self.batch = layers, measure, batch
        self.device, self.dtype = device, dtype
        self._memo: dict[tuple, float] = {}
        self._fits: dict[tuple, list[float]] = {}
        self.constant = 0.0
        # seconds: per-form factors calibrating the isolated layer timings against whole deployed models
        self.scales = dict.fromkeys(("dense", *FORMS), 1.0)

    def channels(self, layer: _Layer, keep: Mapping[str, int], totals: Mapping[str, int]) -> tuple[int, int]:
        n, c = layer.full
        n -= round(sum((totals[g] - keep[g]) * per for g, per in layer.out_groups))
        c -= round(sum((totals[g] - keep[g]) * per for g, per in layer.in_groups))
        return max(n, 1), max(c, 1)

    def layer_cost(self, layer: _Layer, rank: int, n: int, c: int) -> float:
        m = layer.module
        if isinstance(m, nn.Linear):
            key = ("linear", n, c, layer.in_size[:-1], m.bias is not None)
        else:
            key = ("conv", n, c, m.kernel_size, m.stride, m.padding, m.dilation, m.bias is not None, m.padding_mode,
                   layer.in_size[1:], rank, type(m).__name__)
        if key not in self._memo:
            self._memo[key] = self._estimate(key, layer, rank, n, c)
        return self._memo[key] * self.scales[form_of(rank)]

    def _estimate(self, key: tuple, layer: _Layer, rank: int, n: int, c: int) -> float:
        m = layer.module
        macs = float(layer_macs(m, rank, n, c, layer.in_size))
        if self.measure == "macs":
            return macs
        shape_key = key[:1] + key[3:]  # the layer's shape class without its widths
        if shape_key not in self._fits:
            full_n, full_c = layer.full
            widths = dict.fromkeys([(full_n, full_c), (max(1, full_n // 2), full_c), (full_n, max(1, full_c // 2)),
                                    (max(1, full_n // 4), max(1, full_c // 4))])
            features = [[1.0, float(layer_macs(m, rank, w_n, w_c, layer.in_size)),
                         float(layer_elements(m, w_n, w_c, layer.in_size))] for w_n, w_c in widths]
            self._fits[shape_key] = fit_nonnegative(features, [self._time(layer, rank, w_n, w_c) for w_n, w_c in widths])
        a, b, d = self._fits[shape_key]
        return a + b * macs + d * float(layer_elements(m, n, c, layer.in_size))

    def _time(self, layer: _Layer, rank: int, n: int, c: int) -> float:
        m = layer.module
        if isinstance(m, nn.Linear):
            module: nn.Module = nn.Linear(c, n, bias=m.bias is not None)
            shape = (*layer.in_size[:-1], c)
        else:
            c, groups = (n, n) if is_depthwise(m) else (c, m.groups)
            conv = nn.Conv2d(c, n, m.kernel_size, m.stride, m.padding, m.dilation, groups=groups,
                             bias=m.bias is not None, padding_mode=m.padding_mode)
            if isinstance(rank, tuple):
                module = TuckerBlock.like_conv(conv, rank)
            else:
                module = CPDBlock.like_conv(conv, rank) if rank > 0 else conv
            shape = (c, *layer.in_size[1:])
        module = module.to(self.device, self.dtype).eval()
        x = torch.randn(self.batch, *shape, device=self.device, dtype=self.dtype)
        if isinstance(module, CPDBlock):  # deploy runs the fastest plan (or the recomposed conv)
            return min(time_plans(module, x, repeats=5, with_conv=True).values())
        if isinstance(module, TuckerBlock):  # deploy keeps it factored or recomposes it, the faster
            return min(time_tucker(module, x, 5).values())
        with torch.no_grad():
            return time_call(lambda: module(x), x, 5)


# -- the search ----------------------------------------------------------------------------
@dataclass
class _Unit:
    """One choice: a layer's rank or a group's filter count, with its options
    ordered from the most to the least expensive and their measured damages."""

    kind: str  # "rank" or "keep"
    name: str
    options: list[int]
    damage: list[float] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)  # layers whose cost depends on it


class _Search:
    def __init__(self, units: list[_Unit], costs: _CostModel, totals: dict[str, int]):
        self.units, self.costs, self.totals = units, costs, totals

    def config(self, state: Sequence[int]) -> tuple[dict[str, int], dict[str, int]]:
        ranks = {u.name: u.options[i] for u, i in zip(self.units, state) if u.kind == "rank"}
        keep = dict(self.totals)
        keep.update({u.name: u.options[i] for u, i in zip(self.units, state) if u.kind == "keep"})
        return ranks, keep

    def layer_costs(self, state: Sequence[int], names: Iterable[str] | None = None) -> dict[str, float]:
        return self._costs(*self.config(state), self.costs.layers if names is None else names)

    def _costs(self, ranks: Mapping[str, int], keep: Mapping[str, int], names: Iterable[str]) -> dict[str, float]:
        out = {}
        for name in names:
            layer = self.costs.layers[name]
            n, c = self.costs.channels(layer, keep, self.totals)
            out[name] = self.costs.layer_cost(layer, ranks.get(name, 0), n, c)
        return out

    def cost(self, state: Sequence[int]) -> float:
        return self.costs.constant + sum(self.layer_costs(state).values())

    def cheapest(self) -> list[int]:
        """Every group at its fewest filters, every layer at its least costly
        option at those widths (by MACs, options are ordered; by predicted
        seconds, not necessarily)."""
        state = [len(u.options) - 1 for u in self.units]
        for k, u in enumerate(self.units):
            if u.kind == "rank":
                state[k] = min(range(len(u.options)),
                               key=lambda j: sum(self.layer_costs([*state[:k], j, *state[k + 1:]], u.layers).values()))
        return state

    def damage(self, state: Sequence[int]) -> float:
        return sum(u.damage[i] for u, i in zip(self.units, state))

    def _moves(self, state: list[int], current: dict[str, float]):
        """(unit index, option, Δdamage, Δcost) of every single-unit change
        (options are ordered by MACs, which need not be the order of the cost)."""
        ranks, keep = self.config(state)
        for k, u in enumerate(self.units):
            options = (j for j in range(len(u.options)) if j != state[k])
            table = ranks if u.kind == "rank" else keep
            saved = table[u.name]
            before = sum(current[n] for n in u.layers)
            for j in options:
                table[u.name] = u.options[j]
                delta = sum(self._costs(ranks, keep, u.layers).values()) - before
                yield k, j, u.damage[j] - u.damage[state[k]], delta
            table[u.name] = saved

    def greedy(self, budget: float) -> list[int]:
        """Cheapen the unit with the least damage per cost saved until the budget is met."""
        state = [0] * len(self.units)
        current = self.layer_costs(state)
        while self.costs.constant + sum(current.values()) > budget:
            best = None
            for k, j, d_damage, d_cost in self._moves(state, current):
                if d_cost >= 0:
                    continue
                score = d_damage / -d_cost
                if best is None or score < best[0]:
                    best = (score, k, j)
            if best is None:
                raise NortonError("the planner cannot reduce the cost any further")
            state[best[1]] = best[2]
            current = self.layer_costs(state)
        return self.refill(state, budget)

    def lagrangian(self, budget: float) -> list[int]:
        """Minimise damage + λ·cost by coordinate descent, λ bisected (in log
        scale) to the smallest value that meets the budget."""
        base = self.cost([0] * len(self.units))

        def solve(lam: float) -> list[int]:
            state = [0] * len(self.units)
            for _ in range(8):
                changed = False
                for k, u in enumerate(self.units):  # the other layers' cost does not depend on this unit's option
                    scores = []
                    for j in range(len(u.options)):
                        trial = state.copy()
                        trial[k] = j
                        scores.append(u.damage[j] + lam * sum(self.layer_costs(trial, u.layers).values()) / base)
                    j = min(range(len(scores)), key=scores.__getitem__)
                    changed |= j != state[k]
                    state[k] = j
                if not changed:
                    break
            return state

        low, high = 1e-6, 1e6
        best = solve(high)
        if self.cost(best) > budget:
            return self.greedy(budget)  # the penalty cannot reach the budget: fall back to the greedy path
        for _ in range(40):
            mid = math.sqrt(low * high)
            state = solve(mid)
            if self.cost(state) <= budget:
                high, best = mid, state
            else:
                low = mid
        return self.refill(best, budget)

    def refill(self, state: list[int], budget: float) -> list[int]:
        """Spend what the budget still allows: first the more expensive options
        that also lower the damage (most damage saved per cost), then, while
        the cost is more than ``FILL_TOLERANCE`` of the full model's below the
        budget, those of least damage added per cost — a plan that removes far
        more than asked for gives up accuracy that fine-tuning would keep."""
        state = state.copy()
        slack = FILL_TOLERANCE * self.cost([0] * len(self.units))
        while True:
            current = self.layer_costs(state)
            spare = budget - self.costs.constant - sum(current.values())
            best = None
            for k, j, d_damage, d_cost in self._moves(state, current):
                if not 0 < d_cost <= spare:  # every step spends: the loop ends
                    continue
                score = d_damage / d_cost
                if best is None or score < best[0]:
                    best = (score, k, j)
            if best is None or (best[0] >= 0 and spare <= slack):
                return state
            state[best[1]] = best[2]


# -- the entry point -----------------------------------------------------------------------
def plan(
    model: nn.Module,
    data,
    *,
    target_macs: float | None = None,
    target_speedup: float | None = None,
    criterion: str = "l2",
    ranks: Sequence[int] = RANK_OPTIONS,
    forms: Sequence[str] = FORMS,
    keep_steps: int = KEEP_STEPS,
    allocation: str = "best",
    latency_batch: int = 32,
    ignored_layers: Sequence[nn.Module] = (),
    recover: bool = False,
    trial_steps: int = TRIAL_STEPS,
    seed: int = 0,
    progress: bool = False,
) -> Plan:
    """Choose a rank (or dense) for every decomposable conv and a filter count
    for every coupled group of ``model`` so that it meets the target with the
    least damage measured on ``data`` (calibration images: a tensor or batches).

    Give one of ``target_macs`` (fraction of MACs to remove, in (0, 1)) or
    ``target_speedup`` (> 1, latency of the layers' fastest execution plans
    timed here on ``latency_batch`` images).  ``criterion`` selects the filters
    of a pruned group (one that works on dense weights: l2, l1, fpgm, random).
    ``forms``: the factored forms a layer may take besides dense — "cp" (the
    published method, at ``ranks``) and "tucker2" (both channel modes at
    ``TUCKER_FRACTIONS`` of the layer's width; not in the published method).
    ``allocation``: greedy (least damage per cost saved), lagrangian, or best:
    both, greedy on the pruning-only and no-pruning corners and uniform pruning
    (the same share of filters in every group) are built whole and the one whose
    measured damage is least wins.  ``recover``: every pruning
    option is measured after the least-squares refit of the layers it cuts
    (``norton.recover`` on ``data``), as the plan is then meant to be applied.
    ``trial_steps`` (allocation best): each whole candidate is first distilled
    from the uncompressed model for that many SGD steps on half of the
    calibration images and its damage measured on the other half — candidates
    are compared by where a little training takes them, not where they start;
    0 compares them as built, on all the images.
    The model is not changed.
    """
    if (target_macs is None) == (target_speedup is None):
        raise NortonError("give exactly one of target_macs or target_speedup")
    if target_macs is not None and (isinstance(target_macs, bool) or not isinstance(target_macs, (int, float))
                                    or not 0.0 < target_macs < 1.0):
        raise NortonError(f"target_macs must be a fraction of the MACs to remove, in (0, 1), got {target_macs!r}")
    if target_speedup is not None and (isinstance(target_speedup, bool) or not isinstance(target_speedup, (int, float))
                                       or not target_speedup > 1.0 or not math.isfinite(target_speedup)):
        raise NortonError(f"target_speedup must be a number > 1 (e.g. 2 for twice as fast), got {target_speedup!r}")
    if allocation not in ALLOCATIONS:
        raise NortonError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if get_criterion(criterion).needs_factors:
        raise NortonError(f"the planner selects filters on the dense weights; criterion {criterion!r} needs CP "
                          "factors — use l2, l1, fpgm or random (or prune a decomposed model with norton.prune)")
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise NortonError(f"ranks must be positive integers, got {list(ranks)!r}")
    rank_options = sorted(set(ranks), reverse=True)
    if isinstance(forms, str) or not forms or any(f not in FORMS for f in forms):
        raise NortonError(f"forms must be a non-empty subset of {', '.join(FORMS)}, got {forms!r}")
    if isinstance(keep_steps, bool) or not isinstance(keep_steps, int) or keep_steps < 1:
        raise NortonError(f"keep_steps must be a positive integer, got {keep_steps!r}")
    if isinstance(trial_steps, bool) or not isinstance(trial_steps, int) or trial_steps < 0:
        raise NortonError(f"trial_steps must be an integer >= 0, got {trial_steps!r}")

    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    dtype = param.dtype if param is not None else torch.float32
    batches = _batches(data, device)
    dense = copy.deepcopy(model).eval()
    try:
        probe = _Probe(dense, batches)
    except Exception as err:
        raise NortonError(f"calibration images of shape {tuple(batches[0].shape)} do not fit the model "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    example = batches[0][:1]
    trial_images, held_out = None, None
    if trial_steps and allocation == "best":
        if sum(b.shape[0] for b in batches) < 2:
            raise NortonError("trial_steps needs at least 2 calibration images (half to train on, half to measure on)")
        trial_images, held_batches = split_calibration(batches, seed)
        held_out = _Probe(dense, held_batches)

    # what can change: decomposable convs, coupled groups
    graph = build_graph(dense, example)
    groups, _ = collect_groups(dense, graph, example, [dict(zip(model.modules(), dense.modules()))[m] for m in ignored_layers])
    totals = {g.info.root: g.info.total for g in groups}
    names = {m: n for n, m in dense.named_modules()}
    sizes = {n: tuple(x.shape[1:]) for n, x in block_inputs(dense, example, (nn.Conv2d, nn.Linear)).items()}
    layers = {n: _Layer(n, m, sizes[n]) for n, m in dense.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and n in sizes}
    for g in groups:
        for module, is_out, idxs, _ in g.members:
            name = names.get(module)
            if name in layers and (isinstance(module, nn.Linear) or module.groups == 1 or (is_depthwise(module) and is_out)):
                side = layers[name].out_groups if is_out else layers[name].in_groups
                if all(root != g.info.root for root, _ in side):
                    side.append((g.info.root, len(set(idxs)) / g.info.total))
    measure = "macs" if target_macs is not None else "seconds"
    costs = _CostModel(layers, measure, latency_batch, device, dtype)
    counter = costs if measure == "macs" else _CostModel(layers, "macs", 1, device, dtype)  # MACs, whatever the target

    units: list[_Unit] = []
    for name, layer in layers.items():
        if not is_decomposable(layer.module):
            continue
        n, c = layer.full
        factored = [*(rank_options if "cp" in forms else []),
                    *(dict.fromkeys((max(1, round(f * n)), max(1, round(f * c))) for f in TUCKER_FRACTIONS)
                      if "tucker2" in forms else [])]
        dense_cost = counter.layer_cost(layer, 0, n, c)
        cheaper = sorted((o for o in factored if counter.layer_cost(layer, o, n, c) < dense_cost),
                         key=lambda o: -counter.layer_cost(layer, o, n, c))  # most expensive first
        units.append(_Unit("rank", name, [0, *cheaper], layers=[name]))
    for g in groups:
        counts = sorted({max(1, round(g.info.total * s / keep_steps)) for s in range(keep_steps, 0, -1)}, reverse=True)
        affected = [n for n, layer in layers.items() if any(root == g.info.root for root, _ in layer.out_groups + layer.in_groups)]
        units.append(_Unit("keep", g.info.root, counts, layers=affected))

    # the budget (for a speed-up: after the latency model is calibrated, below)
    search = _Search(units, costs, totals)
    dense_macs = float(count_macs(dense, example))
    macs_search = _Search(units, counter, totals)
    counter.constant = dense_macs - sum(macs_search.layer_costs([0] * len(units)).values())
    if measure == "macs":
        full = search.cost([0] * len(units))
        budget = full * (1.0 - target_macs)
        cheapest = search.cost([len(u.options) - 1 for u in units])
        if cheapest > budget:
            raise NortonError(f"the target is out of reach: the planner's cheapest options (forms {', '.join(forms)}, "
                              f"rank {min(rank_options)}, 1/{keep_steps} of the filters) give {1 - cheapest / full:.1%} "
                              "fewer MACs")

    # the damage of every option alone
    blocks = _decompositions(dense, [u for u in units if u.kind == "rank"], seed, progress)
    trials = sum(len(u.options) - 1 for u in units)
    bar = tqdm(total=trials, desc="plan: damage of each option", unit="option", disable=not progress)
    for u in units:
        u.damage = [0.0]
        for option in u.options[1:]:
            if u.kind == "rank":  # the recomposed kernel (the same function, the fastest to evaluate here)
                with _swapped(dense, u.name, blocks[(u.name, option)].to_conv()):  # in place: no copy
                    u.damage.append(probe.damage(dense))
            else:
                trial = copy.deepcopy(dense)
                kept, _ = prune_in_place(trial, example, keep={u.name: option}, criterion=criterion, seed=seed)
                if recover:
                    refit(trial, dense, batches, kept, seed=seed)
                u.damage.append(probe.damage(trial))
            bar.update(1)
    bar.close()

    for u in units:  # between measured counts, any count: damage interpolated, so the budget can be met closely
        if u.kind == "keep":
            _refine_counts(u, FINE_KEEP_OPTIONS)

    # the corners, searched on their own as well: every layer dense (pruning only), every filter kept
    corners = {"pruning only": _Search([_only(u, 0) if u.kind == "rank" else u for u in units], costs, totals),
               "no pruning": _Search([_only(u, 0) if u.kind == "keep" else u for u in units], costs, totals)}

    whole_damage: dict[tuple[int, ...], float] = {}  # of whole candidate plans, kept across budgets

    def allocate(limit: float) -> tuple[str, list[int]]:
        candidates = {}
        if allocation in ("best", "greedy"):
            candidates["greedy"] = search.greedy(limit)
        if allocation in ("best", "lagrangian"):
            candidates["lagrangian"] = search.lagrangian(limit)
        if allocation == "best":
            for name, corner in corners.items():  # a corner's option indices are those of the full search
                if corner.cost([len(u.options) - 1 for u in corner.units]) <= limit:
                    candidates[f"greedy, {name}"] = corner.greedy(limit)
            uniform = uniform_pruning(units, search, limit)
            if uniform is not None:
                candidates["uniform pruning"] = uniform
        if allocation != "best" or len(candidates) == 1:
            best = min(candidates, key=lambda k: search.damage(candidates[k]))
            return best, candidates[best]
        # the summed damages of single options miss how they interact: each candidate
        # plan is built whole (with the refit, if any) and its damage measured
        for state in candidates.values():
            key = tuple(state)
            if key not in whole_damage:
                whole_damage[key] = measure_whole(build(state, refit_pruned=recover))
        best = min(candidates, key=lambda k: (whole_damage[tuple(candidates[k])], search.damage(candidates[k])))
        last_candidates.clear()
        last_candidates.update(candidates)
        return f"{best} (measured best of {len(candidates)})", candidates[best]

    last_candidates: dict[str, list[int]] = {}  # of the last allocation that measured whole candidates

    def measure_whole(trial: nn.Module) -> float:
        if trial_images is None:
            return probe.damage(trial)
        distill_trial(trial, dense, trial_images, trial_steps, seed=seed)
        return held_out.damage(trial)

    def build(state: Sequence[int], refit_pruned: bool = False) -> nn.Module:
        ranks_of, keep_of = search.config(state)
        trial = copy.deepcopy(dense)
        for name, rank in ranks_of.items():
            if rank:
                replace_module(trial, name, copy.deepcopy(blocks[(name, rank)]))
        reference = copy.deepcopy(trial) if refit_pruned else None
        kept, _ = prune_in_place(trial, example, keep={g: k for g, k in keep_of.items() if k < totals[g]},
                                 criterion=criterion, seed=seed)
        if reference is not None and any(g.width < g.total for g in kept):
            refit(trial, reference, batches, kept, seed=seed)
        return trial

    measured = None
    if measure == "seconds":  # the predicted latency steers; the deployed model's timing decides
        x = torch.randn(latency_batch, *batches[0].shape[1:], device=device, dtype=dtype)
        calibrate_latency(costs, search, build, x, progress)
        full = search.cost([0] * len(units))
        cheapest = search.cost(search.cheapest())
        budget = max(full / target_speedup, cheapest)  # the prediction may call it out of reach; the timing decides
        chosen, state, measured = meet_measured_speedup(target_speedup, budget, cheapest, allocate, build, dense, x,
                                                         search.damage, progress)
    else:
        chosen, state = allocate(budget)

    def as_plan(state: Sequence[int], allocated: str) -> Plan:
        ranks_chosen, keep = search.config(state)
        rank_units = {u.name: (u, i) for u, i in zip(units, state) if u.kind == "rank"}
        macs_per_layer = macs_search.layer_costs(state)
        layer_seconds = search.layer_costs(state) if measure == "seconds" else {}
        rows = []
        for name, layer in layers.items():
            n, c = costs.channels(layer, keep, totals)
            unit = rank_units.get(name)
            option = ranks_chosen.get(name, 0)
            rows.append(LayerRow(name=name, rank=option if isinstance(option, int) else 0, filters=n,
                                 total=layer.full[0], macs=int(macs_per_layer[name]),
                                 latency_ms=1000 * layer_seconds[name] if layer_seconds else None,
                                 damage=unit[0].damage[unit[1]] if unit else 0.0,
                                 tucker=list(option) if isinstance(option, tuple) else None))
        return Plan(
            target="macs" if target_macs is not None else "speedup",
            value=float(target_macs if target_macs is not None else target_speedup),
            ranks={n: (o if isinstance(o, int) else 0) for n, o in ranks_chosen.items()},
            tucker={n: list(o) for n, o in ranks_chosen.items() if isinstance(o, tuple)},
            keep=keep, totals=totals, criterion=criterion, allocation=allocated, seed=seed,
            macs_before=round(macs_search.cost([0] * len(units))),
            macs_after=round(macs_search.cost(state)),
            latency_before_ms=1000 * full if measure == "seconds" else None,
            latency_after_ms=1000 * search.cost(state) if measure == "seconds" else None,
            damage=search.damage(state), rows=rows,
            group_damage={u.name: u.damage[i] for u, i in zip(units, state) if u.kind == "keep"},
            measured_speedup=measured if state is chosen_state else None, recover=bool(recover),
            candidates={k: whole_damage[tuple(v)] for k, v in last_candidates.items()},
            trial_steps=trial_steps if trial_images is not None else 0,
        )

    chosen_state = state
    result = as_plan(state, chosen if allocation == "best" else allocation)
    if measure == "macs":  # every distinct whole candidate, as a plan of its own (for a selection after fine-tuning)
        seen_states: set[tuple[int, ...]] = set()
        for name, candidate in last_candidates.items():
            if tuple(candidate) not in seen_states:
                seen_states.add(tuple(candidate))
                result.alternatives[name] = as_plan(candidate, name).to_dict()
    return result


@contextlib.contextmanager
def _swapped(model: nn.Module, name: str, new: nn.Module) -> Iterator[nn.Module]:
    """``model`` with ``new`` in place of its submodule ``name``, put back after."""
    old = model.get_submodule(name)
    replace_module(model, name, new)
    try:
        yield model
    finally:
        replace_module(model, name, old)


def uniform_pruning(units: list[_Unit], search: _Search, limit: float) -> list[int] | None:
    """Every layer dense, every group keeping the same share of its filters (the
    largest share within ``limit``): what uniform filter pruning would choose."""
    def state(share: float) -> list[int]:
        out = []
        for u in units:
            if u.kind == "rank":
                out.append(0)
            else:  # the smallest count not below the share (counts descend)
                want = u.options[0] * share
                out.append(sum(c >= want - 1e-9 for c in u.options) - 1)
        return out

    low, high = 0.0, 1.0
    if search.cost(state(low)) > limit:
        return None
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (mid, high) if search.cost(state(mid)) <= limit else (low, mid)
    return state(low)


def _only(unit: _Unit, index: int) -> _Unit:
    """``unit`` restricted to one option (its index stays valid: the first)."""
    return _Unit(unit.kind, unit.name, unit.options[index:index + 1], unit.damage[index:index + 1], unit.layers)


def calibrate_latency(costs: _CostModel, search: _Search, build, x: Tensor, progress: bool) -> None:
    """Fit the latency model to whole deployed models: isolated layer timings
    do not add up to a deployed network (fused BatchNorm, memory format,
    caches, per-call overhead differ by form), so seven sample models — dense
    and uniformly pruned to 1/2 and 1/4, every layer at a middle CP or Tucker-2
    option at full and half width — are deployed and timed round-robin, and
    ``costs``' constant and per-form factors are the non-negative least-squares
    fit of those timings to the models' summed layer predictions by form."""
    def pick(u: _Unit, form: str, fraction: float) -> int:
        if u.kind == "rank":
            of_form = [i for i, o in enumerate(u.options) if form_of(o) == form]
            return of_form[len(of_form) // 2] if of_form else 0
        return min(range(len(u.options)), key=lambda i: abs(u.options[i] - fraction * u.options[0]))

    forms = [f for f in FORMS if any(form_of(o) == f for u in search.units if u.kind == "rank" for o in u.options)]
    samples = [("dense", 1.0), ("dense", 0.5), ("dense", 0.25), *((f, w) for f in forms for w in (1.0, 0.5))]
    states = {f"{form} {width}": [pick(u, form, width) for u in search.units] for form, width in samples}
    deployed = {name: deploy(build(state), x)[0]
                for name, state in tqdm(states.items(), desc="plan: calibrate latency", unit="model", disable=not progress)}
    with torch.no_grad():
        timing = compare_latency(deployed, x)
    costs.scales = dict.fromkeys(costs.scales, 1.0)
    costs.constant = 0.0
    features = []
    for state in states.values():
        ranks, _ = search.config(state)
        by_form = dict.fromkeys(costs.scales, 0.0)
        for name, seconds in search.layer_costs(state).items():
            by_form[form_of(ranks.get(name, 0))] += seconds
        features.append([1.0, *by_form.values()])
    fit = fit_nonnegative(features, [timing[name].median_ms / 1000 for name in states])
    costs.constant = fit[0]
    for form, scale in zip(list(costs.scales), fit[1:]):
        # a form the samples cannot separate (no sample, or a zero fit) keeps the dense layers' factor
        costs.scales[form] = scale if scale > 0 else (fit[1] or 1.0)


SPEEDUP_ROUNDS = 6  # deployed candidates timed per speed-up target
SPEEDUP_SLACK = 0.04  # a measured speed-up up to 4 % above the target is close enough


def meet_measured_speedup(target: float, budget: float, cheapest: float, allocate, build, dense: nn.Module,
                          x: Tensor, damage, progress: bool) -> tuple[str, list[int], float]:
    """Allocate at a latency budget, deploy the candidate, time it against the
    deployed dense model (round-robin, median) and move the budget until the
    measured speed-up meets the target (within ``SPEEDUP_SLACK`` above it):
    by the ratio measured/target until one budget met the target and one did
    not, then by bisection between them (in log scale) — predicted and measured
    latency need not be proportional.  Returns the least damaging candidate that
    met it; none → a clear error with the speed-ups measured."""
    reference = deploy(dense, x)[0]
    met, tried = [], []
    fast = slow = None  # the largest budget that met the target, the smallest that did not
    for _ in tqdm(range(SPEEDUP_ROUNDS), desc="plan: time deployed candidates", unit="plan", disable=not progress):
        name, state = allocate(budget)
        timing = compare_latency({"dense": reference, "plan": deploy(build(state), x)[0]}, x)
        got = timing["dense"].median_ms / timing["plan"].median_ms
        tried.append(got)
        if got >= target:
            met.append((damage(state), name, state, got))
            if got <= target * (1 + SPEEDUP_SLACK):
                break
            fast = budget if fast is None else max(fast, budget)
        else:
            slow = budget if slow is None else min(slow, budget)
        moved = math.sqrt(fast * slow) if fast is not None and slow is not None else budget * got / target
        moved = max(moved, cheapest)
        if moved == budget:  # already at the cheapest options
            break
        budget = moved
    if not met:
        raise NortonError(f"target_speedup {target:g} is out of reach as measured here: the deployed candidates "
                          f"ran {', '.join(f'{t:.2f}×' for t in tried)} faster than the deployed model; "
                          "ask for less, or give more rank and filter options (ranks=, keep_steps=)")
    _, name, state, got = min(met, key=lambda m: m[0])
    return name, state, got


def _refine_counts(unit: _Unit, most: int) -> None:
    """Every filter count from the largest to the smallest measured one (at
    most ``most`` of them, evenly spread), damage linear in between."""
    measured = list(zip(unit.options, unit.damage))  # descending counts
    high, low = measured[0][0], measured[-1][0]
    step = max(1, math.ceil((high - low) / most))
    counts = sorted({*range(high, low - 1, -step), *unit.options}, reverse=True)
    damage = []
    for count in counts:
        for (c0, d0), (c1, d1) in zip(measured, measured[1:]):
            if c1 <= count <= c0:
                damage.append(d0 + (d1 - d0) * (c0 - count) / (c0 - c1))
                break
        else:
            damage.append(measured[0][1] if count == high else measured[-1][1])
    unit.options, unit.damage = counts, damage


def _decompositions(model: nn.Module, units: list[_Unit], seed: int, progress: bool
                    ) -> dict[tuple[str, int | tuple[int, int]], CPDBlock | TuckerBlock]:
    """Every decomposable conv as a CPDBlock at every rank it may take, and as a
    TuckerBlock at every pair of ranks."""
    blocks: dict = {}
    for u in units:
        for option in u.options[1:]:
            if isinstance(option, tuple):
                blocks[(u.name, option)] = TuckerBlock.from_conv(model.get_submodule(u.name), option)
    ranks = sorted({r for u in units for r in u.options[1:] if isinstance(r, int)})
    for rank in tqdm(ranks, desc="plan: decompose at each rank", unit="rank", disable=not progress):
        names = [u.name for u in units if rank in u.options]
        trial = copy.deepcopy(model)
        decompose(trial, rank, layer_ranks={u.name: (rank if u.name in names else 0) for u in units},
                  progress=False, seed=seed)
        for name in names:
            blocks[(name, rank)] = trial.get_submodule(name)
    return blocks
