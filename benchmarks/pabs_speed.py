"""Vectorised pabs selection vs a straightforward pairwise loop, side by side.

    .venv/bin/python benchmarks/pabs_speed.py          # 512 filters, C_in 512, rank 8

The loop computes the same distances pair by pair (QR of every factor once,
then one singular-value call per pair and mode), as a direct reading of the
definition would; norton computes all pairs i < j from a blockwise Gram matrix
and one batched eigenvalue call spread over torch's threads.  Both then run the
same greedy selection (norton's keeps per-row minima, O(N) per elimination).
"""
from __future__ import annotations

import argparse
import time

import torch

from norton.compression.criteria import greedy_eliminate, pabs_distances


def loop_pabs(factors) -> torch.Tensor:
    n = factors[0].shape[0]
    bases = [torch.linalg.qr(f.double()).Q for f in factors]
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            total = 0.0
            for q in bases:
                s = torch.linalg.svdvals(q[i].T @ q[j]).min().clamp(0, 1)
                total += float(torch.arccos(s))
            out[i, j] = out[j, i] = total
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filters", type=int, default=512)
    parser.add_argument("--in", dest="c_in", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of filters kept")
    args = parser.parse_args()
    torch.manual_seed(0)
    n, r = args.filters, args.rank
    factors = (torch.randn(n, args.c_in, r), torch.randn(n, 3, r), torch.randn(n, 3, r))
    keep = int(n * args.keep)
    print(f"{n} filters, C_in {args.c_in}, rank {r}, keep {keep}, torch threads {torch.get_num_threads()}")

    start = time.perf_counter()
    fast = pabs_distances(factors)
    kept_fast = greedy_eliminate(fast, keep)
    t_fast = time.perf_counter() - start
    print(f"norton pabs + greedy selection: {t_fast:8.2f} s   (target < 0.3 s: {'ok' if t_fast < 0.3 else 'MISSED'})")

    start = time.perf_counter()
    slow = loop_pabs(factors)
    kept_slow = greedy_eliminate(slow, keep)
    t_slow = time.perf_counter() - start
    print(f"pairwise loop + greedy:         {t_slow:8.2f} s")
    print(f"speed-up {t_slow / t_fast:.1f}x; max |distance difference| {float((fast - slow).abs().max()):.2e}; "
          f"same kept filters: {kept_fast == kept_slow}")


if __name__ == "__main__":
    main()
