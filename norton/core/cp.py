"""Batched CP decomposition of convolution filters (ALS), one CPD per filter.

A layer's weight ``(N, C, kh, kw)`` holds N third-order tensors ``W_n`` of shape
``(C, kh, kw)``.  ``cp_decompose`` fits ``W_n ≈ Σ_r a_{n,r} ∘ b_{n,r} ∘ c_{n,r}``
for every filter at once: each ALS step is a batched MTTKRP (matmuls over the
whole layer) followed by a batched R×R pseudo-inverse, so there is no Python
loop over filters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from norton.errors import NortonError

Factors = tuple[Tensor, Tensor, Tensor]

INITS = ("svd", "random")


@dataclass
class CPResult:
    """Factors ``A (N, C, R)``, ``B (N, kh, R)``, ``C (N, kw, R)`` and the fit history.

    ``errors`` is ``(iterations, N)``: the relative error ``||W - Ŵ|| / ||W||`` of
    every filter after each ALS sweep (0 for an all-zero filter).
    """

    factors: Factors
    errors: Tensor
    n_iter: int


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor):
        raise NortonError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise NortonError(
            f"weight must have shape (N, C, kh, kw), got {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise NortonError(f"weight must be floating point, got {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        raise NortonError("weight contains NaN or Inf; cannot decompose it")


def _check_rank(rank: object) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise NortonError(f"rank must be an integer >= 1, got {rank!r}")
    return rank


def _leading_vectors(gram: Tensor, rank: int, generator: torch.Generator) -> Tensor:
    """The ``rank`` leading eigenvectors of every (k, k) Gram matrix, (N, k, rank).

    They are the leading left singular vectors of the unfolding the Gram comes
    from (an SVD of a k × C·k matrix costs far more than an eigh of k × k).
    When the rank exceeds k the extra columns come from one random matrix shared
    by all filters, so identical filters start (and end) identical.
    """
    n, k, _ = gram.shape
    u = torch.linalg.eigh(gram)[1].flip(-1)[..., :rank]  # descending eigenvalues
    if rank > k:
        extra = torch.randn(k, rank - k, generator=generator, dtype=torch.float64).to(gram.device)
        u = torch.cat([u, extra.expand(n, -1, -1)], dim=-1)
    return u


def _svd_init(x: Tensor, rank: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Deterministic init of the two spatial factors from each filter's mode-2 and
    mode-3 unfoldings (their leading left singular vectors)."""
    n, c, kh, kw = x.shape
    rows = x.permute(0, 2, 1, 3).reshape(n, kh, c * kw)  # mode-2 unfolding (N, kh, C·kw)
    cols = x.permute(0, 3, 1, 2).reshape(n, kw, c * kh)  # mode-3 unfolding (N, kw, C·kh)
    return (_leading_vectors(rows @ rows.mT, rank, generator),
            _leading_vectors(cols @ cols.mT, rank, generator))


