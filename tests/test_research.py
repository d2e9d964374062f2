import json
import os

import pytest
import torch
from conftest import REFERENCE_DIR

from norton import NortonError, create_model
from norton.checkpoints import (
    convert_research_state_dict,
    load_research_checkpoint,
    parse_research_name,
)
from norton.cli import main

KEYS = json.load(open(os.path.join(REFERENCE_DIR, "research_keys.json")))


def research_state_dict(arch, rank, rate):
    """A state dict with exactly the published checkpoint's keys, shapes and dtypes."""
    torch.manual_seed(0)
    ours = create_model(arch, rank=rank, compress_rate=rate).state_dict()
    out = {}
    for name, shape, dtype in KEYS[f"{arch}|{rank}|{rate}"]:
        ours_name = name
        for stage in ("pointwise", "vertical", "horizontal"):
            ours_name = ours_name.replace(f".feature.{stage}.weight", f".{stage}")
        out[name] = torch.randn(shape).to(getattr(torch, dtype.split(".")[1])) if ours[ours_name].is_floating_point() \
            else torch.zeros(shape, dtype=torch.int64)
    return out


def test_file_name_parsing():
    named = parse_research_name("/x/vgg_16_bn_[0.6]*6+[0.8]*7_1_90.32.pt")
    assert (named.arch, named.compress_rate, named.rank, named.top1) == ("vgg_16_bn", "[0.6]*6+[0.8]*7", 1, 90.32)
    named = parse_research_name("resnet_56_[0.]+[0.18]*29_1_93.1.pt")
    assert (named.arch, named.compress_rate, named.rank) == ("resnet_56", "[0.]+[0.18]*29", 1)
    assert parse_research_name("model.pt") is None


@pytest.mark.parametrize("key", list(KEYS))
def test_published_checkpoints_load_from_their_name(key, tmp_path):
    arch, rank, rate = key.split("|")
    sd = research_state_dict(arch, int(rank), rate)
    path = tmp_path / f"{arch}_{rate}_{rank}_91.00.pt"
    torch.save({"state_dict": sd}, path)
    model, named = load_research_checkpoint(str(path))
    assert named.top1 == 91.0
    converted = convert_research_state_dict(sd)
    for name, value in model.state_dict().items():
        assert torch.equal(value, converted[name])


def test_wrong_rank_names_the_key(tmp_path):
    sd = research_state_dict("resnet_56", 1, "[0.]+[0.18]*29")
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(NortonError, match=r"key 'conv1.pointwise' has shape \(16, 3, 1, 1\), the model expects \(32, 3, 1, 1\).*look like rank 1"):
        load_research_checkpoint(str(path), arch="resnet_56", rank=2, compress_rate="[0.]+[0.18]*29")
    with pytest.raises(NortonError, match="give --arch, -r and -cpr"):
        load_research_checkpoint(str(path))


def test_evaluate_a_research_checkpoint_on_cifar10(tmp_path, capsys):
    from conftest import write_cifar10

    write_cifar10(tmp_path / "data")
    sd = research_state_dict("resnet_56", 1, "[0.]+[0.18]*29")
    path = tmp_path / "resnet_56_[0.]+[0.18]*29_1_93.00.pt"
    torch.save({"state_dict": sd, "rank": 1}, path)
    assert main(["evaluate", "--ckpt", str(path), "--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["images"] == 20 and 0 <= record["top1"] <= 100
