"""Detections drawn on an image: boxes, labels and scores, masks, keypoint skeletons."""
from __future__ import annotations

import torch
from torch import Tensor, nn

# -- drawing ----------------------------------------------------------------------------------
COCO_PERSON_SKELETON = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
                        (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]


@torch.no_grad()
def draw_detections(model: nn.Module, image: Tensor, *, class_names: list[str] | None = None, score_threshold: float = 0.5,
                    skeleton: list[tuple[int, int]] | None = None, device: torch.device | None = None) -> tuple[Tensor, list[dict]]:
    """``image``: uint8 (3, H, W).  Returns the picture (uint8) with boxes, labels and
    scores, masks and keypoint skeletons drawn, and the kept detections."""
    from torchvision.utils import (
        draw_bounding_boxes,
        draw_keypoints,
        draw_segmentation_masks,
    )

    device = device or torch.device("cpu")
    model.eval().to(device)
    output = {k: v.cpu() for k, v in model([image.float().div(255).to(device)])[0].items()}
    keep = output["scores"] >= score_threshold
    output = {k: v[keep] for k, v in output.items()}
    names = class_names or []
    labels = [f"{names[int(l)] if int(l) < len(names) else int(l)} {float(s):.2f}"
              for l, s in zip(output["labels"], output["scores"])]
    canvas = image.clone()
    if "masks" in output and len(labels):
        canvas = draw_segmentation_masks(canvas, output["masks"][:, 0] > 0.5, alpha=0.45)
    if len(labels):
        canvas = draw_bounding_boxes(canvas, output["boxes"], labels=labels, width=3,
                                     font_size=max(12, image.shape[-1] // 40))
    if "keypoints" in output and len(labels):
        canvas = draw_keypoints(canvas, output["keypoints"][..., :2], connectivity=skeleton or None, colors="yellow",
                                radius=3, width=2, visibility=output["keypoints"][..., 2] > 0)
    detections = [{"label": lab, "box": [round(float(v), 1) for v in box]} for lab, box in zip(labels, output["boxes"])]
    return canvas, detections
