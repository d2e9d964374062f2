"""Compressed models that really run faster where they are served.

``deploy`` returns an inference copy for one device and number format
(float32, bfloat16, float16) in which BatchNorm is folded into the preceding
convolution, each CPDBlock becomes whichever is fastest *there* — one of its
factored plans or the recomposed dense conv —, each TuckerBlock stays factored
or becomes its dense conv, the memory format (channels-last or not) is the
faster for the whole network, and, optionally, the whole forward is captured
as a CUDA graph for a fixed input shape.  Layer timings in isolation need not
add up to a network, so the assembled model is also timed against the same
model with every factored layer recomposed (its dense form) and the faster of
the two is kept: a deployed model is never slower than its dense form there.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils._pytree import tree_map
from torchvision.ops import FrozenBatchNorm2d

from norton.core import DTYPE_NAMES, CPDBlock, TuckerBlock, as_args, replace_module, resolve_device, resolve_dtype
from norton.core.plans import FACTORED_PLANS, block_inputs, time_call, time_plans
from norton.core.surgery import flatten_tensors
from norton.errors import NortonError


# -- BatchNorm folding ------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (CPDBlock, TuckerBlock, FrozenBatchNorm2d)) or super().is_leaf_module(m, qualname)


@torch.no_grad()
def fold_bn_into_block(block: CPDBlock, bn: nn.BatchNorm2d | FrozenBatchNorm2d) -> None:
    """Scale filter n by γ/σ (through its horizontal factors) and absorb the shift in the bias."""
    affine = getattr(bn, "affine", True)  # FrozenBatchNorm2d: always affine
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if affine else 0.0) - bn.running_mean * scale
    block.horizontal.mul_(scale.repeat(block.rank).view(-1, 1, 1, 1))
    old_bias = block.bias if block.bias is not None else torch.zeros_like(scale)
    block.bias = nn.Parameter(old_bias * scale + shift)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A traced copy of an eval-mode ``model`` with every BatchNorm that directly
    follows a conv / CPDBlock (and is its only user) folded into it; a
    detector's FrozenBatchNorm2d too."""
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), (nn.BatchNorm2d, FrozenBatchNorm2d)):
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        producer, bn = modules[source.target], modules[node.target]
        if not getattr(bn, "track_running_stats", True):
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


class CastInputs(nn.Module):
    """Runs the wrapped model (weights in ``dtype`` on ``device``) on its input
    cast to that device and dtype, so that a caller may hand it float32 images."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.device, self.dtype = model, torch.device(device), dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.to(self.device, self.dtype))


class CUDAGraphed(nn.Module):
    """The wrapped inference model replayed from a CUDA graph: one graph per
    input shape, captured on its first call (launch overhead gone; the input is
    copied into the graph's static buffer, the output cloned out of it)."""

    def __init__(self, model: nn.Module, warmup: int = 3) -> None:
        super().__init__()
        self.model, self.warmup = model, warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, object]] = {}

    @torch.no_grad()
    def _capture(self, x: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, object]:
        static = x.clone()
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            for _ in range(self.warmup):
                self.model(static)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model(static)
        return graph, static, out

    @torch.no_grad()
    def forward(self, x: Tensor):
        if x.device.type != "cuda":
            raise NortonError(f"this model was deployed as a CUDA graph; it takes CUDA inputs, got one on {x.device}")
        key = (tuple(x.shape), x.dtype, x.device, x.is_contiguous())
        if key not in self._graphs:
            self._graphs[key] = self._capture(x)
        graph, static, out = self._graphs[key]
        static.copy_(x)
        graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, out)


# default tolerance of the deployed model's outputs against the float32 original, relative to their scale
TOLERANCES = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.03}


