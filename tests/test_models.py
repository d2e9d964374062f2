import json
import os
import warnings

import pytest
import torch
import torchvision
from conftest import REFERENCE_DIR

from norton import (
    CPDBlock,
    NortonError,
    complexity,
    create_model,
    list_models,
    register_model,
)

REFERENCE = json.load(open(os.path.join(REFERENCE_DIR, "complexity.json")))["configs"]
RESEARCH_KEYS = json.load(open(os.path.join(REFERENCE_DIR, "research_keys.json")))


def build(arch, rank, rate, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model(arch, rank=rank, compress_rate=rate, **kwargs)


@pytest.mark.parametrize("config", REFERENCE, ids=lambda c: f"{c['arch']}-r{c['rank']}-{c['compress_rate']}")
def test_reference_complexity(config):
    model = build(config["arch"], config["rank"], config["compress_rate"])
    result = complexity(model, config["input"])
    assert (result.macs, result.params) == (config["macs"], config["params"])


@pytest.mark.parametrize("key", list(RESEARCH_KEYS))
def test_layout_matches_published_checkpoints(key):
    """Every tensor of a published checkpoint has its counterpart, same shape."""
    arch, rank, rate = key.split("|")
    model = build(arch, int(rank), rate)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {}
    for name, shape, _ in RESEARCH_KEYS[key]:
        for stage in ("pointwise", "vertical", "horizontal"):
            name = name.replace(f".feature.{stage}.weight", f".{stage}")
        theirs[name] = tuple(shape)
    assert ours == theirs


CLASSIFIERS = [name for name in list_models() if "rcnn" not in name]  # detectors: tests/test_detection.py


@pytest.mark.parametrize("arch", CLASSIFIERS)
@pytest.mark.parametrize("rank", [0, 2])
def test_every_model_builds_and_runs(arch, rank):
    model = create_model(arch, rank=rank).eval()
    size = model.default_input_size
    if size[1] > 64:
        size = (size[0], 64, 64)
    out = model(torch.randn(2, *size))
    assert out.shape == (2, 100 if arch == "vgg_19_bn" else 1000 if arch == "resnet_50" else 10)
    blocks = sum(isinstance(m, CPDBlock) for m in model.modules())
    assert (blocks > 0) == (rank > 0)


def test_num_classes_and_in_channels():
    model = create_model("resnet_20", num_classes=7, in_channels=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_resnet50_loads_torchvision_weights():
    reference = torchvision.models.resnet50(weights=None).eval()
    ours = create_model("resnet_50").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(ours(x), reference(x))


def test_resnet50_rank_decomposes_only_3x3():
    model = create_model("resnet_50", rank=1)
    blocks = [n for n, m in model.named_modules() if isinstance(m, CPDBlock)]
    assert len(blocks) == 16 and all(n.endswith("conv2") for n in blocks)


def test_resnet56_option_a_shortcut_crops_to_the_middle():
    model = create_model("resnet_56", compress_rate="[0.]+[0.18]*29")
    shortcut = model.layer1[0].shortcut
    x = torch.arange(16.0).view(1, 16, 1, 1).expand(1, 16, 2, 2)
    assert shortcut(x)[0, :, 0, 0].tolist() == list(range(2, 15))  # 16 -> middle 13
    down = model.layer2[0].shortcut  # 13 -> 26 channels, stride 2
    y = down(torch.ones(1, 13, 8, 8))
    assert y.shape == (1, 26, 4, 4)
    assert y[0, :, 0, 0].tolist() == [0.0] * 6 + [1.0] * 13 + [0.0] * 7


def test_densenet_widths():
    model = create_model("densenet_40", compress_rate="[0.]+[0.08]*6+[0.09]*6+[0.08]*26")
    assert [layer.conv1.out_channels for layer in model.dense1] == [11] * 6 + [10] * 6
    assert model.trans1.conv1.in_channels == 24 + 66 + 60
    assert model.trans1.conv1.out_channels == int(150 * 0.92)


def test_unknown_architecture_lists_valid_ones():
    with pytest.raises(NortonError, match="unknown architecture 'vgg_17'.*vgg_16_bn"):
        create_model("vgg_17")


@pytest.mark.parametrize("rank", [-1, 1.5, True])
def test_bad_rank(rank):
    with pytest.raises(NortonError, match="rank must be an integer >= 0"):
        create_model("resnet_20", rank=rank)


def test_rate_that_removes_every_channel():
    with pytest.raises(NortonError, match="leaves no channel"):
        create_model("resnet_20", compress_rate="[0.99]*12")


def test_registry_rejects_duplicates():
    with pytest.raises(RuntimeError, match="already registered"):
        @register_model
        def resnet_56():  # noqa: F811
            return None


def test_none_arguments_do_not_override_defaults():
    model = create_model("vgg_19_bn", num_classes=None, rank=None)
    assert model.classifier.linear2.out_features == 100


@pytest.mark.parametrize("arch", ["torchvision/resnet18", "timm/resnet18"])
def test_library_classifiers_take_grayscale_data_and_rebuild_from_their_checkpoint(arch, tmp_path):
    from norton.checkpoints import load_model, save_checkpoint

    model = create_model(arch, num_classes=3, in_channels=1, rank=2).eval()
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 3) and model.default_input_size[0] == 1
    save_checkpoint(tmp_path / "m.pt", model)
    again, _ = load_model(tmp_path / "m.pt")
    torch.testing.assert_close(again.eval()(x), model(x))


def test_an_unknown_library_model_is_named():
    with pytest.raises(NortonError, match="timm model 'no_such_net' cannot be built"):
        create_model("timm/no_such_net")


def test_vgg_runs_at_any_input_size_and_pools_as_published_at_32():
    model = create_model("vgg_16_bn", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        published = model.classifier(torch.nn.functional.avg_pool2d(model.features(x), 2).flatten(1))
        assert torch.equal(model(x), published)
        for size in (28, 64, 96):
            assert model(torch.randn(2, 3, size, size)).shape == (2, 10)
