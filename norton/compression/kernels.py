"""Compiled CPU kernels for the pairwise criteria and the greedy selection (numba).

A layer of 512 filters at rank 8 has 131 k pairs of 8×8 eigenvalue problems.
LAPACK solves them one call at a time (a few µs of overhead each); these
kernels solve them in lockstep, vectorised over the pairs of one row, and run
the greedy elimination as a compiled loop.  They are compiled on first use and
cached on disk (numba ``cache=True``), so only the first call in a fresh
install pays the compilation.
"""
from __future__ import annotations

import functools
import math
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

#: pairs solved together by one lockstep pass (bounds the scratch memory)
_TILE = 512
#: filters per task: their Gram rows in one matrix product, then their eigenvalues
_CHUNK = 32
#: torch's thread count is process-wide: two Python threads computing pairwise criteria at once take turns
_THREAD_COUNT = threading.Lock()


def _smallest_eigenvalues_rows(gram, rows, row0, n, k, out):  # pragma: no cover - compiled
    """out[i, j] = λ_min(MᵀM) for every i in ``rows`` and j > i, M = Q_iᵀQ_j.

    ``gram`` holds the Gram rows of filters row0.. against filters row0..n-1:
    M = gram[(i-row0)k : (i-row0+1)k, (j-row0)k : (j-row0+1)k].  λ_min comes
    from Laguerre's iteration on the characteristic polynomial, started below
    every eigenvalue (x = 0, as MᵀM is positive semi-definite): each step
    factors A - xI by Cholesky and moves x up by at most the distance to the
    smallest eigenvalue (all roots are real), converging cubically; a failed
    factorisation means x has reached λ_min to rounding.
    """
    m_t = np.empty((k, k, _TILE))
    a_m = np.empty((k, k, _TILE))
    low = np.empty((k, k, _TILE))
    inv = np.empty((k, k, _TILE))
    x = np.empty(_TILE)
    t1 = np.empty(_TILE)
    t2 = np.empty(_TILE)
    s = np.empty(_TILE)
    live = np.empty(_TILE, dtype=np.bool_)
    idx = np.empty(_TILE, dtype=np.int64)
    for ii in range(rows.shape[0]):
        i = rows[ii]
        base = (i - row0) * k
        for j0 in range(i + 1, n, _TILE):
            m = min(_TILE, n - j0)
            # M[p, a, :] contiguous over the pairs, then A = MᵀM (upper triangle)
            for jj in range(m):
                c0 = (j0 + jj - row0) * k
                for p in range(k):
                    for a in range(k):
                        m_t[p, a, jj] = gram[base + p, c0 + a]
            for a in range(k):
                for b in range(a, k):
                    for jj in range(m):
                        s[jj] = 0.0
                    for p in range(k):
                        for jj in range(m):
                            s[jj] += m_t[p, a, jj] * m_t[p, b, jj]
                    for jj in range(m):
                        a_m[a, b, jj] = s[jj]
            for jj in range(m):
                x[jj] = 0.0
                live[jj] = True
                idx[jj] = jj
            for _ in range(60):
                # Cholesky A - xI = L Lᵀ; a non-positive pivot: x is at λ_min
                for c in range(k):
                    for jj in range(m):
                        s[jj] = a_m[c, c, jj] - x[jj]
                    for p in range(c):
                        for jj in range(m):
                            s[jj] -= low[c, p, jj] * low[c, p, jj]
                    for jj in range(m):
                        if s[jj] <= 0.0:
                            live[jj] = False
                            s[jj] = 1.0
                        low[c, c, jj] = math.sqrt(s[jj])
                    for r in range(c + 1, k):
                        for jj in range(m):
                            s[jj] = a_m[c, r, jj]
                        for p in range(c):
                            for jj in range(m):
                                s[jj] -= low[r, p, jj] * low[c, p, jj]
                        for jj in range(m):
                            low[r, c, jj] = s[jj] / low[c, c, jj]
                # L⁻¹; t1 = tr((A - xI)⁻¹) = ‖L⁻¹‖², t2 = tr((A - xI)⁻²) = ‖L⁻ᵀL⁻¹‖²
                for jj in range(m):
                    t1[jj] = 0.0
                    t2[jj] = 0.0
                for c in range(k):
                    for jj in range(m):
                        inv[c, c, jj] = 1.0 / low[c, c, jj]
                        t1[jj] += inv[c, c, jj] * inv[c, c, jj]
                    for r in range(c + 1, k):
                        for jj in range(m):
                            s[jj] = 0.0
                        for p in range(c, r):
                            for jj in range(m):
                                s[jj] -= low[r, p, jj] * inv[p, c, jj]
                        for jj in range(m):
                            inv[r, c, jj] = s[jj] / low[r, r, jj]
                            t1[jj] += inv[r, c, jj] * inv[r, c, jj]
                for a in range(k):
                    for b in range(a, k):
                        for jj in range(m):
                            s[jj] = 0.0
                        for p in range(b, k):
                            for jj in range(m):
                                s[jj] += inv[p, a, jj] * inv[p, b, jj]
                        weight = 1.0 if a == b else 2.0
                        for jj in range(m):
                            t2[jj] += weight * s[jj] * s[jj]
                # Laguerre step towards the smallest root; finished pairs are
                # written out and the live ones packed to the front
                w = 0
                for jj in range(m):
                    if live[jj]:
                        disc = (k - 1) * (k * t2[jj] - t1[jj] * t1[jj])
                        step = k / (t1[jj] + math.sqrt(max(disc, 0.0)))
                        x[jj] += step
                        if step <= 1e-15 * (1.0 + x[jj]):
                            live[jj] = False
                    if not live[jj]:
                        out[i, j0 + idx[jj]] = x[jj]
                        continue
                    if w != jj:
                        for a in range(k):
                            for b in range(a, k):
                                a_m[a, b, w] = a_m[a, b, jj]
                        x[w] = x[jj]
                        idx[w] = idx[jj]
                    live[w] = True
                    w += 1
                m = w
                if m == 0:
                    break
            for jj in range(m):
                out[i, j0 + idx[jj]] = x[jj]


