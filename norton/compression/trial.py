"""A brief distillation of a candidate plan before its damage is measured.

Damage measured right after pruning (and the least-squares refit) says how far
a compressed model starts from the uncompressed one, not how far fine-tuning
can bring it back: an uneven plan that starts closer can end further away.
``distill_trial`` gives a candidate a few SGD steps of distillation from the
uncompressed model on calibration images — no labels needed — so that the
planner compares candidates by where a little training takes them; the damage
is then measured on calibration images the trial did not train on.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from norton.core.surgery import flatten_tensors

TRIAL_BATCH = 64
TRIAL_LR = 0.01
TRIAL_MOMENTUM = 0.9


def split_calibration(batches: Sequence[Tensor], seed: int) -> tuple[Tensor, list[Tensor]]:
    """Calibration images split in two halves, at random: (images to train on,
    held-out batches to measure on).  Needs at least two images."""
    images = torch.cat(list(batches))
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed)).to(images.device)
    half = images.shape[0] // 2
    held_out = images[order[half:]]
    return images[order[:half]], [held_out[i:i + 256] for i in range(0, held_out.shape[0], 256)]


def _divergence(got: Sequence[Tensor], want: Sequence[Tensor]) -> Tensor:
    """KL(teacher ‖ student) for logits, relative squared error for other outputs."""
    loss = got[0].new_zeros(())
    for g, w in zip(got, want):
        if w.dim() == 2:
            loss = loss + F.kl_div(F.log_softmax(g, 1), F.log_softmax(w, 1), log_target=True, reduction="batchmean")
        else:
            loss = loss + ((g - w) ** 2).sum() / (w ** 2).sum().clamp_min(1e-12)
    return loss


def distill_trial(model: nn.Module, teacher: nn.Module, images: Tensor, steps: int, *, seed: int = 0,
                  batch_size: int = TRIAL_BATCH, lr: float = TRIAL_LR) -> list[float]:
    """``steps`` SGD steps (momentum, no weight decay) of ``model`` toward the
    outputs of ``teacher`` (in eval mode) on random batches of ``images``, in
    place; returns the loss of every step.  Deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=TRIAL_MOMENTUM)
    was_training, teacher_training = model.training, teacher.training
    model.train()
    teacher.eval()
    losses = []
    try:
        for _ in range(steps):
            index = torch.randint(images.shape[0], (min(batch_size, images.shape[0]),), generator=generator)
            x = images[index.to(images.device)]
            with torch.no_grad():
                want = [t.detach() for t in flatten_tensors(teacher(x))]
            loss = _divergence(flatten_tensors(model(x)), want)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
        teacher.train(teacher_training)
    return losses
