"""Pairwise criteria + greedy selection for one layer, side by side with a pair-by-pair loop.

    .venv/bin/python benchmarks/pabs_speed.py          # 512 filters, C_in 512, rank 8

For each of pabs, csa and vbd: the distance matrix of every pair and the
greedy elimination to half the filters, as ``prune`` runs them.  The first call
in the process is timed on its own (it imports numba and loads — or, after an
edit, compiles — the cached kernels); the figure that counts for a model's
many layers is the median of the calls after it.  Anchors in the same run: the
pabs angles from batched LAPACK ``eigvalsh`` (norton's path off the CPU, and
its CPU path before the compiled kernel), and a straightforward loop (QR of
every factor once, one singular-value call per pair and mode), as a direct
reading of the definition would compute them.
"""
from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from record import Table

from norton.compression import kernels
from norton.compression.criteria import csa_similarities, greedy_eliminate, pabs_distances, vbd_distances

TARGET_SECONDS = 0.3


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


def batched_lapack_pabs(factors) -> torch.Tensor:
    """``pabs_distances`` with the pairs' eigenvalues from batched eigvalsh instead of the compiled kernel."""
    with mock.patch.object(kernels, "smallest_gram_eigenvalues", kernels.batched_gram_eigenvalues):
        return pabs_distances(factors)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filters", type=int, default=512)
    parser.add_argument("--in", dest="c_in", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of filters kept")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls after the first, per criterion")
    parser.add_argument("--skip-loop", action="store_true", help="leave out the pair-by-pair loop (minutes)")
    parser.add_argument("--record", action="store_true", help="record the pruning guide's table")
    args = parser.parse_args()
    torch.manual_seed(0)
    n, r = args.filters, args.rank
    factors = (torch.randn(n, args.c_in, r), torch.randn(n, 3, r), torch.randn(n, 3, r))
    keep = int(n * args.keep)
    print(f"{n} filters, C_in {args.c_in}, rank {r}, keep {keep}, torch threads {torch.get_num_threads()}")

    criteria = {
        "pabs": lambda: greedy_eliminate(pabs_distances(factors), keep),
        "csa": lambda: greedy_eliminate(csa_similarities(factors), keep, similarity=True),
        "vbd": lambda: greedy_eliminate(vbd_distances(factors), keep),
    }
    _, first = timed(criteria["pabs"])
    print(f"first call in the process (pabs; imports numba, loads the kernels): {first:.2f} s")
    table = Table(["what", "median", "min–max", f"target < {TARGET_SECONDS} s"])
    for name, run in criteria.items():
        times = [timed(run)[1] for _ in range(args.repeats)]
        median = statistics.median(times)
        table.add([f"{name} + greedy selection", f"**{median:.3f} s**", f"{min(times):.3f}–{max(times):.3f} s",
                   "✓" if median < TARGET_SECONDS else "✗"])
    table.add(["pabs + greedy, the first call in the process (imports numba, loads the compiled kernels)",
               f"{first:.2f} s", "—", "—"])
    fast, t_fast = timed(pabs_distances, factors)
    lapack, t_lapack = timed(batched_lapack_pabs, factors)
    table.add(["pabs distances alone: the compiled kernel / batched LAPACK `eigvalsh`",
               f"{t_fast:.3f} s / {t_lapack:.3f} s ({t_lapack / t_fast:.1f}×)",
               f"largest difference {float((fast - lapack).abs().max()):.1e}", "—"])
    if not args.skip_loop:
        kept_fast, t_sel = timed(greedy_eliminate, fast, keep)
        slow, t_slow = timed(loop_pabs, factors)
        kept_slow = greedy_eliminate(slow, keep)
        table.add(["pabs pair by pair (a Python loop, one `eigvalsh` per pair)",
                   f"{t_slow:.2f} s ({t_slow / (t_fast + t_sel):.0f}× norton's pabs + greedy)",
                   f"largest difference {float((fast - slow).abs().max()):.1e}; the same kept filters: "
                   f"{'yes' if kept_fast == kept_slow else 'NO'}", "—"])
    if args.record:
        table.record("pabs_speed", note=f"Random CP factors of a layer of {n} filters, {args.c_in} input channels, "
                     f"rank {r}, keeping {keep}; {args.repeats} timed calls per criterion after the first; "
                     f"{torch.get_num_threads()} threads.")

if __name__ == "__main__":
    main()
