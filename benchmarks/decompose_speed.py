"""Whole-model and large-kernel decomposition times, and the same on a GPU when there is one.

    .venv/bin/python benchmarks/decompose_speed.py                 # CPU
    .venv/bin/python benchmarks/decompose_speed.py --device cuda   # prints a line and stops without a GPU

Rows: ResNet-50 and VGG-16-BN decomposed at rank 8 (every k×k conv; layers of
equal shape go through one batched CP-ALS call), a ViT-B/32 patch embedding
(768, 3, 32, 32) at rank 8 (a large kernel on few channels), and pabs selection
of a 512-filter layer.  Random weights: the hardest case for a low-rank fit.
"""
from __future__ import annotations

import argparse
import time

import torch

from record import Table

import norton
from norton.compression.criteria import greedy_eliminate, pabs_distances


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--record", action="store_true", help="record the decomposition guide's table")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"{args.device}: no CUDA device on this machine; GPU figures skipped")
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    table = Table(["what", "rank", "seconds", "fit"])
    for arch in ("resnet_50", "vgg_16_bn"):
        model = norton.create_model(arch).to(device)
        report, seconds = timed(lambda: norton.decompose(model, 8, progress=False), device)
        table.add([f"{arch}: every k×k conv ({len(report.layers)} layers)", 8, f"{seconds:.2f} s",
                   f"mean NMSE {report.mean_nmse:.4f}"])
    weight = (torch.randn(768, 3, 32, 32) * (2.0 / (3 * 1024)) ** 0.5).to(device)
    result, seconds = timed(lambda: norton.cp_als(weight, 8), device)
    table.add(["ViT-B/32 patch embedding (768, 3, 32, 32)", 8, f"{seconds:.2f} s",
               f"{result.n_iter} sweeps, mean NMSE {float(norton.nmse(weight, result.factors).mean()):.4f}"])
    factors = tuple(f.to(device) for f in (torch.randn(512, 512, 8), torch.randn(512, 3, 8), torch.randn(512, 3, 8)))
    _, first = timed(lambda: greedy_eliminate(pabs_distances(factors), 256), device)
    _, seconds = timed(lambda: greedy_eliminate(pabs_distances(factors), 256), device)
    table.add(["pabs distances + greedy selection of 256 of 512 filters (C_in 512)", 8,
               f"{seconds:.2f} s (the first call in the process: {first:.2f} s)", "—"])
    if args.record:
        table.record("decompose_speed" if device.type == "cpu" else f"decompose_speed_{device.type}",
                     note=f"Random weights (the hardest case for a low-rank fit), {device}, "
                          f"{torch.get_num_threads()} threads, one run each.")

if __name__ == "__main__":
    main()
