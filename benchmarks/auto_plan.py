"""How close a CPDBlock's ``auto`` plan comes to its fastest plan at inference.

    .venv/bin/python benchmarks/auto_plan.py            # the sweep, printed
    .venv/bin/python benchmarks/auto_plan.py --record   # the table in docs/results/tables/auto_plan.md

Every 3×3 layer of C → C channels (C 16–256) on H×H images (H 8–64, at most
64·64·64 input values), rank 1–16, batch 64: each plan (separable, depthwise,
dense) timed without gradients in eval mode, best of 3 calls after a warm-up,
one layer after the other in this process.  For each rule — the plan ``auto``
resolves to now, the separable plan wherever its MACs (a depthwise MAC counted
as 8) are fewer than the dense conv's (the inference rule before), and always
dense — the time of the plan it picks over the fastest of the three: geometric
mean over the layers, and the worst layer.
"""
from __future__ import annotations

import argparse
import itertools
import math
import time

import torch

from record import Table

from norton import CPDBlock

PLANS = ("separable", "depthwise", "dense")


def best_of(call, repeats: int = 3) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def separable_by_macs(block: CPDBlock) -> str:
    kh, kw = block.kernel_size
    return "separable" if block.rank * (block.in_channels + 8.0 * (kh + kw)) < block.in_channels * kh * kw else "dense"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="record docs/results/tables/auto_plan.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = []
    with torch.no_grad():
        for c, size, rank in itertools.product((16, 32, 64, 128, 256), (8, 16, 32, 64), (1, 2, 4, 8, 16)):
            if c * size * size > 64 * 64 * 64:
                continue
            x = torch.randn(64, c, size, size)
            block = CPDBlock.like_conv(torch.nn.Conv2d(c, c, 3, padding=1, bias=False), rank).eval()
            times = {}
            for plan in PLANS:
                block.set_plan(plan)
                times[plan] = best_of(lambda: block(x))
            block.set_plan("auto")
            layers.append(((c, size, rank), times, {"auto (now)": block.resolved_plan(),
                                                     "separable by MACs (before)": separable_by_macs(block),
                                                     "always dense": "dense"}))
            print(c, size, rank, {k: f"{1000 * v:.2f} ms" for k, v in times.items()}, layers[-1][2]["auto (now)"],
                  flush=True)
    table = Table(["rule", "time / fastest plan, geometric mean", "worst layer (C, H, rank)", "layers"])
    for rule in layers[0][2]:
        ratios = [(times[chosen[rule]] / min(times.values()), shape) for shape, times, chosen in layers]
        mean = math.exp(sum(math.log(r) for r, _ in ratios) / len(ratios))
        worst, shape = max(ratios)
        table.add([rule, f"{mean:.3f}×", f"{worst:.2f}× {shape}", len(ratios)])
    if args.record:
        table.record("auto_plan", note="3×3 CPDBlocks of C → C channels in eval mode without gradients, batch 64, "
                     "each plan best of 3 calls after a warm-up, one layer after the other; 2 threads.")


if __name__ == "__main__":
    main()
