"""``norton compare / report / demo``: the evidence, measured."""
from __future__ import annotations

import argparse
from dataclasses import replace

from norton.cli.common import add_command, add_folder_args, folder_options, rank_list
from norton.evidence import ReportPlan, run_compare, run_demo, run_report, run_showcase
from norton.evidence.compare import BUDGETS, DEFAULT_ARCH, DEFAULT_DATA
from norton.evidence.compare import METHODS as COMPARE_METHODS
from norton.training import DATASETS, resolve_device


def cmd_compare(args: argparse.Namespace) -> int:

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    budget = BUDGETS[args.budget]
    if args.patience is not None:
        budget = replace(budget, baseline=replace(budget.baseline, patience=args.patience))
    run_compare(args.out, budget=budget, budget_name=args.budget, methods=methods, resume=args.resume,
                data_dir=args.data_dir, device=resolve_device(args.device), arch=args.arch, data=args.data,
                baseline_ckpt=args.baseline, folder_options=folder_options(args), command=args.command_line)
    return 0


def cmd_report(args: argparse.Namespace) -> int:

    plan = ReportPlan(ranks=args.ranks, grid=args.grid, gradcam_images=args.gradcam_images)
    plan.gradcam_ranks = tuple(r for r in (1, 2, 4) if r in plan.ranks) or plan.ranks[:1]
    run_report(args.out, baseline_ckpt=args.baseline, compare_dir=args.compare, budget=args.budget, plan=plan,
               resume=args.resume, data=args.data, data_dir=args.data_dir,
               folder_options=folder_options(args) or None, device=resolve_device(args.device),
               command=args.command_line)
    return 0




def cmd_demo(args: argparse.Namespace) -> int:
    if args.showcase:
        run_showcase()
        return 0
    run_demo(args.out_dir, full=args.full, resume=args.resume, data=args.data, data_dir=args.data_dir,
             folder_options=folder_options(args) or None, device=resolve_device(args.device),
             command=args.command_line)
    return 0


def register(sub) -> None:
    p = add_command(sub, "compare", cmd_compare,
                    "NORTON vs pruning and decomposition baselines on Fashion-MNIST, side by side",
                    "norton compare                   # --budget small: about 15 min on 2 CPU cores\n"
                    "  norton compare --resume          # continue an interrupted comparison\n"
                    "  norton compare --budget medium --out runs/compare_medium --resume   # 3 seeds; about 80 min on 2 cores\n"
                    "  norton compare --baseline runs/base/model.pt --budget medium   # a trained baseline, not retrained\n"
                    "  norton compare --budget gpu --device cuda --out runs/compare_gpu\n"
                    "  norton compare --data folder --data-dir ~/images --image-size 64 --out runs/mine\n"
                    "  norton compare --budget full --device cuda --out runs/compare_full\n"
                    "  norton compare --methods norton,l1,fpgm\n"
                    "  norton compare --arch resnet_56 --data cifar10 --data-dir ~/data/cifar-10-batches-py --out runs/c32")
    p.add_argument("--budget", choices=("small", "medium", "full", "gpu"), default="small",
                   help="small: 1 fine-tuning epoch, the main methods (NORTON-auto, NORTON, CP only, L1, FPGM, "
                        "Tucker-2), 2 seeds; medium: 3 epochs, the main methods and NORTON-auto at "
                        "speed-up targets, 3 seeds; full: the paper's; gpu: all 60,000 images, the main methods, "
                        "fine-tuning until validation stops improving (--device cuda)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of: {', '.join(COMPARE_METHODS)}")
    p.add_argument("--arch", default=DEFAULT_ARCH,
                   help="the baseline every method compresses: a zoo model or torchvision/<name> that runs on the data")
    p.add_argument("--data", default=DEFAULT_DATA, choices=DATASETS, help="trains the baseline and fine-tunes every method")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--data-dir", default=None, help="dataset folder (Fashion-MNIST: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--baseline", default=None, metavar="CKPT",
                   help="a norton checkpoint of the trained, uncompressed --arch for the data's classes: used instead "
                        "of training one (its validation curve is read from its run directory, if there)")
    add_folder_args(p)
    p.add_argument("--patience", type=int, default=None,
                   help="the baseline's training stops when validation top-1 has not improved for this many epochs "
                        "(default: the budget's; 0 trains every epoch of the budget)")

    p = add_command(sub, "report", cmd_report,
                    "rank sweep, rank × pruning grid, Pareto curve and Grad-CAM figures (Markdown + PNG)",
                    "norton report --compare runs/compare            # baseline + methods of a comparison\n"
                    "  norton report --baseline best.pt --ranks 1-4 --grid 2,3,4 --out runs/report_small\n"
                    "  norton report --compare runs/compare --resume   # reuse finished runs, redraw\n"
                    "  norton report --baseline runs/base/model.pt --data folder --data-dir ~/images --out runs/rep")
    p.add_argument("--compare", default=None, help="a norton compare run: its baseline and models join the report")
    p.add_argument("--baseline", default=None, help="norton checkpoint of the trained zoo ResNet (default: the comparison's)")
    p.add_argument("--budget", choices=("small", "full"), default="small", help="data subset and fine-tuning schedule")
    p.add_argument("--ranks", type=rank_list, default=tuple(range(1, 9)), help="rank sweep (default 1-8)")
    p.add_argument("--grid", type=rank_list, default=(3, 4, 6, 8), help="first unpruned, the rest pruned to its MACs")
    p.add_argument("--gradcam-images", type=int, default=6)
    p.add_argument("--out", default="runs/report")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--data", default=None, choices=DATASETS,
                   help="the images the analyses train and test on (default: the comparison's, read as it read "
                        "them; without --compare, fashion-mnist)")
    p.add_argument("--data-dir", default=None)
    add_folder_args(p)
    p.add_argument("--device", default="cpu")

    p = add_command(sub, "demo", cmd_demo,
                    "NORTON end to end on Fashion-MNIST: baseline, two compression levels, table and plot",
                    "norton demo                      # ~15 min on 2 CPU cores\n"
                    "  norton demo --resume             # continue an interrupted run\n"
                    "  norton demo --full --device cuda # all 60k images, published schedules\n"
                    "  norton demo --data folder --data-dir ~/images --out-dir runs/demo_mine   # your own images")
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--full", action="store_true", help="all 60k images and the published 400-epoch schedules")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    p.add_argument("--data", default="fashion-mnist", choices=DATASETS,
                   help="the images (the budget is fitted to a smaller dataset as compare's are)")
    p.add_argument("--data-dir", default=None, help="the dataset's folder (Fashion-MNIST: /usr/share/datasets/fashion-mnist)")
    add_folder_args(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--showcase", action="store_true", help="instead: complexity of the paper's configs and decomposition speed")
