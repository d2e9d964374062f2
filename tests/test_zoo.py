"""A fast subset of the torchvision zoo benchmark (benchmarks/zoo.py, `make zoo`):
one classifier per family at a small input, through norton as a user runs it —
prune 50 % (and, for some, CP rank 8 where cheaper first), deploy, ONNX."""
import importlib.util
import os

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("zoo_benchmark", os.path.join(ROOT, "benchmarks", "zoo.py"))
zoo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(zoo)

# (model, input size, modes); the full list and 224×224 input are in `make zoo` (VGG, DenseNet: tests/test_prune.py)
FAMILIES = [
    ("alexnet", 224, ("prune",)),  # its adaptive pooling exports to ONNX only when the input divides
    ("convnext_tiny", 64, ("prune",)),
    ("efficientnet_b0", 64, ("prune",)),
    ("googlenet", 64, ("prune",)),
    ("inception_v3", 96, ("prune",)),
    ("mnasnet0_5", 64, ("prune",)),
    ("mobilenet_v3_small", 64, ("decompose+prune", "prune")),
    ("regnet_y_400mf", 64, ("decompose+prune", "prune")),
    ("resnet18", 64, ("decompose+prune", "prune")),
    ("resnext50_32x4d", 64, ("prune",)),
    ("squeezenet1_1", 64, ("prune",)),
    ("vit_b_32", 224, ("prune",)),  # MLP widths; the patch embedding's stream breaks the forward: left whole
]


@pytest.mark.slow
@pytest.mark.parametrize("name,size,mode", [(n, s, m) for n, s, modes in FAMILIES for m in modes])
def test_a_classifier_of_every_family_compresses_deploys_and_exports(name, size, mode):
    row = zoo.run_one(name, mode, size)
    assert row["shape_kept"], row  # the classifier's output keeps its shape
    assert row["ok"], row  # deploy and ONNX match the compressed model (relative error ≤ zoo.TOLERANCE)
    assert row["macs_after"] <= 0.6 * row["macs_before"], row  # #15: at least 40 % fewer MACs at 50 % pruning
    assert row["groups_left_whole"] <= 1, row  # at most SqueezeNet's conv classifier, ViT's token stream
    # the pruned model computes the original with the removed channels zeroed (part of "ok"), except where a
    # cut stream passes through a LayerNorm (ConvNeXt): then it is another function, and the row says so
    faithful = row["zeroed_max_abs_diff"]
    assert isinstance(faithful, str) == (name == "convnext_tiny"), row
    assert not isinstance(faithful, str) or faithful.startswith("no zeroed equivalent: group features."), row


def test_an_onnx_export_torch_cannot_do_is_one_clear_error(tmp_path):
    """AlexNet at 64×64: its 1×1 feature map pooled to 6×6 is not an ONNX op."""
    import torch
    import torchvision

    from norton import NortonError
    from norton.deployment import export_onnx

    model = torchvision.models.alexnet(weights=None).eval()
    with pytest.raises(NortonError, match=r"cannot export this model for an example of shape \(1, 3, 64, 64\)"):
        export_onnx(model, torch.randn(1, 3, 64, 64), str(tmp_path / "m.onnx"))
    assert not os.listdir(tmp_path)
