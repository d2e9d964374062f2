"""The planner's damage probe: how far a changed model's outputs move from the
uncompressed model's on the calibration images.

A probe changes one layer (its kernel recomposed at a rank) or one group of
filters (zeroed in place, ``zero_channels``), so everything the network
computes before that layer is what the reference computed.  The model is traced
once (``torch.fx``); at every *cut point* — a node that every path from the
input to the output passes through, such as a residual block's output — the
reference activations of each calibration batch are cached (within a memory
budget), and a probe runs the network only from the last cut point before the
first layer it changed.  The results are those of a whole forward: the same
operations on the same values.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from norton.core import ChannelPadShortcut, CPDBlock, TuckerBlock, batch_statistics, replace_module
from norton.core.surgery import flatten_tensors

CACHE_BYTES = 2 << 30  # activations kept for skipping the unchanged front of the network


class _Tracer(fx.Tracer):
    """Layers a probe may hook or swap stay modules of the traced graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (CPDBlock, TuckerBlock, ChannelPadShortcut, FrozenBatchNorm2d))
                or super().is_leaf_module(m, qualname))


class CachedForward:
    """``model`` traced, with the activations of the calibration batches at its
    cut points cached; ``run(i, changed)`` computes batch i's outputs starting
    from the last cached cut point before the first of the ``changed`` layers.
    Swap layers with ``swapped`` (on the traced module); forward hooks on the
    layers (shared with ``model``) act as they would on ``model``."""

    def __init__(self, model: nn.Module, batches: list[Tensor], budget: int = CACHE_BYTES):
        self.module = fx.GraphModule(model, _Tracer().trace(model))
        self.nodes = list(self.module.graph.nodes)
        self.position = {node: i for i, node in enumerate(self.nodes)}
        self.first_call = {}  # module name -> position of its first call
        for i, node in enumerate(self.nodes):
            if node.op == "call_module":
                self.first_call.setdefault(node.target, i)
        self.batches = batches
        candidates = self._cut_points()
        self.cache: list[dict[fx.Node, Tensor]] = []
        with torch.no_grad(), batch_statistics(self.module):
            for x in batches:
                values = self._execute(0, {self.nodes[0]: x}, keep=set(candidates))
                self.cache.append(values)
        per_cut = {n: sum(v[n].numel() * v[n].element_size() for v in self.cache) for n in candidates}
        chosen, used = [], 0
        for node in reversed(candidates):  # from the output back: those save the most
            if used + per_cut[node] <= budget:
                chosen.append(node)
                used += per_cut[node]
        for values in self.cache:
            for node in [n for n in values if n not in chosen]:
                del values[node]
        self.cuts = sorted(self.position[n] for n in chosen)

    def _cut_points(self) -> list[fx.Node]:
        """Nodes after which no other value computed earlier is still needed."""
        last_use = {}
        for i, node in enumerate(self.nodes):
            for arg in node.all_input_nodes:
                if arg.op != "get_attr":
                    last_use[arg] = i
        cuts, live = [], set()
        for i, node in enumerate(self.nodes[:-1]):
            if node.op != "get_attr":
                live.add(node)
            live = {n for n in live if last_use.get(n, -1) > i}
            if live == {node} and node.op != "placeholder":
                cuts.append(node)
        return cuts

    def _fetch(self, target: str):
        value = self.module
        for part in target.split("."):
            value = getattr(value, part)
        return value

    def _execute(self, begin: int, env: dict, keep: set | None = None):
        """Run the nodes from position ``begin`` on, given ``env`` (the values they need from before it);
        the output, or with ``keep`` the values of those nodes."""
        kept: dict = {}

        def load(node: fx.Node):
            if node not in env and node.op == "get_attr":
                env[node] = self._fetch(node.target)
            return env[node]

        for node in self.nodes[begin:]:
            if node in env:  # the input, given
                continue
            args = fx.node.map_arg(node.args, load)
            kwargs = fx.node.map_arg(node.kwargs, load)
            if node.op == "output":
                return args[0] if keep is None else kept
            if node.op == "get_attr":
                env[node] = self._fetch(node.target)
            elif node.op == "call_module":
                env[node] = self.module.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            else:  # call_method
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            if keep is not None and node in keep:
                kept[node] = env[node]
        raise RuntimeError("the traced graph has no output")

    def start_for(self, changed: Iterable[str]) -> int | None:
        """The position of the last cached cut point before every changed layer (None: run it all)."""
        first = min((self.first_call.get(name, 0) for name in changed), default=0)
        before = [c for c in self.cuts if c < first]
        return before[-1] if before else None

    def run(self, index: int, changed: Iterable[str]):
        start = self.start_for(changed)
        if start is None:
            return self._execute(0, {self.nodes[0]: self.batches[index]})
        node = self.nodes[start]
        return self._execute(start + 1, {node: self.cache[index][node]})

    @contextlib.contextmanager
    def swapped(self, name: str, new: nn.Module) -> Iterator[None]:
        """The traced module with ``new`` in place of its layer ``name``, put back after."""
        old = self.module.get_submodule(name)
        replace_module(self.module, name, new)
        try:
            yield
        finally:
            replace_module(self.module, name, old)