def _random_init(
    x: Tensor, rank: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    n, _, kh, kw = x.shape
    b = torch.randn(n, kh, rank, generator=generator, dtype=torch.float64)
    c = torch.randn(n, kw, rank, generator=generator, dtype=torch.float64)
    return b.to(x.device), c.to(x.device)


def _solve(rhs: Tensor, gram: Tensor, eye: Tensor) -> Tensor:
    """``rhs · gram⁻¹`` for a batch of R×R Gram matrices, kept finite.

    A tiny relative ridge (1e-10 of the mean eigenvalue) keeps rank-deficient
    cases — rank above a mode's size, collapsed columns — positive definite, so
    the batched Cholesky always succeeds; on many small matrices it is far
    faster than a general solve or a pseudo-inverse.
    """
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    ridge = (trace * (1e-10 / gram.shape[-1]) + 1e-150)[:, None, None] * eye
    chol = torch.linalg.cholesky_ex(gram + ridge)[0]
    return torch.cholesky_solve(rhs.mT, chol).mT


def _balance(a: Tensor, b: Tensor, c: Tensor) -> Factors:
    """Give the three columns of every rank-one term the same norm."""
    na, nb, nc = (f.norm(dim=1, keepdim=True) for f in (a, b, c))
    scale = (na * nb * nc).clamp_min(1e-300) ** (1.0 / 3.0)
    zero = (na * nb * nc) == 0
    fa = torch.where(zero, 0.0, scale / na.clamp_min(1e-300))
    fb = torch.where(zero, 0.0, scale / nb.clamp_min(1e-300))
    fc = torch.where(zero, 0.0, scale / nc.clamp_min(1e-300))
    return a * fa, b * fb, c * fc


def cp_als(
    weight: Tensor,
    rank: int,
    *,
    n_iter_max: int = 300,
    tol: float = 1e-4,
    init: str = "svd",
    seed: int = 0,
) -> CPResult:
    """Rank-``rank`` CP-ALS of every filter of ``weight`` (N, C, kh, kw), batched.

    A filter stops updating once its relative error changes by less than ``tol``
    between sweeps (the stopping rule of tensorly's ``parafac``); the loop ends
    when every filter has stopped or after ``n_iter_max`` sweeps.  Computation is
    in float64 on ``weight``'s device; factors come back in ``weight``'s dtype.
    """
    _check_weight(weight)
    rank = _check_rank(rank)
    if init not in INITS:
        raise NortonError(f"init must be one of {INITS}, got {init!r}")
    if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, int) or n_iter_max < 1:
        raise NortonError(f"n_iter_max must be an integer >= 1, got {n_iter_max!r}")
    if not tol >= 0:
        raise NortonError(f"tol must be >= 0, got {tol!r}")

    x = weight.detach().to(torch.float64)
    n, c_in, kh, kw = x.shape
    generator = torch.Generator().manual_seed(seed)
    b0, c0 = (_svd_init if init == "svd" else _random_init)(x, rank, generator)

    norm_sq_all = x.pow(2).sum(dim=(1, 2, 3))  # (N,)
    out = [torch.zeros(n, size, rank, dtype=torch.float64, device=x.device) for size in (c_in, kh, kw)]
    errors = torch.zeros(n_iter_max, n, dtype=torch.float64, device=x.device)

    # The channel factor A is never formed inside the loop.  With X₁ the (C, K)
    # unfolding of a filter (K = kh·kw), KR the Khatri-Rao product of B and C
    # and V = BᵀB ∗ CᵀC, the ALS update is A = X₁ KR V⁻¹ =: X₁ Q, and all that
    # the other two updates need from it is P = X₁ᵀA = X₁ᵀX₁ Q and AᵀA = Qᵀ P.
    # For small kernels (K < 2C) the K×K Gram G = X₁ᵀX₁ is computed once and a
    # sweep costs O(K²R) per filter whatever the number of input channels; for
    # large kernels on few channels (a ViT patch embedding: C=3, K=1024) G would
    # be huge and P = X₁ᵀ(X₁Q) costs O(CKR).  A = X₁ Q is formed at the end.
    idx = torch.nonzero(norm_sq_all > 0).flatten()  # all-zero filters are never fitted
    x1_all = x.reshape(n, c_in, kh * kw)
    use_gram = kh * kw < 2 * c_in
    operand = x1_all[idx].mT @ x1_all[idx] if use_gram else x1_all[idx]  # (n, K, K) or (n, C, K)

    def gram_times(q: Tensor) -> Tensor:
        return operand @ q if use_gram else operand.mT @ (operand @ q)

    b, c = b0[idx], c0[idx]
    q = torch.zeros(idx.numel(), kh * kw, rank, dtype=torch.float64, device=x.device)
    norm_sq = norm_sq_all[idx]
    prev_err = torch.full_like(norm_sq, float("inf"))
    done = torch.zeros_like(norm_sq, dtype=torch.bool)
    q_out = torch.zeros(n, kh * kw, rank, dtype=torch.float64, device=x.device)
    eye = torch.eye(rank, dtype=torch.float64, device=x.device)
    q_old, b_old, c_old = q, b, c  # the previous sweep's factors, for the line search
    it = 0
    for it in range(1, n_iter_max + 1):
        if idx.numel() == 0:
            it -= 1
            break
        m = idx.numel()
        gram_c = c.mT @ c
        khatri_rao = (b.unsqueeze(2) * c.unsqueeze(1)).reshape(m, kh * kw, rank)
        q = _solve(khatri_rao, (b.mT @ b) * gram_c, eye)
        p = gram_times(q)  # P[i·kw+j, r] = Σ_c X[c,i,j] A[c,r]
        gram_a = q.mT @ p
        p = p.reshape(m, kh, kw, rank)
        b = _solve((p * c.unsqueeze(1)).sum(2), gram_a * gram_c, eye)
        m_c = (p * b.unsqueeze(2)).sum(1)  # M[j,r] = Σ_ci X[c,i,j] A[c,r] B[i,r]
        gram_ab = gram_a * (b.mT @ b)
        c = _solve(m_c, gram_ab, eye)

        # ||X - X̂||² = ||X||² - 2<X, X̂> + ||X̂||², from R×R quantities only.
        inner = (m_c * c).sum(dim=(1, 2))
        fit_sq = (gram_ab * (c.mT @ c)).sum(dim=(1, 2))
        err_sq = norm_sq - 2 * inner + fit_sq

        # Line search (Bro, 1998): extrapolate along this sweep's step and keep
        # the jump wherever it fits better, which cuts the ALS "swamps" short.
        if it > 1:
            step = it ** (1.0 / 3.0)
            q_j, b_j, c_j = (torch.lerp(o, f, step) for o, f in ((q_old, q), (b_old, b), (c_old, c)))
            p_j = gram_times(q_j)
            inner_j = (p_j.reshape(m, kh, kw, rank) * b_j.unsqueeze(2) * c_j.unsqueeze(1)).sum(dim=(1, 2, 3))
            fit_j = ((q_j.mT @ p_j) * (b_j.mT @ b_j) * (c_j.mT @ c_j)).sum(dim=(1, 2))
            err_sq_j = norm_sq - 2 * inner_j + fit_j
            better = err_sq_j < err_sq
            q, b, c = (torch.where(better[:, None, None], j, f) for j, f in ((q_j, q), (b_j, b), (c_j, c)))
            err_sq = torch.where(better, err_sq_j, err_sq)
        q_old, b_old, c_old = q, b, c
        err = (err_sq.clamp_min(0) / norm_sq).sqrt()
        errors[it - 1, idx] = err
        done |= (prev_err - err).abs() < tol
        prev_err = err

        # Retire converged filters in batches (a retired filter keeps its factors).
        n_done = int(done.sum())
        if n_done and n_done * 8 >= m:
            for buf, f in zip((q_out, out[1], out[2]), (q, b, c)):
                buf[idx[done]] = f[done]
            keep = ~done
            idx, operand, q, b, c = idx[keep], operand[keep], q[keep], b[keep], c[keep]
            q_old, b_old, c_old = q, b, c
            norm_sq, prev_err, done = norm_sq[keep], prev_err[keep], done[keep]
    for buf, f in zip((q_out, out[1], out[2]), (q, b, c)):
        buf[idx] = f
    out[0] = x1_all @ q_out  # A = X₁ Q

    # After a filter retires, its error stays what it was.
    errors = errors[:it]
    for t in range(1, it):
        stale = errors[t] == 0
        errors[t] = torch.where(stale, errors[t - 1], errors[t])
    a, b, c = _balance(*out)
    zero = norm_sq_all == 0
    a, b, c = (f.masked_fill(zero[:, None, None], 0.0) for f in (a, b, c))
    dtype = weight.dtype
    return CPResult(factors=(a.to(dtype), b.to(dtype), c.to(dtype)), errors=errors.to(dtype), n_iter=it)


