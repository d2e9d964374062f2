"""Compressed models on the hardware they are served on: deployed against deployed, on one GPU.

    python3 benchmarks/gpu.py --out-dir $OUT              # everything (sized for < 8 min on one H200)
    python3 benchmarks/gpu.py --sections inference --resume
    .venv/bin/python benchmarks/gpu.py --quick --device cpu   # a small smoke run on the CPU (what the test runs)

Every model is deployed with ``norton.deploy`` (BatchNorm folded, each layer's
form timed on the device) and timed against the uncompressed model deployed the
same way, in three modes: float32; bfloat16 channels-last; bfloat16
channels-last replayed from a CUDA graph.  Runs interleave round-robin (median
of ``--repeats``), so the ratios are what to quote.  Rows: the dense model, the
paper's configurations, the planner's plans at 60 % and 85 % fewer MACs and at
2× / 3× speed-up targets (planned on this device in bfloat16, widths rounded
to the multiple measured here), and Torch-Pruning L1 / FPGM at the same MACs
(widths unrounded and rounded to 8); then the Faster R-CNN R50-FPN detector
with a backbone planned for 2× (batch 1 and 8, 800×800), the training step
(as built and with the plans fit tunes on the device, against dense) and the
pairwise criterion on a CUDA layer.  Random weights: speed does not depend on
their values (the planner's damage on random weights is not a statement on
accuracy).  Results go to ``--out-dir``/gpu.json row by row (``--resume`` skips
rows already there) and are rendered to gpu.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from latency import train_step_ratio  # noqa: E402

from norton import create_model  # noqa: E402
from norton.compression import measure_round_to, plan, prune  # noqa: E402
from norton.core import DTYPE_NAMES, count_macs, device_name, resolve_device  # noqa: E402
from norton.deployment import compare_latency, deploy  # noqa: E402

MODES = (("float32", torch.float32, False), ("bf16 channels-last", torch.bfloat16, False),
         ("bf16 channels-last, CUDA graph", torch.bfloat16, True))
PAPER = {"vgg_16_bn": (1, "[0.6]*6+[0.8]*7"), "resnet_56": (4, "[0.]+[0.18]*29"),
         "resnet_50": (1, "[0.]+[0.1]*2+[0.4]*5+[0.75]*12"), "densenet_40": (8, None)}
# (arch, input size, batches): CIFAR models at a serving batch and a large one, ResNet-50 at ImageNet size
FULL = (("vgg_16_bn", 32, (256, 2048)), ("resnet_56", 32, (256, 2048)), ("resnet_50", 224, (64, 256)),
        ("densenet_40", 32, (256,)))
QUICK = (("resnet_20", 32, (8,)),)
PLANNER = dict(ranks=(1, 2, 4, 8), keep_steps=8, allocation="greedy")


def build(arch: str, rank: int = 0, rate=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model(arch, rank=rank, compress_rate=rate).eval()


class Results:
    """gpu.json: rows keyed by name, written after each one."""

    def __init__(self, path: str, resume: bool, setting: dict):
        self.path = path
        self.data = {"setting": setting, "rows": {}}
        if resume and os.path.exists(path):
            with open(path) as f:
                self.data["rows"] = json.load(f)["rows"]

    def done(self, key: str) -> bool:
        return key in self.data["rows"]

    def add(self, key: str, row: dict) -> None:
        self.data["rows"][key] = row
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)
        print(f"{key}: " + json.dumps({k: v for k, v in row.items() if k not in ("layers",)}), flush=True)


def variants(arch: str, size: int, batch: int, device, quick: bool):
    """(the compressed models of one architecture by row name — or why one was not built —, what each row
    records of how it was made: MACs removed, planning seconds, round_to; the dense model)."""
    dense = build(arch).to(device)
    x1 = torch.zeros(1, 3, size, size, device=device)
    dense_macs = count_macs(dense, x1)
    out, made_by = {}, {}
    if arch in PAPER:
        rank, rate = PAPER[arch]
        out[f"paper r{rank}" + (f" {rate}" if rate else "")] = build(arch, rank, rate).to(device)
    calibration = torch.randn(8 if quick else 32, 3, size, size, device=device)
    round_to = measure_round_to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    options = dict(PLANNER, ranks=(1, 2) if quick else PLANNER["ranks"], round_to=round_to)
    targets = [("macs", 0.6)] if quick else [("macs", 0.6), ("macs", 0.85), ("speedup", 2.0), ("speedup", 3.0)]
    for kind, value in targets:
        name = f"planner {value:.0%} fewer MACs" if kind == "macs" else f"planner {value:g}× speed-up"
        try:
            started = time.perf_counter()
            if kind == "macs":
                made = plan(dense, calibration, target_macs=value, **options)
            else:
                made = plan(dense, calibration, target_speedup=value, latency_batch=batch,
                            latency_dtype=torch.bfloat16 if device.type == "cuda" else None, **options)
            model = copy.deepcopy(dense)
            made.apply(model, x1)
            out[name] = model
            made_by[name] = {"planning_seconds": time.perf_counter() - started, "round_to": round_to}
        except Exception as err:  # a target out of reach is a row that says so
            out[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    # Torch-Pruning at the MACs of the paper's config and the planner's MACs-target plans
    references = [k for k, m in out.items() if not isinstance(m, str) and (not k.startswith("planner") or "MACs" in k)]
    for reference in references[:1] if quick else references:
        macs = 1 - count_macs(out[reference], x1) / dense_macs
        if macs <= 0.01:
            continue
        # L1 unrounded and rounded to 8 (what rounding buys), FPGM rounded
        for criterion, rounded in (("l1", None), ("l1", 8), ("fpgm", 8)):
            name = f"Torch-Pruning {criterion.upper()} at the MACs of {reference}" + (", round_to 8" if rounded else "")
            model = copy.deepcopy(dense)
            head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
            try:
                prune(model, target_macs=min(macs, 0.97), example_inputs=x1, criterion=criterion,
                      ignored_layers=head, round_to=rounded)
                out[name] = model
            except Exception as err:
                out[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    for name, model in out.items():
        if not isinstance(model, str):
            made_by.setdefault(name, {})["macs_reduction"] = 1 - count_macs(model, x1) / dense_macs
    return out, made_by, dense


def inference(results: Results, device, quick: bool, repeats: int) -> None:
    for arch, size, batches in QUICK if quick else FULL:
        made = None
        for batch in batches:
            for mode, dtype, graph in MODES:
                if graph and device.type != "cuda":
                    continue
                key = f"{arch} batch {batch} {mode}"
                if results.done(key):
                    continue
                if made is None:
                    made = variants(arch, size, batches[-1] if not quick else batch, device, quick)
                models, made_by, dense = made
                x = torch.randn(batch, 3, size, size, device=device)
                options = dict(device=device, dtype=dtype, cuda_graph=graph, memory_format="channels_last"
                               if dtype != torch.float32 else "contiguous")
                deployed = {"dense": deploy(dense, x, **options)[0]}
                layers, failed = {}, {}
                for name, model in models.items():
                    if isinstance(model, str):
                        failed[name] = model
                        continue
                    deployed[name], report = deploy(model, x, **options)
                    layers[name] = {"forms": report.layers, "chosen_whole": report.chosen_whole}
                lat = compare_latency(deployed, x, repeats=repeats)
                rows = {name: {"median_ms": v.median_ms, "speedup": lat["dense"].median_ms / v.median_ms,
                               "macs_reduction": 0.0, "planning_seconds": None, "round_to": None,
                               **made_by.get(name, {})}
                        for name, v in lat.items()}
                results.add(key, {"arch": arch, "batch": batch, "input": size, "mode": mode, "models": rows,
                                  "failed": failed, "layers": layers})


def detector(results: Results, device, quick: bool, repeats: int) -> None:
    """Faster R-CNN R50-FPN: dense, the paper's backbone, and a backbone planned for 2× (on resnet_50 at 224)."""
    from norton.compression import decompose
    from norton.detection import backbone_batch, deploy_detector

    size, batches = (128, (1,)) if quick else (800, (1, 8))
    todo = [(b, m) for b in batches for m in MODES if not (m[2] and device.type != "cuda")
            if not results.done(f"detector batch {b} {m[0]}")]
    if not todo:
        return
    dense = build("fasterrcnn_resnet50_fpn").to(device)
    paper = build("fasterrcnn_resnet50_fpn", *PAPER["resnet_50"]).to(device)
    models = {"paper backbone r1": paper}
    planned = copy.deepcopy(dense)
    try:
        if quick:
            raise RuntimeError("--quick: no backbone planned (planning ResNet-50 takes minutes on a CPU)")
        classifier = build("resnet_50").to(device)
        calibration = torch.randn(8 if quick else 32, 3, 224, 224, device=device)
        made = plan(classifier, calibration, target_speedup=2.0, latency_batch=8 if quick else 64,
                    latency_dtype=torch.bfloat16 if device.type == "cuda" else None,
                    **dict(PLANNER, ranks=(1, 2) if quick else PLANNER["ranks"],
                           round_to=measure_round_to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)))
        body = planned.backbone.body
        decompose(body, max([1, *made.ranks.values()]), layer_ranks=made.ranks, progress=False)
        images = [torch.rand(3, size, size, device=device)]
        keep = {f"body.{root}": k for root, k in made.keep.items() if k < made.totals[root] and not root.startswith("fc")}
        prune(planned.backbone, keep=keep, example_inputs=backbone_batch(planned, images), round_to=made.round_to,
              criterion=made.criterion)
        models["backbone planned for 2× (on resnet_50, 224 px)"] = planned
    except Exception as err:
        models["backbone planned for 2× (on resnet_50, 224 px)"] = f"{type(err).__name__}: {str(err)[:200]}"
    for m in (dense, *[v for v in models.values() if not isinstance(v, str)]):
        m.transform.min_size, m.transform.max_size = (size,), size
    for batch, (mode, dtype, graph) in todo:
        images = [torch.rand(3, size, size, device=device) for _ in range(batch)]
        options = dict(device=device, dtype=dtype, cuda_graph=graph)
        deployed = {"dense": deploy_detector(dense, images, **options)[0]}
        failed = {k: v for k, v in models.items() if isinstance(v, str)}
        for name, model in models.items():
            if name not in failed:
                deployed[name] = deploy_detector(model, images, **options)[0]
        whole = compare_latency(deployed, images, warmup=2, repeats=repeats)
        features = backbone_batch(dense, images)
        backbone = compare_latency({k: d.backbone for k, d in deployed.items()}, features, warmup=2, repeats=repeats)
        rows = {name: {"median_ms": whole[name].median_ms, "fps": batch * 1000 / whole[name].median_ms,
                       "speedup": whole["dense"].median_ms / whole[name].median_ms,
                       "backbone_ms": backbone[name].median_ms,
                       "backbone_speedup": backbone["dense"].median_ms / backbone[name].median_ms}
                for name in deployed}
        results.add(f"detector batch {batch} {mode}", {"batch": batch, "input": size, "mode": mode, "models": rows,
                                                       "failed": failed})


