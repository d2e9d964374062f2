"""Compressed models that really run faster.

``deploy`` returns an inference copy in which BatchNorm is folded into the
preceding convolution, each CPDBlock becomes whichever is fastest on this
machine — its best factored plan or a plain dense conv —, each TuckerBlock
stays factored or becomes its dense conv, whichever is faster, and the memory format
(channels-last or not) is the faster one for the whole network.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from norton.core import CPDBlock, TuckerBlock, as_args, replace_module
from norton.core.plans import block_inputs, time_call, time_plans
from norton.errors import NortonError


# -- BatchNorm folding ------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (CPDBlock, TuckerBlock)) or super().is_leaf_module(m, qualname)


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
        elif isinstance(producer, TuckerBlock):
            producer[2] = fuse_conv_bn_eval(producer[2], bn)
        elif type(producer) is nn.Conv2d:
            replace_module(gm, source.target, fuse_conv_bn_eval(producer, bn))
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
    layers: dict[str, str] = field(default_factory=dict)  # CPDBlock -> "conv" or its plan; TuckerBlock -> "conv" or "factored"
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
    return time_call(lambda: model(x), x, repeats)


@torch.no_grad()
def time_tucker(block: TuckerBlock, x: Tensor, repeats: int) -> dict[str, float]:
    """Seconds per call of a TuckerBlock's three convs and of its dense conv."""
    conv = block.to_conv().eval()
    return {"factored": time_call(lambda: block(x), x, repeats), "conv": time_call(lambda: conv(x), x, repeats)}


def deploy(model: nn.Module, example_inputs, *, fold_bn: bool = True, repeats: int = 3,
           memory_format: str = "auto", tolerance: float = 1e-3) -> tuple[nn.Module, DeployReport]:
    """An inference copy of ``model`` that is as fast as this machine allows.

    ``memory_format``: "auto" (time both), "channels_last" or "contiguous".
    Raises if the deployed outputs differ from the original's by more than
    ``tolerance`` relative to their scale.
    """
    if memory_format not in ("auto", "channels_last", "contiguous"):
        raise NortonError(f"memory_format must be auto, channels_last or contiguous, got {memory_format!r}")
    x = as_args(example_inputs)[0]
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
    inputs = block_inputs(deployed, x, (CPDBlock, TuckerBlock))
    for name, module in list(deployed.named_modules()):
        if not isinstance(module, (CPDBlock, TuckerBlock)) or name not in inputs:
            continue
        if isinstance(module, TuckerBlock):
            times = time_tucker(module, inputs[name], repeats)
        else:
            times = time_plans(module, inputs[name], repeats=repeats, with_conv=True)
        choice = min(times, key=times.get)
        report.timings_ms[name] = {k: 1000 * v for k, v in times.items()}
        report.layers[name] = choice
        if choice == "conv":
            replace_module(deployed, name, module.to_conv().eval())
        elif choice != "factored":
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