def cp_decompose(
    weight: Tensor,
    rank: int,
    *,
    n_iter_max: int = 300,
    tol: float = 1e-4,
    init: str = "svd",
    seed: int = 0,
) -> Factors:
    """One rank-``rank`` CPD per filter of ``weight`` (N, C, kh, kw).

    Returns ``(A, B, C)`` of shapes ``(N, C, R)``, ``(N, kh, R)``, ``(N, kw, R)``.
    """
    return cp_als(
        weight, rank, n_iter_max=n_iter_max, tol=tol, init=init, seed=seed
    ).factors


def reconstruct(factors: Factors) -> Tensor:
    """Dense filters ``(N, C, kh, kw)`` from per-filter CP factors."""
    a, b, c = factors
    return torch.einsum("ncr,nhr,nwr->nchw", a, b, c)


def nmse(weight: Tensor, factors: Factors) -> Tensor:
    """Per-filter ``||W - Ŵ||² / ||W||²`` as a ``(N,)`` tensor (0 for a zero filter)."""
    w = weight.detach().to(torch.float64)
    approx = reconstruct(tuple(f.detach().to(torch.float64) for f in factors))
    num = (w - approx).pow(2).sum(dim=(1, 2, 3))
    den = w.pow(2).sum(dim=(1, 2, 3))
    out = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), num)
    return out.to(weight.dtype)
