"""Batched CP-ALS vs the research code's per-filter tensorly loop, side by side.

    .venv/bin/python benchmarks/cp_speed.py            # (256, 256, 3, 3), rank 8
    .venv/bin/python benchmarks/cp_speed.py --out 512 --in 512

The research code calls ``tensorly.decomposition.parafac`` once per filter
(random init, 300 iterations); norton decomposes the whole layer at once.
Both run in this process on the same weight; the ratio is what to quote.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import parafac

from norton import cp_als, nmse


def tensorly_loop(weight: torch.Tensor, rank: int) -> tuple[float, float]:
    errors = []
    start = time.perf_counter()
    for w in weight.numpy():
        cp = parafac(tl.tensor(w), rank, init="random", n_iter_max=300, random_state=0)
        rec = tl.cp_to_tensor(cp)
        errors.append(((w - rec) ** 2).sum() / (w**2).sum())
    return time.perf_counter() - start, float(np.mean(errors))


def norton_batched(weight: torch.Tensor, rank: int, repeats: int) -> tuple[float, float, int]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = cp_als(weight, rank)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(nmse(weight, result.factors).mean()), result.n_iter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=int, default=256, help="filters N")
    parser.add_argument("--in", dest="c_in", type=int, default=256, help="input channels C")
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="norton runs (median reported)")
    args = parser.parse_args()

    torch.manual_seed(0)
    # Kaiming-normal weight, the scale of a conv layer before/after training
    weight = torch.randn(args.out, args.c_in, args.kernel, args.kernel) * (2.0 / (args.c_in * args.kernel**2)) ** 0.5
    print(f"weight {tuple(weight.shape)}, rank {args.rank}, torch threads {torch.get_num_threads()}")
    ours_t, ours_e, iters = norton_batched(weight, args.rank, args.repeats)
    print(f"norton batched CP-ALS:      {ours_t:8.3f} s   mean NMSE {ours_e:.5f}   ({iters} sweeps, SVD init)")
    ref_t, ref_e = tensorly_loop(weight, args.rank)
    print(f"tensorly parafac per filter: {ref_t:8.3f} s   mean NMSE {ref_e:.5f}   (random init, 300 iterations)")
    print(f"speed-up: {ref_t / ours_t:.1f}x   NMSE ratio (norton / tensorly): {ours_e / ref_e:.4f}")


if __name__ == "__main__":
    main()
