"""`norton compare`: NORTON against other compression methods, side by side.

One trained baseline (ResNet-20 on Fashion-MNIST unless ``--arch`` / ``--data``
say otherwise) is shared by every method.  At
each MACs target (fraction of the baseline's MACs removed, factored
convention) every method's configuration is searched so that it lands within
``TOLERANCE`` of the target; then every compressed model gets the same BN
recalibration and the same fine-tuning (optimizer, schedule, epochs, data
order) for every seed.  Results: ``results.md`` (table), ``results.json`` (every
measured number, per seed) and ``accuracy_vs_macs.png`` in the run directory.
Every (method, target, seed) run is kept on disk, so ``--resume`` continues an
interrupted comparison.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from norton.checkpoints import atomic_write_text, load_checkpoint, model_from_checkpoint
from norton.compression import PLANNER_CRITERION, Plan, PruneReport, decompose, plan, prune, recover
from norton.core import (
    CPDBlock,
    complexity,
    count_macs,
    is_decomposable,
    machine_record,
    provenance,
    replace_module,
)
from norton.deployment import compare_latency, deploy
from norton.errors import NortonError
from norton.evidence.plotting import pyplot, save
from norton.evidence.verdicts import paired_difference
from norton.models import create_model
from norton.training import (
    CONVERGED_SPREAD,
    CONVERGED_WINDOW,
    TrainConfig,
    calibration_batches,
    converged,
    dataset_shape,
    evaluate,
    fit,
    folder_splits,
    held_out,
    input_size_of,
    joined,
    limit,
    load_best,
    load_dataset,
    recalibrate_bn,
    select_plan,
    split_validation,
)

TOLERANCE = 0.02  # each method lands within 2 points of the MACs target
DEFAULT_ARCH, DEFAULT_DATA = "resnet_20", "fashion-mnist"
DATA_NAMES = {"fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "digits": "digits", "imagenet": "ImageNet"}
LATENCY_BATCH = 128  # deployed latency is measured on batches of this size
LATENCY_REPEATS = 25  # round-robin passes over every deployed model


@dataclass
class CompareBudget:
    train_images: int | None  # before the validation split; None = all 60,000
    val_images: int
    test_images: int | None  # None = all 10,000
    baseline: TrainConfig
    finetune: TrainConfig
    seeds: tuple[int, ...] = (0, 1)
    targets: tuple[float, ...] = (0.60, 0.85)
    # deployed-latency targets for the methods that take one (NORTON-auto, speed-up target)
    speedup_targets: tuple[float, ...] = ()
    recalibration_images: int = 1024
    # NORTON's rank at each target: one step above the rank at which CP alone
    # would reach it, so that pruning removes the rest
    norton_ranks: dict[float, int] = field(default_factory=lambda: {0.60: 4, 0.85: 2})
    methods: tuple[str, ...] | None = None  # None: every method
    calibration_images: int = 256  # NORTON-auto's planner measures damage on these training images
    plan_options: dict = field(default_factory=dict)  # other norton.plan arguments (ranks, keep_steps, ...)
    # every method that prunes refits the layers pruning cut on the calibration images (norton.recover);
    # on by default since the recovery ablation (docs/guides/comparison.md, the defaults' studies)
    recover: bool = True
    # NORTON-auto (MACs targets): every whole candidate plan fine-tuned this many epochs and the one of best
    # validation top-1 kept (norton.select_plan); 0 keeps the planner's pick by damage
    selection_epochs: int = 0
    # validation images added from the training images the budget leaves unused (the next ones of the same
    # fixed shuffle), so the training split stays the same and the validation split resolves smaller
    # differences; 0 = none
    extra_val_images: int = 0
    # each seed draws its own calibration images (the planner's, and every refit's), so a seed varies the data
    # order, the calibration images and the fine-tuning, and every method is built again for each seed
    seeded_calibration: bool = True
    # deployed latency: the batch it is measured on (and the speed-up targets planned at), round-robin passes
    latency_batch: int = LATENCY_BATCH
    latency_repeats: int = LATENCY_REPEATS


# the main methods (NORTON, NORTON-auto, their best pruning and decomposition peers); the ablations
# (norton-auto-cp, norton-auto-l2, norton-random, norton-l2, tltorch-cp) with --methods: on digits with
# ResNet-56 they took 17 of the 34 minutes of every method (building and fine-tuning as recorded)
SMALL = CompareBudget(
    train_images=12_000, val_images=2_000, test_images=5_000,
    baseline=TrainConfig(epochs=6, batch_size=128, lr=0.1, warmup_epochs=1, channels_last="auto"),
    finetune=TrainConfig(epochs=1, batch_size=128, lr=0.02, warmup_epochs=0, channels_last="auto"),
    methods=("norton-auto", "norton", "cp-only", "l1", "fpgm", "tltorch-tucker2"),
)
FULL = CompareBudget(
    train_images=None, val_images=5_000, test_images=None,
    baseline=TrainConfig(epochs=200, batch_size=128, lr=0.1, warmup_epochs=5, channels_last="auto"),
    finetune=TrainConfig(epochs=60, batch_size=128, lr=0.02, warmup_epochs=0, channels_last="auto"),
    seeds=(0, 1, 2),
)
# several fine-tuning epochs, the methods that matter, three seeds, and a baseline trained until its validation
# top-1 stops improving (up to 30 epochs: 15 cosine epochs left it still rising, 89.72 / 90.47 / 90.24 % over the
# last three on the 10,000 validation images; 30 converged, 91.71 / 91.62 / 91.57 %: benchmarks/baseline_schedule.py).  The speed-up targets are what pruning alone reached at 60 % and
# 85 % fewer MACs in a small comparison (docs/results/compare_small.md), fixed before this budget's runs.  Validation: the
# 2,000 images split from the 12,000 and 8,000 more that the budget leaves unused (10,000 in all, so the best
# epoch and the planner's choices are made on a split that resolves ~0.5 points).  The ablations
# (norton-auto-cp, norton-l2) run with --methods.
MEDIUM = CompareBudget(
    train_images=12_000, val_images=2_000, test_images=5_000, extra_val_images=8_000,
    baseline=TrainConfig(epochs=30, batch_size=128, lr=0.1, warmup_epochs=1, channels_last="auto", patience=5),
    finetune=TrainConfig(epochs=3, batch_size=128, lr=0.02, warmup_epochs=0, channels_last="auto"),
    seeds=(0, 1, 2),
    methods=("norton-auto", "norton-auto-speed", "norton", "cp-only", "l1", "fpgm", "tltorch-tucker2"),
    speedup_targets=(1.8, 3.0),
)
# one GPU (``--device cuda``): every Fashion-MNIST training image, the baseline trained until it stops
# improving, the main methods at both targets with fine-tuning that stops when validation stops improving;
# sized to finish in about 12 minutes on one H200 — an estimate, not a measurement: no GPU has run it yet
GPU = CompareBudget(
    train_images=None, val_images=5_000, test_images=None,
    baseline=TrainConfig(epochs=30, batch_size=256, lr=0.2, warmup_epochs=1, channels_last="auto", patience=4),
    finetune=TrainConfig(epochs=8, batch_size=256, lr=0.04, warmup_epochs=0, channels_last="auto", patience=2),
    seeds=(0, 1), methods=("norton-auto", "norton", "cp-only", "l1", "fpgm"),
    calibration_images=512, latency_batch=256,
)
BUDGETS = {"small": SMALL, "medium": MEDIUM, "full": FULL, "gpu": GPU}
MAX_EPOCH_SCALE = 50  # a small dataset's epochs are scaled up at most this much
MIN_TRAIN_IMAGES = 100
REFERENCE_PIXELS = 28 * 28  # the image size the budgets were sized for (Fashion-MNIST)
MIN_LATENCY_BATCH = 8  # a budget's latency batch, scaled down for larger images, is never smaller
PRECISE_BN_IMAGES = 256  # a scaled fine-tuning re-estimates BatchNorm statistics on these before validating


def latency_batch_for(batch: int, pixels: int) -> int:
    """A budget's latency batch (sized for 28×28 images) for images of ``pixels`` (height × width): the power
    of two nearest to as many pixels per batch, at least ``MIN_LATENCY_BATCH`` and at most ``batch`` — 32 for
    64×64 images where Fashion-MNIST's is 128, so that timing the deployed models (and the speed-up targets'
    candidates) costs about what it costs at 28×28."""
    if pixels <= REFERENCE_PIXELS:
        return batch
    return min(batch, max(MIN_LATENCY_BATCH, 2 ** round(math.log2(batch * REFERENCE_PIXELS / pixels))))


def scale_budget(budget: CompareBudget, train_available: int, test_available: int, name: str = "custom",
                 pixels: int = REFERENCE_PIXELS) -> CompareBudget:
    """The budget fitted to a dataset smaller than it was sized for (Fashion-MNIST's 60,000 + 10,000).

    Where the training images the budget asks for (with its extra validation
    images) are there, it is unchanged.  Otherwise every training image is used,
    the validation split keeps the budget's share of them (at most its size), the
    extra validation images are dropped, the test split is what there is (at most
    the budget's), and the baseline's and fine-tuning's epochs are scaled by how
    much smaller the training split is, so that they take about as many SGD steps
    as on the data the budget was sized for (at most ``MAX_EPOCH_SCALE`` times
    as many epochs) — but no more work: images of more than 28×28 ``pixels``
    (height × width) cost more per step, and the scale shrinks by as much (never
    below the budget's own epochs), so a folder of larger images takes about the
    budget's compute, not its steps.  "About": the nearest whole number of epochs
    (rounding up added up to an epoch: 5 fine-tuning epochs where 4.3 keep the
    budget's work on 1,333 images of 64×64).  A patience (early stopping) is scaled to
    the budget's steps.  The fine-tuning validates with BatchNorm statistics re-estimated on
    ``PRECISE_BN_IMAGES`` training images (``TrainConfig.precise_bn``; its epochs are too few
    steps for the running averages to follow the weights).  Images larger than 28×28 are timed on a smaller batch
    (``latency_batch_for``), whatever the dataset's size.  Too few images for
    any comparison: one clear error."""
    wanted = (budget.train_images or train_available) + budget.extra_val_images
    test_images = budget.test_images if budget.test_images is None or budget.test_images <= test_available else test_available
    budget = replace(budget, latency_batch=latency_batch_for(budget.latency_batch, pixels))
    if train_available >= wanted:
        return replace(budget, test_images=test_images)
    if train_available < MIN_TRAIN_IMAGES:
        raise NortonError(f"budget {name!r} needs at least {MIN_TRAIN_IMAGES} training images; this dataset has "
                          f"{train_available} (and {test_available} test images)")
    reference = budget.train_images or train_available
    share = budget.val_images / reference
    val_images = max(1, min(budget.val_images, round(share * train_available)))
    steps = min(MAX_EPOCH_SCALE, (reference - budget.val_images) / (train_available - val_images))
    scale = steps * min(1.0, REFERENCE_PIXELS / pixels)

    def scaled(config: TrainConfig) -> TrainConfig:
        # patience stays the budget's in SGD steps: on a small split, a few epochs are a few steps, and the
        # validation top-1 of a model still training at a high learning rate swings by tens of points
        return replace(config, epochs=max(config.epochs, round(config.epochs * scale)),
                       warmup_epochs=math.ceil(config.warmup_epochs * scale) if config.warmup_epochs else 0,
                       patience=math.ceil(config.patience * steps) if config.patience else config.patience)

    # an epoch of a few steps at the fine-tuning's learning rate leaves batch norm's running averages behind the
    # weights: on 1,333 images of 64×64 (10 steps an epoch) a ~70 %-pruned model validated at chance after its
    # first epoch while training at loss 1.0, and the best validation epoch was then picked from noise (test
    # 41 % for a model at 67 % before fine-tuning); its statistics re-estimated before each validation, the
    # curves rose from the start.  So the validation of a scaled fine-tuning re-estimates them first.
    finetune = scaled(budget.finetune)
    if not finetune.precise_bn:
        finetune = replace(finetune, precise_bn=min(PRECISE_BN_IMAGES, train_available - val_images))
    return replace(budget, train_images=None, val_images=val_images, extra_val_images=0, test_images=test_images,
                   baseline=scaled(budget.baseline), finetune=finetune,
                   recalibration_images=min(budget.recalibration_images, train_available - val_images),
                   calibration_images=min(budget.calibration_images, train_available - val_images))


# -- the methods ------------------------------------------------------------------------------
@dataclass
class Context:
    base_macs: int
    example: torch.Tensor
    budget: CompareBudget
    calibration: list[torch.Tensor] = field(default_factory=list)  # training images, for the planner
    cell_dir: str = ""  # where the current (method, target) keeps what its seeds share (a plan)
    input_size: tuple[int, int, int] = (1, 28, 28)  # one image of the data
    train: object = None  # the training and validation splits, for NORTON-auto's plan selection
    val: object = None
    device: torch.device = torch.device("cpu")
    methods: tuple[str, ...] = ()  # the methods the comparison runs (those that plan alike plan together)


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    family: str
    build: Callable  # (baseline, target, seed, ctx) -> (model, configuration text)
    seeded: bool = False  # the compressed model (before fine-tuning) depends on the seed
    described: bool = True  # its models are norton's own modules: a checkpoint's architecture rebuilds them
    target_kind: str = "macs"  # "macs": a fraction of MACs removed; "speedup": deployed latency ratio


def macs_reduction(model: nn.Module, ctx: Context) -> float:
    return 1.0 - count_macs(model, input_size=ctx.input_size) / ctx.base_macs


def decomposable_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_decomposable(m)]


def _norton(criterion: str) -> Callable:
    def build(base: nn.Module, target: float, seed: int, ctx: Context):
        rank = ctx.budget.norton_ranks.get(target) or _norton_rank(base, target, ctx)
        model = copy.deepcopy(base)
        decompose(model, rank, progress=False)
        keep = (1.0 - target) * ctx.base_macs / count_macs(model, input_size=ctx.input_size)
        if keep >= 1.0:
            raise NortonError(f"rank {rank} alone already removes more than {target:.0%} of the MACs; use a higher rank")
        reference = copy.deepcopy(model)
        report = prune(model, target_macs=1.0 - keep, example_inputs=ctx.example, criterion=criterion, seed=seed)
        total = sum(g.total for g in report.groups)
        kept = sum(len(g.kept) for g in report.groups)
        return model, f"rank {rank}, {criterion} prunes {1 - kept / total:.0%} of filters" + _recovered(
            model, reference, report, seed, ctx)

    return build


def _auto(kind: str, forms: tuple[str, ...] = ("cp", "tucker2"), select: bool = True,
          criterion: str = PLANNER_CRITERION) -> Callable:
    """The budget planner: per-layer CP rank, Tucker-2 ranks (``forms``) or
    dense, per-group filter counts (filters ranked by ``criterion``), damages measured on training
    images only.  A speed-up target
    uses per-layer timings on this machine at the batch the latency is measured
    with.  With the budget's ``selection_epochs`` (and ``select``) a MACs
    target's candidate plans are fine-tuned briefly and the one of best
    validation top-1 is kept (``norton.select_plan``).  The plan is kept in the
    cell's directory, so a resumed comparison rebuilds the same model even when
    timings would now choose another."""

    def build(base: nn.Module, target: float, seed: int, ctx: Context):
        name = f"plan_seed{seed}.json" if ctx.budget.seeded_calibration else "plan.json"
        saved = os.path.join(ctx.cell_dir, name) if ctx.cell_dir else None
        if saved and os.path.exists(saved):
            with open(saved) as f:
                chosen = Plan.from_dict(json.load(f))
        else:
            options = {"forms": forms, "recover": ctx.budget.recover, "criterion": criterion,
                       **ctx.budget.plan_options}
            if kind == "macs":
                options["target_macs"] = target
            else:
                options.update(target_speedup=target, latency_batch=ctx.budget.latency_batch)
            chosen = shared_plan(base, seed, ctx, options)
            if select and kind == "macs" and ctx.budget.selection_epochs and chosen.alternatives:
                chosen = select_plan(base, chosen, ctx.train, ctx.val, epochs=ctx.budget.selection_epochs,
                                     finetune=ctx.budget.finetune, run_dir=os.path.join(ctx.cell_dir, "selection"),
                                     calibration=ctx.calibration, example=ctx.example, device=ctx.device,
                                     recalibration_images=ctx.budget.recalibration_images, seed=seed)
            if saved:
                os.makedirs(ctx.cell_dir, exist_ok=True)
                atomic_write_text(saved, json.dumps(chosen.to_dict(), indent=1))
        model = copy.deepcopy(base)
        chosen.decompose(model)
        reference = copy.deepcopy(model)
        report = chosen.prune(model, ctx.example)
        return model, plan_summary(chosen) + _recovered(model, reference, report, seed, ctx, chosen.recover)

    build.planner = (tuple(forms), criterion)  # methods that plan alike share their plan calls (shared_plan)
    return build


KINDS = ("target_macs", "target_speedup")


def shared_plan(base: nn.Module, seed: int, ctx: Context, options: dict, scope: int = 2) -> Plan:
    """``norton.plan`` of ``base`` on the seed's calibration images with ``options``, made once per
    comparison: kept under the comparison's ``plans/`` folder by a digest of the options, so methods that
    plan alike (NORTON-auto and its no-selection ablation) share one plan, and a resumed run reuses it.
    A target of the budget is planned together with the budget's other targets (``scope`` 2): of its kind
    (MACs, or speed-up), and of the other kind too where a method of the run plans those with the same
    forms and criterion (NORTON-auto and NORTON-auto-speed) — one ``plan`` call, every option measured once
    for all of them, the latency model calibrated once.  A speed-up out of reach fails the joint call:
    then the targets of its own kind are planned together (``scope`` 1), then it alone (0)."""
    key = "target_macs" if "target_macs" in options else "target_speedup"
    budget_targets = {"target_macs": list(ctx.budget.targets), "target_speedup": list(ctx.budget.speedup_targets)}
    common = {k: v for k, v in options.items() if k not in (*KINDS, "latency_batch")}
    joint = {key: budget_targets[key]} if scope and options[key] in budget_targets[key] else {key: [options[key]]}
    other = KINDS[1 - KINDS.index(key)]
    if scope == 2 and options[key] in budget_targets[key]:
        if budget_targets[other] and any(
                METHODS[m].target_kind == other[len("target_"):] and getattr(METHODS[m].build, "planner", None)
                == (tuple(common.get("forms", ())), common.get("criterion")) for m in ctx.methods):
            joint[other] = budget_targets[other]
    latency_batch = options.get("latency_batch", ctx.budget.latency_batch)
    each = [{**common, kind: t, **({"latency_batch": latency_batch} if kind == "target_speedup" else {}),
             **({"planned_with": joint} if len(joint) > 1 or len(joint[key]) > 1 else {})}
            for kind in KINDS for t in joint.get(kind, ())]
    wanted = next(i for i, o in enumerate(each) if o.get(key) == options[key])
    paths = [None] * len(each)
    if ctx.cell_dir:
        paths = [os.path.join(os.path.dirname(ctx.cell_dir), "plans", f"{_digest(o)}_seed{seed}.json") for o in each]
    if paths[wanted] and os.path.exists(paths[wanted]):
        with open(paths[wanted]) as f:
            return Plan.from_dict(json.load(f))
    together = {kind: targets if len(each) > 1 else targets[0] for kind, targets in joint.items()}
    if "target_speedup" in joint:
        together["latency_batch"] = latency_batch
    try:
        made = plan(copy.deepcopy(base), ctx.calibration, seed=seed, **common, **together)
    except NortonError:  # a speed-up out of reach fails the joint call: fewer targets together
        if len(each) == 1:
            raise
        return shared_plan(base, seed, ctx, options, scope=1 if len(joint) > 1 else 0)
    made = made if len(each) > 1 else [made]
    for path, one in zip(paths, made):
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_text(path, json.dumps(one.to_dict(), indent=1))
    return made[wanted]


def _digest(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _recovered(model: nn.Module, reference: nn.Module, report: PruneReport, seed: int, ctx: Context,
               planned: bool = False) -> str:
    """With the budget's ``recover`` (or a plan made with it): refit the layers
    pruning cut to ``reference`` on the calibration images (the same images for
    every method)."""
    if not (ctx.budget.recover or planned) or not report.groups:
        return ""
    done = recover(model, reference, ctx.calibration, report, seed=seed)
    return f"; least-squares recovery of {len(done.layers)} layers"


def plan_summary(chosen: Plan) -> str:
    """One line: how many layers took each form, and how much was pruned."""
    ranks = [r for r in chosen.ranks.values() if r > 0]
    dense = len(chosen.ranks) - len(ranks) - len(chosen.tucker)
    parts = [f"{len(ranks)} CP (ranks {min(ranks)}–{max(ranks)})" if ranks else "",
             f"{len(chosen.tucker)} Tucker-2" if chosen.tucker else "", f"{dense} dense" if dense else ""]
    pruned = sum(chosen.totals.values()) - sum(chosen.keep.values())
    return (f"planned {len(chosen.ranks)} layers: {', '.join(p for p in parts if p)}; "
            f"{chosen.criterion} prunes {pruned / max(1, sum(chosen.totals.values())):.0%} of filters"
            + (f"; candidate {chosen.allocation}" if chosen.selection else ""))


def _norton_rank(base: nn.Module, target: float, ctx: Context) -> int:
    """The smallest rank whose decomposition alone leaves ≥ 10 points for pruning."""
    for rank in range(1, 65):
        if cp_reduction(base, {n: rank for n in decomposable_layers(base)}, ctx) <= target - 0.10:
            return rank
    raise NortonError(f"no rank up to 64 leaves room for pruning at target {target}")


def cp_reduction(base: nn.Module, ranks: dict[str, int], ctx: Context) -> float:
    model = copy.deepcopy(base)
    for name, rank in ranks.items():
        replace_module(model, name, CPDBlock.like_conv(model.get_submodule(name), rank))
    return macs_reduction(model, ctx)


def _cp_only(base: nn.Module, target: float, seed: int, ctx: Context):
    """The uniform rank nearest the target; when no uniform rank is within the
    tolerance, layers (in network order) take rank r instead of r + 1 until it is."""
    names = decomposable_layers(base)
    by_rank = {r: cp_reduction(base, dict.fromkeys(names, r), ctx) for r in range(1, 17)}
    rank = min(by_rank, key=lambda r: abs(by_rank[r] - target))
    ranks = dict.fromkeys(names, rank)
    if abs(by_rank[rank] - target) > TOLERANCE / 2 and rank > 1:
        high = rank if by_rank[rank] < target else rank + 1  # the rank that removes too little
        ranks = dict.fromkeys(names, high)
        for name in names:
            ranks[name] = high - 1
            if cp_reduction(base, ranks, ctx) >= target - TOLERANCE / 4:
                break
    model = copy.deepcopy(base)
    decompose(model, 1, layer_ranks=ranks, progress=False)
    used = sorted(set(ranks.values()))
    text = f"rank {used[0]}" if len(used) == 1 else (
        f"rank {used[0]} on {sum(r == used[0] for r in ranks.values())} layers, {used[1]} on the rest")
    return model, text


def _pruning_only(criterion: str) -> Callable:
    def build(base: nn.Module, target: float, seed: int, ctx: Context):
        model = copy.deepcopy(base)
        report = prune(model, target_macs=target, example_inputs=ctx.example, criterion=criterion, seed=seed)
        total = sum(g.total for g in report.groups)
        kept = sum(len(g.kept) for g in report.groups)
        return model, f"{criterion} prunes {1 - kept / total:.0%} of filters (torch-pruning importance)" + _recovered(
            model, base, report, seed, ctx)

    return build


def _layerwise(factorization: str) -> Callable:
    """tltorch's FactorizedConv on every 3×3 conv but the 1-channel stem, the
    parameter fraction searched to meet the target.  Tucker-2 keeps the kernel
    modes whole (``fixed_rank_modes=(2, 3)``)."""

    def build(base: nn.Module, target: float, seed: int, ctx: Context):
        import tltorch

        names = [n for n in decomposable_layers(base) if base.get_submodule(n).in_channels > 1]
        fixed = (2, 3) if factorization == "tucker" else None

        def make(fraction: float, weights: bool) -> nn.Module:
            model = copy.deepcopy(base)
            torch.manual_seed(seed)
            for name in names:
                replace_module(model, name, tltorch.FactorizedConv.from_conv(
                    model.get_submodule(name), rank=fraction, factorization=factorization,
                    implementation="factorized", decompose_weights=weights, fixed_rank_modes=fixed))
            return model

        low, high = 0.005, 1.0
        for _ in range(30):
            mid = (low + high) / 2
            got = macs_reduction(make(mid, False), ctx)
            if abs(got - target) <= TOLERANCE / 4:
                break
            low, high = (low, mid) if got < target else (mid, high)
        kind = "CP" if factorization == "cp" else "Tucker-2"
        return make(mid, True), f"{kind}, {mid:.1%} of each layer's parameters (tltorch)"

    return build


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("norton-auto", "NORTON-auto (planner, MACs target)", "NORTON", _auto("macs")),
    Method("norton-auto-speed", "NORTON-auto (planner, speed-up target)", "NORTON", _auto("speedup"),
           target_kind="speedup"),
    Method("norton-auto-cp", "NORTON-auto, CP ranks only (the paper's forms)", "ablation", _auto("macs", ("cp",))),
    Method("norton-auto-damage", "NORTON-auto, candidate of least damage (no selection)", "ablation",
           _auto("macs", select=False)),
    Method("norton-auto-l2", "NORTON-auto, L2 ranking (the default before the held-out study)", "ablation",
           _auto("macs", select=False, criterion="l2")),
    Method("norton", "NORTON (pabs)", "NORTON", _norton("pabs")),
    Method("norton-random", "NORTON, random selection", "ablation", _norton("random"), seeded=True),
    Method("norton-l2", "NORTON, L2 selection", "ablation", _norton("l2")),
    Method("cp-only", "CP decomposition only", "decomposition", _cp_only),
    Method("l1", "L1-norm pruning", "pruning", _pruning_only("l1")),
    Method("fpgm", "FPGM pruning", "pruning", _pruning_only("fpgm")),
    Method("tltorch-cp", "layer-wise CP (tltorch)", "decomposition", _layerwise("cp"), described=False),
    Method("tltorch-tucker2", "Tucker-2 (tltorch)", "decomposition", _layerwise("tucker"), described=False),
]}


# -- the run ----------------------------------------------------------------------------------
def _check(methods, seeds, targets, speedups=()) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise NortonError(f"unknown method(s) {', '.join(map(repr, unknown))}; valid: {', '.join(METHODS)}")
    if not methods:
        raise NortonError(f"give at least one method; valid: {', '.join(METHODS)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise NortonError(f"seeds must be distinct integers, got {list(seeds)}")
    for t in targets:
        if not 0.05 <= t <= 0.98:
            raise NortonError(f"MACs target {t!r} must be a fraction between 0.05 and 0.98 (e.g. 0.6 for 60 % fewer MACs)")
    for s in speedups:
        if not s > 1.0:
            raise NortonError(f"speed-up target {s!r} must be a number > 1 (e.g. 2 for twice as fast)")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_compare(out_dir: str = "runs/compare", *, budget: CompareBudget | str = "small",
                methods: list[str] | None = None, resume: bool = False, data_dir: str | None = None,
                device: torch.device | None = None, progress: bool = True, arch: str = DEFAULT_ARCH,
                data: str = DEFAULT_DATA, baseline_ckpt: str | None = None, budget_name: str | None = None,
                folder_options: dict | None = None, command: str | None = None) -> dict:
    """Compare the methods on ``arch`` (a zoo name or ``torchvision/<name>``)
    trained on ``data`` (any dataset ``norton train`` reads, from ``data_dir``).
    The baseline is trained until its validation top-1 stops improving (the
    budget's ``baseline`` patience), or given: ``baseline_ckpt``, a norton
    checkpoint of the uncompressed ``arch`` for the data's classes (its
    validation curve is read from the run directory it was written in, if it
    has one).  ``data`` "folder": a user's class folders at ``data_dir``, read
    with ``folder_options`` (input_size, on_bad_image, augment; see
    ``norton.training.folder_splits``); its training and validation images
    are pooled and split as the budget says, its test images kept.  The
    record (results.json) states the machine, the date, the commit and
    ``command``, the command line that ran it."""
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise NortonError(f"unknown budget {budget!r}; valid: {', '.join(BUDGETS)}")
        budget_name, budget = budget, BUDGETS[budget]
    else:
        budget_name = budget_name or "custom"
    budget.baseline.validate()
    budget.finetune.validate()
    chosen = methods
    methods = list(methods or budget.methods or default_methods(budget))
    _check(methods, budget.seeds, budget.targets, budget.speedup_targets)
    idle = [m for m in chosen or () if not (budget.targets if METHODS[m].target_kind == "macs" else budget.speedup_targets)]
    if idle:
        raise NortonError(f"method {idle[0]!r} takes {METHODS[idle[0]].target_kind} targets and budget "
                          f"{budget_name!r} has none; use --budget medium or a custom budget with speedup_targets")
    for key in ("latency_batch", "latency_repeats"):
        if not isinstance(getattr(budget, key), int) or getattr(budget, key) < 1:
            raise NortonError(f"{key} must be an integer >= 1, got {getattr(budget, key)!r}")
    device = device or torch.device("cpu")
    started = time.perf_counter()
    source = provenance(command)  # the code this run executes: the checkout may change while it runs
    budget, full, train, val, test = comparison_splits(data, data_dir, budget, budget_name, folder_options)
    given = load_checkpoint(baseline_ckpt) if baseline_ckpt is not None else None
    settings = {**_shared_settings(budget), "baseline_checkpoint": given["sha256"] if given else None,
                "folder": _folder_record(full) if data == "folder" else None}
    _check_setup(out_dir, arch, data, resume, settings)  # before any work: the run directory must fit
    classes, channels = dataset_shape(train)
    input_size = tuple(input_size_of(test))
    torch.manual_seed(budget.baseline.seed)
    baseline = _baseline_model(arch, classes, channels, input_size)
    if given is not None:
        baseline = _given_baseline(given, baseline_ckpt, baseline, arch, classes)
    os.makedirs(out_dir, exist_ok=True)  # recorded once the model is known to run on the data
    atomic_write_text(os.path.join(out_dir, "compare.json"),
                      json.dumps({"arch": arch, "data": data, "settings": settings}))
    model_text = f"{_model_name({'arch': arch})} ({'×'.join(map(str, input_size))})"
    data_text = f"image folder {full.source['root']}" if data == "folder" else DATA_NAMES.get(data, data)
    setup = (f"{data_text}: {len(train)} training + {len(val)} validation images (held out), "
             f"{len(test)} test images; {model_text}; "
             + (f"baseline given ({baseline_ckpt})" if given else
                f"baseline trained up to {budget.baseline.epochs} epochs"
                + (f", stopped when validation top-1 has not improved for {budget.baseline.patience}"
                   if budget.baseline.patience else ""))
             + "; every compressed model: BN recalibration on "
             f"{budget.recalibration_images} training images, then {budget.finetune.epochs} fine-tuning epoch(s) "
             f"(SGD lr {budget.finetune.lr}, cosine, batch {budget.finetune.batch_size}, best validation epoch"
             + (f", validated with BN statistics re-estimated on {budget.finetune.precise_bn} training images"
                if budget.finetune.precise_bn else "") + "); "
             f"seeds {list(budget.seeds)}; {torch.get_num_threads()} CPU threads"
             + ("; every pruned model's cut layers refitted by least squares on the planner's calibration images"
                if budget.recover else "")
             + (f"; NORTON-auto's candidate plans each fine-tuned {budget.selection_epochs} epoch(s), the one of best "
                "validation top-1 kept" if budget.selection_epochs and "norton-auto" in methods else ""))
    print(setup)

    # the shared baseline
    base_dir = os.path.join(out_dir, "baseline")
    last = os.path.join(base_dir, "last.pt")
    if given is None:
        if not _finished(last):
            fit(baseline, train, val, budget.baseline, base_dir, device=device, resume=os.path.exists(last),
                progress=progress, extra={"stage": "compare baseline"})
        load_best(baseline, base_dir)
        curve = _validation_curve(base_dir)
    else:
        os.makedirs(base_dir, exist_ok=True)  # marks the run directory as holding a comparison
        curve = _validation_curve(os.path.dirname(os.path.abspath(baseline_ckpt)))
    baseline.to(device).eval()
    base_cx = complexity(baseline, list(input_size))
    base_test = evaluate(baseline, test, device=device)
    print(f"baseline: {len(curve)} epochs, validation top-1 {' '.join(f'{v:.2f}' for v in curve[-5:])} (last 5); "
          f"{'converged' if converged(curve) else 'not converged'} (last {CONVERGED_WINDOW} within "
          f"{CONVERGED_SPREAD} points)")
    teacher = copy.deepcopy(baseline) if budget.finetune.distill > 0 else None  # the same teacher for every method
    ctx = Context(base_macs=base_cx.macs, example=torch.zeros(1, *input_size), budget=budget, input_size=input_size,
                  calibration=calibration_batches(train, budget.calibration_images, seed=0), train=train, val=val,
                  device=device, methods=tuple(methods))

    results = []
    finals: dict[tuple[str, float, int], nn.Module] = {}  # every seed's model: seeds may plan differently
    cells = [("macs", t) for t in budget.targets] + [("speedup", s) for s in budget.speedup_targets]
    for kind, target in cells:
        for name in (m for m in methods if METHODS[m].target_kind == kind):
            method = METHODS[name]
            built = None
            ctx.cell_dir = os.path.join(out_dir, f"{name}_{round(100 * target)}" if kind == "macs" else f"{name}_x{target:g}")
            for seed in budget.seeds:
                if budget.seeded_calibration:
                    ctx.calibration = calibration_batches(train, budget.calibration_images, seed=seed)
                run_dir = os.path.join(ctx.cell_dir, f"seed{seed}")
                result_path = os.path.join(run_dir, "result.json")
                done = resume and os.path.exists(result_path)
                if done and method.described:  # a finished run: its checkpoint rebuilds the model, no planning again
                    model = model_from_checkpoint(load_checkpoint(os.path.join(run_dir, "finetune", "best.pt")),
                                                  f"{name}'s fine-tuned model in {run_dir!r}",
                                                  base_model=copy.deepcopy(baseline).cpu()).to(device)
                else:
                    if built is None or method.seeded or budget.seeded_calibration:
                        t0 = time.perf_counter()
                        built = method.build(baseline.cpu(), target, seed, ctx)
                        build_seconds = time.perf_counter() - t0
                        reached = macs_reduction(built[0], ctx)
                        if kind == "macs" and abs(reached - target) > TOLERANCE:
                            raise NortonError(f"{name} reached {reached:.1%} fewer MACs, more than {TOLERANCE:.0%} from the target {target:.0%}")
                    model = copy.deepcopy(built[0]).to(device)
                    if done:  # tltorch's models: built again, then given their fine-tuned weights
                        load_best(model, os.path.join(run_dir, "finetune"))
                if done:
                    with open(result_path) as f:
                        result = json.load(f)
                else:
                    goal = f"{target:.0%} fewer MACs" if kind == "macs" else f"{target:g}× faster"
                    print(f"\n{method.label} at {goal}, seed {seed}: {built[1]}")
                    result = _run_one(model, built[1], method, target, seed, train, val, test, ctx, run_dir,
                                      device, progress, resume, build_seconds, teacher)
                    atomic_write_text(result_path, json.dumps(result, indent=1))
                results.append(result)
                finals[(name, target, seed)] = model
        baseline.to(device)

    latency = deployed_latencies(baseline, finals, device, input_size, batch=budget.latency_batch,
                                 repeats=budget.latency_repeats)
    for r in results:
        r["latency_ms"] = latency[(r["method"], r["target"], r["seed"])]
    summary = {
        "budget": budget_name, "setup": setup, "arch": arch, "data": data,
        "baseline": {"top1": base_test["top1"], "macs": base_cx.macs, "params": base_cx.params,
                     "latency_ms": latency["baseline"], "epochs": len(curve), "val_curve": curve,
                     "converged": converged(curve), "given": baseline_ckpt},
        "runs": results, "timed": "every seed", "budget_settings": _budget_dict(budget), "machine": machine_record(device),
        **provenance(command), "commit": source["commit"], "started": source["date"],
        "minutes": (time.perf_counter() - started) / 60,
    }
    atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(summary, indent=1))
    table = write_report(summary, out_dir)
    print("\n" + table)
    print(f"written: {out_dir}/results.md, results.json, accuracy_vs_macs.png, accuracy_vs_latency.png")
    return summary


def default_methods(budget: CompareBudget) -> list[str]:
    """What a budget without its own method list compares: every method, except the no-selection
    ablation where the budget selects no plan (it would build NORTON-auto's model again)."""
    return [m for m in METHODS if not (m == "norton-auto-damage" and not budget.selection_epochs)]


def comparison_splits(data: str, data_dir: str | None, budget: CompareBudget, budget_name: str,
                      folder_options: dict | None = None):
    """(the budget scaled to the data, the full training pool, train, validation, test) as a comparison
    splits ``data`` — ``norton report`` takes the same splits.  ``data`` "folder": a user's class folders at
    ``data_dir``, read with ``folder_options``; its training and validation images are the pool to split, its
    test images kept."""
    if data == "folder":
        folder_train, folder_val, full_test = folder_splits(data_dir, **(folder_options or {}))
        full = joined(folder_train, folder_val) if folder_val is not None else folder_train
    else:
        full = load_dataset(data, data_dir, "train")
        full_test = load_dataset(data, data_dir, "test")
    _, height, width = input_size_of(full)
    budget = scale_budget(budget, len(full), len(full_test), budget_name, height * width)
    train = limit(full, budget.train_images)
    test = limit(full_test, budget.test_images)
    train, val = split_validation(train, budget.val_images)
    if budget.extra_val_images:
        val = joined(val, held_out(full, budget.train_images or len(full), budget.extra_val_images))
    return budget, full, train, val, test


def _baseline_model(arch: str, classes: int, channels: int, input_size) -> nn.Module:
    """The untrained baseline, checked to run on the data's images."""
    channels_of = {} if arch.startswith("torchvision/") else {"in_channels": channels}  # torchvision's take 3
    model = create_model(arch, num_classes=classes, **channels_of)
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *input_size))
    except Exception as err:  # noqa: BLE001 - any failure of a model's forward is reported
        raise NortonError(f"--arch {arch} does not run on the data's {'×'.join(map(str, input_size))} images "
                          f"({type(err).__name__}: {err}); choose a model that fits them") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        raise NortonError(f"--arch {arch} must return (batch, {classes}) logits on the data's images, "
                          f"got {getattr(out, 'shape', type(out).__name__)}")
    return model


def _folder_record(data) -> dict:
    """How an image folder was read: a resumed comparison must read it the same way."""
    return {k: data.source[k] for k in ("root", "image_size", "on_bad_image", "augment", "classes")}


def _given_baseline(ckpt: dict, path: str, fresh: nn.Module, arch: str, classes: int) -> nn.Module:
    """The trained baseline of a checkpoint, checked to be the uncompressed
    ``arch`` for the data's ``classes`` (``fresh``: that model, untrained)."""
    base = ckpt["architecture"].get("base") or {}
    if base.get("arch") != arch:
        raise NortonError(f"--baseline {path!r} is a {base.get('arch') or 'model from outside the norton zoo'}, not the "
                          f"comparison's --arch {arch}; give --arch {base.get('arch') or 'of its model'} or another checkpoint")
    if base.get("num_classes") != classes:
        raise NortonError(f"--baseline {path!r} has {base.get('num_classes')} classes; the data has {classes}")
    model = model_from_checkpoint(ckpt, f"--baseline {path!r}", base_model=copy.deepcopy(fresh))
    shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    other = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes != other:
        different = next(k for k in sorted(set(shapes) | set(other)) if shapes.get(k) != other.get(k))
        raise NortonError(f"--baseline {path!r} is a compressed or differently shaped {arch} ({different}: "
                          f"{other.get(different)} where the uncompressed model has {shapes.get(different)}); "
                          "the comparison starts from the uncompressed model")
    return model


# what every run of a comparison must share: a resumed run with other data or training would mix tables
_SHARED = ("train_images", "val_images", "extra_val_images", "test_images", "baseline", "finetune",
           "recalibration_images", "calibration_images", "seeded_calibration", "baseline_checkpoint", "folder")
# what a run recorded before a shared setting existed did
_BEFORE_SETTING = {"seeded_calibration": False, "baseline_checkpoint": None, "folder": None}


def _validation_curve(run_dir: str) -> list[float]:
    """Validation top-1 per epoch of a finished fit run (its metrics.jsonl)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["val_top1"] for line in f if line.strip()]


def _convergence(base: dict) -> str:
    """What a summary says of its baseline's training (older summaries do not record it)."""
    if "epochs" not in base:
        return ""
    given = f"; given ({base['given']})" if base.get("given") else ""
    if not base["epochs"]:
        return given + ", no validation curve recorded with it"
    state = "converged" if base["converged"] else "not converged"
    last = ", ".join(f"{v:.2f}" for v in base.get("val_curve", [])[-CONVERGED_WINDOW:])
    return (f"{given}; trained {base['epochs']} epochs, {state} (validation top-1 of the last {CONVERGED_WINDOW} epochs"
            f"{f' {last} %,' if last else ''} {'within' if base['converged'] else 'not within'} {CONVERGED_SPREAD} points)")


def _shared_settings(budget: CompareBudget) -> dict:
    settings = _budget_dict(budget)
    return {k: settings[k] for k in _SHARED if k in settings}


def _check_setup(out_dir: str, arch: str, data: str, resume: bool, settings: dict) -> None:
    """A run directory holds one (arch, data) comparison (``compare.json``): a
    resumed run must not mix in another — nor other data splits or training
    (runs recorded before the settings were kept are not checked on them) —
    and a finished one is not overwritten."""
    path = os.path.join(out_dir, "compare.json")
    if os.path.exists(os.path.join(out_dir, "baseline")) and not resume:
        raise NortonError(f"{out_dir!r} already holds a comparison; pass --resume to continue it or choose another --out")
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
    elif os.path.exists(os.path.join(out_dir, "baseline")):
        recorded = {"arch": DEFAULT_ARCH, "data": DEFAULT_DATA}  # what a run from before --arch/--data compared
    else:
        return
    if (recorded["arch"], recorded["data"]) != (arch, data):
        raise NortonError(f"{out_dir!r} holds a comparison of {recorded['arch']} on {recorded['data']}, not {arch} on "
                          f"{data}; choose another --out")
    before = recorded.get("settings")
    if before is None:
        return
    before = {**_BEFORE_SETTING, **before}
    differ = [k for k in _SHARED if k in before and before[k] != settings[k]]
    if differ:
        k = differ[0]
        raise NortonError(f"{out_dir!r} holds a comparison run with {k}={before[k]!r}, not {settings[k]!r}; "
                          "resume it with the budget it was run with, or choose another --out")


def _model_name(summary: dict) -> str:
    arch = summary.get("arch", DEFAULT_ARCH)
    return "ResNet-20" if arch == DEFAULT_ARCH else arch


def _data_name(summary: dict) -> str:
    data = summary.get("data", DEFAULT_DATA)
    return DATA_NAMES.get(data, data)


def write_report(summary: dict, out_dir: str) -> str:
    """results.md and both figures from a comparison's summary (results.json)."""
    table = render_table(summary)
    atomic_write_text(os.path.join(out_dir, "results.md"), table)
    plot_compare(summary, os.path.join(out_dir, "accuracy_vs_macs.png"))
    plot_latency(summary, os.path.join(out_dir, "accuracy_vs_latency.png"))
    return table


def _finished(last: str) -> bool:
    return os.path.exists(last) and bool(load_checkpoint(last)["train_state"].get("finished"))


def _budget_dict(budget: CompareBudget) -> dict:
    out = asdict(budget)
    out["norton_ranks"] = {str(k): v for k, v in budget.norton_ranks.items()}
    return out


def _run_one(model, configuration, method, target, seed, train, val, test, ctx: Context, run_dir, device, progress,
             resume, build_seconds, teacher=None) -> dict:
    budget = ctx.budget
    started = time.perf_counter()
    cx = complexity(model, list(ctx.input_size))
    raw = evaluate(model, test, device=device)
    recalibrate_bn(model, train, device=device, num_images=budget.recalibration_images, seed=seed)
    recalibrated = evaluate(model, test, device=device)
    config = replace(budget.finetune, seed=seed)
    finetune_dir = os.path.join(run_dir, "finetune")
    fitted = fit(model, train, val, config, finetune_dir, device=device, progress=progress,
                 resume=resume and os.path.exists(os.path.join(finetune_dir, "last.pt")),
                 overwrite=not resume, extra={"stage": f"compare {method.name} {target}"}, teacher=teacher)
    load_best(model, finetune_dir)
    final = evaluate(model, test, device=device)
    return {"method": method.name, "label": method.label, "family": method.family, "target": target,
            "target_kind": method.target_kind, "seed": seed,
            "configuration": configuration, "macs": cx.macs, "params": cx.params,
            "top1_before_finetune": raw["top1"], "top1_recalibrated": recalibrated["top1"], "top1": final["top1"],
            "val_top1": fitted.best_val["top1"], "val_images": len(val),
            "build_seconds": build_seconds, "run_seconds": time.perf_counter() - started}


def deployed_latencies(baseline: nn.Module, finals: dict, device: torch.device, input_size, *,
                       batch: int = LATENCY_BATCH, repeats: int = LATENCY_REPEATS) -> dict:
    """Deployed latency of every compressed model (``finals``: by method, target
    and seed — the seeds of one method may build different models) and of the
    baseline, timed round-robin in one run (``repeats`` passes) on a batch of
    ``batch``.

    Each model is deployed in both memory formats and both are in the
    round-robin; a model's latency is the faster of its two medians.  (``deploy``
    alone picks the format from a few calls timed one after the other, which on
    a noisy machine can pick the slower one for one model and not for its twin.)"""
    example = torch.randn(batch, *input_size, device=device)
    models = {"baseline": baseline, **finals}
    layouts = ("contiguous", "channels_last")
    deployed = {(key, layout): deploy(model, example, memory_format=layout)[0]
                for key, model in models.items() for layout in layouts}
    measured = compare_latency(deployed, example, repeats=repeats)
    return {key: min(measured[(key, layout)].median_ms for layout in layouts) for key in models}


# -- the report -------------------------------------------------------------------------------
def _groups(summary: dict) -> dict[tuple[str, float, str], list[dict]]:
    """Runs by (target kind, target, method); MACs targets first."""
    groups: dict[tuple[str, float, str], list[dict]] = {}
    for r in summary["runs"]:
        groups.setdefault((r.get("target_kind", "macs"), r["target"], r["method"]), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0] != "macs", kv[0][1])))


def _target_text(kind: str, target: float) -> str:
    return f"{target:.0%}" if kind == "macs" else f"{target:g}× faster"


def latency_of(runs: list[dict]) -> float:
    """A method's deployed latency at one target: the mean over its seeds' models (records from before
    every seed was timed give each run seed 0's)."""
    return _mean_of(runs, "latency_ms")


def speedup_text(runs: list[dict], base: dict) -> str:
    """The speed-up of ``latency_of(runs)`` over the baseline, with the seeds' range where they differ by
    more than 5 % (their plans differ)."""
    each = [base["latency_ms"] / r["latency_ms"] for r in runs]
    spread = f" ({min(each):.2f}–{max(each):.2f}× by seed)" if max(each) > 1.05 * min(each) else ""
    return f"{base['latency_ms'] / latency_of(runs):.2f}×{spread}"


def configuration_text(runs: list[dict]) -> str:
    """What a method built at one target: one line, or each seed's where they differ."""
    configurations = {r["configuration"] for r in runs}
    if len(configurations) == 1:
        return runs[0]["configuration"]
    return "; ".join(f"seed {r['seed']}: {r['configuration']}" for r in runs)


def _mean_of(runs: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in runs)


def _mean_top1(runs: list[dict]) -> float:
    return _mean_of(runs, "top1")


def dominated_by(summary: dict, method: str) -> list[tuple[list[dict], list[dict]]]:
    """Pairs (runs of one ``method`` point, runs of another method's point that
    is both faster and more accurate): what the accuracy-vs-latency figure shows."""
    points = list(_groups(summary).values())
    return [(ours, other) for ours in points if ours[0]["method"] == method for other in points
            if other[0]["method"] != method and latency_of(other) < latency_of(ours)
            and _mean_top1(other) > _mean_top1(ours)]


def _recorded_minutes(summary: dict) -> str:
    """What the compressed models cost as they were built and fine-tuned, over every invocation (a
    resumed run's own minutes only count what was left): each cell's build once, each run's fine-tuning."""
    runs = summary["runs"]
    if not runs or any("run_seconds" not in r for r in runs):
        return ""
    per_seed = summary.get("budget_settings", {}).get("seeded_calibration", False)
    builds = {(r["method"], r["target"],
               r["seed"] if per_seed or getattr(METHODS.get(r["method"]), "seeded", False) else None):
              r["build_seconds"] for r in runs}
    total = (sum(builds.values()) + sum(r["run_seconds"] for r in runs)) / 60
    return f" (this invocation; building and fine-tuning the compressed models took {total:.1f} min as recorded)"


def _top1_resolution(summary: dict) -> float:
    """The points one test image is worth in ``summary``'s comparison (0 where its record does not say how many
    test images there were)."""
    images = summary.get("budget_settings", {}).get("test_images")
    return 100.0 / images if images else 0.0


def _margins(ours: list[dict], other: list[dict], resolution: float) -> str:
    """By how much ``other`` is more accurate (paired over seeds, with its
    interval: a tie when it includes 0) and faster."""
    difference = paired_difference(other, ours, resolution=resolution)
    tie = "; the accuracy difference is a tie, its interval includes 0" if difference.verdict == "tie" else ""
    return f"by {difference.text()} and {latency_of(ours) - latency_of(other):.1f} ms{tie}"


def _point_text(runs: list[dict]) -> str:
    r0 = runs[0]
    return (f"{r0['label']} at {_target_text(r0.get('target_kind', 'macs'), r0['target'])} "
            f"({latency_of(runs):.1f} ms, {_mean_top1(runs):.2f} %)")


def _fmt(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.2f} ± {std:.2f}"


def _latency_setting(summary: dict, key: str) -> int:
    """The budget's latency batch or passes (comparisons recorded before they were settings used the defaults)."""
    return summary.get("budget_settings", {}).get(key, getattr(CompareBudget, key))


def peer_verdicts(summary: dict) -> dict[tuple[float, str], tuple]:
    """{(MACs target, NORTON method): (its paired difference to the best other method at that target, that
    method's label)} — the most accurate method outside the NORTON family and its ablations, by mean top-1."""
    out = {}
    groups = _groups(summary)
    resolution = _top1_resolution(summary)
    for target in dict.fromkeys(t for k, t, _ in groups if k == "macs"):
        rows = [(m, runs) for (k, t, m), runs in groups.items() if (k, t) == ("macs", target)]
        ranked = sorted(rows, key=lambda mr: -statistics.fmean(r["top1"] for r in mr[1]))
        peers = [(m, runs) for m, runs in ranked if m not in METHODS or METHODS[m].family not in ("NORTON", "ablation")]
        for ours_name in ("norton-auto", "norton"):
            if ours_name in dict(rows) and peers:
                out[(target, ours_name)] = (paired_difference(dict(rows)[ours_name], peers[0][1], resolution=resolution),
                                            peers[0][1][0]["label"])
    return out


def headline_table(summary: dict) -> str:
    """The short table of a comparison (the README's): per target and method, MACs removed, test top-1,
    change against the baseline, deployed speed-up, NORTON's paired verdict, and the command that
    reproduces the row.  Ablations are left to the full table."""
    base = summary["baseline"]
    verdicts = peer_verdicts(summary)
    budget = summary.get("budget", "medium")
    lines = ["| target | method | MACs ↓ | test top-1 | vs baseline | deployed speed-up | verdict | reproduce |",
             "|---|---|---|---|---|---|---|---|"]
    for (kind, target, method), runs in _groups(summary).items():
        if method in METHODS and METHODS[method].family == "ablation":
            continue
        r0, final = runs[0], [r["top1"] for r in runs]
        found = verdicts.get((target, method))
        verdict = (f"{found[0].verdict} vs {found[1]}: {found[0].mean:+.2f} ({found[0].low:+.2f} to "
                   f"{found[0].high:+.2f})" if found else "")
        name = f"**{r0['label']}**" if method.startswith("norton") else r0["label"]
        lines.append(f"| {_target_text(kind, target)} | {name} | {100 * (1 - _mean_of(runs, 'macs') / base['macs']):.1f} % "
                     f"| {_fmt(final)} | {statistics.fmean(final) - base['top1']:+.2f} "
                     f"| {speedup_text(runs, base)} | {verdict} "
                     f"| `norton compare --budget {budget} --methods {method}` |")
    return "\n".join(lines) + "\n"


def render_table(summary: dict) -> str:
    base = summary["baseline"]
    lines = [
        f"Measured by `norton compare --budget {summary['budget']}` in {summary['minutes']:.1f} min"
        f"{_recorded_minutes(summary)}. {summary['setup']}.",
        f"Accuracy: test top-1 (%), mean ± std over seeds. Latency: deployed model, median of "
        f"{_latency_setting(summary, 'latency_repeats')} round-robin passes of a batch of "
        f"{_latency_setting(summary, 'latency_batch')}, the faster of its two memory formats (ratios are what "
        "to quote)" + ("; a method's latency is the mean over its seeds' models." if summary.get("timed") == "every seed"
                       else "; each method's latency is its seed-0 model's (recorded before every seed's model was "
                       "timed), whatever the other seeds built."),
        "",
        f"Baseline {_model_name(summary)}: {base['top1']:.2f} %, {base['macs'] / 1e6:.2f}M MACs, {base['params'] / 1e3:.1f}K params, "
        f"{base['latency_ms']:.1f} ms" + _convergence(base) + ".",
        "",
        "| MACs target | method | configuration | MACs ↓ | params ↓ | before fine-tuning | + BN recalibration "
        "| after fine-tuning | vs baseline | latency (speed-up) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    groups = _groups(summary)
    for kind, target in dict.fromkeys((k, t) for k, t, _ in groups):
        rows = [(m, runs) for (k, t, m), runs in groups.items() if (k, t) == (kind, target)]
        for method, runs in rows:
            r0 = runs[0]
            final = [r["top1"] for r in runs]
            lines.append(
                f"| {_target_text(kind, target)} | {r0['label']} | {configuration_text(runs)} | {100 * (1 - _mean_of(runs, 'macs') / base['macs']):.1f} % "
                f"| {100 * (1 - _mean_of(runs, 'params') / base['params']):.1f} % | {_fmt([r['top1_before_finetune'] for r in runs])} "
                f"| {_fmt([r['top1_recalibrated'] for r in runs])} | **{_fmt(final)}** "
                f"| {statistics.fmean(final) - base['top1']:+.2f} | {latency_of(runs):.1f} ms "
                f"({speedup_text(runs, base)}) |")
    for (target, ours_name), (difference, peer_label) in peer_verdicts(summary).items():
        label = groups[("macs", target, ours_name)][0]["label"]
        peer_text = f"the best other method, {peer_label}"
        if difference.verdict == "wins":
            verdicts.append(f"- at {target:.0%} fewer MACs {label} **wins** against {peer_text}: {difference.text()}.")
        elif difference.verdict == "loses":
            verdicts.append(f"- at {target:.0%} fewer MACs {label} **loses** to {peer_text}: {difference.text()}.")
        else:
            verdicts.append(f"- at {target:.0%} fewer MACs {label} **ties** with {peer_text}: {difference.text()}; "
                            "the interval includes 0.")
    resolution = _top1_resolution(summary)
    for name in ("norton-auto", "norton-auto-speed"):
        runs = [r for r in summary["runs"] if r["method"] == name]
        if not runs:
            continue
        beaten = dominated_by(summary, name)
        if not beaten:
            verdicts.append(f"- accuracy vs deployed latency: no other method is both faster and more accurate than "
                            f"any {runs[0]['label']} model.")
        verdicts += [f"- accuracy vs deployed latency: {_point_text(other)} is both faster and more accurate than "
                     f"{_point_text(ours)}, {_margins(ours, other, resolution)}."
                     for ours, other in beaten]
    machine = summary.get("machine")
    ran_on = [f"Ran on {_machine_text(machine)}.", ""] if machine else []
    rule = ("Verdicts: each method's difference to the best other method, paired by seed (the same seed gives both "
            "the same data order, calibration images and fine-tuning), with its 95 % interval; a win or a loss only "
            "where the interval excludes 0, otherwise a tie (the deviation of the differences taken no smaller than "
            "one test image's step gives: `norton.evidence.verdicts`).")
    return "\n".join(lines + [""] + ran_on + [rule, ""] + verdicts) + "\n"


def _machine_text(machine: dict) -> str:
    gpu = f", GPU {machine['gpu']} (CUDA {machine.get('cuda')})" if machine.get("gpu") else ""
    return (f"CPU {machine['cpu']}, BLAS {machine['blas']}{gpu}, torch {machine['torch']}, "
            f"Python {machine['python']}")


def _ceiling(summary: dict) -> float:
    """Top of the accuracy axis: above the baseline and every mean + std."""
    tops = [sum(_mean_std([r["top1"] for r in runs])) for runs in _groups(summary).values()]
    return max([summary["baseline"]["top1"], *tops]) + 0.5


def plot_compare(summary: dict, path: str) -> None:
    """Accuracy after fine-tuning vs MACs removed, one marker per method, error
    bars = std over seeds.  The axis spans the results within 12 points of the
    baseline; a method far below is drawn on the lower edge with its value."""
    plt = pyplot()
    base = summary["baseline"]
    fig, ax = plt.subplots(figsize=(9.6, 4.8), dpi=120)
    ax.axhline(base["top1"], color="black", linestyle="--", linewidth=1, label=f"baseline ({base['top1']:.2f} %)")
    markers = "o^sDvP*Xh<>"
    by_method: dict[str, list] = {}
    for (_, _, method), runs in _groups(summary).items():
        by_method.setdefault(method, []).append(runs)
    means = [statistics.fmean(r["top1"] for r in runs) for groups in by_method.values() for runs in groups]
    floor = max(min(means) - 1.5, base["top1"] - 12)
    off_scale = []
    for marker, (method, groups) in zip(markers, by_method.items()):
        groups.sort(key=lambda runs: _mean_of(runs, "macs"), reverse=True)
        xs = [100 * (1 - _mean_of(runs, "macs") / base["macs"]) for runs in groups]
        stats = [_mean_std([r["top1"] for r in runs]) for runs in groups]
        ys = [max(m, floor + 0.4) for m, _ in stats]
        ours = groups[0][0]["family"] == "NORTON"
        line = ax.errorbar(xs, ys, yerr=[s if m > floor else 0 for m, s in stats], marker=marker, markersize=8 if ours else 7,
                           capsize=4, linestyle="-" if ours else ":", linewidth=2.2 if ours else 1,
                           label=groups[0][0]["label"], zorder=3 if ours else 2)
        off_scale += [(x, m, s, line.lines[0].get_color(), groups[0][0]["label"]) for x, (m, s) in zip(xs, stats) if m <= floor]
    for x, m, s, color, label in off_scale:
        left = x < 72
        ax.annotate(f"{label}: {m:.1f} ± {s:.1f} % (off scale)", (x, floor + 0.4), xytext=(12 if left else -12, 14),
                    textcoords="offset points", ha="left" if left else "right", fontsize=7.5, color=color,
                    arrowprops={"arrowstyle": "->", "color": color})
    ax.set_ylim(floor, _ceiling(summary))
    ax.set_xlabel("MACs removed from the baseline (%, factored convention)")
    ax.set_ylabel("test top-1 accuracy after fine-tuning (%)")
    ax.set_title(f"{_model_name(summary)} on {_data_name(summary)}, budget '{summary['budget']}' (mean ± std over seeds)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, path)


def plot_latency(summary: dict, path: str) -> None:
    """Accuracy after fine-tuning vs measured speed-up of the deployed model
    (baseline latency / latency, seed 0's model), error bars = std over seeds;
    the grey line joins the points no other point beats in both."""
    plt = pyplot()
    base = summary["baseline"]
    fig, ax = plt.subplots(figsize=(9.6, 4.8), dpi=120)
    ax.axhline(base["top1"], color="black", linestyle="--", linewidth=1, label=f"baseline ({base['top1']:.2f} %)")
    groups = list(_groups(summary).values())
    means = [_mean_top1(runs) for runs in groups]
    floor = max(min(means) - 1.5, base["top1"] - 12)
    points = [(base["latency_ms"] / latency_of(runs), m) for runs, m in zip(groups, means)]
    front = sorted(p for p in points if not any(q[0] > p[0] and q[1] > p[1] for q in points))
    ax.plot([x for x, _ in front], [max(y, floor + 0.4) for _, y in front], color="0.6", linewidth=3, alpha=0.5,
            zorder=1, label="no other point both faster and more accurate")
    by_method: dict[str, list] = {}
    for runs in groups:
        by_method.setdefault(runs[0]["method"], []).append(runs)
    for marker, (method, series) in zip("o^sDvP*Xh<>", by_method.items()):
        series.sort(key=latency_of, reverse=True)
        xs = [base["latency_ms"] / latency_of(runs) for runs in series]
        stats = [_mean_std([r["top1"] for r in runs]) for runs in series]
        ours = series[0][0]["family"] == "NORTON"
        ax.errorbar(xs, [max(m, floor + 0.4) for m, _ in stats], yerr=[s if m > floor else 0 for m, s in stats],
                    marker=marker, markersize=8 if ours else 7, capsize=4, linestyle="-" if ours else ":",
                    linewidth=2.2 if ours else 1, label=series[0][0]["label"], zorder=3 if ours else 2)
    ax.set_ylim(floor, _ceiling(summary))
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(lambda value, _: f"{value:g}×")
    ax.xaxis.set_minor_formatter(lambda value, _: f"{value:g}×" if value in (0.75, 1.5, 3) else "")
    ax.set_xlabel(f"measured speed-up of the deployed model (baseline {base['latency_ms']:.1f} ms / latency, "
                  f"batch {_latency_setting(summary, 'latency_batch')}, log scale)")
    ax.set_ylabel("test top-1 accuracy after fine-tuning (%)")
    ax.set_title(f"{_model_name(summary)} on {_data_name(summary)}, budget '{summary['budget']}': accuracy vs deployed "
                 "latency", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, path)
