"""A detector deployed for a device and number format: its backbone + FPN
(where nearly all of its MACs are) deployed by ``norton.deploy`` on the batch
the detector's transform makes of the example images; the heads run as they are,
in float32."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from norton.deployment import DeployReport, deploy
from norton.errors import NortonError


class Float32Outputs(nn.Module):
    """The wrapped backbone, its feature maps handed on in float32 (the heads' dtype)."""

    def __init__(self, backbone: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.backbone, self.out_channels = backbone, out_channels

    def forward(self, x: Tensor):
        return {k: v.float() for k, v in self.backbone(x).items()}


def backbone_batch(model: nn.Module, images: list[Tensor]) -> Tensor:
    """The padded image batch the detector's backbone receives for ``images``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.transform(images)[0].tensors
    finally:
        model.train(was_training)


def deploy_detector(model: nn.Module, images: list[Tensor], *, device=None, dtype=None, cuda_graph: bool = False,
                    repeats: int = 3, timer=None) -> tuple[nn.Module, DeployReport]:
    """An inference copy of a torchvision two-stage detector whose backbone + FPN
    is deployed (``norton.deploy``) for ``device`` and ``dtype`` on the batch
    that ``images`` make; the model is not changed."""
    if not isinstance(images, (list, tuple)) or not images or not all(isinstance(i, Tensor) and i.dim() == 3 for i in images):
        raise NortonError("a detector is deployed on a list of (3, H, W) image tensors")
    batch = backbone_batch(model, list(images))
    backbone, report = deploy(model.backbone, batch, device=device, dtype=dtype, cuda_graph=cuda_graph,
                              repeats=repeats, timer=timer)
    # copied with the deployed backbone in place of the original one (which is not copied for nothing)
    wrapped = Float32Outputs(backbone, model.backbone.out_channels)
    deployed = copy.deepcopy(model, {id(model.backbone): wrapped}).eval().to(torch.device(report.device))
    return deployed, report
