"""Ablations on the medium comparison: one change at a time, everything else as
in `norton compare --budget medium` (same trained baseline, NORTON-auto plans,
data, BN recalibration, fine-tuning and seeds).

    .venv/bin/python benchmarks/ablation.py distill   [--weight 0.5]  # -> runs/compare_distill
    .venv/bin/python benchmarks/ablation.py recover                   # -> runs/compare_recover

distill: NORTON-auto and FPGM at 85 % fewer MACs, fine-tuned with knowledge
distillation from the uncompressed model (loss (1-W)·CE + W·T²·KL, T = 4).
recover: NORTON-auto, NORTON (pabs), FPGM and L1 at 60 % and 85 %, every pruned
model's cut layers refitted by least squares on the 256 calibration images
(norton.recover) before BN recalibration and fine-tuning.

The medium run's baseline and NORTON-auto plans are copied into --out, so the
rows differ from the medium table only by the change named.
"""
from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import replace

from norton.evidence.compare import MEDIUM, run_compare

VARIANTS = {
    "distill": (("norton-auto", "fpgm"), (0.85,)),
    "recover": (("norton-auto", "norton", "fpgm", "l1"), (0.60, 0.85)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--medium", default="runs/compare_medium", help="a finished `norton compare --budget medium` run")
    parser.add_argument("--out", default=None, help="default: runs/compare_<variant>")
    parser.add_argument("--weight", type=float, default=0.5, help="distill: weight W in (1-W)·CE + W·T²·KL")
    args = parser.parse_args()
    out = args.out or f"runs/compare_{args.variant}"
    methods, targets = VARIANTS[args.variant]
    plans = [os.path.join(args.medium, f"norton-auto_{round(100 * t)}", "plan.json") for t in targets]
    if not os.path.exists(os.path.join(args.medium, "baseline", "best.pt")) or not all(map(os.path.exists, plans)):
        raise SystemExit(f"{args.medium!r} is not a finished medium comparison (no baseline or NORTON-auto plans)")
    if not os.path.exists(os.path.join(out, "baseline")):
        shutil.copytree(os.path.join(args.medium, "baseline"), os.path.join(out, "baseline"))
    for target, plan in zip(targets, plans):
        cell = os.path.join(out, f"norton-auto_{round(100 * target)}")
        os.makedirs(cell, exist_ok=True)
        if not os.path.exists(os.path.join(cell, "plan.json")):
            shutil.copy(plan, os.path.join(cell, "plan.json"))
    budget = replace(MEDIUM, methods=methods, targets=targets, speedup_targets=())
    if args.variant == "distill":
        budget = replace(budget, finetune=replace(MEDIUM.finetune, distill=args.weight))
    else:
        budget = replace(budget, recover=True)
    run_compare(out, budget=budget, resume=True, progress=False)


if __name__ == "__main__":
    main()
