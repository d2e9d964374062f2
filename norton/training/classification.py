"""Stage ③: classification training for the baseline, fine-tuning and ``compress``.

SGD with momentum, linear warm-up then cosine decay (per step), weight decay,
optional label smoothing.  The best epoch is chosen on a held-out validation
split.  Every epoch ends with an atomic checkpoint (``last.pt``) holding model,
optimizer, scheduler, epoch and best metric; all data randomness derives from
(seed, epoch), so a run killed at any point and resumed ends bit-identical to
an uninterrupted one on CPU.  Under ``torchrun`` the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU) and only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from norton.checkpoints import load_checkpoint, save_checkpoint
from norton.core import deterministic_numerics, fast_channels_last_batchnorm, plan_override, reestimate_bn, tune_plans
from norton.errors import NortonError
from norton.training.data import ArrayDataset, epoch_batches, first_images, num_batches
from norton.training.distributed import Distributed
from norton.training.engine import TrainingRun


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
    distill: float = 0.0  # weight of the distillation term (0: plain cross-entropy; needs a teacher)
    temperature: float = 4.0  # of the distillation softmaxes
    # train in the channels-last memory format (True), the standard one (False), or whichever trains faster on the
    # device ("auto": the first epoch's first steps timed each way, the choice kept for a resume); the same
    # numbers up to rounding
    channels_last: bool | str = False
    # stop once validation top-1 has not improved for this many epochs (0: train every epoch); the learning-rate
    # schedule still spans ``epochs``, so a run that stops early stops at a higher learning rate than the last epoch's
    patience: int = 0
    # before each validation, BatchNorm's statistics re-estimated on this many training images (no augmentation)
    # with the epoch's final weights ("precise BN"), instead of the running averages gathered while the weights
    # moved; 0: the running averages
    precise_bn: int = 0

    def validate(self) -> None:
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs must be an integer >= 1"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch size must be an integer >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "weight decay must be >= 0"),
            (isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0, "warm-up epochs must be an integer >= 0"),
            (0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)"),
            (0 <= self.distill <= 1, "the distillation weight must be in [0, 1]"),
            (self.temperature > 0 and math.isfinite(self.temperature), "the distillation temperature must be > 0"),
            (isinstance(self.channels_last, bool) or self.channels_last == "auto",
             "channels_last must be True, False or \"auto\""),
            (isinstance(self.patience, int) and not isinstance(self.patience, bool) and self.patience >= 0,
             "patience must be an integer >= 0 (0: no early stopping)"),
            (isinstance(self.precise_bn, int) and not isinstance(self.precise_bn, bool) and self.precise_bn >= 0,
             "precise_bn must be an integer >= 0 (training images; 0: off)"),
        ]
        for ok, message in checks:
            if not ok:
                raise NortonError(f"{message}; got {asdict(self)}")


def classification_loss(logits: Tensor, labels: Tensor, config: TrainConfig, teacher_logits: Tensor | None = None) -> Tensor:
    """Cross-entropy (with label smoothing), or with a teacher
    ``(1 − w)·CE + w·T²·KL(softmax(teacher/T) ‖ softmax(logits/T))`` (Hinton et al.;
    the T² keeps the gradient scale of the soft term independent of T)."""
    ce = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
    if teacher_logits is None or config.distill == 0:
        return ce
    t = config.temperature
    kl = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True)
    return (1.0 - config.distill) * ce + config.distill * t * t * kl


CONVERGED_WINDOW, CONVERGED_SPREAD = 3, 0.2  # the last 3 validation top-1 values within 0.2 points


def converged(val_top1: list[float], window: int = CONVERGED_WINDOW, spread: float = CONVERGED_SPREAD) -> bool:
    """Whether a validation curve has settled: its last ``window`` values lie within ``spread`` points."""
    tail = val_top1[-window:]
    return len(tail) == window and max(tail) - min(tail) <= spread


def stops_early(val_top1: list[float], patience: int) -> bool:
    """Whether training stops after the last of these epochs: none of the last ``patience`` epochs improved on
    the best before them (``patience`` 0: never)."""
    if patience <= 0 or len(val_top1) <= patience:
        return False
    return max(val_top1[-patience:]) <= max(val_top1[:-patience])


def lr_factor(step: int, total_steps: int, warmup_steps: int, warmup_start: float) -> float:
    """Multiplier of the base lr: linear warm-up from ``warmup_start``, then cosine to 0."""
    if warmup_steps and step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -- evaluation ---------------------------------------------------------------------------
# every CPDBlock evaluated in the plan a freshly loaded checkpoint runs ("auto" in eval mode: chosen from the
# layer's shape alone, never by timing), whatever plan it was set to for training or speed
EVALUATION_PLAN = "auto"


@torch.no_grad()
def evaluate(model: nn.Module, data: ArrayDataset, *, device: torch.device, batch_size: int = 500,
             ddp: Distributed | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over ``data``.

    Deterministic: every CPDBlock runs one plan (``EVALUATION_PLAN``) whatever
    plan it was set to for training or speed, and on CUDA the arithmetic is
    reproducible float32 (``deterministic_numerics``) — the accuracy a run
    records for a checkpoint is what evaluating that checkpoint gives on the
    same device."""
    ddp = ddp or Distributed()
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    plain = data.without_augmentation() if isinstance(data, ArrayDataset) else data
    with deterministic_numerics(device), plan_override(model, EVALUATION_PLAN):
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


