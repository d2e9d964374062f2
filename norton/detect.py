"""Detection on COCO-format data: training, COCO evaluation and drawing.

Follows torchvision's detection recipe: images without annotations are left
out of training, batches group images of similar aspect ratio, random
horizontal flip (keypoints swap left/right), SGD with a linear warm-up and a
multi-step schedule (26 epochs, steps at 16 and 22 by default, scaled with
``epochs``), lr 0.02 per 16 images.  Runs are resumable: ``last.pt`` is
written atomically every ``checkpoint_every`` iterations and at each epoch's
end with the exact position in the (seeded) batch order; ``--resume`` goes on
from there.  Evaluation uses pycocotools' ``COCOeval`` (bbox; segm for Mask
R-CNN; keypoints for Keypoint R-CNN).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from norton.checkpoint import atomic_write_text, save_checkpoint
from norton.errors import NortonError
from norton.train import Distributed, restore_training

TASKS = {"fasterrcnn_resnet50_fpn": "bbox", "maskrcnn_resnet50_fpn": "segm", "keypointrcnn_resnet50_fpn": "keypoints"}
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


# -- training ---------------------------------------------------------------------------------
@dataclass
class DetectTrainConfig:
    """torchvision's detection recipe; ``lr`` is for 16 images per step and is
    scaled linearly with the global batch."""

    epochs: int = 26
    batch_size: int = 2  # per process
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_steps: list[int] = field(default_factory=lambda: [16, 22])  # for 26 epochs; scaled with epochs
    lr_gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 1e-3
    flip: float = 0.5
    seed: int = 0
    checkpoint_every: int = 500
    max_iters: int | None = None  # stop after this many iterations (smoke tests)

    def validate(self) -> None:
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs must be an integer >= 1"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch size must be an integer >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number"),
            (all(isinstance(s, int) and s >= 1 for s in self.lr_steps), "lr steps must be epochs >= 1"),
            (0 <= self.flip <= 1, "flip probability must be in [0, 1]"),
            (isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.max_iters is None or self.max_iters >= 1, "max_iters must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise NortonError(f"{message}; got {asdict(self)}")

    def milestones(self) -> list[int]:
        """The lr steps in epochs, scaled from the 26-epoch schedule."""
        if self.epochs == 26:
            return list(self.lr_steps)
        return sorted({max(1, round(s * self.epochs / 26)) for s in self.lr_steps})


def _lr_factor(config: DetectTrainConfig, epoch: int, iteration: int) -> float:
    factor = config.lr_gamma ** sum(epoch >= m for m in config.milestones())
    if iteration < config.warmup_iters:
        alpha = iteration / config.warmup_iters
        factor *= config.warmup_factor * (1 - alpha) + alpha
    return factor


def _batch(data: CocoData, indices: list[int], config: DetectTrainConfig, epoch: int, device: torch.device):
    images, targets = [], []
    for index in indices:
        image, target = data[index]
        flip_draw = torch.rand(1, generator=torch.Generator().manual_seed(config.seed * 7_919 + epoch * 1_000_003 + index))
        if float(flip_draw) < config.flip:
            image, target = hflip(image, target, data.flip_index)
        images.append(image.to(device))
        targets.append({k: v.to(device) for k, v in target.items()})
    return images, targets


def train_detector(model: nn.Module, data: CocoData, config: DetectTrainConfig, run_dir: str, *, device: torch.device,
                   val: CocoData | None = None, resume: bool = False, overwrite: bool = False, progress: bool = True,
                   ddp: Distributed | None = None, extra: dict | None = None) -> dict[str, Any]:
    """Train a torchvision detector in place; ``run_dir`` gets last.pt, final.pt,
    metrics.jsonl (and eval.json per epoch when ``val`` is given)."""
    config.validate()
    ddp = ddp or Distributed()
    last = os.path.join(run_dir, "last.pt")
    if os.path.exists(last) and not (resume or overwrite):
        raise NortonError(f"{run_dir!r} already holds a detection run; pass --resume to continue it or --overwrite")
    if ddp.main:
        os.makedirs(run_dir, exist_ok=True)
        if overwrite and not resume:
            for name in ("last.pt", "final.pt", "metrics.jsonl"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(run_dir, name))
    ddp.barrier()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    world_batch = config.batch_size * ddp.world_size
    base_lr = config.lr * world_batch / 16
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=config.momentum, weight_decay=config.weight_decay)
    groups = aspect_ratio_groups(data)
    epoch, step, iteration = 0, 0, 0
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    info = {"categories": data.class_names, "category_ids": data.category_ids, "keypoint_names": data.keypoint_names,
            "skeleton": data.skeleton, "task": data.task, **(extra or {})}
    if resume and os.path.exists(last):
        state = restore_training(last, model, optimizer, config, run_dir)  # incl. the RNG the RPN / RoI samplers use
        epoch, step, iteration = state["epoch"], state["step"], state["iteration"]
        if ddp.main and os.path.exists(metrics_path):  # drop iterations done after the checkpoint
            with open(metrics_path) as f:
                rows = [line for line in f if line.strip() and json.loads(line)["iteration"] <= iteration]
            atomic_write_text(metrics_path, "".join(rows))
    net = nn.parallel.DistributedDataParallel(model) if ddp.world_size > 1 else model

    def save(finished: bool) -> None:
        if ddp.main:
            state = {"optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "iteration": iteration,
                     "config": asdict(config), "finished": finished, "torch_rng": torch.get_rng_state()}
            save_checkpoint(last, model, train_state=state, extra=info)

    while epoch < config.epochs and not _stopped(config, iteration):
        batches = grouped_batches(groups, world_batch, seed=config.seed, epoch=epoch)
        started, seen, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(total=len(batches), initial=step, desc=f"epoch {epoch + 1}/{config.epochs}", unit="it",
                   disable=not (progress and ddp.main), leave=False)
        net.train()
        while step < len(batches) and not _stopped(config, iteration):
            global_batch = batches[step]
            mine = global_batch[ddp.rank::ddp.world_size] or global_batch[:1]
            images, targets = _batch(data, mine, config, epoch, device)
            for g in optimizer.param_groups:
                g["lr"] = base_lr * _lr_factor(config, epoch, iteration)
            losses = net(images, targets)
            loss = sum(losses.values())
            total = ddp.sum([float(loss.detach())], device)[0] / ddp.world_size
            if not math.isfinite(total):
                raise NortonError(f"the loss became {total} at epoch {epoch + 1}, iteration {iteration + 1} "
                                  f"({ {k: float(v) for k, v in losses.items()} }); the last checkpoint in {run_dir!r} "
                                  "is untouched (try a lower learning rate)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step, iteration = step + 1, iteration + 1
            seen += len(global_batch)
            loss_sum += total
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.5f}")
            if ddp.main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"epoch": epoch + 1, "iteration": iteration, "loss": total,
                                        **{k: float(v) for k, v in losses.items()},
                                        "lr": optimizer.param_groups[0]["lr"]}) + "\n")
            if iteration % config.checkpoint_every == 0:
                save(False)
        bar.close()
        if step >= len(batches):
            epoch, step = epoch + 1, 0
            if progress and ddp.main:
                tqdm.write(f"epoch {epoch}/{config.epochs}: mean loss {loss_sum / max(steps, 1):.4f} "
                           f"({seen / max(time.perf_counter() - started, 1e-9):.1f} img/s)")
            if val is not None:
                stats = evaluate_detector(model, val, device=device, ddp=ddp, progress=progress)
                if ddp.main:
                    atomic_write_text(os.path.join(run_dir, f"eval_epoch{epoch}.json"), json.dumps(stats, indent=1))
        save(finished=epoch >= config.epochs)
    if step:  # stopped inside an epoch by max_iters
        save(finished=False)
    if ddp.main:
        save_checkpoint(os.path.join(run_dir, "final.pt"), model, extra=info,
                        metrics={"epochs_completed": epoch, "iterations": iteration})
    ddp.barrier()
    return {"epoch": epoch, "iteration": iteration}


def _stopped(config: DetectTrainConfig, iteration: int) -> bool:
    return config.max_iters is not None and iteration >= config.max_iters


# -- evaluation -------------------------------------------------------------------------------
STAT_NAMES = {
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
    "segm": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
    "keypoints": ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"],
}


def _to_coco(output: dict[str, Tensor], image_id: int, data: CocoData) -> list[dict]:
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


@torch.no_grad()
def evaluate_detector(model: nn.Module, data: CocoData, *, device: torch.device, batch_size: int = 2,
                      ddp: Distributed | None = None, progress: bool = True) -> dict[str, dict[str, float]]:
    """COCOeval of ``model`` on ``data``: {iou type: {AP, AP50, ...}} (bbox, plus
    segm or keypoints for Mask / Keypoint R-CNN).  Values in [0, 1]."""
    ddp = ddp or Distributed()
    was_training = model.training
    model.eval().to(device)
    mine = list(range(ddp.rank, len(data), ddp.world_size))
    results = []
    for start in tqdm(range(0, len(mine), batch_size), desc="evaluate", unit="batch", disable=not (progress and ddp.main),
                      leave=False):
        indices = mine[start:start + batch_size]
        images = [data.load_image(i).to(device) for i in indices]
        for index, output in zip(indices, model(images)):
            results.extend(_to_coco(output, data.ids[index], data))
    model.train(was_training)
    if ddp.world_size > 1:
        gathered = [None] * ddp.world_size
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    iou_types = ["bbox"] + ([data.task] if data.task != "bbox" else [])
    return {t: coco_stats(data, results, t) for t in iou_types}


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


# -- drawing ----------------------------------------------------------------------------------
COCO_PERSON_SKELETON = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
                        (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]


@torch.no_grad()
def draw_detections(model: nn.Module, image: Tensor, *, class_names: list[str] | None = None, score_threshold: float = 0.5,
                    skeleton: list[tuple[int, int]] | None = None, device: torch.device | None = None) -> tuple[Tensor, list[dict]]:
    """``image``: uint8 (3, H, W).  Returns the picture (uint8) with boxes, labels and
    scores, masks and keypoint skeletons drawn, and the kept detections."""
    from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

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
