"""``norton benchmark / export``: latency against the uncompressed model, ONNX."""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch

from norton.cli.common import add_command, model_from_args, rank
from norton.core import tune_plans
from norton.deployment import compare_latency, deploy, export_onnx, onnx_latency_ms
from norton.detection import is_detector
from norton.errors import NortonError
from norton.training import resolve_device


def _model_and_baseline(args: argparse.Namespace):
    """(compressed model, uncompressed baseline or None, example input) for benchmark/export."""
    if not (args.ckpt or args.arch):
        raise NortonError("give --ckpt or --arch (with -r/-cpr)")
    loaded = model_from_args(args, rank=args.rank, compress_rate=args.compress_rate)
    model, baseline = loaded.model, loaded.baseline()
    channels, height, width = model.default_input_size
    if args.input_size:
        height = width = args.input_size
    torch.manual_seed(0)
    example = torch.randn(args.batch_size, channels, height, width)
    return model.eval(), (baseline.eval() if baseline is not None else None), example


def cmd_benchmark(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, baseline, example = _model_and_baseline(args)
    if is_detector(model):
        return _benchmark_detector(args, model, baseline, device)
    model, example = model.to(device), example.to(device)
    deployed, _ = deploy(model, example, repeats=3)
    models = {"compressed (eager)": model, "compressed (deployed)": deployed}
    if baseline is not None:
        baseline = baseline.to(device)
        models = {"baseline (eager)": baseline, "baseline (deployed)": deploy(baseline, example, repeats=3)[0], **models}
    lat = compare_latency(models, example, repeats=args.repeats)
    rows = {k: {"median_ms": v.median_ms, "p10_ms": v.p10_ms, "p90_ms": v.p90_ms,
                "images_per_s": example.shape[0] * 1000 / v.median_ms} for k, v in lat.items()}
    if args.onnx and device.type == "cpu":
        with tempfile.TemporaryDirectory() as tmp:
            for name, m in (("compressed (ONNX Runtime)", deployed), ("baseline (ONNX Runtime)", models.get("baseline (deployed)"))):
                if m is None:
                    continue
                path = export_onnx(m, example, f"{tmp}/m.onnx").path
                times = onnx_latency_ms(path, example, repeats=args.repeats, threads=torch.get_num_threads())
                q = statistics.quantiles(times, n=10)
                median = statistics.median(times)
                rows[name] = {"median_ms": median, "p10_ms": q[0], "p90_ms": q[-1], "images_per_s": example.shape[0] * 1000 / median}
    reference = rows.get("baseline (eager)", {}).get("median_ms")
    for row in rows.values():
        row["speedup_vs_baseline"] = reference / row["median_ms"] if reference else None
    record = {"batch": example.shape[0], "input": list(example.shape[1:]), "threads": torch.get_num_threads(),
              "device": str(device), "repeats": args.repeats, "results": rows}
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"batch {example.shape[0]}, input {tuple(example.shape[1:])}, {torch.get_num_threads()} threads, {device}, "
          f"median of {args.repeats} interleaved runs")
    print(f"{'model':<28} {'median':>10} {'p10–p90':>17} {'images/s':>10} {'vs baseline':>12}")
    for name, row in rows.items():
        speed = f"{row['speedup_vs_baseline']:.2f}×" if row["speedup_vs_baseline"] else "—"
        spread = f"{row['p10_ms']:.1f}–{row['p90_ms']:.1f} ms"
        print(f"{name:<28} {row['median_ms']:>8.1f} ms {spread:>17} {row['images_per_s']:>10.0f} {speed:>12}")
    return 0


def _benchmark_detector(args: argparse.Namespace, model, baseline, device) -> int:
    """Images/s of a detector against its uncompressed baseline at the model's
    resolution (800 px by default), one image per call."""
    size = args.input_size or 800
    for m in (model, baseline):
        if m is not None:
            m.transform.min_size, m.transform.max_size = (size,), size
    images = [torch.rand(3, size, size, device=device)]
    model = model.to(device)
    tune_plans(model, images)  # the fastest plan of every CPDBlock for this input
    models = {"compressed": model}
    if baseline is not None:
        models = {"baseline": baseline.to(device), **models}
    lat = compare_latency(models, images, warmup=2, repeats=args.repeats)
    rows = {k: {"median_ms": v.median_ms, "p10_ms": v.p10_ms, "p90_ms": v.p90_ms, "images_per_s": 1000 / v.median_ms}
            for k, v in lat.items()}
    if "baseline" in rows:
        for row in rows.values():
            row["speedup_vs_baseline"] = rows["baseline"]["median_ms"] / row["median_ms"]
    record = {"image": [3, size, size], "threads": torch.get_num_threads(), "device": str(device),
              "repeats": args.repeats, "results": rows}
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"detector, one {size}×{size} image per call, {torch.get_num_threads()} threads, {device}, "
          f"median of {args.repeats} interleaved runs")
    for name, row in rows.items():
        speed = f"{row['speedup_vs_baseline']:.2f}×" if "speedup_vs_baseline" in row else "—"
        print(f"{name:<12} {row['median_ms']:>9.1f} ms  {row['images_per_s']:>7.2f} images/s  {speed}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    model, _, example = _model_and_baseline(args)
    deployed, report = deploy(model, example)
    result = export_onnx(deployed, example, args.onnx)
    print(f"exported {result.path}: onnx checker passed; ONNX Runtime vs PyTorch max |difference| {result.max_abs_diff:.2e}; "
          f"{report.folded_batchnorms} BatchNorms folded, {sum(c == 'conv' for c in report.layers.values())} of "
          f"{len(report.layers)} CPDBlocks as dense convs")
    return 0


def register(sub) -> None:
    for name, func, help_, example in (
        ("benchmark", cmd_benchmark, "latency and throughput of a compressed model against its uncompressed baseline",
         "norton benchmark --ckpt runs/c1/final.pt --batch-size 128\n"
         '  norton benchmark --arch vgg_16_bn -r 1 -cpr "[0.6]*6+[0.8]*7" --onnx --json'),
        ("export", cmd_export, "export the deployed model to ONNX (checked with onnx and ONNX Runtime)",
         "norton export --ckpt runs/c1/final.pt --onnx model.onnx"),
    ):
        p = add_command(sub, name, func, help_, example)
        p.add_argument("--ckpt", default=None, help="norton checkpoint")
        p.add_argument("--arch", "-a", default=None, help="or a zoo architecture (random weights)")
        p.add_argument("-r", "--rank", type=rank, default=0)
        p.add_argument("-cpr", "--compress-rate", default=None)
        p.add_argument("--batch-size", type=int, default=128 if name == "benchmark" else 1)
        p.add_argument("--input-size", type=int, default=None, help="H = W (default: the model's)")
        if name == "benchmark":
            p.add_argument("--repeats", type=int, default=15)
            p.add_argument("--threads", type=int, default=None)
            p.add_argument("--device", default="cpu")
            p.add_argument("--onnx", action="store_true", help="also time ONNX Runtime")
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("--onnx", required=True, help="output .onnx file")
