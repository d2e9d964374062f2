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

    assert main(["benchmark", "--ckpt", str(tmp_path / "m.pt"), "--batch-size", "1,4", "--repeats", "3", "--onnx",
                 "--eager", "--json"]) == 0
    import json

    record = json.loads(capsys.readouterr().out)
    assert set(record["results"]) == {"1", "4"} and record["dtype"] == "float32" and record["device"] == "cpu"
    for rows in record["results"].values():  # deployed against deployed: the deployed dense model is the 1.00× row
        assert set(rows) == {"dense (deployed)", "compressed (deployed)", "compressed (eager)", "dense (eager)",
                             "compressed (ONNX Runtime)", "dense (ONNX Runtime)"}
        assert rows["dense (deployed)"]["speedup_vs_dense_deployed"] == 1.0
        assert all(r["median_ms"] > 0 and r["images_per_s"] > 0 for r in rows.values())
        eager = rows["dense (deployed)"]["median_ms"] / rows["dense (eager)"]["median_ms"]
        assert rows["dense (eager)"]["speedup_vs_dense_deployed"] == pytest.approx(eager)


@pytest.mark.parametrize("plan", ["separable", "depthwise", "dense"])
def test_every_plan_exports_to_onnx(plan, tmp_path):
    """deploy picks a plan by timing, so export must work whichever it picked."""
    from norton.deployment import export_onnx

    block = CPDBlock.from_conv(nn.Conv2d(8, 16, 3, padding=1), 2).eval().set_plan(plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch's note on the TorchScript exporter norton uses
        result = export_onnx(nn.Sequential(block), torch.randn(1, 8, 8, 8), str(tmp_path / "m.onnx"))
    assert result.max_abs_diff < 1e-4


# -- deploying for a device and a number format (fake timers decide what "faster" means) --------------------
def _counting_timer(cost):
    """A timer that runs ``fn`` once and charges ``cost(counts)`` seconds, where
    ``counts`` says how many CPDBlocks, their convs and plain convs it called."""
    from torch.nn.modules.module import register_module_forward_hook

    def timer(fn, x, repeats):
        counts = {"block": 0, "conv": 0}

        def hook(module, args, out):
            if isinstance(module, CPDBlock):
                counts["block"] += 1
            elif type(module) is nn.Conv2d:
                counts["conv"] += 1

        handle = register_module_forward_hook(hook)
        try:
            fn()
        finally:
            handle.remove()
        return cost(counts)

    return timer


def test_a_layer_whose_factored_form_is_slower_is_deployed_dense():
    model = build("resnet_20", 2)
    x = torch.randn(2, 3, 32, 32)
    slow_blocks = _counting_timer(lambda c: 10.0 * c["block"] + c["conv"])  # every factored form loses
    deployed, report = deploy(model, x, timer=slow_blocks)
    assert set(report.layers.values()) == {"conv"}
    assert not any(isinstance(m, CPDBlock) for m in deployed.modules())
    assert "no factored form wins on this device" in report.table()
    assert "deployed as its dense conv" in report.table()
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), atol=1e-4, rtol=1e-4)


def test_the_whole_model_falls_back_to_its_dense_form_when_the_layer_choices_lose_together():
    model = build("resnet_20", 2)
    x = torch.randn(2, 3, 32, 32)

    def cost(c):  # a block alone is cheaper than its conv; many blocks in one network are not
        return 0.5 * c["block"] + c["conv"] if c["block"] + c["conv"] <= 1 else 5.0 * c["block"] + c["conv"]

    deployed, report = deploy(model, x, timer=_counting_timer(cost), memory_format="contiguous")
    assert report.chosen_whole == "dense form" and report.whole_ms["dense form"] < report.whole_ms["per layer"]
    assert set(report.layers.values()) == {"conv"}
    assert not any(isinstance(m, CPDBlock) for m in deployed.modules())
    # and with layer timings that add up, the per-layer choice stays
    deployed, report = deploy(model, x, timer=_counting_timer(lambda c: 0.5 * c["block"] + c["conv"]),
                              memory_format="contiguous")
    assert report.chosen_whole == "per layer" and "conv" not in report.layers.values()


def test_deploy_in_bfloat16_takes_float32_inputs():
    model = build("resnet_20", 2, "[0.]+[0.25]*11")
    x = torch.randn(4, 3, 32, 32)
    deployed, report = deploy(model, x, dtype="bf16")
    assert report.dtype == "bfloat16" and "bfloat16" in report.table()
    with torch.no_grad():
        out = deployed(torch.randn(3, 3, 32, 32))  # float32 in: cast inside
        assert out.dtype == torch.bfloat16 and out.shape == (3, 10)
        expected = model(x)
        assert float((deployed(x).float() - expected).abs().max()) <= 0.1 * float(expected.abs().max())
    assert all(p.dtype == torch.bfloat16 for p in deployed.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the original is untouched


@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype="int4"), "unknown dtype 'int4'; use float32"),
    (dict(dtype=torch.int8), "dtype torch.int8 is not supported"),
    (dict(dtype="fp16", device="cpu"), "float16 runs on a GPU"),
    (dict(device="tpu"), "device 'tpu'"),
    (dict(cuda_graph=True, device="cpu"), "cuda_graph needs a CUDA device"),
    (dict(repeats=0), "repeats must be a positive integer"),
])
def test_deploy_refuses_bad_targets(kwargs, message):
    with pytest.raises(NortonError, match=message.replace("(", r"\(").replace(")", r"\)")):
        deploy(build("resnet_20", 1), torch.randn(1, 3, 32, 32), **kwargs)


