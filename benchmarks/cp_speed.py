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


def gemm_rate() -> float:
    """Multiply-adds per second of a large float64 matrix product on this machine (the arithmetic limit)."""
    a = torch.randn(1024, 1024, dtype=torch.float64)
    a @ a
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    return 5 * 1024**3 / (time.perf_counter() - start)


CASES = {
    "kaiming": lambda n, c, k: torch.randn(n, c, k, k) * (2.0 / (c * k * k)) ** 0.5,  # a conv layer's scale
    "uniform": lambda n, c, k: torch.rand(n, c, k, k) * 2 - 1,  # a random layer of another distribution
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=int, default=256, help="filters N")
    parser.add_argument("--in", dest="c_in", type=int, default=256, help="input channels C")
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--weights", choices=sorted(CASES), default="kaiming")
    parser.add_argument("--repeats", type=int, default=3, help="norton runs (median reported)")
    args = parser.parse_args()

    torch.manual_seed(0)
    n, c, k, r = args.out, args.c_in, args.kernel, args.rank
    weight = CASES[args.weights](n, c, k)
    print(f"weight {tuple(weight.shape)} ({args.weights}), rank {r}, torch threads {torch.get_num_threads()}")
    ours_t, ours_e, iters = norton_batched(weight, r, args.repeats)
    print(f"norton batched CP-ALS:      {ours_t:8.3f} s   mean NMSE {ours_e:.5f}   ({iters} sweeps, SVD init, defaults)")
    ref_t, ref_e = tensorly_loop(weight, r)
    print(f"tensorly parafac per filter: {ref_t:8.3f} s   mean NMSE {ref_e:.5f}   (random init, 300 iterations)")
    ratio = ref_t / ours_t
    print(f"speed-up: {ratio:.1f}x (target >= 100x {'ok' if ratio >= 100 else 'MISSED'})   "
          f"NMSE ratio (norton / tensorly): {ours_e / ref_e:.4f} (target <= 1.02 {'ok' if ours_e <= 1.02 * ref_e else 'MISSED'})")
    sweep_macs = 2 * n * c * k * k * r  # one plain ALS sweep of the layer
    rate = gemm_rate()
    print(f"time per sweep: {1000 * ours_t / iters:.2f} ms; arithmetic limit of a plain sweep "
          f"({sweep_macs / 1e6:.1f} M multiply-adds at this machine's float64 GEMM rate {rate / 1e9:.1f} G/s): "
          f"{1000 * sweep_macs / rate:.3f} ms")


if __name__ == "__main__":
    main()
