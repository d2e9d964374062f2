"""norton.recover: least-squares refit of the layers pruning cut."""
import copy

import pytest
import torch
from torch import nn

from norton import CPDBlock, NortonError, create_model, decompose, prune
from norton.compression import recover, recovery
from norton.core import TuckerBlock, batch_statistics, reestimate_bn, replace_module


class Linear2(nn.Module):
    """conv1 → conv2 with nothing non-linear between them: when a pruned filter of
    conv1 is a combination of kept ones, conv2 can be refitted exactly."""

    def __init__(self, conv2: nn.Conv2d):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv2 = conv2

    def forward(self, x):
        return self.conv2(self.conv1(x))


def redundant_model(conv2: nn.Conv2d) -> Linear2:
    model = Linear2(conv2)
    with torch.no_grad():  # filter 3 is a small combination of filters 0 and 1: l2 prunes it
        model.conv1.weight[3] = 0.4 * model.conv1.weight[0] + 0.3 * model.conv1.weight[1]
    return model.eval()


@pytest.mark.parametrize("conv2", [
    lambda: nn.Conv2d(4, 5, 3, padding=1),
    lambda: nn.Conv2d(4, 5, 3, stride=2, dilation=2, padding=2, padding_mode="reflect"),
    lambda: nn.Conv2d(4, 5, (3, 1), padding="same", bias=False),
    lambda: nn.Conv2d(4, 5, 2, stride=(2, 1), padding=0),
], ids=["3x3", "stride-dilation-reflect", "same", "2x2-valid"])
def test_a_redundant_filter_is_recovered_exactly(conv2):
    model = redundant_model(conv2())
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12)
    report = prune(model, keep={"conv1": 3}, example_inputs=x, criterion="l2")
    assert model.conv2.in_channels == 3 and report.groups[0].kept == [0, 1, 2]
    data = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    before = (model(data[0]) - reference(data[0])).norm() / reference(data[0]).norm()
    result = recover(model, reference, data, report, ridge=1e-9)
    (layer,) = result.layers
    assert layer.name == "conv2" and layer.inputs == (4, 3)
    assert layer.error_before > 1e-2 and layer.error_after < 1e-8
    after = (model(data[0]) - reference(data[0])).norm() / reference(data[0]).norm()
    assert before > 0.1 and after < 1e-4


def test_recovery_brings_a_pruned_resnet_closer_to_its_reference():
    torch.manual_seed(0)
    model = create_model("resnet_20", in_channels=1, num_classes=10).eval()
    data = [torch.randn(64, 1, 16, 16) for _ in range(2)]
    with torch.no_grad():  # give the BNs real statistics
        model.train()
        for x in data:
            model(x)
        model.eval()
    reference = copy.deepcopy(model)
    report = prune(model, amount=0.5, example_inputs=data[0][:2], criterion="l2")
    unrecovered = copy.deepcopy(model)
    by_layer = copy.deepcopy(model)
    result = recover(model, reference, data, report)
    # the reference's rows are gathered in one forward per batch; a budget of 0 runs it to each layer instead:
    # the same positions, the same fits, to the last bit
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recovery, "REFERENCE_BYTES", 0)
        recover(by_layer, reference, data, report)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), by_layer.state_dict().values()))
    names = [r.name for r in result.layers]
    assert names[0] == "layer1.0.conv1" and names[-1] == "fc" and len(names) == 19  # every cut layer, in run order
    assert all(r.error_after < r.error_before for r in result.layers)
    x = torch.randn(64, 1, 16, 16)
    with torch.no_grad():
        want = reference(x)
        for m in (model, unrecovered):  # BN recalibration follows pruning in norton's pipeline
            reestimate_bn(m, data)
        gap = lambda m: float((m(x) - want).norm() / want.norm())  # noqa: E731
        assert gap(model) < 0.2 * gap(unrecovered)
    assert "19 layers refitted" in result.table()


def test_cpd_blocks_refit_their_channel_factor():
    model = create_model("resnet_20", in_channels=1, num_classes=10).eval()
    decompose(model, 2, progress=False)
    reference = copy.deepcopy(model)
    data = [torch.randn(32, 1, 12, 12)]
    report = prune(model, amount=0.5, example_inputs=data[0][:2], criterion="l2")
    vertical = model.get_submodule("layer2.1.conv1").vertical.clone()
    result = recover(model, reference, data, report)
    stages = {r.name: r.stage for r in result.layers}
    assert stages["layer2.1.conv1"] == "CP channel factor" and stages["fc"] == "linear"
    block = model.get_submodule("layer2.1.conv1")
    assert isinstance(block, CPDBlock) and torch.equal(block.vertical, vertical)  # only the channel factor moves
    assert all(r.error_after < r.error_before for r in result.layers)
    assert model(data[0]).shape == (32, 10)


