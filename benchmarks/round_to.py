"""How close round_to's widths land to a MACs target, and which multiple this machine measures.

    .venv/bin/python benchmarks/round_to.py

``norton.prune(create_model(arch), target_macs=t, criterion="l2", round_to=8)``
for VGG-16-BN and ResNet-56 (CIFAR size) at 30–85 %, the MACs removed as
counted; then ``norton.measure_round_to`` on this CPU in float32 and bfloat16.
"""
from __future__ import annotations

import warnings

import torch

from norton import create_model, measure_round_to, prune

TARGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.85)


def main() -> None:
    warnings.simplefilter("ignore")
    for arch in ("vgg_16_bn", "resnet_56"):
        got = []
        for target in TARGETS:
            report = prune(create_model(arch), target_macs=target, example_inputs=torch.randn(1, 3, 32, 32),
                           criterion="l2", round_to=8)
            got.append(f"{target:.0%} -> {1 - report.macs_after / report.macs_before:.1%}")
        print(f"{arch}, round_to 8: " + ", ".join(got), flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        print(f"measure_round_to(cpu, {dtype}): {measure_round_to('cpu', dtype)}", flush=True)


if __name__ == "__main__":
    main()
