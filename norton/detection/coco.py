"""COCO-format data for the three detection tasks, and COCO evaluation.

Images without annotations are left out of training; batches group images of
similar aspect ratio (torchvision's bins); horizontal flips swap keypoints
left/right by name.  Predictions are converted back to COCO ids and scored
with pycocotools' ``COCOeval`` (bbox; segm for Mask R-CNN; keypoints for
Keypoint R-CNN).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from norton.errors import NortonError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


# -- data -------------------------------------------------------------------------------------
def _fail(ann_file: str, message: str) -> NortonError:
    return NortonError(f"annotation file {ann_file!r}: {message}")


def _check_annotations(data: Any, ann_file: str, task: str) -> None:
    """Clear errors for what would otherwise fail deep inside pycocotools or training."""
    if not isinstance(data, dict):
        raise _fail(ann_file, f"expected a JSON object with images/annotations/categories, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise _fail(ann_file, f"missing list {key!r} (COCO format: images, annotations, categories)")
    image_ids = set()
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not {"id", "file_name"} <= image.keys():
            raise _fail(ann_file, f"images[{i}] needs 'id' and 'file_name', got {image!r:.120}")
        image_ids.add(image["id"])
    categories = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not {"id", "name"} <= cat.keys():
            raise _fail(ann_file, f"categories[{i}] needs 'id' and 'name', got {cat!r:.120}")
        categories[cat["id"]] = cat
    if not categories:
        raise _fail(ann_file, "no categories")
    num_keypoints = None
    if task == "keypoints":
        with_keypoints = [c for c in categories.values() if c.get("keypoints")]
        if not with_keypoints:
            raise _fail(ann_file, "Keypoint R-CNN needs a category with a 'keypoints' list (person_keypoints format)")
        num_keypoints = len(with_keypoints[0]["keypoints"])
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}] (id {ann.get('id') if isinstance(ann, dict) else '?'})"
        if not isinstance(ann, dict):
            raise _fail(ann_file, f"{where} is not an object")
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in ann:
                raise _fail(ann_file, f"{where} has no {key!r}")
        if ann["image_id"] not in image_ids:
            raise _fail(ann_file, f"{where} refers to image_id {ann['image_id']!r}, which is not in 'images'")
        if ann["category_id"] not in categories:
            raise _fail(ann_file, f"{where} has category_id {ann['category_id']!r}; categories are {sorted(categories)}")
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
                and box[2] >= 0 and box[3] >= 0):
            raise _fail(ann_file, f"{where} has bbox {box!r}; expected [x, y, width, height] with width, height >= 0")
        if task == "segm" and not ann.get("iscrowd") and not (isinstance(ann.get("segmentation"), (list, dict)) and ann["segmentation"]):
            raise _fail(ann_file, f"{where} has no 'segmentation' (polygons or RLE), which Mask R-CNN needs")
        if task == "keypoints" and "keypoints" in ann:
            kp = ann["keypoints"]
            if not (isinstance(kp, list) and len(kp) == 3 * num_keypoints):
                raise _fail(ann_file, f"{where} has {len(kp) if isinstance(kp, list) else kp!r} keypoint values; "
                                      f"expected 3 × {num_keypoints} (x, y, visibility)")


class CocoData(torch.utils.data.Dataset):
    """A COCO-format dataset for one of the three tasks.  Labels are contiguous
    (1..C in the order of ``categories``; 0 is background); ``category_ids``
    maps them back for COCOeval."""

    def __init__(self, images_dir: str, ann_file: str, task: str, *, train: bool) -> None:
        if task not in ("bbox", "segm", "keypoints"):
            raise NortonError(f"task must be bbox, segm or keypoints, got {task!r}")
        if not os.path.isdir(images_dir):
            raise NortonError(f"image directory {images_dir!r} does not exist")
        if not os.path.isfile(ann_file):
            raise NortonError(f"annotation file {ann_file!r} does not exist")
        try:
            with open(ann_file) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _fail(ann_file, f"not valid JSON ({err})") from None
        _check_annotations(data, ann_file, task)
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self.images_dir, self.ann_file, self.task, self.train = images_dir, ann_file, task, train
        categories = data["categories"]
        if task == "keypoints":
            categories = [c for c in categories if c.get("keypoints")]
            self.keypoint_names = list(categories[0]["keypoints"])
            self.skeleton = [(a - 1, b - 1) for a, b in categories[0].get("skeleton", [])]
        else:
            self.keypoint_names, self.skeleton = [], []
        self.category_ids = [c["id"] for c in categories]
        self.class_names = ["background"] + [c["name"] for c in categories]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        ids = sorted(self.coco.imgs)
        if train:  # as torchvision's recipe: images with no usable annotation do not train
            ids = [i for i in ids if self._annotations(i)]
            if not ids:
                raise _fail(ann_file, "no image has a usable annotation to train on")
        missing = [self.coco.imgs[i]["file_name"] for i in ids
                   if not os.path.isfile(os.path.join(images_dir, self.coco.imgs[i]["file_name"]))]
        if missing:
            raise NortonError(f"{len(missing)} image(s) of {ann_file!r} are missing from {images_dir!r}, "
                              f"e.g. {missing[0]!r}")
        self.ids = ids
        self.flip_index = _flip_index(self.keypoint_names)

    def _annotations(self, image_id: int) -> list[dict]:
        out = []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd") or ann["category_id"] not in self.label_of:
                continue
            if ann["bbox"][2] < 1 or ann["bbox"][3] < 1:
                continue
            if self.task == "keypoints" and not any(v > 0 for v in ann.get("keypoints", [])[2::3]):
                continue
            out.append(ann)
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratio(self, index: int) -> float:
        info = self.coco.imgs[self.ids[index]]
        return float(info.get("width", 1)) / float(info.get("height", 1))

    def load_image(self, index: int) -> Tensor:
        from torchvision.io import ImageReadMode, decode_image

        path = os.path.join(self.images_dir, self.coco.imgs[self.ids[index]]["file_name"])
        try:
            image = decode_image(path, mode=ImageReadMode.RGB)
        except RuntimeError as err:
            raise NortonError(f"cannot read image {path!r}: {err}") from None
        return image.float() / 255.0

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image_id = self.ids[index]
        image = self.load_image(index)
        height, width = image.shape[-2:]
        anns = self._annotations(image_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        target = {"boxes": boxes, "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
                  "image_id": torch.tensor(image_id)}
        if self.task == "segm":
            masks = [self.coco.annToMask(a) for a in anns]
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width, dtype=torch.uint8)
        if self.task == "keypoints":
            k = len(self.keypoint_names)
            target["keypoints"] = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(-1, k, 3)
        return image, target


def _flip_index(names: list[str]) -> list[int]:
    """Keypoint order after a horizontal flip: left_* ↔ right_*."""
    index = list(range(len(names)))
    position = {n: i for i, n in enumerate(names)}
    for i, name in enumerate(names):
        for a, b in (("left", "right"), ("right", "left")):
            if a in name and name.replace(a, b) in position:
                index[i] = position[name.replace(a, b)]
    return index


def hflip(image: Tensor, target: dict[str, Tensor], flip_index: list[int]) -> tuple[Tensor, dict[str, Tensor]]:
    width = image.shape[-1]
    target = dict(target)
    image = image.flip(-1)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        kp = target["keypoints"][:, flip_index].clone()
        kp[..., 0] = torch.where(kp[..., 2] > 0, width - kp[..., 0], kp[..., 0])
        target["keypoints"] = kp
    return image, target


def aspect_ratio_groups(data: CocoData, bins_per_side: int = 3) -> list[int]:
    """torchvision's quantisation: aspect ratios binned at 2^linspace(-1, 1, 2k + 1)."""
    edges = (2 ** np.linspace(-1, 1, 2 * bins_per_side + 1)).tolist()
    return [int(np.digitize(data.aspect_ratio(i), edges)) for i in range(len(data))]


