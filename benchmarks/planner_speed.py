"""How long the planner takes, and what measuring its options in place buys.

    .venv/bin/python benchmarks/planner_speed.py                  # ResNet-20 and ResNet-56, both ways
    .venv/bin/python benchmarks/planner_speed.py --costs          # ResNet-20 at 128/256/512 images, 8 and 4 keep steps
    .venv/bin/python benchmarks/planner_speed.py --layout         # one probe forward: contiguous, channels-last, traced
    .venv/bin/python benchmarks/planner_speed.py --recover        # recover=True: refits from input sums vs per option
    .venv/bin/python benchmarks/planner_speed.py --screening      # screened (the default) vs every option on every image
    .venv/bin/python benchmarks/planner_speed.py --resnet50 300   # ResNet-50 at 224×224, 256 images: stages and ETA
    .venv/bin/python benchmarks/planner_speed.py --targets        # 60 % and 85 % in one plan call vs one call each
    .venv/bin/python benchmarks/planner_speed.py --workers        # options side by side (the default) vs one at a time
    .venv/bin/python benchmarks/planner_speed.py --overwrite      # probe forwards writing over dead activations vs not

``norton.plan(model, digits calibration images, target_macs=0.6)`` on a
randomly initialised zoo model (the damages it measures need no training to
cost what they cost): once with the options measured in place from the
changed layer on (the planner as it is), once on the surgery path (every
pruning option on a pruned copy, every probe a whole forward: what the planner
did before), one after the other in this process; then whether the two plans
are the same and how far their damages are apart.  ``--costs`` times the
trade-off of ``--calibration-images`` and ``--keep-steps``.  ``--recover``
plans with ``recover=True`` (what ``compare`` plans with): in place, every
pruning option's readers refitted from input sums gathered once per group;
on the surgery path, a pruned copy refitted by ``norton.recover`` per option.
``--screening`` plans each model twice in place: screened (every option
measured on the first 256 of the 512 images — with ``--images 256``, on the
first 128 of 256 — the chosen ones on all of them) and with
``screening=False``; it reports both times and the measured damage of each
chosen plan, built whole, on all the images.  ``--screening --images 512,256
--record`` records the planner guide's table (``benchmarks/record.py``).
``--resnet50 S`` plans a randomly initialised ResNet-50 (ImageNet size) on 256
random 224×224 images for at most S seconds and prints each stage's last
progress line — the options measured, their rate and tqdm's ETA for the rest.
``--targets`` plans 60 % and 85 % fewer MACs as ``compare`` does (256 images,
``recover=True``): in one ``plan`` call (every option measured once) and in
one call per target; both wall times, and whether the plans are the same.
``--workers`` plans each model with the options measured side by side on
threads (``workers=None``, the default: one per torch thread) and one at a
time on all threads (``workers=1``), alternating, ``--rounds`` times each;
the median of each, and whether the plans are the same (their float rounding
differs: a convolution on one thread sums in another order than on two).
``--overwrite`` times the traced forward a probe runs (``CachedForward.run``
from the input, batch statistics, channels-last, no gradients) with its
BatchNorms, additions and ReLUs writing over activations no longer needed (the
default) and with a new buffer for each (``probing.OVERWRITE = False``):
ResNet-50 on 128 and on 64 random 224×224 images, ResNet-56 on 256 16×16;
each way in its own process (what the C library's allocator holds is a state
of the process), ``--rounds`` rounds with the order alternated, the median
over a process's timed forwards and then over rounds; and whether both ways
gave the same outputs to the last bit.
"""
from __future__ import annotations

import argparse
import copy
import json
import warnings

import torch

from norton import create_model
from norton.compression import plan, planning
from norton.training import calibration_batches, load_dataset


def timed_plan(arch: str, images: int, keep_steps: int = 8, in_place: bool = True, recover: bool = False,
               screening: bool = True, target=0.6, workers: int | None = None):
    warnings.simplefilter("ignore")
    batches = calibration_batches(load_dataset("digits", None, "train"), images, seed=0)
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=1).eval()
    make = planning._InPlace.make
    if not in_place:
        planning._InPlace.make = classmethod(lambda cls, *args, **kwargs: None)
    try:
        return plan(model, batches, target_macs=target, keep_steps=keep_steps, seed=0, recover=recover,
                    screening=screening, workers=workers)
    finally:
        planning._InPlace.make = make


