"""Stage ③: one training loop for the baseline, fine-tuning and ``compress``.

SGD with momentum, linear warm-up then cosine decay (per step), weight decay,
optional label smoothing.  The best epoch is chosen on a held-out validation
split.  Every epoch ends with an atomic checkpoint (``last.pt``) holding model,
optimizer, scheduler, epoch and best metric; all data randomness derives from
(seed, epoch), so a run killed at any point and resumed ends bit-identical to
an uninterrupted one on CPU.  Under ``torchrun`` the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU) and only rank 0 writes.
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
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from norton.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from norton.data import ArrayDataset, epoch_batches, num_batches
from norton.errors import NortonError


@dataclass
class TrainConfig:
    """Defaults are the published CIFAR recipe (SPEC §3)."""

    epochs: int = 400
    batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 5
    warmup_start: float = 0.01  # the warm-up starts at lr × this
    label_smoothing: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs must be an integer >= 1"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch size must be an integer >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "weight decay must be >= 0"),
            (isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0, "warm-up epochs must be an integer >= 0"),
            (0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise NortonError(f"{message}; got {asdict(self)}")


def lr_factor(step: int, total_steps: int, warmup_steps: int, warmup_start: float) -> float:
    """Multiplier of the base lr: linear warm-up from ``warmup_start``, then cosine to 0."""
    if warmup_steps and step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -- distributed ---------------------------------------------------------------------------
@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def resolve_device(name: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; ``None`` means cuda when available."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NortonError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NortonError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise NortonError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and "LOCAL_RANK" in os.environ and device.index is None:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


# -- evaluation ---------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, data: ArrayDataset, *, device: torch.device, batch_size: int = 500,
             ddp: Distributed | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over ``data``."""
    ddp = ddp or Distributed()
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    plain = data.without_augmentation() if isinstance(data, ArrayDataset) else data
    for images, labels in epoch_batches(plain, batch_size, seed=0, epoch=0, shuffle=False,
                                        rank=ddp.rank, world_size=ddp.world_size):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += float((top[:, 0] == labels).sum())
        correct5 += float((top == labels[:, None]).any(dim=1).sum())
        count += labels.numel()
    model.train(was_training)
    correct1, correct5, loss_sum, count = ddp.sum([correct1, correct5, loss_sum, count], device)
    if count == 0:
        raise NortonError("cannot evaluate on an empty dataset")
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "loss": loss_sum / count, "images": int(count)}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: ArrayDataset, *, device: torch.device, num_images: int = 512,
                   batch_size: int = 128, seed: int = 0) -> int:
    """Re-estimate BatchNorm running statistics on ``num_images`` training images
    (train-mode forward passes, no gradients, cumulative average).  Returns the
    number of images used; the model's mode and BN momenta are restored."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or num_images <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    used = 0
    try:
        for images, _ in epoch_batches(data, batch_size, seed=seed, epoch=10_000, shuffle=True):
            if used >= num_images:
                break
            images = images[: num_images - used]
            if images.shape[0] < 2 and used:
                break
            model(images.to(device))
            used += images.shape[0]
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return used


# -- the loop ---------------------------------------------------------------------------------
@dataclass
class FitResult:
    best_epoch: int
    best_val: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: str = ""


def _prepare_run_dir(run_dir: str, resume: bool, overwrite: bool, ddp: Distributed) -> str | None:
    """Path of the checkpoint to resume from, or None for a fresh run."""
    last = os.path.join(run_dir, "last.pt")
    if resume and overwrite:
        raise NortonError("give --resume or --overwrite, not both")
    if os.path.exists(last):
        if resume:
            return last
        if not overwrite:
            finished = False
            try:
                finished = bool(load_checkpoint(last)["train_state"].get("finished"))
            except NortonError:
                pass
            state = "a finished run" if finished else "an unfinished run"
            raise NortonError(f"run directory {run_dir!r} already holds {state}; pass --resume to continue it or --overwrite to start again")
        if ddp.main:
            for name in ("last.pt", "best.pt", "metrics.jsonl"):
                path = os.path.join(run_dir, name)
                if os.path.exists(path):
                    os.remove(path)
    elif resume:
        raise NortonError(f"nothing to resume: {last!r} does not exist")
    ddp.barrier()
    if ddp.main:
        os.makedirs(run_dir, exist_ok=True)
    ddp.barrier()
    return None


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def fit(
    model: nn.Module,
    train_data: ArrayDataset,
    val_data: ArrayDataset,
    config: TrainConfig,
    run_dir: str,
    *,
    device: torch.device,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    ddp: Distributed | None = None,
) -> FitResult:
    """Train ``model`` in place; ``run_dir`` receives last.pt, best.pt, metrics.jsonl."""
    config.validate()
    ddp = ddp or Distributed()
    resume_from = _prepare_run_dir(run_dir, resume, overwrite, ddp)
    model.to(device)
    optimizer = _optimizer(model, config)
    steps_per_epoch = num_batches(train_data, config.batch_size)
    total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, config.warmup_start))
    start_epoch, best_epoch, best_val, history = 0, -1, {"top1": -1.0}, []
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if resume_from:
        state = restore_training(resume_from, model, optimizer, config, run_dir)
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_epoch, best_val = state["epoch"] + 1, state["best_epoch"], state["best_val"]
        history = _read_history(metrics_path, before_epoch=start_epoch)
        if ddp.main:
            _write_history(metrics_path, history)
    net = nn.parallel.DistributedDataParallel(model) if ddp.world_size > 1 else model

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        net.train()
        loss_sum = correct = seen = 0.0
        bar = tqdm(epoch_batches(train_data, config.batch_size, seed=config.seed, epoch=epoch, shuffle=True,
                                 rank=ddp.rank, world_size=ddp.world_size),
                   total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                   disable=not (progress and ddp.main), leave=False)
        for step, (images, labels) in enumerate(bar):
            images, labels = images.to(device), labels.to(device)
            logits = net(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            if ddp.world_size > 1:  # DDP averages rank means; weigh them so the result is the global mean
                global_n = min(config.batch_size, len(train_data) - step * config.batch_size)
                (loss * (labels.numel() * ddp.world_size / global_n)).backward()
            else:
                loss.backward()
            batch_loss = ddp.sum([float(loss.detach()) * labels.numel(), float(labels.numel())], device)
            if not math.isfinite(batch_loss[0]):
                raise NortonError(
                    f"the loss became {batch_loss[0]} at epoch {epoch + 1}, step {step + 1}; training stopped, "
                    f"the last good checkpoint in {run_dir!r} is untouched (try a lower learning rate)"
                )
            optimizer.step()
            scheduler.step()
            loss_sum += batch_loss[0]
            seen += batch_loss[1]
            correct += float((logits.argmax(1) == labels).sum())
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{scheduler.get_last_lr()[0]:.4f}",
                            img_s=f"{seen / max(elapsed, 1e-9):.0f}")
        correct = ddp.sum([correct], device)[0]
        val = evaluate(model, val_data, device=device, ddp=ddp)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1),
                  "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"],
                  "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - started,
                  "images_per_s": seen / max(time.perf_counter() - started, 1e-9)}
        history.append(record)
        improved = val["top1"] > best_val["top1"]
        if improved:
            best_epoch, best_val = epoch, val
        if ddp.main:
            _write_history(metrics_path, history)
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                     "best_epoch": best_epoch, "best_val": best_val, "config": asdict(config),
                     "torch_rng": torch.get_rng_state(), "finished": epoch + 1 == config.epochs}
            metrics = {"val": val, "epoch": epoch + 1}
            if improved:
                save_checkpoint(os.path.join(run_dir, "best.pt"), model, metrics=metrics, extra=extra)
            save_checkpoint(os.path.join(run_dir, "last.pt"), model, metrics=metrics, train_state=state, extra=extra)
            if progress:
                tqdm.write(f"epoch {epoch + 1}/{config.epochs}: loss {record['train_loss']:.4f}  val top-1 "
                           f"{val['top1']:.2f}%  ({record['images_per_s']:.0f} img/s)")
        ddp.barrier()
    return FitResult(best_epoch=best_epoch + 1, best_val=best_val, history=history, run_dir=run_dir)


def restore_training(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, config, run_dir: str) -> dict[str, Any]:
    """Load weights, optimizer and RNG state of a run's checkpoint; returns its train_state.
    A run only resumes with the settings it was started with."""
    ckpt = load_checkpoint(path)
    state = ckpt["train_state"]
    if state.get("config") != asdict(config):
        raise NortonError(f"cannot resume {run_dir!r} with different settings: it was started with {state.get('config')}")
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state


def load_best(model: nn.Module, run_dir: str) -> None:
    """Load the weights of the best validation epoch of a finished run."""
    ckpt = load_checkpoint(os.path.join(run_dir, "best.pt"))
    model.load_state_dict(ckpt["state_dict"])


def _read_history(path: str, before_epoch: int) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["epoch"] <= before_epoch]


def _write_history(path: str, history: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in history))

