"""Whether the comparison's baseline recipe converges: the medium budget's ResNet-20 on its own splits.

    .venv/bin/python benchmarks/baseline_schedule.py --epochs 30 --patience 5    # the medium budget's schedule
    .venv/bin/python benchmarks/baseline_schedule.py --epochs 15 --patience 4

Trains the baseline exactly as ``norton compare --budget medium`` splits and seeds it (Fashion-MNIST, 10,000
training and 10,000 validation images), with the cosine schedule over ``--epochs``, and prints the validation
curve, the minutes and whether it converged (the last 3 epochs within 0.2 points).  About 40 s an epoch on
2 cores.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace

import torch

from norton.evidence.compare import MEDIUM, scale_budget
from norton.models import create_model
from norton.training import (
    dataset_shape,
    fit,
    held_out,
    joined,
    limit,
    load_dataset,
    split_validation,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=MEDIUM.baseline.epochs)
    parser.add_argument("--patience", type=int, default=MEDIUM.baseline.patience)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    full = load_dataset("fashion-mnist", args.data_dir, "train")
    budget = scale_budget(MEDIUM, len(full), len(load_dataset("fashion-mnist", args.data_dir, "test")), "medium")
    train, val = split_validation(limit(full, budget.train_images), budget.val_images)
    val = joined(val, held_out(full, budget.train_images, budget.extra_val_images))
    classes, channels = dataset_shape(train)
    torch.manual_seed(budget.baseline.seed)
    model = create_model("resnet_20", num_classes=classes, in_channels=channels)
    config = replace(budget.baseline, epochs=args.epochs, patience=args.patience)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        result = fit(model, train, val, config, run_dir, device=torch.device("cpu"), progress=False)
        with open(f"{run_dir}/metrics.jsonl") as f:
            curve = [json.loads(line)["val_top1"] for line in f if line.strip()]
    print(json.dumps({"epochs": result.epochs, "patience": args.patience, "converged": result.converged,
                      "stopped_early": result.stopped_early, "val_curve": curve,
                      "minutes": round((time.perf_counter() - started) / 60, 1)}))


if __name__ == "__main__":
    main()
