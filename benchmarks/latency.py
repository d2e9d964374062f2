"""Do compressed models run faster?  Dense vs three-conv CPDBlocks vs deployed, side by side.

    .venv/bin/python benchmarks/latency.py            # every reference config with rank > 0
    .venv/bin/python benchmarks/latency.py --train    # also training steps (VGG-16-BN r8, ResNet-56 r4)
    .venv/bin/python benchmarks/latency.py --train-only
    .venv/bin/python benchmarks/latency.py --train --record   # record the deploy guide's tables

For each config of tests/reference/complexity.json with rank > 0: latency of
the uncompressed dense network (eager, and deployed by ``norton.deploy`` the same
way: the 1.00× a deployed model is compared against), of the compressed network
as the research code runs it (three convs per CPDBlock), and of
``norton.deploy`` of it; CIFAR
models at batch 128, 32×32, ResNet-50 at batch 8, 224×224.  Random weights:
latency does not depend on their values.  All runs of one config interleave,
so machine noise hits every model alike; quote the ratios.  The allocator is set
up as norton's training sets it up unless ``NORTON_ALLOCATOR=default``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from record import Table

from norton import create_model
from norton.core import complexity, tune_allocator, tune_plans
from norton.deployment import compare_latency, deploy

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "..", "tests", "reference", "complexity.json")


def build(arch, rank, rate):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model(arch, rank=rank, compress_rate=rate).eval()


def inference_rows(repeats: int) -> list[dict]:
    rows = []
    for config in json.load(open(CONFIGS))["configs"]:
        if config["rank"] == 0:
            continue
        arch, rank, rate = config["arch"], config["rank"], config["compress_rate"]
        batch, size = (8, 224) if config["input"] == 224 else (128, 32)
        x = torch.randn(batch, 3, size, size)
        dense = build(arch, 0, None)
        compressed = build(arch, rank, rate)
        three_conv = build(arch, rank, rate)
        three_conv.load_state_dict(compressed.state_dict())
        for m in three_conv.modules():
            if hasattr(m, "set_plan"):
                m.set_plan("separable")
        deployed, report = deploy(compressed, x)
        dense_deployed, _ = deploy(dense, x)
        f = complexity(dense, size).macs / complexity(compressed, size).macs
        lat = compare_latency({"dense": dense, "dense deployed": dense_deployed, "three-conv": three_conv,
                               "deployed": deployed}, x, repeats=repeats)
        rows.append({"arch": arch, "rank": rank, "compress_rate": rate, "batch": batch, "input": size, "macs_factor": f,
                     "dense_ms": lat["dense"].median_ms, "dense_deployed_ms": lat["dense deployed"].median_ms,
                     "three_conv_ms": lat["three-conv"].median_ms,
                     "deployed_ms": lat["deployed"].median_ms, "plans": report.layers, "channels_last": report.channels_last})
    return rows


TRAIN_CASES = (("vgg_16_bn", 8), ("resnet_56", 4))


def sgd_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds of one training step: forward, cross-entropy, backward, SGD step."""
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


def faulted_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """``sgd_step``'s seconds and the page faults (fresh pages touched) of the step."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = sgd_step(model, opt, x, y)
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def allocator_label() -> str:
    """Sets the allocator up as norton's training does (unless ``NORTON_ALLOCATOR=default``); says which."""
    return "tuned (norton.tune_allocator)" if tune_allocator() else "the C library's defaults"


