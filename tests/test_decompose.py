import pytest
import torch
import torchvision
from torch import nn

from norton import CPDBlock, NortonError, decompose
from norton.compression.decomposition import is_decomposable

FAST = dict(n_iter_max=3, progress=False)


def count(model, kind):
    return sum(1 for m in model.modules() if type(m) is kind)


def eligible_convs(model):
    return [name for name, m in model.named_modules() if is_decomposable(m)]


@pytest.mark.parametrize("builder,size", [
    (torchvision.models.resnet50, 64),
    (torchvision.models.densenet121, 64),
    (torchvision.models.vgg16_bn, 32),
    (torchvision.models.regnet_x_400mf, 64),
    (torchvision.models.mobilenet_v2, 64),
])
def test_torchvision_models(builder, size):
    model = builder(weights=None).eval()
    x = torch.randn(2, 3, size, size)
    expected_shape = model(x).shape
    names = eligible_convs(model)
    others = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d and n not in names]
    report = decompose(model, 2, **FAST)
    assert [layer.name for layer in report.layers] == names
    assert count(model, CPDBlock) == len(names)
    # depthwise, grouped and 1×1 convs are left exactly as they were
    for name, module in others:
        assert model.get_submodule(name) is module
    assert model(x).shape == expected_shape


def test_regnet_grouped_convs_untouched():
    model = torchvision.models.regnet_x_400mf(weights=None)
    grouped = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert grouped  # the model does have grouped convs
    decompose(model, 1, **FAST)
    assert all(isinstance(model.get_submodule(n), nn.Conv2d) for n in grouped)


def test_detection_backbone():
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=128
    ).eval()
    body = model.backbone.body
    n_eligible = len(eligible_convs(body))
    decompose(body, 2, **FAST)
    assert count(body, CPDBlock) == n_eligible == 17  # stem 7×7 + 16 bottleneck 3×3
    features = model.backbone(torch.randn(1, 3, 128, 128))
    assert [f.shape[1] for f in features.values()] == [256] * 5
    with torch.no_grad():
        out = model([torch.rand(3, 128, 128)])
    assert set(out[0]) == {"boxes", "labels", "scores"}


def test_decomposed_model_approximates_the_original():
    # a small CNN whose filters are exactly rank 2: decomposition is lossless
    from conftest import low_rank_filters

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight.copy_(low_rank_filters(*conv.weight.shape, 2, dtype=torch.float32)[0])
    x = torch.randn(2, 3, 12, 12)
    before = model(x)
    report = decompose(model, 2, n_iter_max=500, tol=1e-12, progress=False)
    assert report.mean_nmse < 1e-8
    torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)


def test_layer_ranks_and_skip():
    model = torchvision.models.resnet18(weights=None)
    report = decompose(model, 2, layer_ranks={"layer1.0.conv1": 5, "layer1.0.conv2": 0}, skip=["conv1"], **FAST)
    ranks = {layer.name: layer.rank for layer in report.layers}
    assert ranks["layer1.0.conv1"] == 5 and ranks["layer2.0.conv1"] == 2
    assert "layer1.0.conv2" not in ranks and "conv1" not in ranks
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.layer1[0].conv2, nn.Conv2d)
    assert model.layer1[0].conv1.rank == 5


def test_report_contents():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 6, (3, 1)))
    report = decompose(model, 2, progress=False)
    first, second = report.layers
    assert first.name == "0" and first.shape == (4, 3, 3, 3) and first.rank == 2
    assert second.shape == (6, 4, 3, 1)
    assert 0 <= first.nmse <= first.max_nmse <= 1 and first.seconds >= 0 and first.iterations >= 1
    table = report.table()
    assert "mean NMSE" in table and "4×3×3×3" in table


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=2, layer_ranks={"nope": 2}), "no module named 'nope'"),
    (dict(rank=2, skip=["2"]), "not a decomposable convolution"),
    (dict(rank=2, layer_ranks={"0": -1}), r"layer_ranks\['0'\] must be an integer >= 0"),
])
def test_bad_arguments(kwargs, match):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    with pytest.raises(NortonError, match=match):
        decompose(model, progress=False, **kwargs)
    assert isinstance(model[0], nn.Conv2d)  # nothing was changed


def test_an_interrupted_decomposition_leaves_the_model_as_it_was(monkeypatch):
    from norton.compression import decomposition

    calls = []
    real = decomposition.cp_als

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # two shapes are already fitted
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    model = torchvision.models.resnet18(weights=None)
    before = eligible_convs(model)
    monkeypatch.setattr(decomposition, "cp_als", interrupted)
    with pytest.raises(KeyboardInterrupt):
        decompose(model, 2, **FAST)
    assert len(calls) == 3 and count(model, CPDBlock) == 0 and eligible_convs(model) == before


@pytest.mark.parametrize("c,n,kernel,stride,rank", [(3, 16, 3, 1, 4), (16, 32, 3, 2, 2), (8, 8, (3, 5), (2, 1), 3)])
def test_cost_ratio_is_the_counted_macs_ratio(c, n, kernel, stride, rank):
    from norton.compression.decomposition import cost_ratio
    from norton.core import count_macs

    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    conv = nn.Conv2d(c, n, kernel, stride=stride, padding=(kh // 2, kw // 2))
    block = CPDBlock.like_conv(conv, rank)
    x = torch.zeros(1, c, 24, 24)
    assert cost_ratio(conv, rank) == pytest.approx(count_macs(block, x) / count_macs(conv, x), rel=0.05)


def test_only_cheaper_keeps_costlier_layers_dense_and_says_so():
    from norton import create_model

    model = create_model("resnet_20")  # a 3-channel stem: rank 4 costs 1.33× its MACs
    report = decompose(model, 4, only_cheaper=True, **FAST)
    assert type(model.conv1) is nn.Conv2d and "conv1" in report.skipped and "1.33×" in report.skipped["conv1"]
    # the strided convs too: their 1×1 conv (C -> R·N) runs at the unstrided resolution
    assert set(report.skipped) == {"conv1", "layer2.0.conv1", "layer3.0.conv1"}
    assert all(layer.cost_ratio < 1 for layer in report.layers) and len(report.layers) == 16
    assert "kept dense" in report.table()
    plain = create_model("resnet_20")
    table = decompose(plain, 4, **FAST).table()  # the paper's way: every conv, the costlier one flagged
    assert isinstance(plain.conv1, CPDBlock) and "costlier than the conv" in table