def test_bad_arguments_are_named_and_a_failure_leaves_the_model_alone():
    model = redundant_model(nn.Conv2d(4, 5, 3, padding=1))
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    report = prune(model, keep={"conv1": 3}, example_inputs=x, criterion="l2")
    with pytest.raises(NortonError, match="rows must be a positive integer, got 0"):
        recover(model, reference, [x], report, rows=0)
    with pytest.raises(NortonError, match="ridge must be > 0"):
        recover(model, reference, [x], report, ridge=0.0)
    with pytest.raises(NortonError, match="non-empty list of image batches"):
        recover(model, reference, [], report)
    with pytest.raises(NortonError, match=r"forward fails on a calibration batch of shape \(2, 1, 8, 8\)"):
        recover(model, reference, [torch.randn(2, 1, 8, 8)], report)
    state = copy.deepcopy(model.state_dict())

    def broken(*_):
        raise RuntimeError("boom")

    handle = reference.conv2.register_forward_pre_hook(broken)  # fails inside the refit
    with pytest.raises(RuntimeError, match="boom"):
        recover(model, reference, [x], report)
    handle.remove()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_batch_statistics_normalises_with_the_batch_and_restores_every_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU())
    model[1].running_mean.fill_(5.0)
    model.eval()
    model[2].train()  # a mixed mode must come back as it was
    x = torch.randn(8, 3, 6, 6)
    stats = [t.clone() for t in (model[1].running_mean, model[1].running_var)]
    with torch.no_grad(), batch_statistics(model):
        assert model[1].training and not model[2].training and not model.training
        got = model(x)
    y = model[0](x)
    want = torch.relu((y - y.mean((0, 2, 3), keepdim=True)) / torch.sqrt(y.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
                      * model[1].weight[:, None, None] + model[1].bias[:, None, None])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [m.training for m in model] == [False, False, True, False] and not model.training
    assert model[1].track_running_stats
    assert all(torch.equal(a, b) for a, b in zip(stats, (model[1].running_mean, model[1].running_var)))


@pytest.mark.parametrize("arch", ["resnet_20", "resnet_20 tucker2", "densenet_40", "vgg_16_bn"])
def test_stage_inputs_from_cut_points_give_the_refit_of_running_up_to_each_layer(arch, monkeypatch):
    """recover takes each stage's input from a traced forward that goes on from the last cut point before the
    stage before it (the network about once per batch); running the pruned model up to each layer instead
    (what an untraceable model gets) gives the same weights — also where a stage is a conv inside a
    Tucker-2 block."""
    torch.manual_seed(0)
    model = create_model(arch.split()[0], in_channels=1, num_classes=10).eval()
    if "tucker2" in arch:
        for name in ("layer2.1.conv2", "layer3.0.conv1", "layer3.1.conv2"):
            replace_module(model, name, TuckerBlock.from_conv(model.get_submodule(name), (8, 8)))
    data = [torch.randn(6, 1, 16, 16) for _ in range(2)]
    reference = copy.deepcopy(model)
    report = prune(model, target_macs=0.5, example_inputs=data[0][:1], criterion="l1")
    slow = copy.deepcopy(model)
    captured = []
    real = recovery._capture
    monkeypatch.setattr(recovery, "_capture", lambda *a: captured.append(1) or real(*a))
    fast = recover(model, reference, data, report)
    assert not captured and len(fast.layers) >= 3
    if "tucker2" in arch:
        assert any(".conv2.0" in r.name or ".conv1.0" in r.name for r in fast.layers)  # no run up to a layer: every input from the traced forward
    monkeypatch.setattr(recovery.TracedForward, "__init__", lambda self, model: (_ for _ in ()).throw(TypeError()))
    ran_up = recover(slow, reference, data, report)
    assert len(captured) == 2 * len(ran_up.layers)  # the untraceable path: one run per layer and batch
    assert [r.name for r in fast.layers] == [r.name for r in ran_up.layers]
    for (name, a), b in zip(model.state_dict().items(), slow.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(r.error_after < r.error_before for r in fast.layers)
