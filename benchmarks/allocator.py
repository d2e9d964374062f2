"""What ``norton.tune_allocator`` buys a training step: glibc's defaults against the tuned allocator.

    .venv/bin/python benchmarks/allocator.py [--rounds 6] [--steps 5] [--cases resnet_50:8 ...]

The allocator is a setting of the whole process, so each measurement is a
fresh process (this script again, with ``--child``): it builds the model,
takes two warm-up steps and times ``--steps`` SGD steps (batch 128, 32×32;
ImageNet models batch 16, 224×224), counting page faults, and reports its peak
resident memory (what the tuned allocator costs).  Rounds run one process of each setting, the order
alternated; a model's ratio is the median over rounds of (default step /
tuned step), each process's step being its median.  Models (``--cases``,
ARCH:RANK, rank 0 = dense): VGG-16-BN and ResNet-56, dense and decomposed as
``create_model`` builds them (rank 8 / 4).

    .venv/bin/python benchmarks/allocator.py --probes [--rounds 3] [--record allocator_probes]

times what the planner's probes do at ImageNet size instead: batch-statistics
forwards (no gradients) of a randomly initialised ResNet-50, channels-last, on
two batches of 64 random 224×224 images — side by side on two threads of one
torch thread each (how the planner measures small models' options) and one
after the other on the main thread with all torch threads — each way with the
C library's defaults and with the tuned allocator, in its own process, the
order rotated each round.  glibc serves a thread other than the main one from
heaps of at most 64 MiB, so there the tuned allocator cannot keep ResNet-50's
205 MB activations (``norton.compression.probing.probe_workers``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from latency import build, faulted_step, sgd_step
from record import Table
from train_overhead import median_ci

from norton.core import tune_allocator

CASES = ("vgg_16_bn:0", "vgg_16_bn:8", "resnet_56:0", "resnet_56:4")
SETTINGS = ("tuned", "default")


def child(arch: str, rank: int, steps: int) -> None:
    applied = tune_allocator()
    torch.manual_seed(0)
    model = build(arch, rank, None).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    imagenet = model.default_input_size[-1] == 224
    batch = 16 if imagenet else 128
    x, y = torch.randn(batch, *model.default_input_size), torch.randint(0, 1000 if imagenet else 10, (batch,))
    sgd_step(model, opt, x, y), sgd_step(model, opt, x, y)
    times, faults = zip(*(faulted_step(model, opt, x, y) for _ in range(steps)))
    print(json.dumps({"applied": applied, "step": statistics.median(times), "faults": statistics.median(faults),
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


PROBE_WAYS = ("side by side", "main thread")


def probe_child(way: str, repeats: int) -> None:
    """Two batch-statistics forwards of ResNet-50 on 64 random 224×224 images each, ``way``; the median of
    ``repeats`` timings (after one warm-up) and the page faults of one."""
    from concurrent.futures import ThreadPoolExecutor

    from norton import create_model
    from norton.core import batch_statistics

    applied = tune_allocator()
    torch.manual_seed(0)
    model = create_model("resnet_50").eval().to(memory_format=torch.channels_last)
    xs = [torch.randn(64, 3, 224, 224).contiguous(memory_format=torch.channels_last) for _ in range(2)]

    @torch.no_grad()
    def forward(x):
        return float(model(x).sum())

    pool = ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,)) if way == "side by side" else None
    run = (lambda: list(pool.map(forward, xs))) if pool else (lambda: list(map(forward, xs)))
    times, faults = [], []
    with batch_statistics(model):
        run()
        for _ in range(repeats):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            began = time.perf_counter()
            run()
            times.append(time.perf_counter() - began)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "seconds": statistics.median(times), "faults": statistics.median(faults)}))


def probes(rounds: int, repeats: int, record: str | None) -> None:
    configs = [(way, setting) for way in PROBE_WAYS for setting in SETTINGS]
    got = {c: [] for c in configs}
    for i in range(rounds):
        for way, setting in configs[i % len(configs):] + configs[:i % len(configs)]:
            result = run_child(["--probe-child", way, "--steps", str(repeats)], setting)
            got[(way, setting)].append(result)
            print(way, setting, result, flush=True)
    slowest = statistics.median(r["seconds"] for r in got[("side by side", "default")])
    table = Table(["two forwards of 64 images", "allocator", "seconds (median)", "page faults", "vs side by side, default"])
    for way, setting in configs:
        seconds = statistics.median(r["seconds"] for r in got[(way, setting)])
        table.add([way, setting, f"{seconds:.2f} s", f"{statistics.median(r['faults'] for r in got[(way, setting)]):.0f}",
                   f"{slowest / seconds:.2f}×"])
    if record:
        table.record(record, note=f"Batch-statistics forwards of a randomly initialised ResNet-50 (channels-last, no "
                     f"gradients) on two batches of 64 random 224×224 images, as the planner's probes run them; each "
                     f"configuration in its own process, {rounds} rounds with the order rotated, the median of "
                     f"{repeats} timings per process.  Side by side: two threads of one torch thread each; main "
                     "thread: one forward after the other on all torch threads.")


def run_child(arguments: list[str], setting: str) -> dict:
    """This script again in a fresh process with ``arguments`` and ``NORTON_ALLOCATOR=setting`` (the allocator
    is a setting of the whole process); its last line's JSON, checked to have applied the setting."""
    env = {**os.environ, "NORTON_ALLOCATOR": setting}
    done = subprocess.run([sys.executable, __file__, *arguments], env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["applied"] != (setting == "tuned"):
        raise SystemExit(f"NORTON_ALLOCATOR={setting}: tune_allocator returned {result['applied']}")
    return result


def measure(arch: str, rank: int, setting: str, steps: int) -> dict:
    return run_child(["--child", arch, str(rank), "--steps", str(steps)], setting)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=CASES, metavar="ARCH:RANK")
    parser.add_argument("--record", default=None, metavar="NAME",
                        help="record the table under this name (docs/results/tables/NAME.json)")
    parser.add_argument("--probes", action="store_true",
                        help="time the planner's probes at ImageNet size instead (ResNet-50, 224×224)")
    parser.add_argument("--child", nargs=2, metavar=("ARCH", "RANK"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-child", choices=PROBE_WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), args.steps)
    if args.probe_child:
        return probe_child(args.probe_child, args.steps)
    if args.probes:
        return probes(args.rounds, args.steps, args.record)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds of one process "
          f"per setting, {args.steps} timed steps each\n")
    table = Table(["model", "step, default allocator", "step, tuned", "default / tuned (95 % CI)",
                   "page faults per step: default / tuned", "peak memory: default / tuned"])
    for case in args.cases:
        arch, _, rank = case.partition(":")
        rank = int(rank or 0)
        runs = {s: [] for s in SETTINGS}
        for i in range(args.rounds):
            for setting in (SETTINGS if i % 2 == 0 else SETTINGS[::-1]):
                runs[setting].append(measure(arch, rank, setting, args.steps))
        ratio = median_ci([d["step"] / t["step"] for d, t in zip(runs["default"], runs["tuned"])])
        med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in ("step", "faults", "peak_mb")} for s in SETTINGS}
        name = f"{arch} " + (f"rank {rank}" if rank else "dense")
        table.add([name, f"{1000 * med['default']['step']:.0f} ms", f"{1000 * med['tuned']['step']:.0f} ms",
                   f"**{ratio[0]:.3f}×** ({ratio[1]:.3f}–{ratio[2]:.3f})",
                   f"{med['default']['faults']:.0f} / {med['tuned']['faults']:.0f}",
                   f"{med['default']['peak_mb']:.0f} / {med['tuned']['peak_mb']:.0f} MB"])
    if args.record:
        table.record(args.record, note=f"Each setting in its own process (the setting is process-wide), the order "
                     f"alternated, {args.rounds} rounds of {args.steps} timed training steps; the median of the "
                     "per-round ratios with a 95 % bootstrap interval.")

if __name__ == "__main__":
    main()