@pytest.mark.parametrize("flags,message", [
    (["--dtype", "int4"], "unknown dtype 'int4'"),
    (["--device", "cuda:7"], "cuda:7"),
    (["--device", "cpu", "--cuda-graph"], "needs a CUDA device"),
])
@pytest.mark.parametrize("command", ["benchmark", "deploy"])
def test_cli_refuses_bad_device_and_dtype_in_one_line(command, flags, message, tmp_path, capsys):
    out = tmp_path / "deployed.pt"
    args = [command, "--arch", "resnet_20", "-r", "1", *flags] + (["--out", str(out)] if command == "deploy" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_export_refuses_a_dtype_onnx_runtime_does_not_check(tmp_path, capsys):
    assert main(["export", "--arch", "resnet_20", "--dtype", "bf16", "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "ONNX export writes float32" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_deploy_cli_writes_a_safe_file_that_loads_deployed(tmp_path, capsys):
    import json

    import norton

    out = tmp_path / "deployed.pt"
    assert main(["deploy", "--arch", "vgg_16_bn", "-r", "1", "-cpr", "[0.6]*6+[0.8]*7", "--dtype", "bf16",
                 "--batch-size", "4", "--out", str(out)]) == 0
    assert "deployed for cpu, bfloat16" in capsys.readouterr().out
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(out)) == []  # tensors and plain values only
    record = json.loads((tmp_path / "deployed.deploy.json").read_text())
    assert record["dtype"] == "bfloat16" and record["batch"] == 4 and record["report"]["folded_batchnorms"] == 13
    deployed, report = norton.load_deployed(str(out))  # the recorded forms, nothing timed again
    assert report.layers == record["report"]["layers"] and report.dtype == "bfloat16"
    assert report.channels_last == record["report"]["channels_last"]
    assert all(times == {} for times in report.timings_ms.values())
    with torch.no_grad():
        y = deployed(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and y.dtype == torch.bfloat16
    assert main(["deploy", "--arch", "resnet_20", "--out", str(out)]) == 2  # never overwritten unasked
    assert "--overwrite" in capsys.readouterr().err


def test_a_recorded_deployment_must_fit_the_model(tmp_path):
    import norton
    from norton.checkpoints import save_checkpoint

    model = build("resnet_20", 2)
    x = torch.randn(2, 3, 32, 32)
    _, report = deploy(model, x, memory_format="contiguous")
    with pytest.raises(NortonError, match="give its memory_format too"):
        deploy(model, x, layer_forms=report.layers)
    wrong = dict(report.layers, **{next(iter(report.layers)): "tucker"})
    with pytest.raises(NortonError, match="it was made for another model"):
        deploy(model, x, layer_forms=wrong, memory_format="contiguous")
    save_checkpoint(tmp_path / "plain.pt", model)
    with pytest.raises(NortonError, match="holds no deployment"):
        norton.load_deployed(str(tmp_path / "plain.pt"))


def test_detector_backbone_deploys_with_its_frozen_batchnorms_folded():
    from norton.detection import deploy_detector

    detector = create_model("fasterrcnn_resnet50_fpn", rank=1,
                            compress_rate="[0.]+[0.1]*2+[0.4]*5+[0.75]*12").eval()
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    deployed, report = deploy_detector(detector, images, repeats=1)
    assert report.folded_batchnorms == 53 and report.fold_error is None
    with torch.no_grad():
        expected, got = detector(images), deployed(images)
    for want, have in zip(expected, got):
        torch.testing.assert_close(have["boxes"], want["boxes"], atol=1e-2, rtol=1e-3)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on a GPU machine)")


@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_deploy_in_every_dtype_with_a_cuda_graph(dtype):
    model = build("resnet_56", 4)
    x = torch.randn(16, 3, 32, 32, device="cuda")
    deployed, report = deploy(model, x, device="cuda", dtype=dtype, cuda_graph=True)
    assert report.cuda_graph and report.device.startswith("cuda")
    with torch.no_grad():
        first = deployed(x)
        again = deployed(x * 1.0)  # replayed from the graph: same numbers
        other = deployed(torch.randn(3, 3, 32, 32, device="cuda"))  # another shape: another graph
    torch.testing.assert_close(first, again)
    assert other.shape == (3, 10)
    with pytest.raises(NortonError, match="takes CUDA inputs"):
        deployed(torch.randn(1, 3, 32, 32))


@cuda
def test_cuda_deploy_of_a_cpu_model():
    model = build("resnet_20", 2)
    deployed, report = deploy(model, torch.randn(8, 3, 32, 32), device="cuda", dtype="bf16")
    assert next(model.parameters()).device.type == "cpu"
    with torch.no_grad():
        assert deployed(torch.randn(2, 3, 32, 32)).device.type == "cuda"  # CPU input moved in


def test_a_deployed_detector_is_saved_safely_and_loads_deployed(tmp_path):
    import norton

    out = tmp_path / "detector.pt"
    assert main(["deploy", "--arch", "fasterrcnn_resnet50_fpn", "-r", "1", "-cpr", "[0.]+[0.1]*2+[0.4]*5+[0.75]*12",
                 "--input-size", "128", "--out", str(out)]) == 0
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(out)) == []
    detector, report = norton.load_deployed(str(out))
    assert report.folded_batchnorms == 53
    with torch.no_grad():
        assert set(detector([torch.rand(3, 128, 128)])[0]) >= {"boxes", "labels", "scores"}
