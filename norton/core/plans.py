"""Execution plans of CPDBlocks, timed on the input each block really sees.

``tune_plans`` times every plan of every CPDBlock (forward, or forward +
backward for training) and keeps the fastest; timings are cached per layer
shape, input shape, dtype and device.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from norton.core.cpd_block import PLANS, CPDBlock
from norton.core.surgery import as_args

FACTORED_PLANS = tuple(plan for plan in PLANS if plan != "auto")  # every plan a block can be set to and timed in
_TIMING_CACHE: dict[tuple, dict[str, float]] = {}


def block_inputs(model: nn.Module, example_inputs, types: tuple[type, ...] = (CPDBlock,)) -> dict[str, Tensor]:
    """The input each CPDBlock (or each module of ``types``) receives on ``example_inputs``."""
    seen: dict[str, Tensor] = {}
    names = {m: n for n, m in model.named_modules()}

    def record(module: nn.Module, args: tuple) -> None:
        seen.setdefault(names[module], args[0].detach())

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, types)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*as_args(example_inputs))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


def synchronize(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def time_call(fn, x: Tensor, repeats: int) -> float:
    """Best of ``repeats`` wall-clock seconds of ``fn()`` after one warm-up call."""
    fn()  # warm-up (also lets oneDNN pick its kernels)
    synchronize(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(x)
        best = min(best, time.perf_counter() - start)
    return best


def _signature(block: CPDBlock, x: Tensor, training: bool, extra: str = "") -> tuple:
    return (block.in_channels, block.out_channels, block.rank, block.kernel_size, block.stride, block.padding,
            block.dilation, block.bias is not None, tuple(x.shape), x.dtype, str(x.device),
            x.is_contiguous(memory_format=torch.channels_last), training, extra)


def time_plans(block: CPDBlock, x: Tensor, *, training: bool = False, repeats: int = 3,
               with_conv: bool = False, timer=None) -> dict[str, float]:
    """Seconds per call of each plan on ``x`` (forward, or forward + backward when
    ``training``); ``with_conv`` adds a plain ``nn.Conv2d`` (inference only).
    ``timer(fn, x, repeats)``: seconds per call of ``fn`` (default ``time_call``;
    only its timings are cached, per layer shape, input shape, dtype and device)."""
    key = _signature(block, x, training, "conv" if with_conv else "")
    cached = timer is None or timer is time_call
    timer = timer or time_call
    if cached and key in _TIMING_CACHE:
        return _TIMING_CACHE[key]
    saved = block.plan
    times = {}
    try:
        for plan in FACTORED_PLANS:
            block.set_plan(plan)
            if training:
                inp = x.clone().requires_grad_(True)

                def step():
                    block.zero_grad(set_to_none=True)
                    block(inp).sum().backward()

                times[plan] = timer(step, x, repeats)
            else:
                with torch.no_grad():
                    times[plan] = timer(lambda: block(x), x, repeats)
        if with_conv and not training:
            conv = block.to_conv().eval()
            with torch.no_grad():
                times["conv"] = timer(lambda: conv(x), x, repeats)
    finally:
        block.plan = saved
    if cached:
        _TIMING_CACHE[key] = times
    return times


def tune_plans(model: nn.Module, example_inputs, *, training: bool = False, repeats: int = 3) -> dict[str, str]:
    """Set every CPDBlock to its fastest plan for this input; returns {layer: plan}."""
    inputs = block_inputs(model, example_inputs)
    chosen = {}
    for name, module in model.named_modules():
        if isinstance(module, CPDBlock) and name in inputs:
            times = time_plans(module, inputs[name], training=training, repeats=repeats)
            module.set_plan(min(times, key=times.get))
            chosen[name] = module.plan
    return chosen
