"""Stage ② of NORTON: which filters are redundant.

Pairwise criteria compare filters through their CP factors ``A (N, C, R)``,
``B (N, kh, R)``, ``C (N, kw, R)``; score criteria rank filters one by one.
Every pairwise matrix is computed for all pairs of a layer at once.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor

from norton.compression import kernels
from norton.core import Factors
from norton.errors import NortonError


# -- pairwise matrices ------------------------------------------------------------
def _orthonormal_bases(factor: Tensor) -> Tensor:
    """Q of the reduced QR of every filter's factor matrix, float64 on the CPU (N, d, min(d, R)).

    Always on the CPU, wherever the factors are: the compiled kernel there is
    the fastest path (a 512-filter layer in about 0.25 s; batched QR and
    ``eigvalsh`` of small matrices on a GPU took 2.6 s on an H200)."""
    return torch.linalg.qr(factor.detach().to(device="cpu", dtype=torch.float64)).Q


def _min_cosines_squared(factor: Tensor) -> Tensor | None:
    """cos² of the largest principal angle between every pair of column spaces, (N, N).

    cos θ_max = σ_min(Q_iᵀQ_j): one Gram matrix of the stacked bases gives every
    Q_iᵀQ_j, and σ_min² is the smallest eigenvalue of (Q_iᵀQ_j)ᵀ(Q_iᵀQ_j) —
    computed for all pairs i < j at once, by a compiled kernel on the CPU and
    by batched ``eigvalsh`` elsewhere.  Returns None when every basis spans the
    whole space (R >= d): all angles 0.
    """
    n, d, _ = factor.shape
    q = _orthonormal_bases(factor)
    k = q.shape[-1]
    if k == d:
        return None
    stacked = q.mT.reshape(n * k, d)
    lam = kernels.smallest_gram_eigenvalues(stacked, n, k).clamp(0.0, 1.0).triu(1)
    return (lam + lam.T).fill_diagonal_(1.0)


def pabs_distances(factors: Factors) -> Tensor:
    """Σ over the three modes of the largest principal angle (MATLAB ``subspace``), (N, N), on the CPU."""
    n = factors[0].shape[0]
    total = torch.zeros(n, n, dtype=torch.float64)
    for factor in factors:
        cos2 = _min_cosines_squared(factor)
        if cos2 is not None:
            total += torch.arccos(cos2.sqrt())
    total.fill_diagonal_(0.0)
    return total


def csa_similarities(factors: Factors) -> Tensor:
    """cos² of the largest principal angle between channel factors, (N, N), on the CPU: a similarity."""
    cos2 = _min_cosines_squared(factors[0])
    n = factors[0].shape[0]
    out = torch.ones(n, n, dtype=torch.float64) if cos2 is None else cos2
    return out.fill_diagonal_(1.0)


def vbd_distances(factors: Factors) -> Tensor:
    """var(A_i − A_j) / (var(A_i) + var(A_j)) on the channel factors, (N, N)."""
    a = factors[0].detach().to(torch.float64).flatten(1)  # (N, C·R)
    m = a.shape[1]
    mean = a.mean(1)
    sq = (a * a).mean(1)
    inner = a @ a.T / m
    var_diff = sq[:, None] + sq[None, :] - 2 * inner - (mean[:, None] - mean[None, :]) ** 2
    var = sq - mean**2
    denom = var[:, None] + var[None, :]
    out = torch.where(denom > 0, var_diff.clamp_min(0) / denom.clamp_min(1e-300), torch.zeros_like(denom))
    return out.fill_diagonal_(0.0)


# -- per-filter scores ----------------------------------------------------------------
def l2_scores(weight: Tensor, *, seed: int = 0) -> Tensor:
    """L2 norm of every filter of a dense kernel (N, ...): small = unimportant."""
    return weight.detach().to(torch.float64).flatten(1).norm(dim=1)


def l1_scores(weight: Tensor, *, seed: int = 0) -> Tensor:
    """L1 norm of every filter of a dense kernel."""
    return weight.detach().to(torch.float64).flatten(1).abs().sum(1)


def fpgm_scores(weight: Tensor, *, seed: int = 0) -> Tensor:
    """Summed distance of every filter to the others (FPGM: near the geometric median = replaceable)."""
    w = weight.detach().to(torch.float64).flatten(1)
    return torch.cdist(w, w).sum(1)


def random_scores(weight: Tensor, *, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(weight.shape[0], generator=generator, dtype=torch.float64)


# -- registry -------------------------------------------------------------------------
@dataclass(frozen=True)
class Criterion:
    """``kind`` is "distance" (small = redundant pair), "similarity" (large =
    redundant pair) or "score" (small = unimportant filter).  ``on_group``
    criteria score a whole torch-pruning dependency group (every coupled
    layer) instead of one weight tensor."""

    name: str
    kind: str
    needs_factors: bool
    compute: Callable
    description: str
    on_group: bool = False
    per_weight: Callable | None = None  # an on_group criterion's score of one dense kernel, for CPDBlocks


def _torch_pruning_importance(importance) -> Callable:
    """Per-channel scores of a torch-pruning dependency group (plain conv /
    linear / BN layers of the group; CPDBlocks are not among their types)."""

    def compute(group) -> Tensor:
        scores = importance(group)
        if scores is None:
            raise NortonError("this criterion scores plain Conv2d/Linear/BatchNorm layers; the group has none "
                              "(use pabs/vbd/csa for decomposed layers)")
        return scores.detach().to(torch.float64).cpu()

    return compute


CRITERIA: dict[str, Criterion] = {}


def register_criterion(criterion: Criterion) -> Criterion:
    if criterion.name in CRITERIA:
        raise RuntimeError(f"a criterion named {criterion.name!r} is already registered")
    if criterion.kind not in ("distance", "similarity", "score"):
        raise ValueError(f"criterion kind must be distance, similarity or score, got {criterion.kind!r}")
    CRITERIA[criterion.name] = criterion
    return criterion


register_criterion(Criterion("pabs", "distance", True, pabs_distances,
                             "sum of the largest principal angles between the filters' factor matrices (paper)"))
register_criterion(Criterion("vbd", "distance", True, vbd_distances, "variance-based distance of channel factors"))
register_criterion(Criterion("csa", "similarity", True, csa_similarities, "cos² of the channel-factor principal angle"))
register_criterion(Criterion("l2", "score", False, l2_scores, "L2 norm of each filter"))
register_criterion(Criterion("random", "score", False, random_scores, "seeded random choice (baseline)"))
register_criterion(Criterion(
    "l1", "score", False,
    _torch_pruning_importance(tp.importance.MagnitudeImportance(p=1, group_reduction="mean", normalizer=None)),
    "L1 norm over the coupled layers of the group (torch-pruning's MagnitudeImportance)", on_group=True,
    per_weight=l1_scores))
register_criterion(Criterion(
    "fpgm", "score", False,
    _torch_pruning_importance(tp.importance.FPGMImportance(p=2, group_reduction="mean", normalizer=None)),
    "distance to the geometric median of the filters (torch-pruning's FPGMImportance)", on_group=True,
    per_weight=fpgm_scores))


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise NortonError(f"unknown criterion {name!r}; valid: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]


def list_criteria() -> list[str]:
    return sorted(CRITERIA)


# -- selection --------------------------------------------------------------------------
def normalized_mean(matrices: Sequence[Tensor], positions: Sequence[Sequence[int] | None] | None = None,
                    size: int | None = None) -> Tensor:
    """Mean of matrices (or score vectors), each first divided by the mean of
    its off-diagonal entries (of its entries, for a vector), so that coupled
    layers weigh alike.

    With ``positions``, matrix ``i`` covers only the channels ``positions[i]``
    of a ``size``-channel group (a layer behind a split or a concatenation sees
    part of the group): every entry is the mean over the matrices that cover
    it, and an entry none covers gets 1, the mean of a normalized matrix, so
    it neither looks redundant nor important.  ``None`` covers every channel.
    """
    if not matrices:
        raise ValueError("normalized_mean needs at least one matrix")
    positions = list(positions) if positions is not None else [None] * len(matrices)
    size = size if size is not None else matrices[0].shape[0]
    dim = matrices[0].dim()
    total = torch.zeros((size,) * dim, dtype=torch.float64, device=matrices[0].device)
    count = torch.zeros_like(total)
    for m, where in zip(matrices, positions):
        m = m.to(torch.float64)
        if m.dim() == 2:
            n = m.shape[0]
            off = m[~torch.eye(n, dtype=torch.bool, device=m.device)] if n > 1 else m.flatten()
            scale = off.abs().mean() if off.numel() else torch.tensor(0.0, dtype=torch.float64)
        else:
            scale = m.abs().mean()
        m = m / scale if scale > 0 else m
        if where is None:
            if m.shape[0] != size:
                raise ValueError(f"a matrix of {m.shape[0]} channels without positions in a group of {size}")
            total += m
            count += 1
            continue
        index = torch.as_tensor(list(where), dtype=torch.long, device=m.device)
        if index.numel() != m.shape[0]:
            raise ValueError(f"{index.numel()} positions for a matrix of {m.shape[0]} channels")
        grid = torch.meshgrid(index, index, indexing="ij") if m.dim() == 2 else (index,)
        total.index_put_(grid, m, accumulate=True)
        count.index_put_(grid, torch.ones_like(m), accumulate=True)
    return torch.where(count > 0, total / count.clamp(min=1), torch.ones_like(total))


def greedy_eliminate(
    pairwise: Tensor,
    keep: int,
    *,
    similarity: bool = False,
    protected: Sequence[int] = (),
    allowed: Sequence[int] | None = None,
) -> list[int]:
    """Greedy redundancy elimination; returns the kept (never eliminated) indices, sorted.

    Repeat until ``keep`` filters remain: take the closest pair (smallest
    distance, or largest similarity); of the two, eliminate the one whose summed
    distance to the remaining filters is smaller (summed similarity larger) — it
    is the more redundant.  ``protected`` filters are never eliminated;
    filters outside ``allowed`` are eliminated first.
    """
    n = pairwise.shape[0]
    if pairwise.shape != (n, n):
        raise ValueError(f"pairwise must be square, got {tuple(pairwise.shape)}")
    if not 1 <= keep <= n:
        raise NortonError(f"cannot keep {keep} of {n} filters; keep must be in [1, {n}]")
    dist = pairwise.detach().to(device="cpu", dtype=torch.float64).clone()  # a sequential loop: on the CPU
    if similarity:
        dist = -dist
    alive = torch.ones(n, dtype=torch.bool)
    if allowed is not None:
        alive[:] = False
        alive[list(allowed)] = True
    shield = torch.zeros(n, dtype=torch.bool)
    shield[list(protected)] = True
    if int((alive | shield).sum()) < keep:
        raise NortonError(f"cannot keep {keep} filters: only {int((alive | shield).sum())} may be kept")
    alive |= shield

    dist.fill_diagonal_(math.inf)
    dist[~alive, :] = math.inf
    dist[:, ~alive] = math.inf
    finite = torch.where(torch.isfinite(dist), dist, torch.zeros_like(dist))
    sums = finite.sum(1)
    search = dist
    search[shield.nonzero().flatten()[:, None], shield.nonzero().flatten()[None, :]] = math.inf
    kernels.greedy_loop(search.numpy(), finite.numpy(), sums.numpy(), alive.numpy(), shield.numpy(), keep)
    return alive.nonzero().flatten().tolist()


def top_scores(scores: Tensor, keep: int, *, protected: Sequence[int] = (), allowed: Sequence[int] | None = None) -> list[int]:
    """The ``keep`` highest-scoring filters (protected ones always), sorted."""
    n = scores.shape[0]
    if not 1 <= keep <= n:
        raise NortonError(f"cannot keep {keep} of {n} filters; keep must be in [1, {n}]")
    s = scores.detach().to(device="cpu", dtype=torch.float64).clone()
    if allowed is not None:
        mask = torch.ones(n, dtype=torch.bool)
        mask[list(allowed)] = False
        s[mask] = -math.inf
    s[list(protected)] = math.inf
    order = torch.argsort(s, descending=True, stable=True)
    return sorted(order[:keep].tolist())