class Probe:
    """Damage of a changed model: divergence of its outputs from the reference
    model's on the calibration batches, every BatchNorm normalising with the
    batch's own statistics (BN re-estimation and evaluation in one pass; the
    reference is computed the same way, so an unchanged model has damage 0).
    With ``cached`` (a ``CachedForward`` of the reference model), ``damage(None,
    changed)`` measures the traced model from the first changed layer on."""

    def __init__(self, model: nn.Module, batches: list[Tensor], cached: CachedForward | None = None):
        self.batches, self.cached = batches, cached
        self.reference = [self._outputs(model, x) for x in batches]

    @staticmethod
    @torch.no_grad()
    def _outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
        with batch_statistics(model):
            return _float64(model(x))

    @torch.no_grad()
    def damage(self, model: nn.Module | None, changed: Iterable[str] = (), batches: Sequence[int] | None = None
               ) -> float:
        """The mean divergence over the calibration batches (over those numbered in ``batches``, if given)."""
        total = 0.0
        changed = list(changed)
        indices = range(len(self.batches)) if batches is None else batches
        with batch_statistics(self.cached.module if model is None else model):
            for i in indices:
                out = self.cached.run(i, changed) if model is None else model(self.batches[i])
                total += divergence(_float64(out), self.reference[i])
        return total / len(indices)


def _float64(outputs) -> list[Tensor]:
    """A model's outputs as a flat list of float64 tensors, the form divergences are taken in."""
    return [t.detach().to(torch.float64) for t in flatten_tensors(outputs)]


def probe_layout(model: nn.Module, batches: list[Tensor]) -> tuple[nn.Module, list[Tensor]]:
    """``model`` (a copy) and ``batches`` in channels-last memory layout, the
    layout the planner's probes run in whenever the images are 4-D and the
    model has convolutions: a batch-statistics forward of ResNet-20 on 256
    16×16 images took 47.7 ms against 58.7 ms contiguous on 2 CPU cores
    (``benchmarks/planner_speed.py --layout``).  A fixed
    rule, not a timing: the same call gives the same damages to the last
    digit (the values differ from contiguous only by float rounding)."""
    if batches[0].dim() != 4 or not any(p.dim() == 4 for p in model.parameters()):
        return model, batches
    return (copy.deepcopy(model).to(memory_format=torch.channels_last),
            [b.contiguous(memory_format=torch.channels_last) for b in batches])


def divergence(got: list[Tensor], want: list[Tensor]) -> float:
    """KL(reference ‖ changed) of logits (mean over images); relative squared error of other outputs."""
    total = 0.0
    for g, w in zip(got, want):
        if w.dim() == 2:
            total += float(F.kl_div(F.log_softmax(g, 1), F.log_softmax(w, 1), log_target=True, reduction="batchmean"))
        else:
            total += float(((g - w) ** 2).sum() / (w ** 2).sum().clamp_min(1e-30))
    return total
