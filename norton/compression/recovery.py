"""Data-aware recovery after pruning: least-squares reconstruction of the layers
that lost input channels.

Pruning a group of filters removes input channels of every layer that reads
them.  ``recover`` refits each such layer, in the order the network runs them,
so that its linear stage reproduces the unpruned model's on calibration images
(the reconstruction step of ThiNet and of He et al.'s channel pruning):

    min_W' ‖Y − W'·X'‖² + λ‖W' − W₀‖²

X' are the layer's inputs in the pruned model — with the layers before it
already refitted, so errors do not pile up — and Y the reference model's outputs
of the same layer at the same sampled positions, restricted to the filters that
stayed.  The linear stage is the whole kernel of a conv (im2col rows), the
channel factor (pointwise conv) of a CPDBlock, or a Linear layer; the ridge term
pulls toward the pruned weights W₀ where the calibration data say little.
Only sums XᵀX, XᵀY and ‖Y‖² are kept per layer, so memory does not grow with
the calibration set.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from norton.compression.probing import OPAQUE, TracedForward
from norton.compression.pruning import GroupPruning, PruneReport
from norton.core import CPDBlock, TuckerBlock, batch_statistics, conv_output_size
from norton.core.surgery import unchanged_on_error
from norton.errors import NortonError

ROWS = 16384  # sampled positions per layer (spread evenly over the calibration images)
RIDGE = 1e-3  # λ relative to the mean diagonal of XᵀX


@dataclass
class LayerRecovery:
    name: str
    stage: str  # "conv 3×3", "CP channel factor", "linear"
    inputs: tuple[int, int]  # input channels (reference, pruned)
    rows: int  # sampled positions the fit used
    error_before: float  # ‖Y − W₀X'‖² / ‖Y‖² on the calibration positions
    error_after: float


@dataclass
class RecoveryReport:
    layers: list[LayerRecovery] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        rows = [f"{'layer':<34} {'stage':<18} {'inputs':>9} {'rows':>6} {'error before':>12} {'after':>8}"]
        for r in self.layers:
            rows.append(f"{r.name:<34} {r.stage:<18} {r.inputs[1]:>4}/{r.inputs[0]:<4} {r.rows:>6} "
                        f"{r.error_before:>12.4f} {r.error_after:>8.4f}")
        rows.append(f"{len(self.layers)} layers refitted in {self.seconds:.1f} s")
        return "\n".join(rows)


class _Stop(Exception):
    """Raised by a hook once the layer's input is captured: the rest of the forward is not needed."""


@dataclass
class _Stage:
    """The linear stage of one layer: the reference weight restricted to the
    outputs that stayed, and the pruned parameter to refit."""

    name: str
    kind: str
    weight: Tensor  # reference weight as a matrix (outputs, inputs·k²), restricted to the kept outputs
    pruned: nn.Parameter  # the pruned layer's parameter to refit
    module: nn.Module  # the pruned layer