def grouped_batches(groups: list[int], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """All batches of one epoch: a seeded shuffle, each batch from one aspect-ratio
    group (an epoch's leftovers per group form the last, smaller batches)."""
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    buffers: dict[int, list[int]] = {}
    batches = []
    for index in order:
        buffer = buffers.setdefault(groups[index], [])
        buffer.append(index)
        if len(buffer) == batch_size:
            batches.append(buffer[:])
            buffer.clear()
    batches.extend(b for _, b in sorted(buffers.items()) if b)
    return batches



# -- evaluation -------------------------------------------------------------------------------
STAT_NAMES = {
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
    "segm": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
    "keypoints": ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"],
}


def to_coco(output: dict[str, Tensor], image_id: int, data: CocoData) -> list[dict]:
    from pycocotools import mask as mask_util

    boxes = output["boxes"].detach().cpu()
    xywh = boxes.clone()
    xywh[:, 2:] -= xywh[:, :2]
    results = []
    for i in range(boxes.shape[0]):
        label = int(output["labels"][i])
        if not 1 <= label <= len(data.category_ids):
            continue
        r = {"image_id": image_id, "category_id": data.category_ids[label - 1],
             "bbox": [round(float(v), 2) for v in xywh[i]], "score": float(output["scores"][i])}
        if "masks" in output:
            binary = (output["masks"][i, 0] > 0.5).cpu().numpy().astype(np.uint8)
            rle = mask_util.encode(np.asfortranarray(binary))
            rle["counts"] = rle["counts"].decode("ascii")
            r["segmentation"] = rle
        if "keypoints" in output:
            r["keypoints"] = [round(float(v), 2) for v in output["keypoints"][i].detach().cpu().flatten()]
        results.append(r)
    return results


def coco_stats(data: CocoData, results: list[dict], iou_type: str) -> dict[str, float]:
    from pycocotools.cocoeval import COCOeval

    names = STAT_NAMES[iou_type]
    if not results:  # pycocotools cannot load an empty result list: nothing detected scores 0
        return {**dict.fromkeys(names, 0.0), "detections": 0}
    with contextlib.redirect_stdout(io.StringIO()):
        detections = data.coco.loadRes(results)
        evaluator = COCOeval(data.coco, detections, iou_type)
        evaluator.params.imgIds = list(data.ids)
        if iou_type == "keypoints":
            import copy

            k = len(data.keypoint_names)
            evaluator.params.kpt_oks_sigmas = (copy.copy(evaluator.params.kpt_oks_sigmas) if k == 17
                                               else np.full(k, 0.05))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: max(float(v), 0.0) for name, v in zip(names, evaluator.stats)}  # -1 (no ground truth) → 0
    stats["detections"] = len(results)
    return stats


def stats_table(stats: dict[str, dict[str, float]]) -> str:
    """The seed's table: AP, AP50, AP75, AR1, AR10, AR100 (keypoints: AP, AP50, AP75, AR, AR50, AR75), in %."""
    rows = ["| | AP | AP50 | AP75 | AR1 | AR10 | AR100 |", "|---|---|---|---|---|---|---|"]
    for iou_type, s in stats.items():
        if iou_type == "keypoints":
            rows.append("| keypoints (AP, AP50, AP75, AR, AR50, AR75) | " + " | ".join(
                f"{100 * s[k]:.1f}" for k in ("AP", "AP50", "AP75", "AR", "AR50", "AR75")) + " |")
        else:
            label = {"bbox": "box", "segm": "mask"}[iou_type]
            rows.append(f"| {label} | " + " | ".join(f"{100 * s[k]:.1f}" for k in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100")) + " |")
    return "\n".join(rows)