def train_step_ratio(arch: str, rank: int, repeats: int, device: torch.device = torch.device("cpu")) -> dict:
    """Forward + backward + SGD step at batch 128, 32×32: the dense model, the
    decomposed one as a user builds it (``auto`` plans, no call), with every
    block on the three-conv plan, and after ``tune_plans``.

    Each model is timed against the dense one in adjacent pairs whose order
    alternates (dense first, then it first), after two warm-up steps of each;
    a model's ratio is the median of its per-pair ratios, so drift in the
    machine's speed over the run cancels in the ratio."""
    x, y = torch.randn(128, 3, 32, 32, device=device), torch.randint(0, 10, (128,), device=device)
    models = {"dense": build(arch, 0, None).to(device), "three-conv": build(arch, rank, None).to(device),
              "as built (auto)": build(arch, rank, None).to(device), "tuned plans": build(arch, rank, None).to(device)}
    for m in models["three-conv"].modules():
        if hasattr(m, "set_plan"):
            m.set_plan("separable")
    tune_plans(models["tuned plans"], x, training=True)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}

    def step(k: str) -> float:
        return sgd_step(models[k], opts[k], x, y)

    for k, m in models.items():
        m.train()
        step(k), step(k)
    times = {k: [] for k in models}
    ratios = {k: [] for k in models if k != "dense"}
    for k in ratios:
        for i in range(repeats):
            first, second = ("dense", k) if i % 2 == 0 else (k, "dense")
            pair = {first: step(first), second: step(second)}
            times["dense"].append(pair["dense"])
            times[k].append(pair[k])
            ratios[k].append(pair[k] / pair["dense"])
    out = {k: statistics.median(v) * 1000 for k, v in times.items()}
    out.update({f"{k} / dense": statistics.median(v) for k, v in ratios.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--train", action="store_true", help="also time training steps (VGG-16-BN r8, ResNet-56 r4)")
    parser.add_argument("--train-only", action="store_true", help="only the training steps")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--device", default="cpu", help="training steps on this device (cuda: skipped without a GPU)")
    parser.add_argument("--record", action="store_true",
                        help="record the tables the deploy guide shows (docs/results/tables/latency_*.json)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"{args.device}: no CUDA device on this machine; GPU figures skipped")
        return
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, allocator: {allocator_label()}\n")
    rows = [] if args.train_only else inference_rows(args.repeats)
    args.train = args.train or args.train_only
    table = Table(["config", "batch × input", "MACs ÷", "dense (eager)", "dense deployed", "three-conv", "deployed",
                   "deployed vs dense deployed", "vs dense (eager)", "vs three-conv",
                   "target (vs dense deployed)"]) if rows else None
    for r in rows:
        target = min(8.0, max(1.0, 0.6 * r["macs_factor"]))
        speed = r["dense_deployed_ms"] / r["deployed_ms"]
        table.add([f"{r['arch']} r{r['rank']} `{r['compress_rate']}`", f"{r['batch']} × {r['input']}²",
                   f"{r['macs_factor']:.1f}", f"{r['dense_ms']:.1f} ms", f"{r['dense_deployed_ms']:.1f} ms",
                   f"{r['three_conv_ms']:.1f} ms", f"{r['deployed_ms']:.1f} ms", f"**{speed:.2f}×**",
                   f"{r['dense_ms'] / r['deployed_ms']:.2f}×", f"{r['three_conv_ms'] / r['deployed_ms']:.2f}×",
                   f"≥ {target:.2f}× {'✓' if speed >= target else '✗'}"])
    train_table = None
    if args.train:
        train_table = Table(["training step, batch 128, 32×32", "dense", "three-conv", "as built (auto)",
                             "tuned plans", "as built / dense", "target"])
        for arch, rank in TRAIN_CASES:
            t = train_step_ratio(arch, rank, args.repeats, device)
            ratio = t["as built (auto) / dense"]
            train_table.add([f"{arch} rank {rank}", f"{t['dense']:.0f} ms",
                             f"{t['three-conv']:.0f} ms ({t['three-conv / dense']:.2f}×)", f"{t['as built (auto)']:.0f} ms",
                             f"{t['tuned plans']:.0f} ms ({t['tuned plans / dense']:.2f}×)", f"{ratio:.2f}×",
                             f"≤ 1.05× {'✓' if ratio <= 1.05 else '✗'}"])
    if args.record:
        allocator = allocator_label()
        if table:
            table.record("latency_inference", note=f"Random weights, {torch.get_num_threads()} threads, every model of "
                         f"a row timed in one interleaved run ({args.repeats} repeats, medians); allocator {allocator}.")
        if train_table:
            train_table.record("latency_training", note=f"Forward + backward + SGD step; each model timed against the "
                               f"dense one in {args.repeats} adjacent pairs of alternating order, a ratio the median of "
                               f"the per-pair ratios; allocator {allocator}.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
