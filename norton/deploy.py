"""Compressed models that really run faster.

``tune_plans`` times every execution plan of every CPDBlock on the input it
actually sees and keeps the fastest (for training: forward + backward).
``deploy`` returns an inference copy in which BatchNorm is folded into the
preceding convolution, each CPDBlock becomes whichever is fastest on this
machine — its best factored plan or a plain dense conv — and the memory format
(channels-last or not) is the faster one for the whole network.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from norton.cpd_block import CPDBlock
from norton.decompose import _replace
from norton.errors import NortonError
from norton.prune import _as_tuple

FACTORED_PLANS = ("separable", "depthwise", "dense")
_TIMING_CACHE: dict[tuple, dict[str, float]] = {}


def _block_inputs(model: nn.Module, example_inputs) -> dict[str, Tensor]:
    """The input each CPDBlock receives on ``example_inputs``."""
    seen: dict[str, Tensor] = {}
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.setdefault(names[mod], args[0].detach()))
             for m in model.modules() if isinstance(m, CPDBlock)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*_as_tuple(example_inputs))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


def _sync(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def _time(fn, x: Tensor, repeats: int) -> float:
    fn()  # warm-up (also lets oneDNN pick its kernels)
    _sync(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(x)
        best = min(best, time.perf_counter() - start)
    return best


def _signature(block: CPDBlock, x: Tensor, training: bool, extra: str = "") -> tuple:
    return (block.in_channels, block.out_channels, block.rank, block.kernel_size, block.stride, block.padding,
            block.dilation, block.bias is not None, tuple(x.shape), x.dtype, str(x.device),
            x.is_contiguous(memory_format=torch.channels_last), training, extra)


def time_plans(block: CPDBlock, x: Tensor, *, training: bool = False, repeats: int = 3,
               with_conv: bool = False) -> dict[str, float]:
    """Seconds per call of each plan on ``x`` (forward, or forward + backward when
    ``training``); ``with_conv`` adds a plain ``nn.Conv2d`` (inference only)."""
    key = _signature(block, x, training, "conv" if with_conv else "")
    if key in _TIMING_CACHE:
        return _TIMING_CACHE[key]
    saved = block.plan
    times = {}
    try:
        for plan in FACTORED_PLANS:
            block.set_plan(plan)
            if training:
                inp = x.clone().requires_grad_(True)

                def step():
                    block.zero_grad(set_to_none=True)
                    block(inp).sum().backward()

                times[plan] = _time(step, x, repeats)
            else:
                with torch.no_grad():
                    times[plan] = _time(lambda: block(x), x, repeats)
        if with_conv and not training:
            conv = block.to_conv().eval()
            with torch.no_grad():
                times["conv"] = _time(lambda: conv(x), x, repeats)
    finally:
        block.plan = saved
    _TIMING_CACHE[key] = times
    return times


def tune_plans(model: nn.Module, example_inputs, *, training: bool = False, repeats: int = 3) -> dict[str, str]:
    """Set every CPDBlock to its fastest plan for this input; returns {layer: plan}."""
    inputs = _block_inputs(model, example_inputs)
    chosen = {}
    for name, module in model.named_modules():
        if isinstance(module, CPDBlock) and name in inputs:
            times = time_plans(module, inputs[name], training=training, repeats=repeats)
            module.set_plan(min(times, key=times.get))
            chosen[name] = module.plan
    return chosen


# -- BatchNorm folding ------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, CPDBlock) or super().is_leaf_module(m, qualname)


@torch.no_grad()
def fold_bn_into_block(block: CPDBlock, bn: nn.BatchNorm2d) -> None:
    """Scale filter n by γ/σ (through its horizontal factors) and absorb the shift in the bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
    block.horizontal.mul_(scale.repeat(block.rank).view(-1, 1, 1, 1))
    old_bias = block.bias if block.bias is not None else torch.zeros_like(scale)
    block.bias = nn.Parameter(old_bias * scale + shift)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A traced copy of an eval-mode ``model`` with every BatchNorm that directly
    follows a conv / CPDBlock (and is its only user) folded into it."""
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        producer, bn = modules[source.target], modules[node.target]
        if not bn.track_running_stats:
            continue
        if isinstance(producer, CPDBlock):
            fold_bn_into_block(producer, bn)
        elif type(producer) is nn.Conv2d:
            _replace(gm, source.target, fuse_conv_bn_eval(producer, bn))
        else:
            continue
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.default_input_size = getattr(model, "default_input_size", None)
    return gm, folded


# -- deploy -----------------------------------------------------------------------------------------
class ChannelsLast(nn.Module):
    """Runs the wrapped model on a channels-last copy of its input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


