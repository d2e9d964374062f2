"""Distillation ablation on the medium comparison: NORTON-auto and FPGM at 85 %
fewer MACs fine-tuned with knowledge distillation from the uncompressed model
(loss 0.5·CE + 0.5·T²·KL, T = 4), everything else as in `--budget medium`.

    .venv/bin/python benchmarks/distill_ablation.py [--medium runs/compare_medium] [--out runs/compare_distill]

Reuses the medium run's trained baseline and NORTON-auto plan (copied into
--out), so the rows differ from the medium table only by the distillation term.
"""
from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import replace

from norton.evidence.compare import MEDIUM, run_compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--medium", default="runs/compare_medium", help="a finished `norton compare --budget medium` run")
    parser.add_argument("--out", default="runs/compare_distill")
    parser.add_argument("--weight", type=float, default=0.5, help="distillation weight W in (1-W)·CE + W·T²·KL")
    args = parser.parse_args()
    plan = os.path.join(args.medium, "norton-auto_85", "plan.json")
    if not os.path.exists(os.path.join(args.medium, "baseline", "best.pt")) or not os.path.exists(plan):
        raise SystemExit(f"{args.medium!r} is not a finished medium comparison (no baseline or NORTON-auto 85 % plan)")
    if not os.path.exists(os.path.join(args.out, "baseline")):
        shutil.copytree(os.path.join(args.medium, "baseline"), os.path.join(args.out, "baseline"))
        os.makedirs(os.path.join(args.out, "norton-auto_85"), exist_ok=True)
        shutil.copy(plan, os.path.join(args.out, "norton-auto_85", "plan.json"))
    budget = replace(MEDIUM, finetune=replace(MEDIUM.finetune, distill=args.weight), methods=("norton-auto", "fpgm"),
                     targets=(0.85,), speedup_targets=())
    run_compare(args.out, budget=budget, resume=True, progress=False)


if __name__ == "__main__":
    main()
