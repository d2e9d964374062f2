import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles

from norton import NortonError
from norton.compression import kernels
from norton.compression.criteria import (
    csa_similarities,
    get_criterion,
    greedy_eliminate,
    list_criteria,
    normalized_mean,
    pabs_distances,
    top_scores,
    vbd_distances,
)


def random_factors(n, c=6, k=3, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, d, r, generator=g, dtype=torch.float64) for d in (c, k, k))


def loop_pabs(factors):
    """Straightforward reference: scipy's principal angles, pair by pair."""
    n = factors[0].shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                out[i, j] = sum(subspace_angles(f[i].numpy(), f[j].numpy()).max() for f in factors)
    return out


@pytest.mark.parametrize("shape", [(6, 3, 2), (5, 5, 3), (7, 3, 4)])
def test_pabs_matches_pairwise_reference(shape):
    c, k, r = shape
    factors = random_factors(9, c, k, r)
    np.testing.assert_allclose(pabs_distances(factors).numpy(), loop_pabs(factors), atol=1e-6)


def test_pabs_spatial_modes_vanish_when_rank_covers_them():
    # R >= k: a k×R factor spans R^k, so only the channel factor discriminates
    factors = random_factors(5, c=8, k=3, r=3)
    only_channel = loop_pabs((factors[0],))
    np.testing.assert_allclose(pabs_distances(factors).numpy(), only_channel, atol=1e-6)


def test_pabs_is_not_collapsed_to_zero():
    # the research code's Frobenius-sine/mod bug maps most pairs to 0; ours does not
    factors = random_factors(40, c=64, k=3, r=6)
    d = pabs_distances(factors)
    off = d[~torch.eye(40, dtype=torch.bool)]
    assert (off > 0.1).float().mean() > 0.99
    assert off.max() <= 3 * math.pi / 2 + 1e-9


def test_pabs_is_invariant_to_column_scaling_and_order():
    factors = random_factors(4)
    a, b, c = (f.clone() for f in factors)
    a[2] = a[2][:, [1, 0]] * torch.tensor([3.0, -0.5], dtype=torch.float64)
    torch.testing.assert_close(pabs_distances((a, b, c))[2], pabs_distances(factors)[2], atol=1e-6, rtol=0)


def test_vbd_matches_direct_variance():
    factors = random_factors(6, c=5, r=3)
    a = factors[0]
    d = vbd_distances(factors)
    for i in range(6):
        for j in range(6):
            if i != j:
                expected = torch.var(a[i] - a[j]) / (torch.var(a[i]) + torch.var(a[j]))
                assert d[i, j].item() == pytest.approx(expected.item(), rel=1e-9)


def test_csa_is_cos_squared_of_the_channel_angle():
    factors = random_factors(5, c=7, r=3)
    s = csa_similarities(factors)
    for i, j in [(0, 1), (2, 4)]:
        angle = subspace_angles(factors[0][i].numpy(), factors[0][j].numpy()).max()
        assert s[i, j].item() == pytest.approx(math.cos(angle) ** 2, abs=1e-8)


def test_greedy_known_answer():
    # 0≈1 and 2≈3 are near-duplicates; 4 is far from all.  Keeping 3 must keep
    # one of each pair and 4; the one dropped from each pair is the one closer
    # to the rest (smaller summed distance).
    d = torch.tensor([
        [0.0, 0.1, 5.0, 5.0, 9.0],
        [0.1, 0.0, 4.0, 4.0, 9.0],
        [5.0, 4.0, 0.0, 0.2, 9.0],
        [5.0, 4.0, 0.2, 0.0, 8.0],
        [9.0, 9.0, 9.0, 8.0, 0.0],
    ])
    assert greedy_eliminate(d, 3) == [0, 2, 4]
    # the same as a similarity (large = close) picks the same filters
    assert greedy_eliminate(10.0 - d, 3, similarity=True) == [0, 2, 4]


def test_greedy_duplicates_of_real_factors_are_removed():
    base = random_factors(6, c=8, k=3, r=2)
    factors = tuple(torch.cat([f, f[[1, 3]] * 2.0]) for f in base)  # 6, 7 duplicate 1, 3
    kept = greedy_eliminate(pabs_distances(factors), 6)
    assert len(kept) == 6 and 0 in kept and 2 in kept and 4 in kept and 5 in kept
    assert (1 in kept) != (6 in kept) and (3 in kept) != (7 in kept)  # one of each pair survives


def test_greedy_protected_and_allowed():
    d = torch.rand(8, 8, generator=torch.Generator().manual_seed(1))
    d = d + d.T
    kept = greedy_eliminate(d, 4, protected=[0, 1, 2])
    assert {0, 1, 2} <= set(kept) and len(kept) == 4
    kept = greedy_eliminate(d, 3, allowed=[5, 6, 7, 2])
    assert set(kept) <= {5, 6, 7, 2} and len(kept) == 3
    with pytest.raises(NortonError, match="keep must be in"):
        greedy_eliminate(d, 0)


