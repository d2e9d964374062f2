"""Where a decomposed model's training step loses time against the dense one.

    .venv/bin/python benchmarks/train_overhead.py [--pairs 30]

For VGG-16-BN rank 8 and ResNet-56 rank 4 (batch 128, 32×32, every block on
the plan ``auto`` picks while training):

1. the recomposition W = Σ a⊗b⊗c of every block, forward and backward, per step:
   ``CPDBlock.dense_weight`` against the (N, C, R) @ (N, R, K) orientation it
   replaced, the two timed alternately;
2. the training step of the model as built against the dense model, in adjacent
   pairs of alternating order: the median and interquartile range of the
   per-pair ratios;
3. the same with the recomposed kernel returned in channels-last layout (which
   switches the network's activations to channels-last), against the dense
   model run contiguous and run channels-last.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from latency import build

from norton.core import CPDBlock

CASES = (("vgg_16_bn", 8), ("resnet_56", 4))


def earlier_dense_weight(block: CPDBlock) -> torch.Tensor:
    """The orientation ``dense_weight`` used before: (N, C, R) @ (N, R, K), a permuted factor."""
    a, b, c = block.factors()
    n, kh, kw = block.out_channels, *block.kernel_size
    khatri_rao = (b.unsqueeze(2) * c.unsqueeze(1)).reshape(n, kh * kw, block.rank)
    return torch.bmm(a, khatri_rao.transpose(1, 2)).reshape(n, block.in_channels, kh, kw)


def recomposition_ms(model: torch.nn.Module, pairs: int) -> dict[str, float]:
    blocks = [m for m in model.modules() if isinstance(m, CPDBlock)]
    ways = {"dense_weight": CPDBlock.dense_weight, "earlier orientation": earlier_dense_weight}
    times = {k: [] for k in ways}
    for i in range(pairs + 2):
        for name in (list(ways) if i % 2 else list(ways)[::-1]):
            start = time.perf_counter()
            torch.stack([ways[name](b).sum() for b in blocks]).sum().backward()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def step_ratio(dense: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, pairs: int,
               dense_x: torch.Tensor | None = None) -> tuple[float, float, float]:
    """Median and quartiles of (our step / dense step) over adjacent pairs of alternating order."""
    inputs = {"dense": x if dense_x is None else dense_x, "ours": x}
    models = {"dense": dense.train(), "ours": ours.train()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}

    def step(k: str) -> float:
        start = time.perf_counter()
        loss = F.cross_entropy(models[k](inputs[k]), y)
        opts[k].zero_grad()
        loss.backward()
        opts[k].step()
        return time.perf_counter() - start

    for k in models:
        step(k), step(k)
    ratios = []
    for i in range(pairs):
        order = ("dense", "ours") if i % 2 == 0 else ("ours", "dense")
        t = {k: step(k) for k in order}
        ratios.append(t["ours"] / t["dense"])
    q = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q[0], q[2]


def with_channels_last_kernels(fn: Callable) -> Callable:
    """Run ``fn`` with every CPDBlock's recomposed kernel returned in channels-last layout."""
    def run(*args, **kwargs):
        original = CPDBlock.dense_weight
        CPDBlock.dense_weight = lambda block: original(block).contiguous(memory_format=torch.channels_last)
        try:
            return fn(*args, **kwargs)
        finally:
            CPDBlock.dense_weight = original
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | recomposition per step: dense_weight / earlier orientation | step as built / dense (IQR) "
          "| channels-last kernel / dense | channels-last kernel / dense run channels-last |")
    print("|---|---|---|---|---|")
    for arch, rank in CASES:
        torch.manual_seed(0)
        x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
        dense, ours = build(arch, 0, None), build(arch, rank, None)
        rec = recomposition_ms(ours.train(), args.pairs)
        plain = step_ratio(dense, ours, x, y, args.pairs)
        cl = with_channels_last_kernels(step_ratio)(dense, ours, x, y, args.pairs)
        dense_cl = dense.to(memory_format=torch.channels_last)
        both = with_channels_last_kernels(step_ratio)(dense_cl, ours, x, y, args.pairs,
                                             dense_x=x.contiguous(memory_format=torch.channels_last))
        print(f"| {arch} rank {rank} | {rec['dense_weight']:.0f} / {rec['earlier orientation']:.0f} ms "
              f"| {plain[0]:.2f}× ({plain[1]:.2f}–{plain[2]:.2f}) | {cl[0]:.2f}× ({cl[1]:.2f}–{cl[2]:.2f}) "
              f"| {both[0]:.2f}× ({both[1]:.2f}–{both[2]:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
