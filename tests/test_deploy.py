import warnings

import pytest
import torch
import torchvision
from torch import nn

from norton import CPDBlock, NortonError, create_model, decompose
from norton.cli import main
from norton.core import time_plans, tune_plans
from norton.deployment import deploy, fold_batchnorm


def build(arch, rank, rate=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model(arch, rank=rank, compress_rate=rate).eval()
    with torch.no_grad():  # non-trivial BatchNorms, so that folding is really tested
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


@pytest.mark.parametrize("arch,rank,rate", [
    ("resnet_20", 2, "[0.]+[0.25]*11"),
    ("vgg_16_bn", 1, "[0.6]*6+[0.8]*7"),
    ("densenet_40", 4, "[0.]+[0.5]*38"),
])
def test_deployed_model_computes_the_same(arch, rank, rate):
    model = build(arch, rank, rate)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    deployed, report = deploy(model, x)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(deployed(torch.randn(7, 3, 32, 32)).shape, torch.Size([7, 10]))
    assert set(report.layers.values()) <= {"conv", "separable", "depthwise", "dense"}
    assert len(report.layers) == sum(isinstance(m, CPDBlock) for m in model.modules())
    if arch != "densenet_40":  # pre-activation BatchNorms precede their conv: nothing to fold
        assert report.folded_batchnorms > 0
    assert "max |output difference|" in report.table()
    assert any(isinstance(m, CPDBlock) for m in model.modules())  # the original is untouched


def test_folding_into_a_cpd_block():
    block = CPDBlock(4, 6, 2, 3, padding=1)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.normal_(), bn.bias.normal_()
    model = nn.Sequential(block, bn, nn.ReLU()).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = model(x)
        folded, count = fold_batchnorm(model)
        torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)
    assert count == 1 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_batchnorm_with_two_users_is_not_folded():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output is used twice

    folded, count = fold_batchnorm(Fork().eval())
    assert count == 0


def test_untraceable_models_still_deploy():
    detector = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    body = detector.backbone.body.eval()
    decompose(body, 1, n_iter_max=2, progress=False)

    class Wrapped(nn.Module):  # returns a dict, with data-dependent control flow
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            out = self.body(x)
            if x.sum() > float("inf"):
                return out["0"]
            return out["3"]

    deployed, report = deploy(Wrapped(body), torch.randn(1, 3, 64, 64))
    assert report.fold_error is not None and len(report.layers) == 17


def test_tune_plans_for_training_and_timing_cache():
    model = build("resnet_20", 2)
    x = torch.randn(8, 3, 32, 32)
    chosen = tune_plans(model, x, training=True)
    assert len(chosen) == 19 and set(chosen.values()) <= {"separable", "depthwise", "dense"}
    block = model.layer2[0].conv1
    first = time_plans(block, torch.randn(8, 16, 32, 32))
    assert time_plans(block, torch.randn(8, 16, 32, 32)) is first  # cached per shape


def test_deploy_rejects_bad_memory_format():
    with pytest.raises(NortonError, match="memory_format must be"):
        deploy(build("resnet_20", 1), torch.randn(1, 3, 32, 32), memory_format="nhwc")


def test_export_and_benchmark_cli(tmp_path, capsys):
    import onnxruntime as ort

    from norton.checkpoints import save_checkpoint
    from norton.compression import prune

    model = build("resnet_20", 2)
    prune(model, "[0.]+[0.25]*11", example_inputs=torch.randn(1, 3, 32, 32))
    save_checkpoint(tmp_path / "m.pt", model)
    assert main(["export", "--ckpt", str(tmp_path / "m.pt"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "onnx checker passed" in out and "max |difference|" in out
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]  # dynamic batch
    assert abs(got - expected).max() < 1e-3

    assert main(["benchmark", "--ckpt", str(tmp_path / "m.pt"), "--batch-size", "4", "--repeats", "3", "--onnx", "--json"]) == 0
    import json

    record = json.loads(capsys.readouterr().out)
    assert set(record["results"]) == {"baseline (eager)", "baseline (deployed)", "compressed (eager)",
                                      "compressed (deployed)", "compressed (ONNX Runtime)", "baseline (ONNX Runtime)"}
    assert record["results"]["baseline (eager)"]["speedup_vs_baseline"] == 1.0
    assert all(r["median_ms"] > 0 and r["images_per_s"] > 0 for r in record["results"].values())


@pytest.mark.parametrize("plan", ["separable", "depthwise", "dense"])
def test_every_plan_exports_to_onnx(plan, tmp_path):
    """deploy picks a plan by timing, so export must work whichever it picked."""
    from norton.deployment import export_onnx

    block = CPDBlock.from_conv(nn.Conv2d(8, 16, 3, padding=1), 2).eval().set_plan(plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch's note on the TorchScript exporter norton uses
        result = export_onnx(nn.Sequential(block), torch.randn(1, 8, 8, 8), str(tmp_path / "m.onnx"))
    assert result.max_abs_diff < 1e-4