def test_top_scores():
    scores = torch.tensor([0.5, 3.0, 1.0, 2.0])
    assert top_scores(scores, 2) == [1, 3]
    assert top_scores(scores, 2, protected=[0]) == [0, 1]


def test_normalized_mean_weighs_layers_alike():
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    total = normalized_mean([a, 100 * a])
    torch.testing.assert_close(total, a.double())


def test_normalized_mean_places_partial_layers_by_their_positions():
    # a 4-channel group; one layer sees all of it, another only channels 2 and 3 (after a split)
    full = torch.tensor([1.0, 2.0, 3.0, 2.0])  # mean 2
    part = torch.tensor([6.0, 2.0])  # mean 4
    scores = normalized_mean([full, part], [None, [2, 3]], size=4)
    torch.testing.assert_close(scores, torch.tensor([0.5, 1.0, (1.5 + 1.5) / 2, (1.0 + 0.5) / 2], dtype=torch.float64))
    pair = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    matrix = normalized_mean([pair], [[1, 3]], size=4)
    assert matrix[1, 3] == matrix[3, 1] == 1.0 and matrix[1, 1] == 0.0
    assert matrix[0, 2] == 1.0  # covered by no layer: neutral
    with pytest.raises(ValueError, match="3 positions for a matrix of 2 channels"):
        normalized_mean([part], [[0, 1, 2]], size=4)


def test_registry():
    assert list_criteria() == ["csa", "fpgm", "l1", "l2", "pabs", "random", "vbd"]
    assert get_criterion("pabs").needs_factors and not get_criterion("l2").needs_factors
    assert get_criterion("l1").on_group and not get_criterion("l2").on_group
    with pytest.raises(NortonError, match="unknown criterion 'hrank'; valid: csa, fpgm, l1, l2, pabs, random, vbd"):
        get_criterion("hrank")


