"""BatchNorm statistics re-estimated on calibration images."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as the
    cumulative average over ``batches`` (train-mode forward passes, no
    gradients).  Returns the number of images seen; the model's mode and the
    BN momenta are restored."""
    norms = batchnorms(model)
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    seen = 0
    try:
        for images in batches:
            model(images)
            seen += images.shape[0]
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return seen


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode except that every BatchNorm normalises with
    the statistics of the batch it sees (its running statistics are neither
    used nor updated).  On a large calibration batch this is what re-estimating
    the statistics on that batch and then evaluating gives, in one pass.  Every
    module's mode is restored on exit (set directly: the planner enters this
    once per probe, and ``Module.train``'s recursion would cost more than a
    small probe)."""
    modules = list(model.modules())
    modes = [m.training for m in modules]
    norms = batchnorms(model)
    for m in modules:
        object.__setattr__(m, "training", False)
    try:
        for m in norms:
            object.__setattr__(m, "training", True)
            m.track_running_stats = False
        yield model
    finally:
        for m in norms:
            m.track_running_stats = True
        for m, mode in zip(modules, modes):
            object.__setattr__(m, "training", mode)
