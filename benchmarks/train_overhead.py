"""Where a decomposed model's training step loses time against the dense one.

    .venv/bin/python benchmarks/train_overhead.py [--pairs 30]
    NORTON_ALLOCATOR=default .venv/bin/python benchmarks/train_overhead.py   # glibc's allocator defaults

For VGG-16-BN rank 8 and ResNet-56 rank 4 (batch 128, 32×32, every block on
the plan ``auto`` picks while training):

1. the recomposition W = Σ a⊗b⊗c of every block, forward and backward, per step:
   ``CPDBlock.dense_weight`` against the (N, C, R) @ (N, R, K) orientation it
   replaced, the two timed alternately;
2. the training step of the model as built against the dense model: rounds of
   one step of the dense model, an identical copy of it and the decomposed one,
   the order rotated every round; the median of the per-round ratios with a 95 %
   bootstrap confidence interval.  The identical copy's ratio is the noise of
   the measurement on this machine: it should be 1;
3. with ``--channels-last``: both models and the input converted to
   channels-last, as a user training in that layout does (the blocks then
   recompose their kernels channels-last, with no layout copy): the as-built
   step over the dense channels-last one, and the dense contiguous step over
   the dense channels-last one (whether the layout pays on this machine);
4. with ``--profile``: torch.profiler's self-CPU time per step of three models
   profiled one after the other — dense, as built, and a control: the dense
   model with every kernel copied afresh each step (``weight.clone()``) — in
   two repetitions, the order reversed in the second.  Per-operator figures of
   models profiled in turn drift by more than the gap between them; the
   control and the reversal show how much.

The process's allocator is set up as norton's training sets it up
(``norton.tune_allocator``) unless ``NORTON_ALLOCATOR=default``; the header
says which, with the page faults per step of the dense and the as-built model.
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
from latency import allocator_label, build, faulted_step, sgd_step
from record import Table

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
    # a dense gradient for every kernel, as a convolution's backward hands it over (the gradient of a
    # sum would be one broadcast value, which the layout copy's backward and the matmuls read differently)
    grads = [torch.randn(b.out_channels, b.in_channels, *b.kernel_size) for b in blocks]
    times = {k: [] for k in ways}
    for i in range(pairs + 2):
        for name in (list(ways) if i % 2 else list(ways)[::-1]):
            start = time.perf_counter()
            torch.autograd.backward([ways[name](b) for b in blocks], grads)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def median_ci(ratios: list[float], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The median of ``ratios`` and a 95 % bootstrap confidence interval for it."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def step_ratios(models: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor], y: torch.Tensor,
                pairs: int) -> tuple[dict[str, tuple[float, float, float]], float, dict[str, float]]:
    """Each model's step over the ``dense`` one's: rounds of one step of every model, the order
    rotated every round; median of the per-round ratios with its 95 % confidence interval, the
    median step of the dense model in ms, and every model's median page faults per step."""
    for m in models.values():
        m.train()
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}

    faults = {k: [] for k in models}

    def step(k: str) -> float:
        seconds, touched = faulted_step(models[k], opts[k], inputs[k], y)
        faults[k].append(touched)
        return seconds

    for k in models:
        step(k), step(k)
        faults[k].clear()
    names = list(models)
    ratios = {k: [] for k in names if k != "dense"}
    dense_times = []
    for i in range(pairs):
        order = names[i % len(names):] + names[:i % len(names)]
        t = {k: step(k) for k in (order if i % 2 == 0 else order[::-1])}
        dense_times.append(t["dense"])
        for k in ratios:
            ratios[k].append(t[k] / t["dense"])
    return ({k: median_ci(v) for k, v in ratios.items()}, 1000 * statistics.median(dense_times),
            {k: statistics.median(v) for k, v in faults.items()})