def recalibrate_bn(model: nn.Module, data: ArrayDataset, *, device: torch.device, num_images: int = 512,
                   batch_size: int = 128, seed: int = 0) -> int:
    """Re-estimate BatchNorm running statistics on ``num_images`` training images
    (train-mode forward passes, no gradients, cumulative average).  Returns the
    number of images used; the model's mode and BN momenta are restored."""
    if num_images <= 0:
        return 0

    batches = first_images(data, num_images, batch_size, seed=seed, epoch=10_000, smallest_last=2)  # BN needs 2
    return reestimate_bn(model, (images.to(device) for images in batches))


# -- the loop ---------------------------------------------------------------------------------
@dataclass
class FitResult:
    best_epoch: int
    best_val: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: str = ""
    epochs: int = 0  # epochs run (fewer than configured when it stopped early)
    converged: bool = False  # the last 3 validation top-1 values within 0.2 points
    stopped_early: bool = False


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
    teacher: nn.Module | None = None,
) -> FitResult:
    """Train ``model`` in place; ``run_dir`` receives last.pt, best.pt, metrics.jsonl.

    With ``config.distill > 0`` the ``teacher`` (e.g. the uncompressed model; kept
    in eval mode, never updated) adds a distillation term to the loss.  With
    ``config.channels_last`` the model, the teacher and every batch are converted to
    channels-last for the run, and the model is handed back contiguous; "auto" times
    the first epoch's first steps each way (``LayoutTrial``) and keeps the faster, the
    choice recorded with the run so that a resume trains the same way.  The process's
    allocator is set up for training (``norton.tune_allocator``) unless ``NORTON_ALLOCATOR=default``."""
    config.validate()
    if config.distill > 0 and teacher is None:
        raise NortonError(f"distillation weight {config.distill} needs a teacher model (the uncompressed one); "
                          "pass teacher=... or set distill=0")
    ddp = ddp or Distributed()
    model.to(device)
    steps_per_epoch = num_batches(train_data, config.batch_size)
    clean_train = train_data.without_augmentation() if isinstance(train_data, ArrayDataset) else train_data
    total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
    run = TrainingRun(run_dir, model, _optimizer(model, config),
                      lambda step, epoch: lr_factor(step, total, warmup, config.warmup_start),
                      settings=asdict(config), resume=resume, overwrite=overwrite, ddp=ddp,
                      outputs=("last.pt", "best.pt", "metrics.jsonl"), defaults=asdict(TrainConfig()))
    start_epoch, best_epoch, best_val = 0, -1, {"top1": -1.0}
    if run.state:
        start_epoch, best_epoch, best_val = run.state["epoch"] + 1, run.state["best_epoch"], run.state["best_val"]
        if run.state.get("stopped_early"):  # a run that stopped early is finished
            start_epoch = config.epochs
    history = run.logged(lambda row: row["epoch"] <= start_epoch)
    channels_last = config.channels_last
    if channels_last == "auto":  # under DDP the standard layout: a bucketed model keeps the one it started in
        channels_last = (run.state or {}).get("channels_last", False if ddp.world_size > 1 else None)
    trial = LayoutTrial(device) if channels_last is None else None
    layout = torch.channels_last if channels_last else torch.preserve_format
    model.to(memory_format=layout)
    if teacher is not None:
        teacher = teacher.to(device, memory_format=layout).eval().requires_grad_(False)
    if device.type == "cuda" and start_epoch < config.epochs:  # the CPU-fitted cost model of plan "auto" is no guide here
        tune_training_plans(model, train_data, config, device, layout)
    net = nn.parallel.DistributedDataParallel(model) if ddp.world_size > 1 else model

    # pruned widths (not multiples of 16) made PyTorch's channels-last BatchNorm the slowest part of a
    # step on the CPU: the same arithmetic in a form that vectorises (norton.core.batchnorm)
    with fast_channels_last_batchnorm(model) if device.type == "cpu" else contextlib.nullcontext():
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            net.train()
            loss_sum = correct = seen = 0.0
            bar = tqdm(epoch_batches(train_data, config.batch_size, seed=config.seed, epoch=epoch, shuffle=True,
                                     rank=ddp.rank, world_size=ddp.world_size),
                       total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                       disable=not (progress and ddp.main), leave=False)
            for step, (images, labels) in enumerate(bar):
                if trial is not None:
                    layout = trial.begin(step, (model, teacher))
                images, labels = images.to(device, memory_format=layout), labels.to(device)
                try:
                    logits = net(images)
                except RuntimeError as error:
                    if trial is not None and layout == torch.channels_last and "view size is not compatible" in str(error):
                        layout = trial.decide((model, teacher), refused=True)  # it cannot train channels-last
                        images = images.clone(memory_format=torch.contiguous_format)
                        logits = net(images)
                    elif channels_last and "view size is not compatible" in str(error):
                        raise NortonError("channels_last training: the model reshapes a channels-last activation with "
                                          ".view, which needs contiguous memory; use .reshape or torch.flatten there, or "
                                          f"train contiguous (channels_last=False): {error}") from error
                    else:
                        raise
                with torch.no_grad():
                    teacher_logits = teacher(images) if teacher is not None and config.distill > 0 else None
                loss = classification_loss(logits, labels, config, teacher_logits)
                if ddp.world_size > 1:  # DDP averages rank means; weigh them so the result is the global mean
                    global_n = min(config.batch_size, len(train_data) - step * config.batch_size)
                    weighted = loss * (labels.numel() * ddp.world_size / global_n)
                else:
                    weighted = loss
                batch_loss = ddp.sum([float(loss.detach()) * labels.numel(), float(labels.numel())], device)
                run.step(weighted, loss_value=batch_loss[0], epoch=epoch, where=f"epoch {epoch + 1}, step {step + 1}")
                if trial is not None and trial.end(step, (model, teacher)):
                    channels_last, layout, trial = trial.chosen == torch.channels_last, trial.batches, None
                loss_sum += batch_loss[0]
                seen += batch_loss[1]
                correct += float((logits.argmax(1) == labels).sum())
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{run.lr:.4f}", img_s=f"{seen / max(elapsed, 1e-9):.0f}")
            if trial is not None:  # an epoch shorter than the trial: what it measured decides
                trial.decide((model, teacher))
                channels_last, layout, trial = trial.chosen == torch.channels_last, trial.batches, None
            correct = ddp.sum([correct], device)[0]
            if config.precise_bn:  # every rank the same images, so the same statistics
                recalibrate_bn(model, clean_train, device=device, num_images=config.precise_bn, seed=config.seed)
            val = evaluate(model, val_data, device=device, ddp=ddp)
            record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1),
                      "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"],
                      "lr": run.lr, "seconds": time.perf_counter() - started,
                      "images_per_s": seen / max(time.perf_counter() - started, 1e-9)}
            history.append(record)
            run.log(record)
            improved = val["top1"] > best_val["top1"]
            if improved:
                best_epoch, best_val = epoch, val
            metrics = {"val": val, "epoch": epoch + 1}
            if improved and ddp.main:
                save_checkpoint(os.path.join(run_dir, "best.pt"), model, metrics=metrics, extra=extra)
            stop = stops_early([r["val_top1"] for r in history], config.patience)
            run.save(finished=epoch + 1 == config.epochs or stop, metrics=metrics, extra=extra,
                     position={"epoch": epoch, "best_epoch": best_epoch, "best_val": best_val, "stopped_early": stop,
                               "channels_last": channels_last})
            if progress and ddp.main:
                tqdm.write(f"epoch {epoch + 1}/{config.epochs}: loss {record['train_loss']:.4f}  val top-1 "
                           f"{val['top1']:.2f}%  ({record['images_per_s']:.0f} img/s)"
                           + (f"; no improvement for {config.patience} epochs: stopped" if stop else ""))
            ddp.barrier()
            if stop:
                break
    if channels_last:
        _convert((model, teacher), torch.contiguous_format)
    curve = [r["val_top1"] for r in history]
    return FitResult(best_epoch=best_epoch + 1, best_val=best_val, history=history, run_dir=run_dir,
                     epochs=len(history), converged=converged(curve),
                     stopped_early=stops_early(curve, config.patience))


