"""Batched CP-ALS vs the research code's per-filter tensorly loop, side by side.

    .venv/bin/python benchmarks/cp_speed.py            # (256, 256, 3, 3), rank 8
    .venv/bin/python benchmarks/cp_speed.py --out 512 --in 512
    .venv/bin/python benchmarks/cp_speed.py --cases kaiming:256:256,kaiming:512:512,uniform:256:256 --record

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

from record import Table

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
    parser.add_argument("--cases", default=None, metavar="WEIGHTS:N:C,...",
                        help="several weights in one run, e.g. kaiming:256:256,kaiming:512:512,uniform:256:256")
    parser.add_argument("--record", action="store_true", help="record the decomposition guide's table")
    args = parser.parse_args()
    cases = ([(w, int(n), int(c)) for w, n, c in (case.split(":") for case in args.cases.split(","))]
             if args.cases else [(args.weights, args.out, args.c_in)])
    k, r = args.kernel, args.rank
    rate = gemm_rate()
    table = Table(["weight", "norton", "tensorly per filter", "speed-up", "NMSE norton / tensorly", "time per sweep",
                   "arithmetic limit of a sweep"])
    for name, n, c in cases:
        if name not in CASES:
            raise SystemExit(f"--cases: weights {name!r} is not one of {', '.join(sorted(CASES))}")
        torch.manual_seed(0)
        weight = CASES[name](n, c, k)
        ours_t, ours_e, iters = norton_batched(weight, r, args.repeats)
        ref_t, ref_e = tensorly_loop(weight, r)
        ratio = ref_t / ours_t
        sweep_macs = 2 * n * c * k * k * r  # one plain ALS sweep of the layer
        table.add([f"{tuple(weight.shape)} {'Kaiming-normal' if name == 'kaiming' else 'uniform in [−1, 1]'}",
                   f"{ours_t:.3f} s ({iters} sweeps), NMSE {ours_e:.5f}", f"{ref_t:.2f} s, NMSE {ref_e:.5f}",
                   f"**{ratio:.0f}×**", f"{ours_e / ref_e:.4f}", f"{1000 * ours_t / iters:.2f} ms",
                   f"{1000 * sweep_macs / rate:.2f} ms"])
    print(f"targets: speed-up >= 100x, NMSE ratio <= 1.02; float64 GEMM rate {rate / 1e9:.1f} G multiply-adds/s")
    if args.record:
        table.record("cp_speed", note=f"Rank {r}, norton with its defaults (median of {args.repeats} runs), "
                     "tensorly's `parafac` once per filter as the research code calls it (random init, 300 "
                     f"iterations), both on the same weight in one process; {torch.get_num_threads()} threads. The "
                     "arithmetic limit is one plain ALS sweep of the layer (2·N·C·k²·R multiply-adds) at this "
                     "machine's float64 matrix-product rate, measured in the same run.")

if __name__ == "__main__":
    main()