def layout_ms(repeats: int = 20) -> dict[str, float]:
    """A batch-statistics forward of ResNet-20 on 256 16×16 images, as the probes run it, in both layouts,
    and the traced forward a probe runs (``CachedForward.run`` from the input, channels-last), alternating
    rounds, median ms."""
    import statistics
    import time

    from norton.compression.probing import CachedForward
    from norton.core import batch_statistics

    torch.manual_seed(0)
    model = create_model("resnet_20", num_classes=10, in_channels=1).eval()
    x = torch.randn(256, 1, 16, 16)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_last = x.contiguous(memory_format=torch.channels_last)
    traced = CachedForward(last, [x_last])
    runs = {"contiguous": (model, lambda: model(x)),
            "channels_last": (last, lambda: last(x_last)),
            "traced, channels_last": (traced.module, lambda: traced.run(0, []))}
    times = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(repeats + 3):
            for name, (m, forward) in runs.items():
                with batch_statistics(m):
                    started = time.perf_counter()
                    forward()
                    times[name].append(1000 * (time.perf_counter() - started))
    return {name: round(statistics.median(t[3:]), 1) for name, t in times.items()}


def per_item(spent: str, done: str, rate: str) -> str:
    """The stage's time over the items done (tqdm's own rate is smoothed over the last updates), in the unit
    of tqdm's rate ("2.84s/option" or "4.43option/s": an option)."""
    seconds = sum(int(part) * 60 ** i for i, part in enumerate(reversed(spent.split(":"))))
    unit = rate.strip().split("/")[1 if "s/" in rate else 0].lstrip("0123456789.")
    return f"{seconds / max(1, int(done)):.2f} s/{unit}"


def resnet50_eta(seconds: int, record: bool = False) -> None:
    import re
    import subprocess
    import sys

    code = ("import torch, warnings; warnings.simplefilter('ignore'); from norton import create_model, plan; "
            "torch.manual_seed(0); m = create_model('resnet_50').eval(); "
            "x = [torch.randn(128, 3, 224, 224) for _ in range(2)]; "
            "p = plan(m, x, target_macs=0.6, progress=True); "
            "print(f'planned in {p.seconds / 60:.1f} min, {p.screening[\"confirmed\"]} of "
            "{p.screening[\"options\"]} options confirmed on every image')")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds)
        out, err = done.stdout, done.stderr
    except subprocess.TimeoutExpired as stopped:
        out = (stopped.stdout or b"").decode() if isinstance(stopped.stdout, bytes) else (stopped.stdout or "")
        err = (stopped.stderr or b"").decode() if isinstance(stopped.stderr, bytes) else (stopped.stderr or "")
    last = {}
    for line in re.split(r"[\r\n]", err):
        match = re.match(r"\s*(plan: [^:]+):", line)
        if match and "|" in line:
            last[match[1]] = line.strip()
    print(json.dumps({"limit_s": seconds, "stages": last, "finished": out.strip() or None}, indent=1))
    if record:
        from record import write_table

        rows = []
        for stage, line in last.items():
            match = re.search(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+),\s*([^\]]+)\]", line)
            if match:
                done, total, spent, left, rate = match.groups()
                rows.append([stage.removeprefix("plan: "), f"{done} of {total}", spent, per_item(spent, done, rate), left])
        write_table("planner_resnet50", ["stage", "done", "time", "time per item", "tqdm's estimate of the rest"], rows,
                    note=f"A randomly initialised ResNet-50, 256 random 224×224 images in two batches of 128 (as `norton "
                         f"plan --calibration-images 256` batches them; screened on the first), `target_macs=0.6`, "
                         + (f"run to the end: {out.strip()}" if out.strip() else f"stopped after {seconds} s") + ".")