@dataclass
class DeployReport:
    layers: dict[str, str] = field(default_factory=dict)  # CPDBlock -> "conv" or its factored plan
    timings_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    folded_batchnorms: int = 0
    fold_error: str | None = None
    channels_last: bool = False
    max_abs_error: float = 0.0

    def table(self) -> str:
        rows = [f"{'layer':<32} {'chosen':<10} timings (ms per call)"]
        for name, choice in self.layers.items():
            t = "  ".join(f"{k} {v:.2f}" for k, v in self.timings_ms[name].items())
            rows.append(f"{name:<32} {choice:<10} {t}")
        rows.append(f"BatchNorms folded: {self.folded_batchnorms}" + (f" (folding skipped: {self.fold_error})" if self.fold_error else ""))
        rows.append(f"memory format: {'channels-last' if self.channels_last else 'contiguous'}; "
                    f"max |output difference| vs. the original: {self.max_abs_error:.2e}")
        return "\n".join(rows)


@torch.no_grad()
def _whole(model: nn.Module, x: Tensor, repeats: int) -> float:
    return _time(lambda: model(x), x, repeats)


def deploy(model: nn.Module, example_inputs, *, fold_bn: bool = True, repeats: int = 3,
           memory_format: str = "auto", tolerance: float = 1e-3) -> tuple[nn.Module, DeployReport]:
    """An inference copy of ``model`` that is as fast as this machine allows.

    ``memory_format``: "auto" (time both), "channels_last" or "contiguous".
    Raises if the deployed outputs differ from the original's by more than
    ``tolerance`` relative to their scale.
    """
    if memory_format not in ("auto", "channels_last", "contiguous"):
        raise NortonError(f"memory_format must be auto, channels_last or contiguous, got {memory_format!r}")
    x = _as_tuple(example_inputs)[0]
    original = model
    was_training = original.training
    original.eval()
    with torch.no_grad():
        reference = original(x)
    original.train(was_training)
    deployed = copy.deepcopy(original).eval()
    report = DeployReport()
    if fold_bn:
        try:
            deployed, report.folded_batchnorms = fold_batchnorm(deployed)
        except Exception as err:  # models that torch.fx cannot trace keep their BatchNorms
            report.fold_error = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"

    # each CPDBlock: its fastest factored plan, or a dense conv
    inputs = _block_inputs(deployed, x)
    for name, module in list(deployed.named_modules()):
        if not isinstance(module, CPDBlock) or name not in inputs:
            continue
        times = time_plans(module, inputs[name], repeats=repeats, with_conv=True)
        choice = min(times, key=times.get)
        report.timings_ms[name] = {k: 1000 * v for k, v in times.items()}
        report.layers[name] = choice
        if choice == "conv":
            _replace(deployed, name, module.to_conv().eval())
        else:
            module.set_plan(choice)

    if memory_format == "channels_last" or (memory_format == "auto" and x.dim() == 4):
        candidate = ChannelsLast(copy.deepcopy(deployed)).eval()
        if memory_format == "channels_last" or _whole(candidate, x, repeats) < _whole(deployed, x, repeats):
            deployed, report.channels_last = candidate, True

    with torch.no_grad():
        out = deployed(x)
    report.max_abs_error = float((out - reference).abs().max())
    scale = float(reference.abs().max()) or 1.0
    if report.max_abs_error > tolerance * scale:
        raise NortonError(f"deployed model differs from the original by {report.max_abs_error:.3g} (scale {scale:.3g})")
    return deployed, report
