"""How well does the planner's candidate measurement predict fine-tuned accuracy?

The planner ("best" allocation) builds several whole candidate plans (greedy,
Lagrangian, the pruning-only and no-pruning corners, uniform pruning) and keeps
the one of least measured damage.  This study fine-tunes every candidate
exactly as `norton compare --budget medium` fine-tunes a method (BN
recalibration, 3 epochs, seed 0) and prints, next to each candidate's damage
measured as built and after a brief distillation trial (``trial_steps``), its
best **validation** top-1 — the held-out split, never the test set, since the
study is there to choose how the planner measures.

    .venv/bin/python benchmarks/candidates.py [--targets 0.6 0.85] [--trial-steps 64]

It reads the baseline of a comparison run directory (``--run``; trains none)
and writes ``candidates.json`` there.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import replace

import torch

import norton.compression.planning as planning
from norton.checkpoints import atomic_write_text
from norton.evidence.compare import MEDIUM
from norton.models import create_model
from norton.training import (
    calibration_batches,
    fit,
    limit,
    load_best,
    load_dataset,
    recalibrate_bn,
    split_validation,
)


def candidate_models(baseline, calibration, target: float, trial_steps: int) -> tuple[planning.Plan, list]:
    """Plan at ``target``; return the plan and every whole candidate the planner
    built, as built (before the trial), with the damage it measured."""
    seen = []
    real_trial = planning.distill_trial

    def recording(model, teacher, images, steps, **kw):
        seen.append(copy.deepcopy(model))
        return real_trial(model, teacher, images, steps, **kw)

    planning.distill_trial = recording
    try:
        chosen = planning.plan(copy.deepcopy(baseline), calibration, target_macs=target, recover=True,
                               trial_steps=trial_steps, seed=0)
    finally:
        planning.distill_trial = real_trial
    return chosen, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/compare_recover", help="a comparison run directory with a baseline")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.6, 0.85])
    parser.add_argument("--trial-steps", type=int, default=64)
    args = parser.parse_args()
    budget = MEDIUM
    train = limit(load_dataset("fashion-mnist", None, "train"), budget.train_images)
    train, val = split_validation(train, budget.val_images)
    baseline = create_model("resnet_20", in_channels=1, num_classes=10)
    load_best(baseline, os.path.join(args.run, "baseline"))
    calibration = calibration_batches(train, budget.calibration_images, seed=0)
    out_path = os.path.join(args.run, "candidates.json")
    rows = json.load(open(out_path)) if os.path.exists(out_path) else []
    cpu = torch.device("cpu")
    dense = copy.deepcopy(baseline).eval()
    probe = planning._Probe(dense, calibration)  # the planner's measurement as built (all calibration images)
    for target in args.targets:
        started = time.perf_counter()
        chosen, models = candidate_models(baseline, calibration, target, args.trial_steps)
        plan_seconds = time.perf_counter() - started
        # the models were recorded in measurement order: one per distinct candidate state
        distinct: list[float] = []
        for damage in chosen.candidates.values():
            if damage not in distinct:
                distinct.append(damage)
        for i, (model, damage) in enumerate(zip(models, distinct)):
            names = [n for n, d in chosen.candidates.items() if d == damage]
            built_damage = probe.damage(model)
            run_dir = os.path.join(args.run, "candidates", f"{round(100 * target)}_{i}")
            recalibrate_bn(model, train, device=cpu, num_images=budget.recalibration_images, seed=0)
            fit(model, train, val, replace(budget.finetune, seed=0), run_dir, device=cpu, overwrite=True, progress=False)
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                val_top1 = max(json.loads(line)["val_top1"] for line in f)
            rows.append({"target": target, "candidates": names, "damage_as_built": built_damage,
                         "damage_after_trial": damage, "trial_steps": args.trial_steps, "val_top1": val_top1,
                         "chosen": chosen.allocation, "plan_seconds": plan_seconds})
            print(f"{target:.0%} {', '.join(names)}: damage as built {built_damage:.4f}, after trial "
                  f"{damage:.4f}; best val top-1 after fine-tuning {val_top1:.2f}", flush=True)
            atomic_write_text(out_path, json.dumps(rows, indent=1))
        print(f"{target:.0%}: planner chose {chosen.allocation!r} (plan {plan_seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