def _two_convs(first: torch.Tensor, second: torch.Tensor) -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Conv2d(first.shape[1], first.shape[0], 3, padding=1, bias=False),
                              torch.nn.Conv2d(second.shape[1], second.shape[0], 3, padding=1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(first)
        net[1].weight.copy_(second)
    return net


def test_l1_scores_the_group_as_torch_pruning_does():
    """L1 of a group: the mean over its layers of each channel's L1 norm (the
    filter of the first conv and the matching input slice of the next)."""
    from norton.compression import prune

    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(6, 2, 3, 3, generator=gen), torch.randn(4, 6, 3, 3, generator=gen)
    expected = (first.abs().flatten(1).sum(1) + second.abs().transpose(0, 1).flatten(1).sum(1)) / 2
    net = _two_convs(first, second)
    report = prune(net, {"0": 0.5}, example_inputs=torch.zeros(1, 2, 8, 8), criterion="l1")
    assert sorted(report.groups[0].kept) == sorted(expected.topk(3).indices.tolist())
    assert torch.equal(net[0].weight, first[sorted(report.groups[0].kept)])


def test_fpgm_removes_the_filter_nearest_the_geometric_median():
    from norton.compression import prune

    gen = torch.Generator().manual_seed(1)
    spread = torch.randn(4, 2, 3, 3, generator=gen) * 5
    first = torch.cat([spread, spread.mean(0, keepdim=True)])  # filter 4 is the centre
    second = torch.ones(3, 5, 3, 3)  # identical input slices: no say in the ranking
    net = _two_convs(first, second)
    report = prune(net, {"0": 0.2}, example_inputs=torch.zeros(1, 2, 8, 8), criterion="fpgm")
    assert sorted(report.groups[0].kept) == [0, 1, 2, 3]
    l1 = prune(_two_convs(first, second), {"0": 0.2}, example_inputs=torch.zeros(1, 2, 8, 8), criterion="l1")
    assert sorted(l1.groups[0].kept) != [0, 1, 2, 3] or first[4].abs().sum() < first[:4].abs().flatten(1).sum(1).min()


def test_torch_pruning_criteria_score_cp_filters_on_their_dense_kernels():
    """Where a group has CPDBlocks (torch-pruning's importances see plain layers
    only), l1 and fpgm score the CP filters' dense kernels, and say so."""
    from norton.compression import decompose, prune
    from norton.compression.criteria import fpgm_scores, l1_scores

    gen = torch.Generator().manual_seed(2)
    w = torch.randn(5, 3, 2, 2, generator=gen)
    flat = w.flatten(1).double()
    by_hand = torch.tensor([sum(float((flat[i] - flat[j]).norm()) for j in range(5)) for i in range(5)])
    torch.testing.assert_close(fpgm_scores(w), by_hand.double())
    torch.testing.assert_close(l1_scores(w), flat.abs().sum(1))

    net = _two_convs(torch.randn(6, 2, 3, 3, generator=gen), torch.randn(4, 6, 3, 3, generator=gen))
    decompose(net, 2, progress=False)  # only CPDBlocks left
    dense = net[0].dense_weight().detach()
    report = prune(net, {"0": 0.5}, example_inputs=torch.zeros(1, 2, 8, 8), criterion="l1")
    group = {g.root: g for g in report.groups}["0"]
    assert group.criterion == "l1 (dense kernels)"
    assert group.kept == sorted(torch.argsort(l1_scores(dense), descending=True)[:3].tolist())




def stacked_bases(n, d, r, seed=0):
    """Orthonormal bases of random factors with exact duplicates and orthogonal pairs, stacked as rows."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, r, generator=g, dtype=torch.float64)
    a[1] = a[0] @ torch.randn(r, r, generator=g, dtype=torch.float64)  # same column space as 0
    a[3] = a[2]
    if d >= 2 * r:
        a[5] = torch.zeros(d, r, dtype=torch.float64)
        a[5][:r] = torch.eye(r, dtype=torch.float64)
        a[4] = torch.zeros(d, r, dtype=torch.float64)
        a[4][r:2 * r] = torch.eye(r, dtype=torch.float64)  # orthogonal to 5: λ_min = 0
    q = torch.linalg.qr(a).Q
    return q.mT.reshape(n * r, d)


@pytest.mark.parametrize("n, d, r", [(600, 12, 4), (40, 9, 1), (30, 40, 8), (20, 5, 5)])
def test_compiled_kernel_matches_batched_eigvalsh(n, d, r):
    # n = 600: row 0 has 599 pairs, more than one lockstep tile
    stacked = stacked_bases(n, d, r)
    fast = kernels.smallest_gram_eigenvalues(stacked, n, r)
    reference = kernels.batched_gram_eigenvalues(stacked, n, r)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    torch.testing.assert_close(fast[upper], reference[upper], atol=1e-12, rtol=0)
    assert fast[0, 1] == pytest.approx(1.0, abs=1e-12) and fast[2, 3] == pytest.approx(1.0, abs=1e-12)
    if d >= 2 * r:
        assert fast[4, 5] == pytest.approx(0.0, abs=1e-12)


def reference_greedy(d, keep, protected=(), allowed=None):
    """The elimination rule read literally: a full search of the matrix at every step."""
    n = d.shape[0]
    alive = set(range(n)) if allowed is None else set(allowed) | set(protected)
    while len(alive) > keep:
        pairs = [(float(d[i, j]), i, j) for i in sorted(alive) for j in sorted(alive)
                 if i != j and not (i in protected and j in protected)]
        _, i, j = min(pairs)
        sums = {f: sum(float(d[f, o]) for o in alive if o != f) for f in (i, j)}
        if i in protected:
            e = j
        elif j in protected:
            e = i
        else:
            e = i if (sums[i] < sums[j] or (sums[i] == sums[j] and i > j)) else j
        alive.remove(e)
    return sorted(alive)


@pytest.mark.parametrize("seed", range(6))
def test_compiled_greedy_matches_the_rule_read_literally(seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(1, 6, (14, 14), generator=g).double()  # many ties
    d = d + d.T
    protected = [] if seed % 2 else [3, 7]
    allowed = None if seed < 3 else list(range(2, 13))
    keep = 5
    assert greedy_eliminate(d, keep, protected=protected, allowed=allowed) == \
        reference_greedy(d, keep, protected=protected, allowed=allowed)


def test_compiled_kernel_is_the_same_on_any_number_of_threads_and_restores_torchs():
    stacked = stacked_bases(70, 10, 3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.smallest_gram_eigenvalues(stacked, 70, 3)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        two = kernels.smallest_gram_eigenvalues(stacked, 70, 3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_python_threads_computing_pairwise_criteria_at_once_leave_torchs_thread_count_as_it_was():
    """torch's thread count is process-wide (a new thread starts from it): calls
    from several Python threads at once must not restore each other's temporary 1."""
    stacked = stacked_bases(70, 10, 3)
    expected = kernels.smallest_gram_eigenvalues(stacked, 70, 3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for _ in range(5):
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda _: kernels.smallest_gram_eigenvalues(stacked, 70, 3), range(8)))
            assert all(torch.equal(r, expected) for r in results)
            with ThreadPoolExecutor(1) as fresh:
                assert fresh.submit(torch.get_num_threads).result() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on a GPU machine)")
def test_pairwise_criteria_on_cuda_factors_take_the_fast_cpu_path():
    import time

    block = torch.nn.Conv2d(512, 512, 3, padding=1)
    from norton.core import CPDBlock

    factors = CPDBlock.like_conv(block, 8).cuda().factors()
    expected = pabs_distances(tuple(f.cpu() for f in factors))
    pabs_distances(factors)  # compiled kernel loaded
    start = time.perf_counter()
    got = pabs_distances(factors)
    seconds = time.perf_counter() - start
    torch.testing.assert_close(got, expected)
    assert seconds <= 0.3 * 1.5, seconds  # ≤ 0.3 s on the pabs benchmark; some slack for a shared machine
    assert csa_similarities(factors).device.type == "cpu"
