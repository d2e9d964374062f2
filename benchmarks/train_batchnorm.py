"""A training BatchNorm (forward + backward, batch statistics) on the CPU: PyTorch's kernel on
channels-last and on contiguous memory, and norton's ``ChannelsLastBatchNorm2d`` (what ``fit``
trains with) on channels-last memory.

    .venv/bin/python benchmarks/train_batchnorm.py [--rounds 7] [--record]

Batch 128; the shapes of a ResNet-20's stages on 64×64 images at its full widths (16, 32, 64) and at
the widths an L1 pruning to 60 % fewer MACs leaves (10, 20, 41), and a few more.  Each case the
median of ``--rounds`` timed calls after two warm-up calls, the three ways interleaved call by call.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from record import Table

from norton.core import fast_channels_last_batchnorm

SHAPES = ((10, 64), (16, 64), (20, 32), (24, 32), (32, 32), (41, 16), (48, 16), (64, 16))


def step_seconds(bn: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    started = time.perf_counter()
    bn(x).backward(grad)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--record", action="store_true", help="write docs/results/tables/train_batchnorm.*")
    args = parser.parse_args()
    torch.manual_seed(0)
    table = Table(["channels × size", "PyTorch channels-last", "PyTorch contiguous", "norton channels-last",
                   "PyTorch channels-last / norton"])
    for channels, size in SHAPES:
        native, fast = nn.BatchNorm2d(channels).train(), nn.BatchNorm2d(channels).train()
        x = torch.randn(128, channels, size, size)
        cases = {"cl": (native, x.to(memory_format=torch.channels_last)), "cf": (native, x),
                 "fast": (fast, x.to(memory_format=torch.channels_last))}
        grads = {k: torch.randn_like(v[1]) for k, v in cases.items()}
        times = {k: [] for k in cases}
        with fast_channels_last_batchnorm(fast):  # as fit runs it
            for i in range(args.rounds + 2):
                for key, (bn, inp) in cases.items():
                    seconds = step_seconds(bn, inp.requires_grad_(), grads[key])
                    if i >= 2:
                        times[key].append(seconds)
        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
        table.add([f"{channels} × {size}×{size}", f"{ms['cl']:.1f} ms", f"{ms['cf']:.1f} ms", f"{ms['fast']:.1f} ms",
                   f"**{ms['cl'] / ms['fast']:.2f}×**"])
    if args.record:
        table.record("train_batchnorm", note=f"BatchNorm2d forward + backward with batch statistics, batch 128, "
                     f"median of {args.rounds} calls each; norton's path is taken for channel counts that are not "
                     "a multiple of 16 (the others stay PyTorch's kernel, as the 16/32/48/64 rows show: the same "
                     "module falls back).")


if __name__ == "__main__":
    main()
