"""The planner's search: each unit (a layer's form, a group's filter count)
has options ordered from the most to the least expensive with their measured
damages; the allocations choose one option per unit so that the cost meets
a budget with the least summed damage."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from norton.compression.costs import CostModel, form_of
from norton.errors import NortonError

FILL_TOLERANCE = 0.005  # a plan's cost ends within half a point of the full cost below its budget


@dataclass
class Unit:
    """One choice: a layer's rank or a group's filter count, with its options
    ordered from the most to the least expensive and their measured damages."""

    kind: str  # "rank" or "keep"
    name: str
    options: list[int]
    damage: list[float] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)  # layers whose cost depends on it


class Search:
    def __init__(self, units: list[Unit], costs: CostModel, totals: dict[str, int]):
        self.units, self.costs, self.totals = units, costs, totals
        # a layer's widths depend only on the filter counts of its own groups
        self._groups = {name: tuple(dict.fromkeys(g for g, _ in layer.out_groups + layer.in_groups))
                        for name, layer in costs.layers.items()}
        self._raw: dict[tuple, float] = {}  # (layer, rank, its groups' filter counts) -> cost before the form scales
        # what a unit's option costs depend on: the ranks and the groups' filter counts of its layers
        self._depends = [(tuple(n for n in u.layers if n != u.name or u.kind != "rank"),
                          tuple(dict.fromkeys(g for n in u.layers for g in self._groups[n] if g != u.name or u.kind != "keep")))
                         for u in units]
        self._options: dict[tuple, list[float]] = {}
        self._touching: list[list[int]] | None = None  # per unit: the units that share a layer with it (itself too)

    def config(self, state: Sequence[int]) -> tuple[dict[str, int], dict[str, int]]:
        ranks = {u.name: u.options[i] for u, i in zip(self.units, state) if u.kind == "rank"}
        keep = dict(self.totals)
        keep.update({u.name: u.options[i] for u, i in zip(self.units, state) if u.kind == "keep"})
        return ranks, keep

    def layer_costs(self, state: Sequence[int], names: Iterable[str] | None = None) -> dict[str, float]:
        ranks, keep = self.config(state)
        return {name: self._layer_cost(name, ranks, keep) for name in (self.costs.layers if names is None else names)}

    def _layer_cost(self, name: str, ranks: Mapping[str, int], keep: Mapping[str, int]) -> float:
        rank = ranks.get(name, 0)
        key = (name, rank, *[keep[g] for g in self._groups[name]])
        raw = self._raw.get(key)
        if raw is None:  # the cost model's own memo is keyed by shape; this one skips building that key
            layer = self.costs.layers[name]
            raw = self._raw[key] = self.costs.unscaled_cost(layer, rank, *self.costs.channels(layer, keep, self.totals))
        return raw * self.costs.scales[form_of(rank)]

    def _option_costs(self, k: int, ranks: dict[str, int], keep: dict[str, int]) -> list[float]:
        """The summed cost of unit ``k``'s layers at each of its options, the
        other units as in ``ranks`` / ``keep`` (restored on return)."""
        u = self.units[k]
        layers, groups = self._depends[k]
        key = (k, tuple(u.options), tuple(self.costs.scales.values()), *[ranks.get(n, 0) for n in layers],
               *[keep[g] for g in groups])
        out = self._options.get(key)
        if out is not None:
            return out
        table = ranks if u.kind == "rank" else keep
        saved = table[u.name]
        out = []
        try:
            for option in u.options:
                table[u.name] = option
                out.append(sum(self._layer_cost(name, ranks, keep) for name in u.layers))
        finally:
            table[u.name] = saved
        self._options[key] = out
        return out

    def cost(self, state: Sequence[int]) -> float:
        return self.costs.constant + sum(self.layer_costs(state).values())

    def cheapest(self) -> list[int]:
        """Every group at its fewest filters, every layer at its least costly
        option at those widths (by MACs, options are ordered; by predicted
        seconds, not necessarily)."""
        state = [len(u.options) - 1 for u in self.units]
        ranks, keep = self.config(state)
        for k, u in enumerate(self.units):
            if u.kind == "rank":
                costs = self._option_costs(k, ranks, keep)
                state[k] = min(range(len(u.options)), key=costs.__getitem__)
                ranks[u.name] = u.options[state[k]]
        return state

    def damage(self, state: Sequence[int]) -> float:
        return sum(u.damage[i] for u, i in zip(self.units, state))

    def _moves(self, state: list[int], current: dict[str, float]):
        """(unit index, option, Δdamage, Δcost) of every single-unit change
        (options are ordered by MACs, which need not be the order of the cost)."""
        ranks, keep = self.config(state)
        for k, u in enumerate(self.units):
            before = sum(current[n] for n in u.layers)
            for j, cost in enumerate(self._option_costs(k, ranks, keep)):
                if j != state[k]:
                    yield k, j, u.damage[j] - u.damage[state[k]], cost - before

    def greedy(self, budget: float) -> list[int]:
        """Cheapen the unit with the least damage per cost saved until the budget is met (the first such
        unit and option, in order, on a tie).  Each unit's best step is kept and found again only for the
        units whose layers the last step changed."""
        state = [0] * len(self.units)
        current = self.layer_costs(state)
        if self._touching is None:
            layers = [set(u.layers) for u in self.units]
            self._touching = [[k2 for k2, other in enumerate(layers) if mine & other or k2 == k]
                              for k, mine in enumerate(layers)]
        ranks, keep = self.config(state)
        steps = [self._cheapening(k, state, current, ranks, keep) for k in range(len(self.units))]
        while self.costs.constant + sum(current.values()) > budget:
            best = None
            for k, step in enumerate(steps):
                if step is not None and (best is None or step[0] < best[0]):
                    best = (step[0], k, step[1])
            if best is None:
                raise NortonError("the planner cannot reduce the cost any further")
            k = best[1]
            state[k] = best[2]
            current = self.layer_costs(state)
            ranks, keep = self.config(state)
            for other in self._touching[k]:
                steps[other] = self._cheapening(other, state, current, ranks, keep)
        return self.refill(state, budget)

    def _cheapening(self, k: int, state: Sequence[int], current: Mapping[str, float], ranks: dict[str, int],
                    keep: dict[str, int]) -> tuple[float, int] | None:
        """Unit ``k``'s option of least damage added per cost saved (the first on a tie), with that ratio;
        None if none of its options costs less."""
        u = self.units[k]
        before = sum(current[n] for n in u.layers)
        best = None
        for j, cost in enumerate(self._option_costs(k, ranks, keep)):
            d_cost = cost - before
            if j == state[k] or d_cost >= 0:
                continue
            score = (u.damage[j] - u.damage[state[k]]) / -d_cost
            if best is None or score < best[0]:
                best = (score, j)
        return best

    def lagrangian(self, budget: float) -> list[int]:
        """Minimise damage + λ·cost by coordinate descent, λ bisected (in log
        scale) to the smallest value that meets the budget."""
        base = self.cost([0] * len(self.units))

        def solve(lam: float) -> list[int]:
            state = [0] * len(self.units)
            ranks, keep = self.config(state)
            for _ in range(8):
                changed = False
                for k, u in enumerate(self.units):  # the other layers' cost does not depend on this unit's option
                    costs = self._option_costs(k, ranks, keep)
                    scores = [u.damage[j] + lam * cost / base for j, cost in enumerate(costs)]
                    j = min(range(len(scores)), key=scores.__getitem__)
                    changed |= j != state[k]
                    state[k] = j
                    (ranks if u.kind == "rank" else keep)[u.name] = u.options[j]
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



def uniform_pruning(units: list[Unit], search: Search, limit: float) -> list[int] | None:
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


def only_option(unit: Unit, index: int) -> Unit:
    """``unit`` restricted to one option (its index stays valid: the first)."""
    return Unit(unit.kind, unit.name, unit.options[index:index + 1], unit.damage[index:index + 1], unit.layers)


def refine_counts(unit: Unit, most: int, multiple: int = 1) -> None:
    """Every filter count from the largest to the smallest measured one (at
    most ``most`` of them, evenly spread; with ``multiple``, multiples of it
    besides the measured counts), damage linear in between."""
    measured = list(zip(unit.options, unit.damage))  # descending counts
    high, low = measured[0][0], measured[-1][0]
    step = multiple * max(1, math.ceil((high - low) / most / multiple))
    top = high - high % multiple
    counts = sorted({*(c for c in range(top, low - 1, -step) if c > 0), *unit.options}, reverse=True)
    damage = []
    for count in counts:
        for (c0, d0), (c1, d1) in zip(measured, measured[1:]):
            if c1 <= count <= c0:
                damage.append(d0 + (d1 - d0) * (c0 - count) / (c0 - c1))
                break
        else:
            damage.append(measured[0][1] if count == high else measured[-1][1])
    unit.options, unit.damage = counts, damage
