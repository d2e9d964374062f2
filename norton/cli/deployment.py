"""``norton deploy / benchmark / export``: a model deployed for a device and a
number format, timed against the uncompressed model deployed the same way, ONNX."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import torch

from norton.checkpoints import atomic_write_text
from norton.cli.common import add_command, model_from_args, rank
from norton.core import DTYPE_NAMES, device_name, resolve_device, resolve_dtype
from norton.deployment import Latency, compare_latency, deploy, export_onnx, onnx_latency_ms
from norton.detection import backbone_batch, deploy_detector, is_detector, save_deployed
from norton.errors import NortonError


def batch_sizes(text: str) -> tuple[int, ...]:
    """``128`` or ``1,128``: the batches to time."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers like 1,128, got {text!r}")
    return tuple(dict.fromkeys(values))


def _target(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """``--device`` and ``--dtype``, checked before any model is built."""
    device = resolve_device(args.device)
    return device, resolve_dtype(args.dtype, device)


def _model_and_baseline(args: argparse.Namespace):
    """(compressed model, uncompressed baseline or None, one sample's input shape)."""
    if not (args.ckpt or args.arch):
        raise NortonError("give --ckpt or --arch (with -r/-cpr)")
    loaded = model_from_args(args, rank=args.rank, compress_rate=args.compress_rate)
    model, baseline = loaded.model, loaded.baseline()
    channels, height, width = model.default_input_size
    if args.input_size:
        height = width = args.input_size
    return model.eval(), (baseline.eval() if baseline is not None else None), (channels, height, width)


def _example(batch: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *shape, generator=generator).to(device)


def _row(latency, images: int, reference_ms: float | None) -> dict:
    return {"median_ms": latency.median_ms, "p10_ms": latency.p10_ms, "p90_ms": latency.p90_ms,
            "images_per_s": images * 1000 / latency.median_ms,
            "speedup_vs_dense_deployed": reference_ms / latency.median_ms if reference_ms else None}


def benchmark_batches(detector: bool) -> tuple[int, ...]:
    """``benchmark``'s batches when none are given: 1 and a serving batch — 128 images for a classifier, 8 for a
    detector (800×800 images: a batch of 128 needs far more memory than a 24 GiB machine has)."""
    return (1, 8) if detector else (1, 128)


def _setting(args, device, dtype) -> dict:
    return {"device": str(device), "device_name": device_name(device), "dtype": DTYPE_NAMES[dtype],
            "cuda_graph": bool(args.cuda_graph), "threads": torch.get_num_threads(), "repeats": getattr(args, "repeats", None),
            "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None}


def cmd_benchmark(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = _target(args)
    if args.cuda_graph and device.type != "cuda":
        raise NortonError(f"--cuda-graph needs a CUDA device, not {device}")
    model, baseline, shape = _model_and_baseline(args)
    args.batch_size = args.batch_size or benchmark_batches(is_detector(model))
    if is_detector(model):
        return _benchmark_detector(args, model, baseline, device, dtype)
    options = dict(device=device, dtype=dtype, cuda_graph=args.cuda_graph)
    record = {**_setting(args, device, dtype), "input": list(shape), "results": {}, "layers": {}}
    for batch in args.batch_size:
        example = _example(batch, shape, device)
        deployed, report = deploy(model, example, **options)
        record["layers"][str(batch)] = report.layers
        models = {"compressed (deployed)": deployed}
        if baseline is not None:
            models = {"dense (deployed)": deploy(baseline, example, **options)[0], **models}
        if args.eager:  # as trained: float32, no folding, no layout or plan choice
            models["compressed (eager)"] = model.to(device)
            if baseline is not None:
                models["dense (eager)"] = baseline.to(device)
        lat = compare_latency(models, example, repeats=args.repeats)
        reference = lat["dense (deployed)"].median_ms if baseline is not None else None
        rows = {name: _row(value, batch, reference) for name, value in lat.items()}
        if args.onnx and device.type == "cpu" and dtype == torch.float32:
            with tempfile.TemporaryDirectory() as tmp:
                for name, m in (("dense (ONNX Runtime)", models.get("dense (deployed)")),
                                ("compressed (ONNX Runtime)", deployed)):
                    if m is None:
                        continue
                    path = export_onnx(m, example, f"{tmp}/m.onnx").path
                    times = onnx_latency_ms(path, example, repeats=args.repeats, threads=torch.get_num_threads())
                    q = statistics.quantiles(times, n=10)
                    rows[name] = _row(Latency(statistics.median(times), q[0], q[-1], len(times)), batch, reference)
        record["results"][str(batch)] = rows
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"{record['device_name']} ({device}), {record['dtype']}"
          f"{', CUDA graph' if args.cuda_graph else ''}, input {tuple(shape)}, median of {args.repeats} interleaved runs; "
          "speed-ups against the dense model deployed the same way")
    for batch, rows in record["results"].items():
        print(f"batch {batch}")
        _print_rows(rows)
        if all(choice == "conv" for choice in record["layers"][batch].values()) and record["layers"][batch]:
            print("  (no factored form is faster here: every factored layer runs as its dense conv)")
    return 0


def _print_rows(rows: dict) -> None:
    print(f"  {'model':<28} {'median':>10} {'p10–p90':>19} {'images/s':>10} {'vs dense':>9}")
    for name, row in rows.items():
        speed = f"{row['speedup_vs_dense_deployed']:.2f}×" if row["speedup_vs_dense_deployed"] else "—"
        spread = f"{row['p10_ms']:.2f}–{row['p90_ms']:.2f} ms"
        print(f"  {name:<28} {row['median_ms']:>7.2f} ms {spread:>19} {row['images_per_s']:>10.1f} {speed:>9}")


def _benchmark_detector(args: argparse.Namespace, model, baseline, device, dtype) -> int:
    """The whole detector and its backbone + FPN, deployed against the
    uncompressed detector deployed the same way, at each batch of
    ``size``×``size`` images (800 px by default)."""
    size = args.input_size or 800
    for m in (model, baseline):
        if m is not None:
            m.transform.min_size, m.transform.max_size = (size,), size
    record = {**_setting(args, device, dtype), "image": [3, size, size], "results": {}, "backbone": {}}
    for batch in args.batch_size:
        generator = torch.Generator().manual_seed(0)
        images = [torch.rand(3, size, size, generator=generator).to(device) for _ in range(batch)]
        options = dict(device=device, dtype=dtype, cuda_graph=args.cuda_graph)
        deployed = {"compressed": deploy_detector(model, images, **options)[0]}
        if baseline is not None:
            deployed = {"dense": deploy_detector(baseline, images, **options)[0], **deployed}
        lat = compare_latency(deployed, images, warmup=2, repeats=args.repeats)
        reference = lat["dense"].median_ms if baseline is not None else None
        record["results"][str(batch)] = {f"{k} (deployed)": _row(v, batch, reference) for k, v in lat.items()}
        features = backbone_batch(deployed["compressed"], images)
        lat = compare_latency({k: d.backbone for k, d in deployed.items()}, features, warmup=2, repeats=args.repeats)
        reference = lat["dense"].median_ms if baseline is not None else None
        record["backbone"][str(batch)] = {f"{k} backbone + FPN": _row(v, batch, reference) for k, v in lat.items()}
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"detector, {size}×{size} images, {record['device_name']} ({device}), {record['dtype']}"
          f"{', CUDA graph backbone' if args.cuda_graph else ''}, median of {args.repeats} interleaved runs; "
          "speed-ups against the dense detector deployed the same way")
    for batch in record["results"]:
        print(f"batch {batch}")
        _print_rows({**record["results"][batch], **record["backbone"][batch]})
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    device, dtype = _target(args)
    if os.path.exists(args.out) and not args.overwrite:
        raise NortonError(f"{args.out!r} exists; pass --overwrite to replace it")
    model, _, shape = _model_and_baseline(args)
    batch = args.batch_size[0]
    if is_detector(model):
        size = args.input_size or 800
        model.transform.min_size, model.transform.max_size = (size,), size
        images = [torch.rand(3, size, size, device=device) for _ in range(batch)]
        _, report = deploy_detector(model, images, device=device, dtype=dtype, cuda_graph=args.cuda_graph)
        saved = dict(image_size=size)
    else:
        _, report = deploy(model, _example(batch, shape, device), device=device, dtype=dtype, cuda_graph=args.cuda_graph)
        saved = dict(input_size=list(shape))
    print(report.table())
    # the model's tensors and the forms chosen for it, no pickled module; a CUDA graph is captured where it is loaded
    save_deployed(args.out, model.cpu(), report, batch=batch, **saved)
    atomic_write_text(os.path.splitext(args.out)[0] + ".deploy.json", json.dumps(
        {**_setting(args, device, dtype), "batch": batch, "report": report.to_dict()}, indent=1))
    print(f"wrote {args.out}: load it deployed with norton.load_deployed(path) (device=, cuda_graph= to change where "
          "and how it runs)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    device, dtype = _target(args)
    if dtype != torch.float32:
        raise NortonError(f"--dtype {DTYPE_NAMES[dtype]}: ONNX export writes float32 models (ONNX Runtime checks them "
                          "on the CPU); deploy or benchmark take bfloat16 / float16")
    model, _, shape = _model_and_baseline(args)
    example = _example(args.batch_size[0], shape, torch.device("cpu"))
    deployed, report = deploy(model, example.to(device), device=device)
    result = export_onnx(deployed.cpu(), example, args.onnx)
    print(f"exported {result.path}: onnx checker passed; ONNX Runtime vs PyTorch max |difference| {result.max_abs_diff:.2e}; "
          f"{report.folded_batchnorms} BatchNorms folded, {sum(c == 'conv' for c in report.layers.values())} of "
          f"{len(report.layers)} factored layers as dense convs (forms chosen by timing on {device})")
    return 0


def register(sub) -> None:
    for name, func, help_, example in (
        ("deploy", cmd_deploy, "deploy a model for a device and number format (BN folded, fastest form per layer)",
         "norton deploy --ckpt runs/c1/final.pt --out deployed.pt\n"
         "  norton deploy --ckpt runs/c1/final.pt --out deployed.pt --device cuda --dtype bf16 --batch-size 256"),
        ("benchmark", cmd_benchmark, "latency and throughput of a compressed model against its uncompressed "
                                     "baseline, both deployed the same way",
         "norton benchmark --ckpt runs/c1/final.pt --batch-size 1,128\n"
         '  norton benchmark --arch vgg_16_bn -r 1 -cpr "[0.6]*6+[0.8]*7" --device cuda --dtype bf16 --cuda-graph --json'),
        ("export", cmd_export, "export the deployed model to ONNX (checked with onnx and ONNX Runtime)",
         "norton export --ckpt runs/c1/final.pt --onnx model.onnx"),
    ):
        p = add_command(sub, name, func, help_, example)
        p.add_argument("--ckpt", default=None, help="norton checkpoint")
        p.add_argument("--arch", "-a", default=None, help="or a zoo architecture (random weights)")
        p.add_argument("-r", "--rank", type=rank, default=0)
        p.add_argument("-cpr", "--compress-rate", default=None)
        p.add_argument("--batch-size", type=batch_sizes, default=None if name == "benchmark" else (1,),
                       help="batches to deploy and time at, a list such as 1,128 (default 1,128; detectors 1,8)"
                       if name == "benchmark" else "batch the forms are chosen for (default 1)")
        p.add_argument("--input-size", type=int, default=None, help="H = W (default: the model's; detectors: 800)")
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
        p.add_argument("--dtype", default="float32", help="float32 (fp32), bfloat16 (bf16) or float16 (fp16, GPU only)")
        if name in ("benchmark", "deploy"):
            p.add_argument("--cuda-graph", action="store_true", help="replay the forward from a CUDA graph (fixed shapes)")
        if name == "benchmark":
            p.add_argument("--repeats", type=int, default=15)
            p.add_argument("--threads", type=int, default=None)
            p.add_argument("--eager", action="store_true", help="also time both models as trained (float32, not deployed)")
            p.add_argument("--onnx", action="store_true", help="also time ONNX Runtime (CPU, float32)")
            p.add_argument("--json", action="store_true")
        elif name == "deploy":
            p.add_argument("--out", required=True, help="file for the deployment: a norton checkpoint of the model with "
                                                        "the forms chosen for it (norton.load_deployed rebuilds it)")
            p.add_argument("--overwrite", action="store_true")
        else:
            p.add_argument("--onnx", required=True, help="output .onnx file")
