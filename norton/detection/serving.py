"""Deployed models where they are served.

A detector is deployed for a device and number format through its backbone +
FPN (where nearly all of its MACs are), by ``norton.deploy`` on the batch the
detector's transform makes of the example images; the heads run as they are, in
float32.  ``save_deployed`` / ``load_deployed`` keep a deployment in a norton
checkpoint — the model's tensors and the forms chosen for each layer, no
pickled module — and rebuild it without timing anything again."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from norton.checkpoints import load_model, save_checkpoint
from norton.deployment import DeployReport, deploy
from norton.detection.builders import is_detector
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
                    repeats: int = 3, timer=None, **recorded) -> tuple[nn.Module, DeployReport]:
    """An inference copy of a torchvision two-stage detector whose backbone + FPN
    is deployed (``norton.deploy``) for ``device`` and ``dtype`` on the batch
    that ``images`` make (``recorded``: ``layer_forms`` and ``memory_format``
    of an earlier deployment, as ``norton.deploy`` takes them); the model is
    not changed."""
    if not isinstance(images, (list, tuple)) or not images or not all(isinstance(i, Tensor) and i.dim() == 3 for i in images):
        raise NortonError("a detector is deployed on a list of (3, H, W) image tensors")
    batch = backbone_batch(model, list(images))
    backbone, report = deploy(model.backbone, batch, device=device, dtype=dtype, cuda_graph=cuda_graph,
                              repeats=repeats, timer=timer, **recorded)
    # copied with the deployed backbone in place of the original one (which is not copied for nothing)
    wrapped = Float32Outputs(backbone, model.backbone.out_channels)
    deployed = copy.deepcopy(model, {id(model.backbone): wrapped}).eval().to(torch.device(report.device))
    return deployed, report


def save_deployed(path: str, model: nn.Module, report: DeployReport, *, batch: int, image_size: int | None = None,
                  input_size: list[int] | None = None, extra: dict | None = None) -> None:
    """A norton checkpoint of ``model`` (as it was before deployment) with how ``report`` deployed it: the
    device, the dtype, the memory format and every factored layer's form (``input_size``: one sample's shape, for a
    classifier deployed at another size than its own; ``image_size``: a detector's image side)."""
    record = {"device": report.device, "dtype": report.dtype, "layer_forms": report.layers,
              "memory_format": "channels_last" if report.channels_last else "contiguous", "batch": batch,
              "image_size": image_size, "report": report.to_dict(), **(extra or {})}
    save_checkpoint(path, model, input_size=input_size, extra={"stage": "deployed", "deployment": record})


def load_deployed(path: str, *, device=None, cuda_graph: bool = False) -> tuple[nn.Module, DeployReport]:
    """The model ``save_deployed`` (``norton deploy --out``) wrote, deployed again with the recorded forms on
    ``device`` (default: the one it was deployed for) — the file holds only tensors and plain values."""
    model, checkpoint = load_model(path)
    record = (checkpoint.get("extra") or {}).get("deployment")
    if not isinstance(record, dict):
        raise NortonError(f"{path!r} holds no deployment; `norton deploy --out FILE` writes one")
    options = dict(device=device or record["device"], dtype=record["dtype"], cuda_graph=cuda_graph,
                   layer_forms=record["layer_forms"], memory_format=record["memory_format"])
    model.eval()
    if is_detector(model):
        size = record["image_size"]
        model.transform.min_size, model.transform.max_size = (size,), size
        return deploy_detector(model, [torch.zeros(3, size, size) for _ in range(record["batch"])], **options)
    return deploy(model, torch.zeros(record["batch"], *model.default_input_size), **options)