@functools.cache
def _compiled() -> types.SimpleNamespace:
    """The kernels compiled by numba, imported on first use (importing numba takes half a second)."""
    import numba

    return types.SimpleNamespace(smallest_eigenvalues_rows=numba.njit(nogil=True, cache=True)(_smallest_eigenvalues_rows),
                                 greedy_loop=numba.njit(cache=True)(_greedy_loop))


def greedy_loop(search: np.ndarray, finite: np.ndarray, sums: np.ndarray, alive: np.ndarray, shield: np.ndarray,
                keep: int) -> None:
    """The compiled elimination loop of ``criteria.greedy_eliminate``; see ``_greedy_loop``."""
    _compiled().greedy_loop(search, finite, sums, alive, shield, keep)


def _gram_rows(stacked: torch.Tensor, a0: int, a1: int, k: int) -> torch.Tensor:
    """Q_iᵀQ_j for filters a0 <= i < a1 and every j >= a0: ((a1 - a0)·k, (n - a0)·k).

    Computing the Gram of the stacked bases by such rows, blocks below the
    diagonal are never computed (about half of the Gram in all)."""
    return stacked[a0 * k:a1 * k] @ stacked[a0 * k:].T


def smallest_gram_eigenvalues(stacked: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """λ_min(MᵀM) for M = Q_iᵀQ_j of every pair i < j, upper triangle of an (n, n) matrix.

    ``stacked`` is (n·k, d) float64: the k orthonormal basis vectors of every
    filter as rows.  Off the CPU: ``batched_gram_eigenvalues``.  On the CPU the
    work is split in tasks of ``_CHUNK`` filters: their Gram rows, then their
    eigenvalues by the compiled kernel.  The tasks run on torch's number of
    threads, each product single-threaded: handing the cores back and forth
    between torch's OpenMP team and the kernel cost a third more.  Entries on
    and below the diagonal are 1.
    """
    if stacked.device.type != "cpu":
        return batched_gram_eigenvalues(stacked, n, k)
    kernel = _compiled().smallest_eigenvalues_rows
    out = np.ones((n, n))

    def task(a0: int) -> None:
        a1 = min(n, a0 + _CHUNK)
        kernel(_gram_rows(stacked, a0, a1, k).numpy(), np.arange(a0, a1), a0, n, k, out)

    with _THREAD_COUNT:
        workers = max(1, torch.get_num_threads())
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(task, range(0, n, _CHUNK)))  # the largest tasks first
        finally:
            torch.set_num_threads(workers)
    return torch.from_numpy(out)


