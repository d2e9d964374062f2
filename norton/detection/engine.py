"""Detection training and evaluation, on the one training engine.

torchvision's detection recipe: SGD with a linear warm-up and a multi-step
schedule (26 epochs, steps at 16 and 22 by default, scaled with ``epochs``),
lr 0.02 per 16 images scaled with the global batch.  ``last.pt`` is written
every ``checkpoint_every`` iterations and at each epoch's end with the exact
position in the (seeded) batch order; ``--resume`` goes on from there.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from norton.checkpoints import atomic_write_text, save_checkpoint
from norton.detection.coco import (
    CocoData,
    aspect_ratio_groups,
    coco_stats,
    grouped_batches,
    hflip,
    to_coco,
)
from norton.errors import NortonError
from norton.training import Distributed, TrainingRun


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
    metrics.jsonl (and eval_epoch<N>.json per epoch when ``val`` is given)."""
    config.validate()
    ddp = ddp or Distributed()
    model.to(device)
    world_batch = config.batch_size * ddp.world_size
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr * world_batch / 16,
                                momentum=config.momentum, weight_decay=config.weight_decay)
    run = TrainingRun(run_dir, model, optimizer, lambda iteration, epoch: _lr_factor(config, epoch, iteration),
                      settings=asdict(config), resume=resume, overwrite=overwrite, ddp=ddp,
                      outputs=("last.pt", "final.pt", "metrics.jsonl"), kind="detection run")
    epoch, step = run.state.get("epoch", 0), run.state.get("step", 0)  # incl. the RNG the RPN / RoI samplers use
    run.logged(lambda row: row["iteration"] <= run.iteration)
    groups = aspect_ratio_groups(data)
    info = {"categories": data.class_names, "category_ids": data.category_ids, "keypoint_names": data.keypoint_names,
            "skeleton": data.skeleton, "task": data.task, **(extra or {})}
    net = nn.parallel.DistributedDataParallel(model) if ddp.world_size > 1 else model

    def save(finished: bool) -> None:
        run.save(finished=finished, position={"epoch": epoch, "step": step}, extra=info)

    while epoch < config.epochs and not _stopped(config, run.iteration):
        batches = grouped_batches(groups, world_batch, seed=config.seed, epoch=epoch)
        started, seen, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(total=len(batches), initial=step, desc=f"epoch {epoch + 1}/{config.epochs}", unit="it",
                   disable=not (progress and ddp.main), leave=False)
        net.train()
        while step < len(batches) and not _stopped(config, run.iteration):
            global_batch = batches[step]
            mine = global_batch[ddp.rank::ddp.world_size] or global_batch[:1]
            images, targets = _batch(data, mine, config, epoch, device)
            losses = net(images, targets)
            loss = sum(losses.values())
            total = ddp.sum([float(loss.detach())], device)[0] / ddp.world_size
            run.step(loss, loss_value=total, epoch=epoch,
                     where=f"epoch {epoch + 1}, iteration {run.iteration + 1} ({ {k: float(v) for k, v in losses.items()} })")
            step += 1
            seen += len(global_batch)
            loss_sum += total
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{run.lr:.5f}")
            run.log({"epoch": epoch + 1, "iteration": run.iteration, "loss": total,
                     **{k: float(v) for k, v in losses.items()}, "lr": run.lr})
            if run.iteration % config.checkpoint_every == 0:
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
                        metrics={"epochs_completed": epoch, "iterations": run.iteration})
    ddp.barrier()
    return {"epoch": epoch, "iteration": run.iteration}


def _stopped(config: DetectTrainConfig, iteration: int) -> bool:
    return config.max_iters is not None and iteration >= config.max_iters



# -- evaluation -------------------------------------------------------------------------------
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
            results.extend(to_coco(output, data.ids[index], data))
    model.train(was_training)
    if ddp.world_size > 1:
        gathered = [None] * ddp.world_size
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    iou_types = ["bbox"] + ([data.task] if data.task != "bbox" else [])
    return {t: coco_stats(data, results, t) for t in iou_types}