def _rows(module: nn.Module, x: Tensor, index: Tensor) -> Tensor:
    """The inputs of ``module``'s linear stage at the sampled positions ``index``
    (flat over images × output positions), one row each."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])[index]
    if isinstance(module, CPDBlock):
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])[index]
    # the rows of im2col at the sampled positions only, gathered from the padded input (an unfold of every
    # position, then a sample of it, spent most of a 64×64 refit making rows it dropped: the same values)
    padded = F.pad(x, module._reversed_padding_repeated_twice,
                   mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    _, out_w = conv_output_size(module, x.shape)
    per_image = _positions(module, x)
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    image, position = index // per_image, index % per_image
    device = x.device
    ys = (position // out_w * sh)[:, None] + torch.arange(kh, device=device)[None, :] * dh  # (rows, kh)
    xs = (position % out_w * sw)[:, None] + torch.arange(kw, device=device)[None, :] * dw  # (rows, kw)
    channels = torch.arange(x.shape[1], device=device)
    patches = padded[image[:, None, None, None], channels[None, :, None, None], ys[:, None, :, None],
                     xs[:, None, None, :]]  # (rows, C, kh, kw): unfold's feature order
    return patches.reshape(index.numel(), -1)


def _positions(module: nn.Module, x: Tensor) -> int:
    """Output positions per image of the layer's linear stage."""
    if isinstance(module, nn.Linear):
        return int(x[0].numel() // x.shape[-1]) if x.dim() > 2 else 1
    if isinstance(module, CPDBlock):
        return x.shape[2] * x.shape[3]
    return math.prod(conv_output_size(module, x.shape))


def _sampled(module: nn.Module, x: Tensor, rows: int, images: int, generator: torch.Generator) -> Tensor:
    """The positions of ``module``'s output sampled from batch ``x``: its share of ``rows`` over the
    calibration set of ``images`` images, drawn from ``generator``, in order."""
    total = _positions(module, x) * x.shape[0]
    share = max(1, -(-rows * x.shape[0] // images))
    return torch.randperm(total, generator=generator)[:share].sort().values.to(x.device)


def _kept_outputs(report: PruneReport | Sequence[GroupPruning]) -> dict[str, list[int]]:
    groups = report.groups if isinstance(report, PruneReport) else report
    return {name: list(g.kept) for g in groups for name in g.layers}


def _stages(model: nn.Module, reference: nn.Module, kept: Mapping[str, list[int]]) -> list[_Stage]:
    """Every layer of ``model`` with fewer input channels than its namesake in ``reference``."""
    ref_modules = dict(reference.named_modules())
    stages = []
    for name, module in model.named_modules():
        ref = ref_modules.get(name)
        if ref is None or type(ref) is not type(module):
            continue
        if isinstance(module, CPDBlock):
            if module.in_channels == ref.in_channels or module.rank != ref.rank:
                continue
            keep = kept.get(name, list(range(ref.out_channels)))
            rows = [r * ref.out_channels + k for r in range(ref.rank) for k in keep]
            weight, param, kind = ref.pointwise.detach()[rows].flatten(1), module.pointwise, "CP channel factor"
        elif isinstance(module, nn.Conv2d):
            if module.groups != 1 or ref.groups != 1 or module.in_channels == ref.in_channels:
                continue
            keep = kept.get(name, list(range(ref.out_channels)))
            kh, kw = module.kernel_size
            weight, param, kind = ref.weight.detach()[keep].flatten(1), module.weight, f"conv {kh}×{kw}"
        elif isinstance(module, nn.Linear):
            if module.in_features == ref.in_features:
                continue
            keep = kept.get(name, list(range(ref.out_features)))
            weight, param, kind = ref.weight.detach()[keep], module.weight, "linear"
        else:
            continue
        if weight.shape[0] != param.shape[0]:
            raise NortonError(f"cannot refit {name!r}: the pruning report does not say which of its "
                              f"{weight.shape[0]} outputs are the {param.shape[0]} that stayed")
        stages.append(_Stage(name, kind, weight, param, module))
    return stages


@torch.no_grad()
def _capture(model: nn.Module, module: nn.Module, x: Tensor) -> Tensor:
    """The input ``module`` sees when ``model`` runs on ``x`` (the forward stops there)."""
    seen: list[Tensor] = []

    def hook(_module, inputs):
        seen.append(inputs[0].detach())
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise NortonError("recover: a layer whose inputs were pruned does not run in the model's forward")
    return seen[0]


class _StageInputs:
    """The inputs the stages' layers see in ``model``, batch by batch and stage after stage (in the order
    the model runs them), each from the last cut point of the traced model before the layer before it, so
    that a stage's input reflects the refits of the stages before it: the network runs about once per
    batch for all the stages, not once up to each of them (ResNet-20 on 256 images of 64×64: ~19 forwards
    to the layer refitted for a plan's 19 stages).  ``make`` gives None where the model cannot be traced,
    runs a layer twice or takes several inputs (``_capture`` then runs the model up to each layer)."""

    def __init__(self, traced: TracedForward, positions: list[int], batches: Sequence[Tensor]):
        self.traced, self.positions = traced, positions
        cuts = [traced.position[c] for c in traced.cut_points()]
        self.before = [max((c for c in cuts if c < p), default=None) for p in positions]  # the cut to hold
        self.held = [(0, x) for x in batches]  # per batch: a cut point (0, the placeholder: the input) and its value
        self.stage = [-1] * len(batches)

    @classmethod
    def make(cls, model: nn.Module, modules: Sequence[nn.Module], batches: Sequence[Tensor]) -> _StageInputs | None:
        try:
            traced = TracedForward(model, opaque=tuple(t for t in OPAQUE if t is not TuckerBlock))  # its convs: stages
        except Exception:  # noqa: BLE001 - a model torch.fx cannot trace runs up to each layer instead
            return None
        names = {m: n for n, m in model.named_modules()}
        calls = Counter(node.target for node in traced.nodes if node.op == "call_module")
        placeholders = [node for node in traced.nodes if node.op == "placeholder"]
        if len(placeholders) != 1 or any(calls[names.get(m)] != 1 for m in modules):
            return None
        positions = [traced.first_call[names[m]] for m in modules]
        if positions != sorted(positions):
            return None
        return cls(traced, positions, batches)

    def of(self, stage: int, batch: int) -> Tensor:
        """Stage ``stage``'s input on batch ``batch``; the stages before it on that batch were asked for
        first (and refitted since), the later ones are asked for after it."""
        if stage <= self.stage[batch]:
            raise ValueError(f"stage {stage} of batch {batch} asked for after stage {self.stage[batch]}")
        begin, value = self.held[batch]
        keep = self.before[stage] if self.before[stage] is not None and self.before[stage] > begin else None
        got, cut = self.traced.input_of(self.positions[stage], begin, value, keep)
        if keep is not None:
            self.held[batch] = (keep, cut)
        self.stage[batch] = stage
        return got


def _run_order(model: nn.Module, stages: list[_Stage], x: Tensor) -> list[_Stage]:
    order: dict[nn.Module, int] = {}

    def seen(module, _inputs) -> None:
        order.setdefault(module, len(order))

    handles = [s.module.register_forward_pre_hook(seen) for s in stages]
    try:
        with torch.no_grad(), batch_statistics(model):
            model(x)
    except Exception as err:  # noqa: BLE001 - any failure of a user model's forward is reported
        raise NortonError(f"recover: the pruned model's forward fails on a calibration batch of shape "
                          f"{tuple(x.shape)} ({type(err).__name__}: {err}); give batches the model accepts") from None
    finally:
        for h in handles:
            h.remove()
    return sorted((s for s in stages if s.module in order), key=lambda s: order[s.module])


def recover(
    model: nn.Module,
    reference: nn.Module,
    data: Sequence[Tensor],
    report: PruneReport | Sequence[GroupPruning],
    *,
    rows: int = ROWS,
    ridge: float = RIDGE,
    seed: int = 0,
    progress: bool = False,
) -> RecoveryReport:
    """Refit, in place, every layer of the pruned ``model`` whose input channels
    pruning removed, to reproduce ``reference`` (the same model before pruning)
    on the calibration batches ``data``.  ``report`` is what ``prune`` returned
    (or its ``groups``): it says which filters of each layer stayed.  The pruned model's BatchNorms
    normalise with batch statistics while it is measured (what recalibration
    gives); the reference runs in eval mode."""
    if not isinstance(rows, int) or rows < 1:
        raise NortonError(f"rows must be a positive integer, got {rows!r}")
    if not ridge > 0:
        raise NortonError(f"ridge must be > 0, got {ridge!r}")
    batches = list(data)
    if not batches or not all(isinstance(b, Tensor) and b.dim() >= 2 and b.shape[0] > 0 for b in batches):
        raise NortonError("recover needs calibration data: a non-empty list of image batches (N, C, H, W)")
    started = time.perf_counter()
    stages = _run_order(model, _stages(model, reference, _kept_outputs(report)), batches[0])
    ref_modules = dict(reference.named_modules())
    images = sum(b.shape[0] for b in batches)
    out = RecoveryReport()
    was_training = reference.training
    reference.eval()
    try:
        targets = _reference_rows(reference, [ref_modules[s.name] for s in stages], stages, batches, images, rows,
                                  [seed + 7919 * i for i in range(len(stages))], REFERENCE_BYTES)
        inputs = _StageInputs.make(model, [s.module for s in stages], batches)
        with unchanged_on_error(model):  # a failure part-way leaves the pruned model as it was
            for i, stage in enumerate(tqdm(stages, desc="recover", disable=not progress, leave=False)):
                out.layers.append(_refit(model, reference, ref_modules[stage.name], stage, batches, images, rows,
                                         ridge, seed + 7919 * i, targets[i],
                                         (lambda b, i=i: inputs.of(i, b)) if inputs is not None else None))
    finally:
        reference.train(was_training)
    out.seconds = time.perf_counter() - started
    return out


REFERENCE_BYTES = 1 << 30  # reference rows kept from one forward per batch (the layers beyond: one forward each)


@torch.no_grad()
def _reference_rows(reference: nn.Module, modules: Sequence[nn.Module], stages: Sequence[_Stage], batches,
                    images: int, rows: int, seeds: Sequence[int], budget: int) -> list[list[tuple[Tensor, Tensor]] | None]:
    """What each stage's refit fits to, per batch — the sampled positions and the reference layer's outputs
    there (Y = X·Wᵀ, float64) — gathered by one forward of the reference per batch for all stages, instead of
    one forward per stage: the reference does not change while the pruned model is refitted.  The positions
    are drawn as ``_refit`` draws them (each stage's generator, batch after batch; a layer's output positions
    are the same in both models), so the fit is the same.  Stages beyond ``budget`` bytes of rows get None
    (``_refit`` then runs the reference itself)."""
    chosen, used = [], 0
    for stage in stages:
        size = (-(-rows * batches[0].shape[0] // images)) * len(batches) * stage.weight.shape[0] * 8
        if used + size > budget:
            break
        chosen.append(stage)
        used += size
    found: list[list[tuple[Tensor, Tensor]] | None] = [[] for _ in chosen] + [None] * (len(stages) - len(chosen))
    if not chosen:
        return found
    generators = [torch.Generator().manual_seed(seed) for seed in seeds[:len(chosen)]]
    weights = [stage.weight.to(torch.float64) for stage in chosen]
    position = {module: i for i, module in enumerate(modules[:len(chosen)])}

    def hook(module, inputs):
        i = position[module]
        if len(found[i]) == batch:  # the first call of a module in this forward only
            index = _sampled(module, inputs[0], rows, images, generators[i])
            found[i].append((index, _rows(module, inputs[0].detach(), index).to(torch.float64) @ weights[i].T))

    handles = [m.register_forward_pre_hook(hook) for m in position]
    try:
        for batch, x in enumerate(batches):
            reference(x)
    finally:
        for h in handles:
            h.remove()
    if any(len(f) != len(batches) for f in found[:len(chosen)]):
        raise NortonError("recover: a layer whose inputs were pruned does not run in the model's forward")
    return found


@torch.no_grad()
def _refit(model: nn.Module, reference: nn.Module, ref_module: nn.Module, stage: _Stage, batches, images: int,
           rows: int, ridge: float, seed: int, targets: list[tuple[Tensor, Tensor]] | None = None,
           inputs: Callable[[int], Tensor] | None = None) -> LayerRecovery:
    """Refit one stage on the batches; ``targets`` (per batch: sampled positions, reference outputs there),
    from ``_reference_rows``, or None to run the reference to the layer here; ``inputs`` (batch number →
    the stage's input in the pruned model, ``_StageInputs``), or None to run the pruned model to it here."""
    weight = stage.weight.to(torch.float64)
    w0 = stage.pruned.detach().flatten(1).to(torch.float64)
    gram = torch.zeros(w0.shape[1], w0.shape[1], dtype=torch.float64, device=w0.device)
    cross = torch.zeros(w0.shape[1], weight.shape[0], dtype=torch.float64, device=w0.device)
    energy, used = 0.0, 0
    generator = torch.Generator().manual_seed(seed)
    for b, x in enumerate(batches):
        with batch_statistics(model):
            got_x = _capture(model, stage.module, x) if inputs is None else inputs(b)
        if targets is None:
            ref_x = _capture(reference, ref_module, x)
            index = _sampled(stage.module, got_x, rows, images, generator)
            ys = _rows(ref_module, ref_x, index).to(torch.float64) @ weight.T
        else:
            index, ys = targets[b]
        xs = _rows(stage.module, got_x, index).to(torch.float64)
        gram += xs.T @ xs
        cross += xs.T @ ys
        energy += float((ys ** 2).sum())
        used += xs.shape[0]
    fitted, before, after = _solve(gram, cross, energy, w0, ridge)
    if fitted is not None:
        stage.pruned.data.copy_(fitted.reshape(stage.pruned.shape).to(stage.pruned.dtype))
    return LayerRecovery(stage.name, stage.kind, (_in_channels(ref_module), _in_channels(stage.module)), used,
                         before, after)


def _solve(gram: Tensor, cross: Tensor, energy: float, w0: Tensor, ridge: float
           ) -> tuple[Tensor | None, float, float]:
    """The ridge least-squares fit from the sums XᵀX (``gram``), XᵀY (``cross``) and ‖Y‖²: the fitted
    weight (None where it does not lower the error on these positions: the pruned weights stay), the
    relative error before and after."""
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    fitted = torch.linalg.solve(gram + lam * eye, cross + lam * w0.T).T

    def error(w: Tensor) -> float:
        residual = energy - 2 * float((w * cross.T).sum()) + float(((w @ gram) * w).sum())
        return max(residual, 0.0) / max(energy, 1e-30)

    before, after = error(w0), error(fitted)
    return (fitted, before, after) if after < before else (None, before, before)


@dataclass
class InputSums:
    """Sums over sampled positions of one layer's linear-stage inputs, for
    refits of any subset of its input channels without running the model again:
    ``gram`` = X'ᵀX' (X' what the layer sees with every BatchNorm on batch
    statistics, as the pruned model is measured), ``cross`` = X'ᵀX and
    ``energy`` = XᵀX (X what it sees in the reference, eval mode)."""

    module: nn.Module
    gram: Tensor
    cross: Tensor
    energy: Tensor


@torch.no_grad()
def input_sums(model: nn.Module, modules: Sequence[nn.Module], data: Sequence[Tensor], *, rows: int = ROWS,
               seed: int = 0, seeds: Sequence[int] | None = None) -> list[InputSums]:
    """``InputSums`` of each of ``modules`` (layers of ``model``, given in the
    order the model runs them) on the calibration batches ``data``: the same
    positions ``recover`` samples when these layers are the ones a pruning cut
    (the i-th with seed ``seed + 7919·i``), so that ``refit_weight`` on a
    subset of the input channels is the refit ``recover`` computes for a model
    pruned only there — when no layer before it was refitted.  ``seeds``: the
    seed of each instead (the sums of several cuts' layers in one pass; a layer
    may be listed twice, with two seeds).  One forward per batch in each mode,
    not one per layer or per pruning option."""
    images = sum(b.shape[0] for b in data)
    if seeds is None:
        seeds = [seed + 7919 * i for i in range(len(modules))]
    elif len(seeds) != len(modules):
        raise ValueError(f"input_sums: {len(seeds)} seeds for {len(modules)} modules")
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    sums: list[InputSums | None] = [None] * len(modules)
    was_training = model.training
    model.eval()
    try:
        for x in data:
            reference = _inputs(model, modules, x)
            with batch_statistics(model):
                seen = _inputs(model, modules, x)
            for i, (module, got, ref) in enumerate(zip(modules, seen, reference)):
                index = _sampled(module, got, rows, images, generators[i])
                xs = _rows(module, got, index).to(torch.float64)
                xr = _rows(module, ref, index).to(torch.float64)
                if sums[i] is None:
                    zero = xs.new_zeros(xs.shape[1], xs.shape[1])
                    sums[i] = InputSums(module, zero, zero.clone(), zero.clone())
                sums[i].gram += xs.T @ xs
                sums[i].cross += xs.T @ xr
                sums[i].energy += xr.T @ xr
    finally:
        model.train(was_training)
    return sums


def _inputs(model: nn.Module, modules: Sequence[nn.Module], x: Tensor) -> list[Tensor]:
    """The input each of ``modules`` sees first when ``model`` runs on ``x`` (the forward stops once
    every one of them has been seen)."""
    seen: dict[nn.Module, Tensor] = {}
    wanted = set(modules)

    def hook(module, inputs):
        seen.setdefault(module, inputs[0].detach())
        if len(seen) == len(wanted):
            raise _Stop

    handles = [m.register_forward_pre_hook(hook) for m in wanted]
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [m for m in modules if m not in seen]
    if missing:
        raise NortonError(f"recover: a layer whose inputs were pruned ({type(missing[0]).__name__}) does not run "
                          "in the model's forward")
    return [seen[m] for m in modules]


def refit_weight(sums: InputSums, weight: Tensor, removed_inputs: Iterable[int], ridge: float = RIDGE
                 ) -> Tensor | None:
    """The refit of a layer (weight as a matrix, outputs × inputs·k²) whose
    input channels ``removed_inputs`` were pruned, from its ``InputSums``: the
    new matrix with zero columns where inputs were removed, or None where the
    fit does not lower the error (the weights then stay as they are, which is
    what ``recover`` does too)."""
    module = sums.module
    per_channel = 1 if isinstance(module, nn.Linear) else math.prod(module.kernel_size)
    kept = torch.as_tensor(sorted(set(range(_in_channels(module))) - set(removed_inputs)), dtype=torch.long,
                           device=sums.gram.device)
    columns = (kept[:, None] * per_channel + torch.arange(per_channel, device=kept.device)).flatten()
    w = weight.detach().to(torch.float64)
    cross = sums.cross[columns] @ w.T
    energy = float(((w @ sums.energy) * w).sum())
    fitted, _, _ = _solve(sums.gram[columns][:, columns], cross, energy, w[:, columns], ridge)
    if fitted is None:
        return None
    full = torch.zeros_like(w)
    full[:, columns] = fitted
    return full


def _in_channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels
