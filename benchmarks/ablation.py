"""Ablations on the medium comparison: one change at a time, everything else as
in `norton compare --budget medium` (same trained baseline, NORTON-auto plans,
data, BN recalibration, fine-tuning and seeds).

    .venv/bin/python benchmarks/ablation.py distill   [--weight 0.5]  # -> runs/compare_distill
    .venv/bin/python benchmarks/ablation.py recover                   # -> runs/compare_recover
    .venv/bin/python benchmarks/ablation.py iterative                 # -> runs/compare_iterative
    .venv/bin/python benchmarks/ablation.py select                    # -> runs/compare_select
    .venv/bin/python benchmarks/ablation.py heldout                   # -> runs/compare_heldout

distill: NORTON-auto and FPGM at 85 % fewer MACs, fine-tuned with knowledge
distillation from the uncompressed model (loss (1-W)·CE + W·T²·KL, T = 4),
without least-squares recovery (as the medium table it is compared with).
recover: NORTON-auto, NORTON (pabs), FPGM and L1 at 60 % and 85 %, every pruned
model's cut layers refitted by least squares on the 256 calibration images
(norton.recover) before BN recalibration and fine-tuning; NORTON-auto plans
afresh, measuring each pruning option after the refit.
iterative: NORTON at 85 % fewer MACs (rank 2, then pruning with pabs or l2, as
in the comparison) through `norton.compress` with its defaults (least-squares
recovery after every pruning), pruned at once or in 3 steps of one fine-tuning
epoch each (the same 3 epochs in all), seeds 0 and 1.
select: a comparison of its own (it trains its baseline with the current code when
--out has none): NORTON-auto with its candidate plans chosen on the validation
split after one fine-tuning epoch each (norton.select_plan), the same planner
keeping its candidate of least damage, L1, FPGM and Tucker-2, at 60 % and 85 %,
with least-squares recovery for every method that prunes.
heldout: a comparison of its own with 10,000 validation images (the medium budget's 2,000 plus 8,000 of
the training images it leaves unused; the same 10,000 training images): NORTON-auto with L2 and with FPGM
ranking (least damage), L1, FPGM and Tucker-2 at 60 % and 85 %, recovery for every method that prunes; it
prints validation top-1 beside test top-1 (validation.md), so the planner's default ranking can be chosen
on data that is not the test set.

The medium run's baseline (and for distill its NORTON-auto plan) is copied into
--out, so the rows differ from the medium table only by the change named.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import time
from dataclasses import replace

import torch

from norton import CompressConfig, compress, count_macs, decompose
from norton.checkpoints import atomic_write_text
from norton.evidence.compare import MEDIUM, run_compare
from norton.models import create_model
from norton.training import limit, load_best, load_dataset, split_validation

VARIANTS = {
    "distill": (("norton-auto", "fpgm"), (0.85,)),
    "recover": (("norton-auto", "norton", "fpgm", "l1"), (0.60, 0.85)),
    "iterative": ((), ()),
    "select": (("norton-auto", "norton-auto-damage", "l1", "fpgm", "tltorch-tucker2"), (0.60, 0.85)),
    # the planner ranking filters by FPGM instead of l2, added to the select run's directory
    # (run at e6031bf, when the planner's default was l2 and this row was "norton-auto-fpgm")
    "criterion": (("norton-auto", "norton-auto-damage", "norton-auto-l2", "l1", "fpgm", "tltorch-tucker2"),
                  (0.60, 0.85)),
    # the criterion question again with 10,000 validation images (the 2,000 + 8,000 of the training images
    # the medium budget leaves unused; the training split is the same): a comparison of its own
    "heldout": (("norton-auto", "norton-auto-l2", "l1", "fpgm", "tltorch-tucker2"), (0.60, 0.85)),
}
MEDIUM_2K = replace(MEDIUM, extra_val_images=0)  # the medium budget as the earlier studies ran it (2,000 validation)
ITERATIVE = [("pabs", 1), ("pabs", 3), ("l2", 1), ("l2", 3)]  # (criterion, steps)


def iterative(medium: str, out: str) -> None:
    """NORTON rank 2 at 85 % fewer MACs, one-shot vs 3-step pruning, through norton.compress."""
    started = time.perf_counter()
    budget = MEDIUM
    train = limit(load_dataset("fashion-mnist", None, "train"), budget.train_images)
    test = limit(load_dataset("fashion-mnist", None, "test"), budget.test_images)
    train, val = split_validation(train, budget.val_images)
    baseline = create_model("resnet_20", in_channels=1, num_classes=10)
    load_best(baseline, os.path.join(medium, "baseline"))
    rank, target = budget.norton_ranks[0.85], 0.85
    decomposed = copy.deepcopy(baseline)
    decompose(decomposed, rank, progress=False)
    base_macs, rank_macs = (count_macs(m, input_size=(1, 28, 28)) for m in (baseline, decomposed))
    prune_target = 1.0 - (1.0 - target) * base_macs / rank_macs  # of the decomposed model, as the comparison does
    rows = []
    for criterion, steps in ITERATIVE:
        for seed in budget.seeds:
            config = CompressConfig(rank=rank, target_macs=prune_target, criterion=criterion, iterative_steps=steps,
                                    recalibration_images=budget.recalibration_images,
                                    finetune=replace(budget.finetune, seed=seed), seed=seed)
            run_dir = os.path.join(out, f"{criterion}_steps{steps}", f"seed{seed}")
            summary = compress(copy.deepcopy(baseline), train, val, test, config, run_dir, device=torch.device("cpu"),
                               resume=True, progress=False)
            rows.append({"criterion": criterion, "steps": steps, "seed": seed,
                         "macs_reduction": 1 - summary["final"]["macs"] / base_macs,
                         "pruned_recalibrated": summary["pruned"]["recalibrated"]["top1"],
                         "top1": summary["final"]["top1"]})
    lines = [f"`benchmarks/ablation.py iterative` in {(time.perf_counter() - started) / 60:.1f} min: NORTON rank {rank} at "
             f"{target:.0%} fewer MACs, ResNet-20 on Fashion-MNIST (the medium comparison's baseline, data and "
             f"{budget.finetune.epochs} fine-tuning epochs), test top-1 mean ± std over seeds {list(budget.seeds)}.", "",
             "| selection | pruning | MACs ↓ | last pruning step + BN recalibration | after fine-tuning |", "|---|---|---|---|---|"]
    for criterion, steps in ITERATIVE:
        mine = [r for r in rows if (r["criterion"], r["steps"]) == (criterion, steps)]

        def fmt(key):
            values = [r[key] for r in mine]
            return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"

        how = "one shot" if steps == 1 else f"{steps} steps, 1 epoch after each"
        lines.append(f"| {criterion} | {how} | {100 * mine[0]['macs_reduction']:.1f} % | {fmt('pruned_recalibrated')} "
                     f"| **{fmt('top1')}** |")
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(rows, indent=1))
    atomic_write_text(os.path.join(out, "results.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def validation_table(out: str) -> None:
    """Best validation top-1 of every (method, target), mean ± std over seeds, beside test top-1: the
    validation column is what a default may be chosen on."""
    with open(os.path.join(out, "results.json")) as f:
        runs = json.load(f)["runs"]
    cells: dict[tuple[float, str], list[dict]] = {}
    for run in runs:
        if "val_top1" in run:
            cells.setdefault((run["target"], run["label"]), []).append(run)

    def fmt(values):
        return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"

    lines = ["| target | method | validation top-1 (best epoch) | test top-1 |", "|---|---|---|---|"]
    for (target, label), mine in sorted(cells.items()):
        lines.append(f"| {target:.0%} | {label} | {fmt([r['val_top1'] for r in mine])} "
                     f"| {fmt([r['top1'] for r in mine])} |")
    text = (f"Validation: {runs[0]['val_images']} held-out images; test top-1 for reference only.\n\n"
            + "\n".join(lines) + "\n")
    atomic_write_text(os.path.join(out, "validation.md"), text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--medium", default="runs/compare_medium", help="a finished `norton compare --budget medium` run")
    parser.add_argument("--out", default=None, help="default: runs/compare_<variant>")
    parser.add_argument("--weight", type=float, default=0.5, help="distill: weight W in (1-W)·CE + W·T²·KL")
    args = parser.parse_args()
    out = args.out or f"runs/compare_{args.variant}"
    if args.variant == "iterative":
        if not os.path.exists(os.path.join(args.medium, "baseline", "best.pt")):
            raise SystemExit(f"{args.medium!r} is not a finished medium comparison (no baseline)")
        return iterative(args.medium, out)
    methods, targets = VARIANTS[args.variant]
    if args.variant in ("select", "criterion"):
        budget = replace(MEDIUM_2K, methods=methods, targets=targets, speedup_targets=(), recover=True,
                         selection_epochs=1)
        run_compare(out, budget=budget, resume=True, progress=False)
        return
    if args.variant == "heldout":
        budget = replace(MEDIUM, methods=methods, targets=targets, speedup_targets=(), recover=True)
        run_compare(out, budget=budget, resume=True, progress=False)
        return validation_table(out)
    plans = [os.path.join(args.medium, f"norton-auto_{round(100 * t)}", "plan.json") for t in targets]
    if not os.path.exists(os.path.join(args.medium, "baseline", "best.pt")) or not all(map(os.path.exists, plans)):
        raise SystemExit(f"{args.medium!r} is not a finished medium comparison (no baseline or NORTON-auto plans)")
    if not os.path.exists(os.path.join(out, "baseline")):
        shutil.copytree(os.path.join(args.medium, "baseline"), os.path.join(out, "baseline"))
    for target, plan in zip(targets, plans if args.variant == "distill" else []):  # recover: planned with it
        cell = os.path.join(out, f"norton-auto_{round(100 * target)}")
        os.makedirs(cell, exist_ok=True)
        if not os.path.exists(os.path.join(cell, "plan.json")):
            shutil.copy(plan, os.path.join(cell, "plan.json"))
    budget = replace(MEDIUM_2K, methods=methods, targets=targets, speedup_targets=())
    if args.variant == "distill":
        budget = replace(budget, finetune=replace(MEDIUM.finetune, distill=args.weight), recover=False)  # as measured
    else:
        budget = replace(budget, recover=True)
    run_compare(out, budget=budget, resume=True, progress=False)


if __name__ == "__main__":
    main()