def training(results: Results, device, quick: bool, repeats: int) -> None:
    for arch, rank in (("resnet_20", 2),) if quick else (("vgg_16_bn", 8), ("resnet_56", 4)):
        key = f"training step {arch} r{rank}"
        if not results.done(key):
            results.add(key, {"arch": arch, "rank": rank, "batch": 128, **train_step_ratio(arch, rank, repeats, device)})


def criteria(results: Results, device, quick: bool, repeats: int) -> None:
    from norton.compression.criteria import pabs_distances
    from norton.core import CPDBlock

    if results.done("pabs"):
        return
    n = 64 if quick else 512
    factors = CPDBlock.like_conv(torch.nn.Conv2d(n, n, 3, padding=1), 8).to(device).factors()
    pabs_distances(factors)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pabs_distances(factors)
        times.append(time.perf_counter() - start)
    results.add("pabs", {"filters": n, "rank": 8, "factors_on": str(device), "median_s": sorted(times)[len(times) // 2]})


SECTIONS = {"inference": inference, "detector": detector, "training": training, "criteria": criteria}


def render(data: dict) -> str:
    """docs/gpu.md from gpu.json."""
    s = data["setting"]
    lines = ["# norton on a GPU: deployed against deployed", "",
             f"Measured {s['date']} on {s['device_name']} ({s['device']}), torch {s['torch']}, CUDA {s['cuda']}, "
             f"commit {s['commit']}, by `{s['command']}`. Speed-ups are against the uncompressed model deployed the "
             "same way (BatchNorm folded, same dtype, layout and CUDA graph); medians of interleaved runs. "
             "Random weights: these are speed figures, not accuracy.", ""]
    for key, row in data["rows"].items():
        if key.startswith("detector") or key.startswith("training") or key == "pabs":
            continue
        lines += [f"## {row['arch']}, batch {row['batch']}, {row['input']}×{row['input']}, {row['mode']}", "",
                  "| model | MACs cut | median ms | speed-up |", "|---|---|---|---|"]
        for name, m in row["models"].items():
            lines.append(f"| {name} | {100 * m['macs_reduction']:.1f} % | {m['median_ms']:.3f} | {m['speedup']:.2f}× |")
        lines += [f"| {name} | — | — | not built: {why} |" for name, why in row.get("failed", {}).items()] + [""]
    detector_rows = {k: v for k, v in data["rows"].items() if k.startswith("detector")}
    if detector_rows:
        lines += ["## Faster R-CNN R50-FPN", "",
                  "The seed's claim: a NORTON backbone makes the detector about 2× faster (FPS). Measured:", "",
                  "| batch | mode | model | FPS | speed-up | backbone + FPN ms | backbone + FPN speed-up |",
                  "|---|---|---|---|---|---|---|"]
        for row in detector_rows.values():
            for name, m in row["models"].items():
                lines.append(f"| {row['batch']} | {row['mode']} | {name} | {m['fps']:.1f} | {m['speedup']:.2f}× | "
                             f"{m['backbone_ms']:.2f} | {m['backbone_speedup']:.2f}× |")
        failed = {name: why for row in detector_rows.values() for name, why in row.get("failed", {}).items()}
        lines += [""] + [f"Not built: {name} ({why})." for name, why in failed.items()]
        lines.append("")
    train_rows = {k: v for k, v in data["rows"].items() if k.startswith("training")}
    if train_rows:
        lines += ["## Training step (batch 128, 32×32, forward + backward + SGD)", "",
                  "| model | dense ms | as built / dense | tuned plans / dense | three-conv / dense |", "|---|---|---|---|---|"]
        for row in train_rows.values():
            lines.append(f"| {row['arch']} r{row['rank']} | {row['dense']:.2f} | {row['as built (auto) / dense']:.2f}× | "
                         f"{row['tuned plans / dense']:.2f}× | {row['three-conv / dense']:.2f}× |")
        lines.append("")
    if "pabs" in data["rows"]:
        p = data["rows"]["pabs"]
        lines += [f"pabs on a {p['filters']}-filter rank-{p['rank']} layer with factors on {p['factors_on']}: "
                  f"{p['median_s']:.3f} s (median).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "..", "docs", "results"))
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {','.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="one small model, small batches (a smoke run)")
    parser.add_argument("--resume", action="store_true", help="keep the rows of an earlier run in --out-dir")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA device: benchmarks/gpu.py --device {args.device} skipped (--device cpu --quick runs it small here)")
        return
    device = resolve_device(args.device)
    sections = args.sections.split(",")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    os.makedirs(args.out_dir, exist_ok=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    except OSError:
        commit = "unknown"
    setting = {"date": datetime.date.today().isoformat(), "device": str(device), "device_name": device_name(device),
               "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
               "commit": commit or "unknown", "command": "python3 benchmarks/gpu.py " + " ".join(sys.argv[1:]),
               "dtypes": [DTYPE_NAMES[d] for _, d, _ in MODES]}
    results = Results(os.path.join(args.out_dir, "gpu.json"), args.resume, setting)
    started = time.perf_counter()
    for section in sections:
        begun = time.perf_counter()
        SECTIONS[section](results, device, args.quick, args.repeats)
        print(f"[{section}: {time.perf_counter() - begun:.0f} s]", flush=True)
    with open(os.path.join(args.out_dir, "gpu.md"), "w") as f:
        f.write(render(results.data))
    print(f"done in {time.perf_counter() - started:.0f} s: {args.out_dir}/gpu.json, gpu.md")


if __name__ == "__main__":
    main()