class LayoutTrial:
    """The memory format a run trains in, chosen from its own first steps (``channels_last="auto"``):
    ``WARMUP + TIMED`` steps in the standard layout, as many channels-last, then the layout of the faster
    timed step for the rest of the run.  Every step trains; none is spent on timing alone.  Which wins
    depends on the widths and the image size: on a CPU convolution's backward pass is faster channels-last
    and batch norm slower — at 64×64 a thin pruned ResNet-20 trained ~1.8× faster in the standard layout, its
    dense original ~1.3× faster channels-last."""

    WARMUP, TIMED = 1, 2

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = {torch.contiguous_format: math.inf, torch.channels_last: math.inf}
        self.phase: torch.memory_format | None = None
        self.chosen: torch.memory_format | None = None
        self.started = 0.0

    @property
    def batches(self) -> torch.memory_format:
        """How the batches are converted once the layout is chosen."""
        return torch.channels_last if self.chosen == torch.channels_last else torch.preserve_format

    def begin(self, step: int, modules) -> torch.memory_format:
        """Step ``step`` of the run's first epoch starts: the layout it runs in (``modules`` converted to it)."""
        phase = torch.contiguous_format if step < self.WARMUP + self.TIMED else torch.channels_last
        if phase != self.phase:
            self.phase = phase
            _convert(modules, phase)
        self._synchronize()
        self.started = time.perf_counter()
        return phase

    def end(self, step: int, modules) -> bool:
        """Step ``step`` has ended; True once the layout is chosen (``modules`` converted to it)."""
        if self.chosen is not None:
            return True
        self._synchronize()
        if step % (self.WARMUP + self.TIMED) >= self.WARMUP:
            self.seconds[self.phase] = min(self.seconds[self.phase], time.perf_counter() - self.started)
        if step + 1 == 2 * (self.WARMUP + self.TIMED):
            self.decide(modules)
        return self.chosen is not None

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def decide(self, modules, refused: bool = False) -> torch.memory_format:
        """Choose the faster layout measured (channels-last never where it was ``refused``); returns it."""
        if refused:
            self.seconds[torch.channels_last] = math.inf
        self.chosen = min(self.seconds, key=self.seconds.get)  # a tie (nothing timed): the standard layout
        _convert(modules, self.chosen)
        return self.chosen


