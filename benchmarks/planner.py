"""The budget planner on a small trained ResNet-20 (Fashion-MNIST): planning
time, the plan, and the planned model's accuracy after BN recalibration,
before any fine-tuning, at 60 % and 85 % fewer MACs.

    .venv/bin/python benchmarks/planner.py [--run-dir runs/planner_base]

The baseline (3 epochs on 10,000 training images, 2,000 held out for
validation) is trained once into --run-dir and reused afterwards.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch

import norton
from norton.training import (
    TrainConfig,
    evaluate,
    fit,
    limit,
    load_best,
    load_dataset,
    recalibrate_bn,
    split_validation,
)
from norton.training.data import epoch_batches

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/planner_base")
    parser.add_argument("--calibration-batches", type=int, default=1, help="batches of 256 training images")
    args = parser.parse_args()

    torch.manual_seed(0)
    train, val = split_validation(limit(load_dataset("fashion-mnist", None, "train"), 12000), 2000)
    test = limit(load_dataset("fashion-mnist", None, "test"), 2000)
    model = norton.create_model("resnet_20", in_channels=1, num_classes=10)
    if not os.path.exists(os.path.join(args.run_dir, "best.pt")):
        fit(model, train, val, TrainConfig(epochs=3, batch_size=128, lr=0.1, warmup_epochs=1), args.run_dir,
            device=CPU, progress=False)
    load_best(model, args.run_dir)
    print(f"baseline: {evaluate(model, test, device=CPU)['top1']:.2f} % on {len(test)} test images")

    calibration_set = limit(load_dataset("fashion-mnist", None, "train"), 4000)
    batches = [x for i, (x, _) in enumerate(epoch_batches(calibration_set.without_augmentation(), 256, seed=0, epoch=0,
                                                          shuffle=True)) if i < args.calibration_batches]
    for target in (0.6, 0.85):
        start = time.perf_counter()
        plan = norton.plan(model, batches, target_macs=target)
        seconds = time.perf_counter() - start
        print(f"\nplanning: {seconds:.1f} s, torch threads {torch.get_num_threads()}")
        print(plan.table())
        planned = copy.deepcopy(model)
        plan.apply(planned, batches[0][:1])
        counted = 1 - norton.count_macs(planned, batches[0][:1]) / norton.count_macs(model, batches[0][:1])
        recalibrate_bn(planned, calibration_set, device=CPU, num_images=1024)
        print(f"counted {counted:.2%} fewer MACs; after BN recalibration, before fine-tuning: "
              f"{evaluate(planned, test, device=CPU)['top1']:.2f} %")


if __name__ == "__main__":
    main()
