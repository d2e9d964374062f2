"""Whether precise BN steadies a baseline's validation curve on a small dataset.

    .venv/bin/python benchmarks/precise_bn.py                 # the 2,000-image 64×64 folder, medium's baseline
    .venv/bin/python benchmarks/precise_bn.py --record        # and record the table the training guide shows

Trains the ResNet-20 baseline of ``norton compare --budget medium`` on the
image folder ``benchmarks/folder_compare.py`` writes (2,000 Fashion-MNIST
images at 64×64, class folders; split as compare splits it: the budget scaled
to the data) twice from the same initial weights and data order: validation
with BatchNorm's running averages (as trained), and with ``precise_bn=256``
(statistics re-estimated on 256 training images before each validation).
Reports per run: the epochs, the largest drop of validation top-1 from one
epoch to the next, the epoch the early-stopping rule of the budget's patience
would have stopped at, whether the last three were within 0.2 points, the best
validation top-1 and the test top-1 of the best epoch, and the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from folder_compare import write_folder
from norton.evidence.compare import BUDGETS, comparison_splits
from norton.models import create_model
from norton.training import converged, evaluate, fit, input_size_of, stops_early


def first_stop(curve: list[float], patience: int) -> int | None:
    """The epoch at which a run with this patience would have stopped (None: it runs every epoch)."""
    return next((i + 1 for i in range(len(curve)) if stops_early(curve[:i + 1], patience)), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--precise-bn", type=int, default=256)
    parser.add_argument("--patience", type=int, default=5, help="the early-stopping rule checked on each curve")
    parser.add_argument("--out", default="runs/precise_bn")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    folder = out / "images"
    write_folder(folder, args.images, args.size)
    budget, _, train, val, test = comparison_splits("folder", str(folder), BUDGETS["medium"], "medium")
    config = replace(budget.baseline, patience=0)  # every epoch, so both curves are whole
    channels, classes = input_size_of(train)[0], len(train.classes)
    rows, results = [], {}
    for name, precise in (("running averages", 0), (f"precise BN ({args.precise_bn} images)", args.precise_bn)):
        run_dir = out / f"run_{precise}"
        shutil.rmtree(run_dir, ignore_errors=True)
        torch.manual_seed(0)
        model = create_model("resnet_20", num_classes=classes, in_channels=channels)
        started = time.perf_counter()
        result = fit(model, train, val, replace(config, precise_bn=precise), str(run_dir), device=torch.device("cpu"))
        seconds = time.perf_counter() - started
        curve = [r["val_top1"] for r in result.history]
        best = create_model("resnet_20", num_classes=classes, in_channels=channels)
        best.load_state_dict(torch.load(os.path.join(run_dir, "best.pt"), weights_only=False)["state_dict"])
        test_top1 = evaluate(best, test, device=torch.device("cpu"))["top1"]
        drop = max((a - b for a, b in zip(curve, curve[1:])), default=0.0)
        stop = first_stop(curve, args.patience)
        results[name] = {"curve": curve, "largest_drop": drop, "stop": stop, "converged": converged(curve),
                         "best_val": max(curve), "test_top1": test_top1, "seconds": seconds}
        print(json.dumps({name: results[name]}), flush=True)
        rows.append([name, str(len(curve)), f"{drop:.1f} points",
                     f"epoch {stop}" if stop else "never", "yes" if converged(curve) else "no",
                     f"{max(curve):.2f} %", f"{test_top1:.2f} %", f"{seconds / 60:.1f} min"])
    if args.record:
        from record import write_table

        write_table("precise_bn", ["validation with", "epochs", "largest drop between epochs",
                                   f"patience {args.patience} would stop", "converged (last 3 within 0.2)",
                                   "best validation top-1", "test top-1 (best epoch)", "wall time"], rows,
                    note=f"ResNet-20, {len(train)} training / {len(val)} validation / {len(test)} test images of "
                         f"{args.size}×{args.size} (Fashion-MNIST resized, class folders), the medium baseline's "
                         f"recipe scaled to the data ({config.epochs} epochs, lr {config.lr}, batch "
                         f"{config.batch_size}), the same initial weights and data order; 2 cores.")


if __name__ == "__main__":
    main()
