"""Latency measured side by side: warm-up, repeated timed runs, median and spread."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Latency:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    def __str__(self) -> str:
        return f"{self.median_ms:.1f} ms (p10 {self.p10_ms:.1f}, p90 {self.p90_ms:.1f}, {self.runs} runs)"


def _sync(example) -> None:
    tensor = example[0] if isinstance(example, (list, tuple)) else example
    if tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)


@torch.no_grad()
def compare_latency(models: dict[str, nn.Module], example, *, warmup: int = 3, repeats: int = 15) -> dict[str, Latency]:
    """Latency of each model on ``example``, runs interleaved round-robin so that
    machine noise hits every model alike; ratios are what to quote."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            model(example)
    _sync(example)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(example)
            _sync(example)
            times[name].append(1000.0 * (time.perf_counter() - start))
    out = {}
    for name, values in times.items():
        q = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
        out[name] = Latency(statistics.median(values), q[0], q[-1], len(values))
    return out