def side_by_side(archs: list[str], rounds: int, record: bool, recover: bool) -> None:
    import statistics

    from norton.compression.probing import probe_workers

    rows = []
    timed_plan(archs[0], 128)  # a warm-up, untimed: the first plan of a process compiles the criterion kernels
    for arch in archs:
        seconds: dict[str, list[float]] = {"side by side": [], "one at a time": []}
        plans = {}
        for _ in range(rounds):
            for name, workers in (("side by side", None), ("one at a time", 1)):
                p = timed_plan(arch, 512, recover=recover, workers=workers)
                seconds[name].append(p.seconds)
                plans[name] = p
        a, b = plans["side by side"], plans["one at a time"]
        same = (a.ranks, a.keep, a.tucker) == (b.ranks, b.keep, b.tucker)
        median = {name: statistics.median(t) for name, t in seconds.items()}
        print(json.dumps({"arch": arch, "recover": recover, "workers": probe_workers(None, 0), "seconds": seconds,
                          "same_plan": same, "damage": [a.damage, b.damage]}), flush=True)
        rows.append([arch.replace("resnet_", "ResNet-"), f"{median['side by side']:.1f} s",
                     f"{median['one at a time']:.1f} s", f"{median['one at a time'] / median['side by side']:.2f}×",
                     "yes" if same else f"no (summed damage {a.damage:.4f} vs {b.damage:.4f})"])
    if record:
        from record import write_table

        write_table("planner_workers" + ("_recover" if recover else ""),
                    ["model", "side by side (the default)", "one at a time", "speed-up", "the same plan"], rows,
                    note=f"`norton.plan(model, 512 digits images, target_macs=0.6{', recover=True' if recover else ''}"
                         f")`, random initial weights, screened; the options measured by {probe_workers(None, 0)} "
                         f"threads of one torch thread each (`workers=None`) or one at a time on "
                         f"{torch.get_num_threads()} (`workers=1`), alternating, median of {rounds} plans each "
                         "(after an untimed warm-up plan).")


OVERWRITE_CASES = (("resnet_50", 128, 224), ("resnet_50", 64, 224), ("resnet_56", 256, 16))


def overwrite_child(arch: str, images: int, size: int, overwrite: bool, repeats: int) -> None:
    """One process: the traced forward from the input, ``repeats`` times after a warm-up; the median seconds,
    the page faults of a forward and the output's exact sum, as JSON."""
    import resource
    import statistics
    import time

    from norton import tune_allocator
    from norton.compression import probing
    from norton.core import batch_statistics

    tune_allocator()
    probing.OVERWRITE = overwrite
    torch.manual_seed(0)
    imagenet = arch == "resnet_50"
    model = (create_model(arch) if imagenet else create_model(arch, num_classes=10, in_channels=1)).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(images, 3 if imagenet else 1, size, size).contiguous(memory_format=torch.channels_last)
    traced = probing.CachedForward(model, [x], budget=0)  # nothing cached: every run from the input
    times, faults = [], []
    with torch.no_grad(), batch_statistics(traced.module):
        out = traced.run(0, [])
        for _ in range(repeats):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            began = time.perf_counter()
            traced.run(0, [])
            times.append(time.perf_counter() - began)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"seconds": statistics.median(times), "faults": statistics.median(faults),
                      "sum": float(out.double().sum())}))


