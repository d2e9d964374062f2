"""What a plan costs: a model's MACs or its latency on this machine, as a
constant plus one term per conv and linear layer, for any choice of ranks
(dense, CP, Tucker-2) and kept filters — without building the model."""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from norton.compression.graph import is_depthwise
from norton.core import DTYPE_NAMES, CPDBlock, TuckerBlock, conv_output_size, device_name
from norton.core.plans import time_call, time_plans
from norton.deployment import time_tucker

FORMS = ("cp", "tucker2")  # factored forms a layer may take besides dense
_LATENCY_CACHE: dict[tuple, float] = {}  # layer timings by device name, dtype, batch, shape and widths


@dataclass
class PlanLayer:
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


class CostModel:
    """Cost of the model for any choice of ranks and kept filters, as a constant
    plus the sum of its convs' and linears' costs: MACs (counted), or seconds.
    Seconds come from a model per layer shape and rank — a + b·MACs + d·values
    moved, coefficients ≥ 0 fitted to the fastest execution plan timed on
    ``batch`` images at four widths (full, half the outputs, half the inputs, a
    quarter of both) — so that filter counts never timed get a smooth estimate
    instead of one noisy timing each."""

    def __init__(self, layers: dict[str, PlanLayer], measure: str, batch: int, device, dtype):
        self.layers, self.measure, self.batch = layers, measure, batch
        self.device, self.dtype = device, dtype
        self._memo: dict[tuple, float] = {}
        self._fits: dict[tuple, list[float]] = {}
        self.constant = 0.0
        # seconds: per-form factors calibrating the isolated layer timings against whole deployed models
        self.scales = dict.fromkeys(("dense", *FORMS), 1.0)

    def channels(self, layer: PlanLayer, keep: Mapping[str, int], totals: Mapping[str, int]) -> tuple[int, int]:
        n, c = layer.full
        n -= round(sum((totals[g] - keep[g]) * per for g, per in layer.out_groups))
        c -= round(sum((totals[g] - keep[g]) * per for g, per in layer.in_groups))
        return max(n, 1), max(c, 1)

    def layer_cost(self, layer: PlanLayer, rank: int, n: int, c: int) -> float:
        return self.unscaled_cost(layer, rank, n, c) * self.scales[form_of(rank)]

    def unscaled_cost(self, layer: PlanLayer, rank: int, n: int, c: int) -> float:
        """``layer_cost`` before the per-form calibration factor (which may change later)."""
        m = layer.module
        if isinstance(m, nn.Linear):
            key = ("linear", n, c, layer.in_size[:-1], m.bias is not None)
        else:
            key = ("conv", n, c, m.kernel_size, m.stride, m.padding, m.dilation, m.bias is not None, m.padding_mode,
                   layer.in_size[1:], rank, type(m).__name__, "depthwise" if is_depthwise(m) else m.groups)
        if key not in self._memo:
            self._memo[key] = self._estimate(key, layer, rank, n, c)
        return self._memo[key]

    def _estimate(self, key: tuple, layer: PlanLayer, rank: int, n: int, c: int) -> float:
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
            seconds = [self._time(layer, rank, w_n, w_c, shape_key) for w_n, w_c in widths]
            self._fits[shape_key] = fit_nonnegative(features, seconds)
        a, b, d = self._fits[shape_key]
        return a + b * macs + d * float(layer_elements(m, n, c, layer.in_size))

    def _time(self, layer: PlanLayer, rank: int, n: int, c: int, shape_key: tuple) -> float:
        """Seconds per call of the layer's fastest deployed form at these widths, timed once per process
        for each device name and dtype (``_LATENCY_CACHE``)."""
        m = layer.module
        grouping = (m.groups, is_depthwise(m)) if isinstance(m, nn.Conv2d) else ()
        key = (self.device_key, str(self.dtype), self.batch, shape_key, grouping, n, c)
        if key not in _LATENCY_CACHE:
            _LATENCY_CACHE[key] = self._time_once(layer, rank, n, c)
        return _LATENCY_CACHE[key]

    @functools.cached_property
    def device_key(self) -> str:
        """The hardware the timings are of (read once: it reads /proc/cpuinfo on a CPU)."""
        return device_name(self.device or "cpu")

    def _time_once(self, layer: PlanLayer, rank: int, n: int, c: int) -> float:
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


# -- widths the hardware likes ------------------------------------------------------------------
ROUND_TO_OPTIONS = (1, 2, 4, 8, 16, 32)
ROUND_TO_WIDTHS = range(96, 161)  # output widths timed: every one from 96 to 160 (multiples of 32 among them)
ROUND_TO_GAIN = 0.05  # a larger multiple is chosen only for this much more throughput
_ROUND_TO_CACHE: dict[tuple[str, str, int, int], int] = {}


def measure_round_to(device, dtype: torch.dtype = torch.float32, *, batch: int = 32, size: int = 16,
                     in_channels: int = 128, repeats: int = 5, timer=None) -> int:
    """The multiple of filters a pruned layer should keep on ``device`` in
    ``dtype``, from measurement: a 3×3 conv of ``in_channels`` inputs is timed
    at every output width in ``ROUND_TO_WIDTHS`` on ``batch`` images of
    ``size``² pixels, and for each multiple m of ``ROUND_TO_OPTIONS`` the
    mean throughput (filters per second) of the widths divisible by m is
    taken; the answer is the smallest m within ``ROUND_TO_GAIN`` of the best —
    8 where bfloat16 tensor cores want it, 1 where any width runs as well.
    Cached per device name, dtype, batch and size."""
    device = torch.device(device)
    key = (device_name(device), DTYPE_NAMES.get(dtype, str(dtype)), batch, size)
    if timer is None and key in _ROUND_TO_CACHE:
        return _ROUND_TO_CACHE[key]
    timer = timer or time_call
    x = torch.randn(batch, in_channels, size, size, device=device, dtype=dtype)
    throughput = {}
    for width in ROUND_TO_WIDTHS:
        conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False).to(device, dtype).eval()
        with torch.no_grad():
            throughput[width] = width / timer(lambda: conv(x), x, repeats)
    score = {m: sum(t for w, t in throughput.items() if w % m == 0) / len([w for w in throughput if w % m == 0])
             for m in ROUND_TO_OPTIONS}
    best = max(score.values())
    chosen = min(m for m in ROUND_TO_OPTIONS if score[m] >= (1 - ROUND_TO_GAIN) * best)
    if timer is time_call:
        _ROUND_TO_CACHE[key] = chosen
    return chosen
