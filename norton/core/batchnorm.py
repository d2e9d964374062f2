"""BatchNorm statistics re-estimated on calibration images, and a faster
channels-last BatchNorm for training on the CPU."""
from __future__ import annotations

import math
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


# -- channels-last BatchNorm on the CPU ---------------------------------------------------------
# PyTorch's CPU kernel for a channels-last BatchNorm with batch statistics runs at a fraction of its
# speed when the channel count is not a multiple of the vector width: forward + backward of
# 128×10×64×64 took 63.0 ms against 14.6 ms contiguous (20 channels at 32×32: 17.4 against 6.1 ms),
# while 16, 32 and 64 channels ran as fast as contiguous (benchmarks/train_batchnorm.py, deploy
# guide).  Pruned widths are rarely multiples of 16, so a pruned ResNet-20 trained slower
# channels-last than contiguous although its convolutions ran faster channels-last
# (benchmarks/train_layout.py --gray64).  The same arithmetic written as reductions
# and fused multiply-adds over the channels-last memory seen as a matrix whose rows hold several
# pixels' channels (a width that vectorises) runs at about the contiguous kernel's speed.
FAST_BN_LANES = 16  # channel counts that are a multiple of this keep PyTorch's kernel
FAST_BN_ROW = 256  # the matrix's rows hold at least this many values (several pixels' channels)


def _rows(channels: int, pixels: int) -> int:
    """How many pixels' channels one row of the matrix view holds: a multiple of ``FAST_BN_LANES``
    values, at least ``FAST_BN_ROW`` where ``pixels`` divides evenly, else one pixel's."""
    k = FAST_BN_LANES // math.gcd(channels, FAST_BN_LANES)
    while k * channels < FAST_BN_ROW and pixels % (2 * k) == 0:
        k *= 2
    return k if pixels % k == 0 else 1


class _ChannelsLastNorm(torch.autograd.Function):
    """Batch-statistics normalisation of a channels-last (N, C, H, W) tensor; returns the output
    (channels-last) and the batch's mean and biased variance per channel (not differentiable)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        n, c, h, w = x.shape
        pixels = n * h * w
        k = _rows(c, pixels)
        rows = x.permute(0, 2, 3, 1).reshape(pixels // k, k * c)  # a view: x is channels-last
        ones = x.new_ones(pixels // k)
        mean = torch.mv(rows.t(), ones).view(k, c).sum(0) / pixels
        centered = rows - mean.repeat(k)
        var = torch.mv((centered * centered).t(), ones).view(k, c).sum(0) / pixels
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else weight * invstd
        y = torch.empty_like(x, memory_format=torch.channels_last)
        out = y.permute(0, 2, 3, 1).view(pixels // k, k * c)
        if bias is None:
            torch.mul(centered, scale.repeat(k), out=out)
        else:
            torch.addcmul(bias.repeat(k), centered, scale.repeat(k), out=out)
        ctx.save_for_backward(centered, invstd, scale)
        ctx.shape, ctx.k, ctx.has_weight, ctx.has_bias = (n, c, h, w), k, weight is not None, bias is not None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean, _dvar):
        centered, invstd, scale = ctx.saved_tensors
        n, c, h, w = ctx.shape
        pixels, k = n * h * w, ctx.k
        grad = dy.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).view(pixels // k, k * c)
        ones = grad.new_ones(pixels // k)
        sum_dy = torch.mv(grad.t(), ones).view(k, c).sum(0)
        sum_dy_centered = torch.mv((grad * centered).t(), ones).view(k, c).sum(0)
        dx = None
        if ctx.needs_input_grad[0]:
            # dx = scale · (dy − mean(dy) − x̂ · mean(dy · x̂)), x̂ = centered · invstd
            dx = torch.empty((n, c, h, w), dtype=grad.dtype, device=grad.device, memory_format=torch.channels_last)
            out = dx.permute(0, 2, 3, 1).view(pixels // k, k * c)
            torch.addcmul((-scale * sum_dy / pixels).repeat(k), grad, scale.repeat(k), out=out)
            out.addcmul_(centered, (-scale * invstd * invstd * sum_dy_centered / pixels).repeat(k))
        dweight = sum_dy_centered * invstd if ctx.has_weight and ctx.needs_input_grad[1] else None
        dbias = sum_dy if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None


class ChannelsLastBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that normalises a channels-last CPU batch whose channel count is not a
    multiple of ``FAST_BN_LANES`` with ``_ChannelsLastNorm`` (batch statistics: training, or no
    running statistics); every other case is ``nn.BatchNorm2d``'s.  The same parameters, buffers and
    running-average updates (momentum, or the cumulative average with ``momentum=None``)."""

    def forward(self, x: Tensor) -> Tensor:
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not (batch_stats and x.dim() == 4 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and x.shape[1] % FAST_BN_LANES and x.is_contiguous(memory_format=torch.channels_last)
                and not x.is_contiguous() and x.numel() > x.shape[1]):
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        update = self.training and self.track_running_stats
        if update and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        y, mean, var = _ChannelsLastNorm.apply(x, self.weight, self.bias, self.eps)
        if update and self.running_mean is not None:
            values = x.numel() // x.shape[1]
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var * (values / (values - 1))).to(self.running_var.dtype), factor)
        return y


@contextmanager
def fast_channels_last_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """Every ``nn.BatchNorm2d`` of ``model`` (exactly that class) runs as ``ChannelsLastBatchNorm2d``
    inside the block: the same module objects, parameters and state dict; their class is restored on
    exit."""
    norms = [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    for m in norms:
        m.__class__ = ChannelsLastBatchNorm2d
    try:
        yield model
    finally:
        for m in norms:
            m.__class__ = nn.BatchNorm2d