def overwrite_ab(rounds: int, record: bool) -> None:
    import statistics
    import subprocess
    import sys

    rows = []
    for arch, images, size in OVERWRITE_CASES:
        repeats = 5 if arch == "resnet_50" else 40
        got: dict[bool, list[dict]] = {True: [], False: []}
        for r in range(rounds):
            for overwrite in ((True, False) if r % 2 else (False, True)):
                done = subprocess.run([sys.executable, __file__, "--overwrite-child", arch, str(images), str(size),
                                       "on" if overwrite else "off", str(repeats)],
                                      capture_output=True, text=True, check=True)
                got[overwrite].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(arch, images, "written over" if overwrite else "new buffers", got[overwrite][-1], flush=True)
        seconds = {k: statistics.median(r["seconds"] for r in v) for k, v in got.items()}
        faults = {k: statistics.median(r["faults"] for r in v) for k, v in got.items()}
        same = len({r["sum"] for v in got.values() for r in v}) == 1
        shown = (lambda t: f"{t:.2f} s") if arch == "resnet_50" else (lambda t: f"{1000 * t:.1f} ms")
        rows.append([f"{arch.replace('resnet_', 'ResNet-')}, {images} images {size}×{size}",
                     shown(seconds[False]), shown(seconds[True]),
                     f"{seconds[False] / seconds[True]:.2f}×", f"{faults[False]:,.0f} / {faults[True]:,.0f}",
                     "yes" if same else "no"])
    if record:
        from record import write_table

        write_table("planner_overwrite", ["traced forward", "new buffers", "written over (the default)", "speed-up",
                                          "page faults per forward: new / written over", "the same outputs"], rows,
                    note="A probe's traced forward from the input (`CachedForward.run`, batch statistics, channels-last, "
                         "no gradients) of a randomly initialised model, the C library's allocator tuned as the planner "
                         f"tunes it; each way in its own process, {rounds} rounds with the order alternated, the median "
                         "of 5 (ResNet-50) or 40 (ResNet-56) timed forwards per process, then over rounds.  The same "
                         "outputs: every process's output summed to the same number.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="resnet_20,resnet_56")
    parser.add_argument("--costs", action="store_true", help="ResNet-20's planning time by calibration images and keep steps")
    parser.add_argument("--layout", action="store_true", help="one probe forward in each memory layout")
    parser.add_argument("--recover", action="store_true", help="plan with recover=True, both ways")
    parser.add_argument("--screening", action="store_true", help="screened vs every option on every image")
    parser.add_argument("--images", default="512", help="--screening: calibration images, a comma list (default 512)")
    parser.add_argument("--record", action="store_true",
                        help="--screening, --costs, --resnet50, --overwrite and the default: record the table the planner guide shows "
                             "(docs/results/tables)")
    parser.add_argument("--resnet50", type=int, default=None, metavar="S",
                        help="ResNet-50 at 224×224 on 256 images for at most S seconds: each stage's progress and ETA")
    parser.add_argument("--targets", action="store_true", help="two MACs targets in one plan call vs one call each")
    parser.add_argument("--workers", action="store_true", help="options side by side on threads vs one at a time")
    parser.add_argument("--rounds", type=int, default=3,
                        help="--workers: plans of each kind per model; --overwrite: processes each way (default 3)")
    parser.add_argument("--overwrite", action="store_true",
                        help="probe forwards writing over activations no longer needed vs a new buffer for each")
    parser.add_argument("--overwrite-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.overwrite_child:
        arch, images, size, way, repeats = args.overwrite_child
        return overwrite_child(arch, int(images), int(size), way == "on", int(repeats))
    if args.overwrite:
        return overwrite_ab(args.rounds, args.record)
    if args.resnet50:
        resnet50_eta(args.resnet50, args.record)
        return
    if args.layout:
        ms = layout_ms()
        print(json.dumps(ms))
        if args.record:
            from record import write_table

            write_table("planner_layout", ["probe forward, ResNet-20, 256 16×16 images", "median"],
                        [[name.replace("_", "-"), f"{value} ms"] for name, value in ms.items()],
                        note="A batch-statistics forward as the probes run it: the model's own forward in both "
                             "layouts, and the traced forward a probe runs (from the input), in 20 alternating "
                             "rounds (after 3 warm-up rounds); 2 cores.")
        return
    if args.costs:
        rows = []
        for images, steps in ((128, 8), (256, 8), (512, 8), (512, 4)):
            p = timed_plan("resnet_20", images, steps)
            print(json.dumps({"calibration_images": images, "keep_steps": steps, "seconds": round(p.seconds, 1),
                              "damage": round(p.damage, 4), "screening": p.screening}), flush=True)
            screen = f", screened on {p.screening['images']}" if p.screening else ""
            rows.append([f"{images}{' (default)' if images == 512 else ''}{screen}",
                         f"{steps}{' (default)' if steps == 8 else ''}", f"{p.seconds:.1f} s", f"{p.damage:.4f}"])
        if args.record:
            from record import write_table

            write_table("planner_costs", ["`--calibration-images`", "`--keep-steps`", "planning", "predicted damage"],
                        rows, note="ResNet-20 on digits, random initial weights, `target_macs=0.6`, 2 cores, one run "
                                   "each, the time of the whole plan; the first row includes compiling the criterion "
                                   "kernels.")
        return
    if args.screening:
        rows = []
        for images in (int(n) for n in args.images.split(",")):
            for arch in args.archs.split(","):
                screened, full = timed_plan(arch, images), timed_plan(arch, images, screening=False)
                # the chosen plan, built whole, measured on all the images: the best of the candidates measured whole
                whole = {name: min(p.candidates.values()) if p.candidates else None for name, p in
                         (("screened", screened), ("full", full))}
                same = (screened.ranks, screened.keep, screened.tucker) == (full.ranks, full.keep, full.tucker)
                print(json.dumps({"arch": arch, "images": images, "screened_s": round(screened.seconds, 1),
                                  "full_s": round(full.seconds, 1), "screening": screened.screening, "same_plan": same,
                                  "whole_damage": whole,
                                  "macs_after": {"screened": screened.macs_after, "full": full.macs_after}}), flush=True)
                rows.append([arch.replace("resnet_", "ResNet-"), f"{images} ({screened.screening['images']})",
                             f"{screened.seconds:.1f} s", f"{full.seconds:.1f} s",
                             f"{screened.screening['confirmed']} of {screened.screening['options']}",
                             f"{whole['screened']:.4f}, the same plan" if same
                             else f"{whole['screened']:.4f} (unscreened {whole['full']:.4f})"])
        if args.record:
            from record import write_table

            write_table("planner_screening", ["model", "images (screen)", "screened (default)",
                                              "every option on every image", "options confirmed",
                                              "whole damage of the chosen plan"], rows,
                        note="`norton.plan(model, digits images, target_macs=0.6)`, random initial weights, "
                             "2 cores; both ways one after the other in one process.")
        return
    if args.workers:
        side_by_side(args.archs.split(","), args.rounds, args.record, args.recover)
        return
    if args.targets:
        import time

        for arch in args.archs.split(","):
            started = time.perf_counter()
            jointly = timed_plan(arch, 256, recover=True, target=[0.6, 0.85])
            middle = time.perf_counter()
            alone = [timed_plan(arch, 256, recover=True, target=t) for t in (0.6, 0.85)]
            ended = time.perf_counter()
            print(json.dumps({"arch": arch, "jointly_s": round(middle - started, 1), "alone_s": round(ended - middle, 1),
                              "same_plans": [(a.ranks, a.keep, a.tucker) == (b.ranks, b.keep, b.tucker)
                                             for a, b in zip(jointly, alone)]}), flush=True)
        return
    rows = []
    for arch in args.archs.split(","):
        fast = timed_plan(arch, 512, recover=args.recover)
        slow = timed_plan(arch, 512, in_place=False, recover=args.recover)
        same = (fast.ranks, fast.keep, fast.tucker) == (slow.ranks, slow.keep, slow.tucker)
        rel = abs(fast.damage - slow.damage) / slow.damage
        print(json.dumps({"arch": arch, "recover": args.recover, "in_place_s": round(fast.seconds, 1), "surgery_s": round(slow.seconds, 1),
                          "same_plan": same, "damage_rel_diff": rel}), flush=True)
        rows.append([arch.replace("resnet_", "ResNet-"), f"{fast.seconds:.1f} s", f"{slow.seconds:.1f} s",
                     "yes" if same else f"no (damages {rel:.1e} apart)"])
    if args.record:
        from record import write_table

        write_table("planner_in_place" + ("_recover" if args.recover else ""),
                    ["model", "in place (the planner)", "surgery path", "the same plan"], rows,
                    note="`norton.plan(model, 512 digits images, target_macs=0.6" + (", recover=True" if args.recover else "")
                         + ")`, random initial weights, screened both ways, one after the other in one process; "
                         "2 cores.")


if __name__ == "__main__":
    main()
