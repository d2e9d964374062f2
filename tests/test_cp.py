import numpy as np
import pytest
import tensorly as tl
import torch
from conftest import low_rank_filters, trained_like_filters
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorly.decomposition import parafac

from norton import NortonError, cp_als, cp_decompose, nmse


def tensorly_mean_nmse(weight, rank, init):
    errors = []
    for w in weight.double().numpy():
        cp = parafac(tl.tensor(w), rank, init=init, n_iter_max=300, tol=1e-8, random_state=0)
        rec = tl.cp_to_tensor(cp)
        errors.append(((w - rec) ** 2).sum() / (w**2).sum())
    return float(np.mean(errors))


@pytest.mark.parametrize("kernel,rank", [((3, 3), 1), ((3, 3), 2), ((3, 3), 3), ((5, 5), 4), ((3, 5), 2)])
def test_exact_recovery_of_low_rank_filters(kernel, rank):
    weight, _ = low_rank_filters(12, 16, *kernel, rank)
    factors = cp_decompose(weight, rank, n_iter_max=1000, tol=1e-12)
    assert nmse(weight, factors).max() < 1e-6


def test_factor_shapes_and_dtype():
    weight = torch.randn(7, 5, 3, 2)
    a, b, c = cp_decompose(weight, 4)
    assert a.shape == (7, 5, 4) and b.shape == (7, 3, 4) and c.shape == (7, 2, 4)
    assert a.dtype == b.dtype == c.dtype == torch.float32


@pytest.mark.parametrize("init", ["svd", "random"])
def test_random_filters_match_tensorly(init):
    weight = torch.randn(24, 16, 3, 3)
    ours = nmse(weight, cp_decompose(weight, 4, init=init)).mean().item()
    reference = tensorly_mean_nmse(weight, 4, init)
    assert ours <= reference * 1.02, (ours, reference)


def test_trained_like_filters_match_tensorly():
    weight = trained_like_filters(24, 32)
    ours = nmse(weight, cp_decompose(weight, 3)).mean().item()
    reference = tensorly_mean_nmse(weight, 3, "random")
    assert ours <= reference * 1.02, (ours, reference)


def test_error_never_increases():
    weight = torch.randn(32, 24, 3, 3, dtype=torch.float64)
    result = cp_als(weight, 6, n_iter_max=200, tol=0.0)
    assert result.errors.shape == (200, 32)
    assert torch.diff(result.errors**2, dim=0).max() <= 1e-7  # NMSE never increases
    assert torch.diff(result.errors, dim=0).max() <= 1e-7  # nor does the relative error, away from 0
    # the recorded error is the real one
    final = nmse(weight, result.factors).sqrt()
    torch.testing.assert_close(final, result.errors[-1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("init", ["svd", "random"])
def test_same_seed_same_factors(init):
    weight = torch.randn(10, 8, 3, 3)
    first = cp_decompose(weight, 3, init=init, seed=5)
    second = cp_decompose(weight, 3, init=init, seed=5)
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    if init == "random":
        other = cp_decompose(weight, 3, init=init, seed=6)
        assert not torch.equal(first[0], other[0])


def test_identical_filters_get_identical_factors():
    # the deterministic SVD init makes duplicates recognisable by their factors
    w = torch.randn(1, 16, 3, 3).repeat(4, 1, 1, 1)
    a, b, c = cp_decompose(w, 5)
    for f in (a, b, c):
        torch.testing.assert_close(f, f[:1].expand_as(f), atol=1e-6, rtol=1e-5)


def test_zero_filters_get_zero_factors():
    weight = torch.randn(6, 8, 3, 3)
    weight[[1, 4]] = 0
    a, b, c = cp_decompose(weight, 3)
    for f in (a, b, c):
        assert torch.isfinite(f).all()
        assert f[[1, 4]].abs().max() == 0
    errors = nmse(weight, (a, b, c))
    assert errors[[1, 4]].abs().max() == 0 and errors.max() < 1


@pytest.mark.parametrize("rank", [4, 10, 40])
def test_rank_above_mode_sizes_is_finite(rank):
    weight = torch.randn(5, 3, 3, 3)
    factors = cp_decompose(weight, rank)
    assert all(torch.isfinite(f).all() for f in factors)
    # a 3×3×3 tensor has rank <= 5, so these fits are close to exact
    assert nmse(weight, factors).max() < 0.02


def test_rank_one_input_channel():
    weight = torch.randn(8, 1, 3, 3)
    factors = cp_decompose(weight, 8)
    assert all(torch.isfinite(f).all() for f in factors)
    assert nmse(weight, factors).max() < 1e-6


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_an_error(bad):
    weight = torch.randn(2, 3, 3, 3)
    weight[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        cp_decompose(weight, 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=2.5), "rank must be an integer >= 1"),
    (dict(rank=2, init="hosvd"), "init must be one of"),
    (dict(rank=2, n_iter_max=0), "n_iter_max"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(NortonError, match=match):
        cp_decompose(torch.randn(2, 3, 3, 3), **kwargs)


def test_bad_weight_shape():
    with pytest.raises(NortonError, match=r"\(N, C, kh, kw\)"):
        cp_decompose(torch.randn(3, 3, 3), 2)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 6), c=st.integers(1, 6), kh=st.integers(1, 4), kw=st.integers(1, 4),
    rank=st.integers(1, 7), scale=st.sampled_from([1e-6, 1.0, 1e4]), init=st.sampled_from(["svd", "random"]),
)
def test_cp_contract_properties(n, c, kh, kw, rank, scale, init):
    weight = torch.randn(n, c, kh, kw, dtype=torch.float64) * scale
    result = cp_als(weight, rank, n_iter_max=60, init=init)
    a, b, cc = result.factors
    assert a.shape == (n, c, rank) and b.shape == (n, kh, rank) and cc.shape == (n, kw, rank)
    assert all(torch.isfinite(f).all() for f in result.factors)
    if result.errors.shape[0] > 1:  # NMSE (squared relative error) never increases
        assert torch.diff(result.errors**2, dim=0).max() <= 1e-7
    errors = nmse(weight, result.factors)
    assert (errors >= 0).all() and (errors <= 1 + 1e-9).all()