def _convert(modules, layout: torch.memory_format) -> None:
    """``modules`` (None skipped) in ``layout``.  To the standard layout every 4-D tensor is copied with
    standard strides: ``.to(memory_format=torch.contiguous_format)`` keeps a one-input-channel kernel's
    channels-last strides (``is_contiguous`` ignores a size-1 dimension), and convolution would go on
    producing channels-last activations from it."""
    for module in modules:
        if module is None:
            pass
        elif layout == torch.contiguous_format:
            module._apply(lambda t: t.clone(memory_format=torch.contiguous_format) if t.dim() == 4 else t)
        else:
            module.to(memory_format=layout)


def tune_training_plans(model: nn.Module, train_data: ArrayDataset, config: TrainConfig, device: torch.device,
                        layout: torch.memory_format) -> dict[str, str]:
    """Every CPDBlock whose plan is "auto" set to the plan that trains fastest
    on ``device`` (forward + backward timed on a batch of the run's size and
    layout); plans the user set stay.  Returns {layer: plan} of those tuned."""
    auto = [m for m in model.modules() if isinstance(m, CPDBlock) and m.plan == "auto"]
    if not auto:
        return {}
    images, _ = next(iter(epoch_batches(train_data, config.batch_size, seed=config.seed, epoch=0, shuffle=False)))
    keep = {m: m.plan for m in model.modules() if isinstance(m, CPDBlock) and m not in set(auto)}
    chosen = tune_plans(model, images.to(device, memory_format=layout), training=True)
    for block, plan in keep.items():
        block.plan = plan
    return chosen


def load_best(model: nn.Module, run_dir: str) -> None:
    """Load the weights of the best validation epoch of a finished run."""
    ckpt = load_checkpoint(os.path.join(run_dir, "best.pt"))
    model.load_state_dict(ckpt["state_dict"])