class CopiedKernelConv(torch.nn.Conv2d):
    """A dense conv whose kernel is a fresh copy every forward: the control for ``--profile``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.clone(), self.bias)


def with_copied_kernels(model: torch.nn.Module) -> torch.nn.Module:
    control = copy.deepcopy(model)
    for m in control.modules():
        if type(m) is torch.nn.Conv2d:
            m.__class__ = CopiedKernelConv
    return control


def profile_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> dict[str, float]:
    """Self-CPU milliseconds per training step of every operator (torch.profiler)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    sgd_step(model, opt, x, y), sgd_step(model, opt, x, y)
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            sgd_step(model, opt, x, y)
    return {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=30, help="rounds of one step of every model")
    parser.add_argument("--channels-last", action="store_true", help="also the channels-last columns (3.)")
    parser.add_argument("--profile", action="store_true",
                        help="also torch.profiler's self-CPU time per step of the dense and the as-built model (4.)")
    parser.add_argument("--record", action="store_true", help="record the deploy guide's table (docs/results/tables)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.pairs} rounds, "
          f"allocator: {allocator_label()}\n")
    fmt = lambda r: f"{r[0]:.3f}× ({r[1]:.3f}–{r[2]:.3f})"  # noqa: E731
    table = Table(["model", "recomposition per step: dense_weight / earlier orientation", "dense step",
                   "as built / dense (95 % CI)", "identical dense twin / dense (the noise)",
                   "page faults per step: dense / as built",
                   *(["channels-last: as built / dense", "dense contiguous / dense channels-last"]
                     if args.channels_last else [])])
    profiles = []
    for arch, rank in CASES:
        torch.manual_seed(0)
        x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
        dense, twin, ours = build(arch, 0, None), build(arch, 0, None), build(arch, rank, None)
        twin.load_state_dict(dense.state_dict())
        rec = recomposition_ms(ours.train(), args.pairs)
        plain, dense_ms, faults = step_ratios({"dense": dense, "twin": twin, "ours": ours}, {"dense": x, "twin": x, "ours": x},
                                      y, args.pairs)
        row = [f"{arch} rank {rank}", f"{rec['dense_weight']:.0f} / {rec['earlier orientation']:.0f} ms",
               f"{dense_ms:.0f} ms", f"**{fmt(plain['ours'])}**", fmt(plain['twin']),
               f"{faults['dense']:.0f} / {faults['ours']:.0f}"]
        if args.channels_last:
            x_cl = x.contiguous(memory_format=torch.channels_last)
            cl, _, _ = step_ratios({"dense": copy.deepcopy(dense).to(memory_format=torch.channels_last),
                                 "ours": copy.deepcopy(ours).to(memory_format=torch.channels_last), "contiguous": dense},
                                {"dense": x_cl, "ours": x_cl, "contiguous": x}, y, args.pairs)
            row += [fmt(cl['ours']), fmt(cl['contiguous'])]
        table.add(row)
        if args.profile:
            models = {"dense": dense, "as built": ours, "copied kernels": with_copied_kernels(dense)}
            for order in (list(models), list(models)[::-1]):
                ops = {name: profile_step(models[name], x, y) for name in order}
                profiles.append((f"{arch} rank {rank}", order, ops))
    if args.record:
        table.record("train_overhead", note=f"{args.pairs} rounds of one training step (batch 128, 32×32) of every "
                     f"model, the order rotated every round; the median of the per-round ratios with a 95 % bootstrap "
                     f"interval; allocator {allocator_label()}.")
    for name, order, ops in profiles:
        print(f"\n{name}, torch.profiler, self-CPU ms per step (mean of 3), profiled in the order {', '.join(order)}:")
        for op in ("all operators", "aten::convolution_backward", "aten::bmm"):
            cells = [f"{m} {sum(ops[m].values()) if op == 'all operators' else ops[m].get(op, 0):7.1f}" for m in order]
            print(f"  {op:<28} " + "   ".join(cells))


if __name__ == "__main__":
    main()
