"""Tucker-2: the decomposition against tensorly's, the block as a drop-in conv,
and the block inside pruning, checkpoints and deployment."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from norton import NortonError, create_model
from norton.compression import describe, prune, rebuild
from norton.compression.decomposition import decompose_tucker
from norton.compression.costs import layer_macs
from norton.core import TuckerBlock, count_macs, tucker2
from norton.deployment import deploy


def kernel(n=24, c=16, k=3, seed=0):
    return torch.randn(n, c, k, k, generator=torch.Generator().manual_seed(seed))


def relative_error(w, approx):
    return float(((w - approx) ** 2).sum() / (w ** 2).sum())


def recomposed(u_out, core, u_in):
    return torch.einsum("no,orij,cr->ncij", u_out, core, u_in)


def test_an_exact_multilinear_rank_kernel_is_recovered():
    g = torch.Generator().manual_seed(1)
    core = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    w = recomposed(torch.randn(20, 5, generator=g, dtype=torch.float64), core,
                   torch.randn(12, 3, generator=g, dtype=torch.float64))
    assert relative_error(w, recomposed(*tucker2(w, (5, 3)))) < 1e-20


@pytest.mark.parametrize("shape, ranks", [((24, 16, 3, 3), (6, 4)), ((64, 32, 3, 3), (16, 8)), ((8, 3, 5, 5), (4, 2))])
def test_error_is_no_worse_than_tensorly_partial_tucker(shape, ranks):
    from tensorly.decomposition import partial_tucker

    w = kernel(*shape[:3], seed=sum(shape)).to(torch.float64)
    (core, factors), _ = partial_tucker(w.numpy(), rank=list(ranks), modes=[0, 1], n_iter_max=40, tol=1e-10)
    reference = relative_error(w, torch.from_numpy(np.einsum("orij,no,cr->ncij", core, factors[0], factors[1])))
    ours = relative_error(w, recomposed(*tucker2(w, ranks)))
    assert ours <= 1.02 * reference, (ours, reference)


def test_factors_are_deterministic_and_filter_norms_sit_in_the_last_conv():
    conv = nn.Conv2d(16, 24, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(kernel())
    a, b = TuckerBlock.from_conv(conv, (8, 6)), TuckerBlock.from_conv(conv, (8, 6))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    norms = a.dense_weight().flatten(1).norm(dim=1)
    assert torch.allclose(a[2].weight.flatten(1).norm(dim=1), norms, rtol=1e-4)  # l2 selection sees the filters
    u_in = a[0].weight[:, :, 0, 0]
    assert torch.allclose(u_in @ u_in.T, torch.eye(6), atol=1e-5)


@pytest.mark.parametrize("options", [
    {"stride": 2, "padding": 1, "bias": True},
    {"padding": 2, "dilation": 2},
    {"padding": 1, "padding_mode": "reflect"},
    {"padding": "same"},
])
def test_at_full_rank_the_block_is_the_conv(options):
    conv = nn.Conv2d(6, 10, 3, **options)
    block = TuckerBlock.from_conv(conv, (10, 6))
    x = torch.randn(2, 6, 11, 11)
    assert torch.allclose(block(x), conv(x), atol=1e-5)
    assert torch.allclose(block.to_conv()(x), conv(x), atol=1e-5)
    assert block.ranks == (10, 6) and block.in_channels == 6 and block.out_channels == 10


def test_ranks_above_the_channels_are_clamped_and_bad_ranks_named():
    conv = nn.Conv2d(4, 6, 3)
    assert TuckerBlock.from_conv(conv, (50, 50)).ranks == (6, 4)
    for bad in [(0, 2), (2,), "2x2", (2.0, 2)]:
        with pytest.raises(NortonError, match="Tucker-2 ranks must be a pair"):
            TuckerBlock.from_conv(conv, bad)
    with pytest.raises(NortonError, match="exceed the kernel"):
        tucker2(conv.weight, (7, 2))
    with pytest.raises(NortonError, match="groups=1"):
        TuckerBlock.like_conv(nn.Conv2d(4, 4, 3, groups=2), (2, 2))


def test_planner_macs_of_a_tucker_layer_are_what_count_macs_counts():
    for conv, size, ranks in [(nn.Conv2d(16, 32, 3, 1, 1), 15, (8, 4)), (nn.Conv2d(8, 12, (3, 5), (2, 1), (1, 2)), 17, (3, 5))]:
        x = torch.zeros(1, conv.in_channels, size, size)
        assert layer_macs(conv, ranks, conv.out_channels, conv.in_channels, x.shape[1:]) == count_macs(
            TuckerBlock.like_conv(conv, ranks), x)


def resnet_with_tucker():
    torch.manual_seed(0)
    model = create_model("resnet_20").eval()
    report = decompose_tucker(model, {"conv1": (8, 3), "layer1.0.conv1": (8, 8), "layer2.0.conv2": (16, 16)})
    assert [layer.tucker for layer in report.layers] == [(8, 3), (8, 8), (16, 16)]
    assert "T8x3" in report.table()
    return model


def test_a_model_with_tucker_blocks_prunes_by_block_name_and_rebuilds_from_its_description():
    model = resnet_with_tucker()
    x = torch.randn(2, 3, 32, 32)
    prune(model, keep={"conv1": 10, "layer1.0.conv1": 12}, example_inputs=x[:1], criterion="l2")
    assert model.conv1.out_channels == 10 and model.layer1[0].conv1.out_channels == 12
    assert model.conv1.ranks == (8, 3)  # the internal ranks are not the block's filters
    description = describe(model, [3, 32, 32])
    assert description["tucker"] == {"conv1": [8, 3], "layer1.0.conv1": [8, 8], "layer2.0.conv2": [16, 16]}
    rebuilt = rebuild(description, create_model("resnet_20"))
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.eval()(x), model(x))


def test_a_model_with_tucker_blocks_deploys_exactly():
    model = resnet_with_tucker()
    x = torch.randn(4, 3, 32, 32)
    deployed, report = deploy(copy.deepcopy(model), x)
    for name in ("conv1", "layer1.0.conv1", "layer2.0.conv2"):  # each timed: factored or recomposed, the faster
        assert report.layers[name] in ("factored", "conv") and set(report.timings_ms[name]) == {"factored", "conv"}
    assert report.folded_batchnorms == 19  # those after Tucker blocks too
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-4, rtol=1e-4)
