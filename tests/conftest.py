import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_DIR = os.path.join(ROOT, "tests", "reference")  # copies of shared/reference


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def low_rank_filters(n, c, kh, kw, rank, *, dtype=torch.float64, seed=0):
    """Filters that are exactly rank-``rank`` CP tensors, and their factors."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, c, rank, generator=g, dtype=dtype)
    b = torch.randn(n, kh, rank, generator=g, dtype=dtype)
    cc = torch.randn(n, kw, rank, generator=g, dtype=dtype)
    return torch.einsum("ncr,nhr,nwr->nchw", a, b, cc), (a, b, cc)


def trained_like_filters(n, c, k=3, seed=0):
    """Filters with the structure of trained ones: a few smooth spatial patterns
    (edges, blobs) mixed across channels with a decaying spectrum, plus noise."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.linspace(-1, 1, k, dtype=torch.float64)
    patterns = torch.stack([
        torch.ones(k, k, dtype=torch.float64),
        lin[:, None].expand(k, k),
        lin[None, :].expand(k, k),
        torch.exp(-(lin[:, None] ** 2 + lin[None, :] ** 2)),
        lin[:, None] * lin[None, :],
    ])
    weights = torch.randn(n, c, len(patterns), generator=g, dtype=torch.float64)
    weights *= torch.tensor([1.0, 0.7, 0.7, 0.5, 0.3], dtype=torch.float64)
    w = torch.einsum("ncp,pij->ncij", weights, patterns)
    return (w + 0.1 * torch.randn(n, c, k, k, generator=g, dtype=torch.float64)).float()