def batched_gram_eigenvalues(stacked: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """λ_min(MᵀM), M = Q_iᵀQ_j, for every pair i < j from batched ``eigvalsh`` (upper triangle of (n, n)).

    The path off the CPU (cuSOLVER solves each batch in one call); on the CPU
    the compiled kernel computes the same numbers without one LAPACK call per
    pair.  The Gram rows come in four chunks of filters.
    """
    out = torch.ones(n, n, dtype=torch.float64, device=stacked.device)
    chunk = max(1, -(-n // 4))
    for a0 in range(0, n, chunk):
        a1 = min(n, a0 + chunk)
        block = _gram_rows(stacked, a0, a1, k).view(a1 - a0, k, n - a0, k)
        i, j = torch.triu_indices(a1 - a0, n - a0, offset=1, device=stacked.device)
        cross = block[i, :, j, :]  # (pairs, k, k) = Q_iᵀ Q_j
        out[i + a0, j + a0] = torch.linalg.eigvalsh(cross.mT @ cross)[:, 0]
    return out


def _greedy_loop(search, finite, sums, alive, shield, keep):  # pragma: no cover - compiled
    """The elimination loop of ``criteria.greedy_eliminate`` on prepared arrays (modified in place).

    Row minima of ``search`` are kept up to date: after an elimination only the
    rows whose minimum sat in the eliminated column are searched again, so a
    step costs O(N).  Ties resolve as a row-major argmin over the matrix would:
    smallest row, then smallest column.
    """
    n = search.shape[0]
    row_min = np.empty(n)
    row_arg = np.zeros(n, dtype=np.int64)
    for r in range(n):
        row_min[r] = math.inf
        for c in range(n):
            if search[r, c] < row_min[r]:
                row_min[r] = search[r, c]
                row_arg[r] = c
    remaining = 0
    for r in range(n):
        remaining += alive[r]
    while remaining > keep:
        i = 0
        for r in range(1, n):
            if row_min[r] < row_min[i]:
                i = r
        j = row_arg[i]
        if not math.isfinite(row_min[i]):
            # no comparable pair left: drop the unprotected filter with the smallest sum
            e = -1
            for r in range(n):
                if alive[r] and not shield[r] and (e < 0 or sums[r] < sums[e]):
                    e = r
        elif shield[i]:
            e = j
        elif shield[j]:
            e = i
        else:
            e = i if (sums[i] < sums[j] or (sums[i] == sums[j] and i > j)) else j
        alive[e] = False
        for r in range(n):
            sums[r] -= finite[r, e]
        for r in range(n):
            finite[e, r] = 0.0
            finite[r, e] = 0.0
            search[e, r] = math.inf
            search[r, e] = math.inf
        row_min[e] = math.inf
        for r in range(n):
            if row_arg[r] == e:
                row_min[r] = math.inf
                row_arg[r] = 0
                for c in range(n):
                    if search[r, c] < row_min[r]:
                        row_min[r] = search[r, c]
                        row_arg[r] = c
        remaining -= 1
