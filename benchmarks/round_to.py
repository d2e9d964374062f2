"""How close round_to's widths land to a MACs target, and which multiple this machine measures.

    .venv/bin/python benchmarks/round_to.py
    .venv/bin/python benchmarks/round_to.py --record   # record the pruning guide's table

``norton.prune(create_model(arch), target_macs=t, criterion="l2", round_to=8)``
for VGG-16-BN and ResNet-56 (CIFAR size) at 30–85 %, the MACs removed as
counted; then ``norton.measure_round_to`` on this CPU in float32 and bfloat16.
"""
from __future__ import annotations

import argparse
import warnings

import torch

from record import Table

from norton import create_model, measure_round_to, prune

TARGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.85)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="record the pruning guide's table")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    table = Table(["model, `round_to=8`", *(f"target {t:.0%}" for t in TARGETS)])
    for arch in ("vgg_16_bn", "resnet_56"):
        got = []
        for target in TARGETS:
            report = prune(create_model(arch), target_macs=target, example_inputs=torch.randn(1, 3, 32, 32),
                           criterion="l2", round_to=8)
            got.append(f"{1 - report.macs_after / report.macs_before:.1%}")
        table.add([arch, *got])
    measured = {str(dtype).replace("torch.", ""): measure_round_to("cpu", dtype) for dtype in (torch.float32, torch.bfloat16)}
    print(f"measure_round_to(cpu): {measured}", flush=True)
    if args.record:
        table.record("round_to", note="The MACs removed as counted, `prune(create_model(arch), target_macs=t, "
                     "criterion='l2', round_to=8)` at CIFAR size. `measure_round_to` on this CPU in the same run: "
                     + ", ".join(f"{k} → {v}" for k, v in measured.items()) + ".")

if __name__ == "__main__":
    main()
