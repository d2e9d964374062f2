import json

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from norton import NortonError, create_model
from norton.checkpoints import save_checkpoint
from norton.cli import main

CPR = "[0.]+[0.1]*2+[0.4]*5+[0.75]*12"


@pytest.mark.parametrize("name,keys", [
    ("fasterrcnn_resnet50_fpn", {"boxes", "labels", "scores"}),
    ("maskrcnn_resnet50_fpn", {"boxes", "labels", "scores", "masks"}),
    ("keypointrcnn_resnet50_fpn", {"boxes", "labels", "scores", "keypoints", "keypoints_scores"}),
])
def test_detectors_on_a_compressed_body(name, keys):
    model = create_model(name, rank=1, compress_rate=CPR, min_size=160, max_size=200).eval()
    body = model.backbone.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    widths = [getattr(body, f"layer{i}")[-1].conv3.out_channels for i in range(1, 5)]
    assert widths == [230, 460, 614, 2048]  # int(256·0.9), int(512·0.9), int(1024·0.6), 2048
    assert [b[0].in_channels for b in model.backbone.fpn.inner_blocks] == widths
    # trainable_backbone_layers=3: layer2..4 train, the stem and layer1 are frozen
    assert not any(p.requires_grad for n, p in body.named_parameters() if n.startswith(("conv1", "layer1")))
    assert all(p.requires_grad for n, p in body.named_parameters() if n.startswith("layer4"))
    with torch.no_grad():
        out = model([torch.rand(3, 150, 180)])
    assert set(out[0]) == keys


def test_a_training_step_runs():
    model = create_model("maskrcnn_resnet50_fpn", rank=1, compress_rate=CPR, num_classes=3, min_size=128, max_size=160).train()
    masks = torch.zeros(1, 120, 140, dtype=torch.uint8)
    masks[0, 20:60, 30:90] = 1
    target = {"boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0]]), "labels": torch.tensor([1]), "masks": masks}
    losses = model([torch.rand(3, 120, 140)], [target])
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and set(losses) >= {"loss_classifier", "loss_box_reg", "loss_mask"}


def test_uncompressed_faster_rcnn_has_the_papers_parameter_count():
    ours = create_model("fasterrcnn_resnet50_fpn")
    assert sum(p.numel() for p in ours.parameters()) == 41_755_286  # 41.8M; frozen BatchNorms hold buffers only
    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    bn_params = sum(p.numel() for m in reference.backbone.body.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert sum(p.numel() for p in reference.parameters()) - bn_params == 41_755_286


def test_backbone_from_a_norton_checkpoint(tmp_path):
    body = create_model("resnet_50", rank=1, compress_rate=CPR)
    with torch.no_grad():
        body.layer2[0].bn1.running_mean.fill_(0.5)
    save_checkpoint(tmp_path / "r50.pt", body)
    model = create_model("fasterrcnn_resnet50_fpn", backbone_ckpt=str(tmp_path / "r50.pt"))
    assert torch.equal(model.backbone.body.layer2[0].bn1.running_mean, torch.full((76,), 0.5))
    torch.testing.assert_close(model.backbone.body.layer3[1].conv2.pointwise, body.layer3[1].conv2.pointwise)


def test_backbone_from_torchvision_weights_and_wrong_checkpoints(tmp_path):
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "tv.pt")
    create_model("fasterrcnn_resnet50_fpn", backbone_ckpt=str(tmp_path / "tv.pt"))
    save_checkpoint(tmp_path / "r20.pt", create_model("resnet_20"))
    with pytest.raises(NortonError, match="holds a resnet_20, not a resnet_50"):
        create_model("fasterrcnn_resnet50_fpn", backbone_ckpt=str(tmp_path / "r20.pt"))
    with pytest.raises(NortonError, match="trainable_backbone_layers must be in 0..5"):
        create_model("fasterrcnn_resnet50_fpn", trainable_backbone_layers=7)


def test_detector_complexity_cli(capsys):
    args = ["complexity", "--arch", "fasterrcnn_resnet50_fpn", "-r", "1", "-cpr", CPR, "--input-size", "320", "--json"]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["macs"] < record["baseline_macs"] < record["baseline_whole_model_macs"]
    assert record["params"] < record["baseline_params"] == 41_755_286
    assert record["box_rois"] > 0 and record["input_size"] == [3, 320, 320]


def test_benchmark_times_a_detector_at_batch_8_unless_told():
    """``norton benchmark``'s serving batch is 128 images for a classifier and 8 for a detector: 128 images of
    800×800 through Faster R-CNN were killed for memory on a 24 GiB machine."""
    from norton.cli import build_parser
    from norton.cli.deployment import benchmark_batches

    assert build_parser().parse_args(["benchmark", "--arch", "fasterrcnn_resnet50_fpn"]).batch_size is None
    assert benchmark_batches(detector=True) == (1, 8) and benchmark_batches(detector=False) == (1, 128)
    assert build_parser().parse_args(["benchmark", "--arch", "resnet_20", "--batch-size", "4"]).batch_size == (4,)


def test_detector_benchmark_cli(capsys):
    args = ["benchmark", "--arch", "fasterrcnn_resnet50_fpn", "-r", "1", "-cpr", CPR, "--input-size", "224",
            "--repeats", "2", "--batch-size", "1,2", "--json"]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["image"] == [3, 224, 224] and set(record["results"]) == set(record["backbone"]) == {"1", "2"}
    for batch in ("1", "2"):  # the dense detector deployed the same way is the 1.00× row, whole and backbone + FPN
        rows, backbone = record["results"][batch], record["backbone"][batch]
        assert set(rows) == {"dense (deployed)", "compressed (deployed)"}
        assert set(backbone) == {"dense backbone + FPN", "compressed backbone + FPN"}
        assert rows["dense (deployed)"]["speedup_vs_dense_deployed"] == 1.0
        assert backbone["dense backbone + FPN"]["speedup_vs_dense_deployed"] == 1.0
        assert all(r["images_per_s"] > 0 for r in [*rows.values(), *backbone.values()])
