"""The budget planner on a small trained ResNet-20 (Fashion-MNIST): planning
time, the plan, and the planned model's accuracy after BN recalibration,
before any fine-tuning, at 60 % and 85 % fewer MACs.

    .venv/bin/python benchmarks/planner.py [--run-dir runs/planner_base] [--record]

``--record`` writes the table the planner guide shows (``benchmarks/record.py``).

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
from norton.evidence.compare import plan_summary
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
    parser.add_argument("--record", action="store_true", help="record the table (docs/results/tables/planner_example)")
    args = parser.parse_args()

    torch.manual_seed(0)
    train, val = split_validation(limit(load_dataset("fashion-mnist", None, "train"), 12000), 2000)
    test = limit(load_dataset("fashion-mnist", None, "test"), 2000)
    model = norton.create_model("resnet_20", in_channels=1, num_classes=10)
    if not os.path.exists(os.path.join(args.run_dir, "best.pt")):
        fit(model, train, val, TrainConfig(epochs=3, batch_size=128, lr=0.1, warmup_epochs=1), args.run_dir,
            device=CPU, progress=False)
    load_best(model, args.run_dir)
    baseline = evaluate(model, test, device=CPU)["top1"]
    print(f"baseline: {baseline:.2f} % on {len(test)} test images")
    rows = []

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
        top1 = evaluate(planned, test, device=CPU)["top1"]
        print(f"counted {counted:.2%} fewer MACs; after BN recalibration, before fine-tuning: {top1:.2f} %")
        rows.append([f"{target:.0%}", f"{seconds:.1f} s", plan_summary(plan), f"{counted:.2%}", f"{top1:.2f} %"])
    if args.record:
        from record import write_table

        write_table("planner_example", ["MACs target", "planning", "plan", "counted MACs ↓",
                                        "top-1 after BN recalibration"], rows,
                    note=f"ResNet-20 trained 3 epochs on 10,000 Fashion-MNIST images ({baseline:.2f} % on "
                         f"{len(test)} test images), {256 * args.calibration_batches} calibration images, default "
                         "options; top-1 before any fine-tuning, BatchNorm recalibrated on 1,024 training images.")



if __name__ == "__main__":
    main()
