"""Faster / Mask / Keypoint R-CNN (torchvision's classes) on a NORTON ResNet-50 body.

The body is the zoo ``resnet_50`` at any rank and compress rate; the FPN reads
its four stages at their compressed widths.  As in torchvision's detection
recipe every BatchNorm of the body becomes a ``FrozenBatchNorm2d`` (statistics
kept from the body's weights; training at batch 2 would ruin them) and only the
last ``trainable_backbone_layers`` stages train.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, KeypointRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from norton.checkpoints import (
    load_state_dict_strict,
    model_from_checkpoint,
    read_checkpoint,
    state_dict_of,
)
from norton.core import count_macs, count_params
from norton.errors import NortonError
from norton.models import create_model, register_model


@dataclass(frozen=True)
class Detector:
    """One detector norton builds: torchvision's class and its COCOeval task."""

    cls: type[nn.Module]
    task: str  # "bbox", "segm" or "keypoints"


DETECTORS = {
    "fasterrcnn_resnet50_fpn": Detector(FasterRCNN, "bbox"),
    "maskrcnn_resnet50_fpn": Detector(MaskRCNN, "segm"),
    "keypointrcnn_resnet50_fpn": Detector(KeypointRCNN, "keypoints"),
}
STAGES = ["conv1", "layer1", "layer2", "layer3", "layer4"]


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` by a FrozenBatchNorm2d with its statistics."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def _body(rank: int, compress_rate, backbone_ckpt: str | None) -> nn.Module:
    if backbone_ckpt is None:
        return create_model("resnet_50", rank=rank, compress_rate=compress_rate)
    kind, obj = read_checkpoint(backbone_ckpt)
    if kind == "norton":
        arch = (obj["architecture"].get("base") or {}).get("arch")
        if arch != "resnet_50":
            raise NortonError(f"backbone checkpoint {backbone_ckpt!r} holds a {arch}, not a resnet_50")
        return model_from_checkpoint(obj, f"backbone checkpoint {backbone_ckpt!r}")
    body = create_model("resnet_50", rank=rank, compress_rate=compress_rate)  # e.g. torchvision weights at rank 0
    source = f"backbone checkpoint {backbone_ckpt!r}"
    load_state_dict_strict(body, state_dict_of(obj, source), source)
    return body


def _detector(name: str, *, rank: int, compress_rate, num_classes: int, backbone_ckpt: str | None,
              trainable_backbone_layers: int, **kwargs) -> nn.Module:
    if not 0 <= trainable_backbone_layers <= 5:
        raise NortonError(f"trainable_backbone_layers must be in 0..5, got {trainable_backbone_layers!r}")
    body = freeze_batchnorm(_body(rank, compress_rate, backbone_ckpt))
    trainable = STAGES[::-1][:trainable_backbone_layers]
    for pname, parameter in body.named_parameters():
        if not any(pname.startswith(stage) for stage in trainable):
            parameter.requires_grad_(False)
    widths = [getattr(body, f"layer{i}")[-1].conv3.out_channels for i in range(1, 5)]
    backbone = BackboneWithFPN(body, return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
                               in_channels_list=widths, out_channels=256, extra_blocks=LastLevelMaxPool())
    model = DETECTORS[name].cls(backbone, num_classes=num_classes, **kwargs)
    model.default_input_size = (3, 800, 800)
    return model


@register_model
def fasterrcnn_resnet50_fpn(*, rank: int = 0, compress_rate=None, num_classes: int = 91, backbone_ckpt: str | None = None,
                            trainable_backbone_layers: int = 3, **kwargs) -> nn.Module:
    """Faster R-CNN + FPN on a NORTON ResNet-50 (``compress_rate``: resnet_50's 20 entries)."""
    return _detector("fasterrcnn_resnet50_fpn", rank=rank, compress_rate=compress_rate, num_classes=num_classes,
                     backbone_ckpt=backbone_ckpt, trainable_backbone_layers=trainable_backbone_layers, **kwargs)


@register_model
def maskrcnn_resnet50_fpn(*, rank: int = 0, compress_rate=None, num_classes: int = 91, backbone_ckpt: str | None = None,
                          trainable_backbone_layers: int = 3, **kwargs) -> nn.Module:
    """Mask R-CNN + FPN on a NORTON ResNet-50."""
    return _detector("maskrcnn_resnet50_fpn", rank=rank, compress_rate=compress_rate, num_classes=num_classes,
                     backbone_ckpt=backbone_ckpt, trainable_backbone_layers=trainable_backbone_layers, **kwargs)


@register_model
def keypointrcnn_resnet50_fpn(*, rank: int = 0, compress_rate=None, num_classes: int = 2, backbone_ckpt: str | None = None,
                              trainable_backbone_layers: int = 3, num_keypoints: int = 17, **kwargs) -> nn.Module:
    """Keypoint R-CNN + FPN on a NORTON ResNet-50 (person + 17 COCO keypoints by default)."""
    return _detector("keypointrcnn_resnet50_fpn", rank=rank, compress_rate=compress_rate, num_classes=num_classes,
                     backbone_ckpt=backbone_ckpt, trainable_backbone_layers=trainable_backbone_layers,
                     num_keypoints=num_keypoints, **kwargs)


def is_detector(model: nn.Module) -> bool:
    """A torchvision two-stage detector (Faster / Mask / Keypoint R-CNN)."""
    return isinstance(model, GeneralizedRCNN)


@torch.no_grad()
def detector_complexity(model: nn.Module, size: int = 800) -> dict[str, int]:
    """MACs of backbone + FPN on one ``size``×``size`` image (deterministic), MACs of
    the whole model on that image with the number of RoIs its heads saw, and params."""
    was_training = model.training
    sizes = (model.transform.min_size, model.transform.max_size)
    model.transform.min_size, model.transform.max_size = (size,), size  # the network sees size × size
    model.eval()
    rois: dict[str, int] = {}

    def count_rois(module, args, out) -> None:
        rois.setdefault("box", out.shape[0])

    hook = model.roi_heads.box_roi_pool.register_forward_hook(count_rois)
    try:
        batch, _ = model.transform([torch.zeros(3, size, size)])
        backbone = count_macs(model.backbone, batch.tensors)
        torch.manual_seed(0)
        whole = count_macs(model, [torch.rand(3, size, size)])
    finally:
        hook.remove()
        model.train(was_training)
        model.transform.min_size, model.transform.max_size = sizes
    return {"backbone_fpn_macs": backbone, "whole_model_macs": whole, "box_rois": rois.get("box", 0),
            "params": count_params(model), "input": [3, batch.tensors.shape[-2], batch.tensors.shape[-1]]}