@dataclass
class DeployReport:
    layers: dict[str, str] = field(default_factory=dict)  # CPDBlock -> "conv" or its plan; TuckerBlock -> "conv" or "factored"
    timings_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    folded_batchnorms: int = 0
    fold_error: str | None = None
    channels_last: bool = False
    max_abs_error: float = 0.0
    device: str = "cpu"
    dtype: str = "float32"
    cuda_graph: bool = False
    # the assembled model against the same model with every factored layer recomposed (ms per call);
    # "dense form" when the per-layer choice lost as a whole and every factored layer became its conv
    whole_ms: dict[str, float] = field(default_factory=dict)
    chosen_whole: str = "per layer"

    def table(self) -> str:
        rows = [f"deployed for {self.device}, {self.dtype}" + (", CUDA graph" if self.cuda_graph else ""),
                f"{'layer':<32} {'chosen':<10} timings (ms per call)"]
        for name, choice in self.layers.items():
            t = "  ".join(f"{k} {v:.3f}" for k, v in self.timings_ms[name].items())
            note = "  (no factored form is faster here: deployed as its dense conv)" if choice == "conv" else ""
            rows.append(f"{name:<32} {choice:<10} {t}{note}")
        if self.layers and all(c == "conv" for c in self.layers.values()):
            rows.append("no factored form wins on this device: every factored layer runs as its dense conv")
        if self.whole_ms:
            rows.append("whole model: " + ", ".join(f"{k} {v:.3f} ms" for k, v in self.whole_ms.items())
                        + f" -> {self.chosen_whole}")
        rows.append(f"BatchNorms folded: {self.folded_batchnorms}" + (f" (folding skipped: {self.fold_error})" if self.fold_error else ""))
        rows.append(f"memory format: {'channels-last' if self.channels_last else 'contiguous'}; "
                    f"max |output difference| vs. the original (float32): {self.max_abs_error:.2e}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return asdict(self)


Timer = Callable[[Callable[[], object], Tensor, int], float]


@torch.no_grad()
def _whole(model: nn.Module, x: Tensor, repeats: int, timer: Timer) -> float:
    return timer(lambda: model(x), x, repeats)


@torch.no_grad()
def time_tucker(block: TuckerBlock, x: Tensor, repeats: int, timer: Timer = time_call) -> dict[str, float]:
    """Seconds per call of a TuckerBlock's three convs and of its dense conv."""
    conv = block.to_conv().eval()
    return {"factored": timer(lambda: block(x), x, repeats), "conv": timer(lambda: conv(x), x, repeats)}


def _dense_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every CPDBlock and TuckerBlock recomposed into its dense conv."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, (CPDBlock, TuckerBlock)):
            replace_module(dense, name, module.to_conv().eval())
    return dense


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def deploy(model: nn.Module, example_inputs, *, device: str | torch.device | None = None,
           dtype: str | torch.dtype | None = None, fold_bn: bool = True, repeats: int = 3,
           memory_format: str = "auto", cuda_graph: bool = False, tolerance: float | None = None,
           timer: Timer | None = None, layer_forms: Mapping[str, str] | None = None) -> tuple[nn.Module, DeployReport]:
    """An inference copy of ``model`` as fast as ``device`` allows in ``dtype``.

    ``device``: cpu, cuda or cuda:N (default: where the model's parameters
    are); ``dtype``: float32 (default), bfloat16 or float16 (GPU) — the copy's
    weights are converted, and it accepts inputs of any float dtype.
    ``memory_format``: "auto" (time both), "channels_last" or "contiguous".
    ``cuda_graph``: replay the forward from a CUDA graph, one per input shape
    (CUDA devices only; fixed shapes are what it is for).  ``timer(fn, x,
    repeats)`` returns seconds per call of ``fn`` (default: the best of
    ``repeats`` wall-clock runs after a warm-up, synchronised on CUDA).
    ``layer_forms`` (a ``DeployReport.layers`` recorded earlier, with its
    memory format given as ``memory_format``) applies those forms without
    timing anything: a deployment made once, rebuilt where it is served.
    Raises if the deployed outputs differ from the float32 original's by more
    than ``tolerance`` relative to their scale (default by dtype:
    ``TOLERANCES``).  The original model is not changed.
    """
    if memory_format not in ("auto", "channels_last", "contiguous"):
        raise NortonError(f"memory_format must be auto, channels_last or contiguous, got {memory_format!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise NortonError(f"repeats must be a positive integer, got {repeats!r}")
    device = resolve_device(device) if device is not None else _model_device(model)
    dtype = resolve_dtype(dtype, device)
    if cuda_graph and device.type != "cuda":
        raise NortonError(f"cuda_graph needs a CUDA device; this model is deployed for {device}")
    if layer_forms is not None and memory_format == "auto":
        raise NortonError("layer_forms applies a recorded deployment: give its memory_format too")
    timer = timer or time_call
    tolerance = TOLERANCES[dtype] if tolerance is None else tolerance
    x32 = as_args(example_inputs)[0].to(device)
    if x32.is_floating_point():
        x32 = x32.float()
    x = x32.to(dtype) if x32.is_floating_point() else x32

    was_training = model.training
    original = copy.deepcopy(model).eval().to(device=device, dtype=torch.float32)
    model.train(was_training)
    with torch.no_grad():
        reference = original(x32)
    deployed = original.to(dtype)  # the reference is computed: the copy can change from here on
    report = DeployReport(device=str(device), dtype=DTYPE_NAMES[dtype], cuda_graph=cuda_graph)
    if fold_bn:
        try:
            deployed, report.folded_batchnorms = fold_batchnorm(deployed)
        except Exception as err:  # models that torch.fx cannot trace keep their BatchNorms
            report.fold_error = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"

    # each CPDBlock: its fastest factored plan, or a dense conv; each TuckerBlock: factored or its conv
    inputs = block_inputs(deployed, x, (CPDBlock, TuckerBlock))
    for name, module in list(deployed.named_modules()):
        if not isinstance(module, (CPDBlock, TuckerBlock)) or name not in inputs:
            continue
        if layer_forms is not None:
            choice = layer_forms.get(name)
            if choice not in ("conv", *(("factored",) if isinstance(module, TuckerBlock) else FACTORED_PLANS)):
                raise NortonError(f"the recorded deployment gives layer {name!r} the form {choice!r}; it was made for "
                                  "another model")
            report.timings_ms[name] = {}
        else:
            if isinstance(module, TuckerBlock):
                times = time_tucker(module, inputs[name], repeats, timer)
            else:
                times = time_plans(module, inputs[name], repeats=repeats, with_conv=True, timer=timer)
            choice = min(times, key=times.get)
            report.timings_ms[name] = {k: 1000 * v for k, v in times.items()}
        report.layers[name] = choice
        if choice == "conv":
            replace_module(deployed, name, module.to_conv().eval())
        elif choice != "factored":
            module.set_plan(choice)

    layout_ms = {}  # whole-model timings of the two memory formats, kept for the comparison below
    if memory_format == "auto" and x.dim() == 4:
        candidate = ChannelsLast(copy.deepcopy(deployed)).eval()
        layout_ms = {True: 1000 * _whole(candidate, x, repeats, timer), False: 1000 * _whole(deployed, x, repeats, timer)}
        report.channels_last = layout_ms[True] < layout_ms[False]
        if report.channels_last:
            deployed = candidate
    elif memory_format == "channels_last":
        deployed, report.channels_last = ChannelsLast(deployed).eval(), True
    if layer_forms is None and any(c != "conv" for c in report.layers.values()):
        # the assembled choice against the dense form, as a whole
        dense = _dense_form(deployed.model if report.channels_last else deployed)
        dense = ChannelsLast(dense).eval() if report.channels_last else dense
        report.whole_ms = {"per layer": layout_ms.get(report.channels_last) or 1000 * _whole(deployed, x, repeats, timer),
                           "dense form": 1000 * _whole(dense, x, repeats, timer)}
        if report.whole_ms["dense form"] < report.whole_ms["per layer"]:
            deployed, report.chosen_whole = dense, "dense form"
            report.layers = dict.fromkeys(report.layers, "conv")

    given = as_args(example_inputs)[0]
    if dtype != torch.float32 or x.dtype != given.dtype or device != given.device:
        deployed = CastInputs(deployed, device, dtype).eval()
    if cuda_graph:
        deployed = CUDAGraphed(deployed).eval()

    with torch.no_grad():
        outs, refs = flatten_tensors(deployed(x)), flatten_tensors(reference)
    report.max_abs_error = max((float((o.float() - r.float()).abs().max()) for o, r in zip(outs, refs)), default=0.0)
    scale = max((float(r.abs().max()) for r in refs), default=0.0) or 1.0
    if not report.max_abs_error <= tolerance * scale:
        raise NortonError(f"deployed model ({report.dtype}) differs from the original by {report.max_abs_error:.3g} "
                          f"(scale {scale:.3g}, tolerance {tolerance:g} of it)")
    return deployed, report
