"""``norton train / finetune / evaluate / compress``: argument groups and commands."""
from __future__ import annotations

import argparse
import json
import os

import torch

from norton.errors import NortonError


# -- argument groups ------------------------------------------------------------------------
def add_data_args(p: argparse.ArgumentParser) -> None:
    from norton.data import DATASETS

    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help=f"dataset: {', '.join(DATASETS)}")
    g.add_argument("--data-dir", default=None, help="dataset folder (fashion-mnist defaults to /usr/share/datasets/fashion-mnist)")
    g.add_argument("--subset", type=int, default=None, help="use only this many training images (fixed shuffle)")
    g.add_argument("--val-size", type=int, default=None, help="held-out validation images from the training set (default 10%%, at most 5000)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")


def add_train_args(p: argparse.ArgumentParser, *, epochs: int, lr: float, warmup: int) -> None:
    g = p.add_argument_group("training (defaults: the published CIFAR recipe)")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--warmup-epochs", type=int, default=warmup)
    g.add_argument("--label-smoothing", type=float, default=0.0, help="0.1 for ImageNet")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--run-dir", required=True, help="where checkpoints and metrics.jsonl go")
    g.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    g.add_argument("--overwrite", action="store_true", help="discard a previous run in --run-dir")


def train_config(args: argparse.Namespace):
    from norton.train import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                       weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                       label_smoothing=args.label_smoothing, seed=args.seed)


def load_splits(args: argparse.Namespace):
    from norton.data import limit, load_dataset, split_validation

    train = limit(load_dataset(args.data, args.data_dir, "train"), args.subset, args.seed)
    test = load_dataset(args.data, args.data_dir, "test")
    val_size = args.val_size if args.val_size is not None else min(5000, max(1, len(train) // 10))
    train, val = split_validation(train, val_size, args.seed)
    return train, val, test


def dataset_shape(train) -> tuple[int, int]:
    """(classes, input channels) of a dataset."""
    from norton.data import ArrayDataset

    if isinstance(train, ArrayDataset):
        return train.num_classes, train.images.shape[1]
    base = getattr(train, "dataset", train)
    return len(base.classes), 3


def _context(args: argparse.Namespace):
    from norton.train import init_distributed, resolve_device

    device = resolve_device(args.device)
    return device, init_distributed(device)


# -- commands ---------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from norton.models import create_model

    device, ddp = _context(args)
    train, val, test = load_splits(args)
    classes, channels = dataset_shape(train)
    torch.manual_seed(args.seed)  # the initial weights follow the seed too
    model = create_model(args.arch, rank=args.rank, compress_rate=args.compress_rate,
                         num_classes=classes, in_channels=channels)
    _fit_and_save(args, model, (train, val, test), device, ddp, stage="train")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from norton.checkpoint import load_model

    device, ddp = _context(args)
    model, _ = load_model(args.ckpt)
    train, val, test = load_splits(args)
    from norton.data import input_size_of
    from norton.deploy import tune_plans

    tune_plans(model, torch.zeros(2, *input_size_of(train)), training=True)  # the fastest trainable plan per layer
    _fit_and_save(args, model, (train, val, test), device, ddp, stage="finetune")
    return 0


def _fit_and_save(args: argparse.Namespace, model, splits, device, ddp, *, stage: str) -> None:
    """Train, keep the best validation epoch, evaluate on the test set, write model.pt."""
    from norton.checkpoint import save_checkpoint
    from norton.train import evaluate, fit, load_best

    train, val, test = splits
    result = fit(model, train, val, train_config(args), args.run_dir, device=device, resume=args.resume,
                 overwrite=args.overwrite, extra={"stage": stage, "data": args.data}, ddp=ddp)
    load_best(model, args.run_dir)
    metrics = evaluate(model, test, device=device, ddp=ddp)
    if ddp.main:
        path = os.path.join(args.run_dir, "model.pt")
        save_checkpoint(path, model, metrics={"test": metrics, "val_top1": result.best_val["top1"],
                                              "best_epoch": result.best_epoch, **_complexity(model, train)},
                        extra={"stage": stage, "data": args.data})
        print(f"best epoch {result.best_epoch}: val top-1 {result.best_val['top1']:.2f}%; "
              f"test top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% -> {path}")


def _complexity(model, data) -> dict[str, int]:
    from norton.complexity import complexity
    from norton.data import input_size_of

    cx = complexity(model, list(input_size_of(data)))
    return {"macs": cx.macs, "params": cx.params}


def load_any_model(args: argparse.Namespace):
    """A norton checkpoint, or a research-code file with --arch/-r/-cpr or its published name."""
    from norton.checkpoint import FORMAT, _safe_load, load_model
    from norton.research import load_research_checkpoint

    obj = _safe_load(args.ckpt)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return load_model(args.ckpt)[0]
    model, _ = load_research_checkpoint(args.ckpt, arch=args.arch, rank=args.rank, compress_rate=args.compress_rate,
                                        num_classes=args.num_classes)
    return model


def cmd_evaluate(args: argparse.Namespace) -> int:
    from norton.data import load_dataset
    from norton.train import evaluate, resolve_device

    device = resolve_device(args.device)
    model = load_any_model(args).to(device)
    test = load_dataset(args.data, args.data_dir, "test")
    metrics = evaluate(model, test, device=device)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  ({metrics['images']} images)")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from norton.checkpoint import load_model
    from norton.pipeline import CompressConfig, compress

    device, ddp = _context(args)
    model, _ = load_model(args.ckpt)
    rates = dict(key_value(item, float, "--layer-rate") for item in args.layer_rate) or None
    if rates and args.compress_rate:
        raise NortonError("give either -cpr or --layer-rate, not both")
    train, val, test = load_splits(args)
    config = CompressConfig(rank=args.rank, compress_rate=rates or args.compress_rate, amount=args.amount,
                            target_macs=args.target_macs, criterion=args.criterion, recalibrate=not args.no_recalibrate,
                            recalibration_images=args.recalibration_images, finetune=train_config(args), seed=args.seed)
    summary = compress(model, train, val, test, config, args.run_dir, device=device, resume=args.resume,
                       overwrite=args.overwrite, ddp=ddp)
    if ddp.main:
        print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    rows = ["| stage | top-1 (%) | after BN recalibration (%) | MACs | params |", "|---|---|---|---|---|"]
    for stage in ("baseline", "decomposed", "pruned", "final"):
        s = summary.get(stage)
        if not s:
            continue
        recal = s.get("recalibrated")
        rows.append(f"| {stage} | {s['top1']:.2f} | {recal['top1']:.2f} |" if recal else f"| {stage} | {s['top1']:.2f} | — |")
        rows[-1] += f" {s['macs']:,} | {s['params']:,} |"
    return "\n".join(rows)


def key_value(item: str, cast, flag: str):
    """``NAME=VALUE`` -> (name, cast(value)), or an error naming the flag."""
    name, sep, value = item.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, cast(value)
    except ValueError:
        raise NortonError(f"{flag} takes NAME=VALUE with a {cast.__name__} value, got {item!r}") from None


def register(sub, parser_class, rank_type, positive_rank, fraction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train", help="train a zoo model (the baseline)", formatter_class=fmt,
                       epilog="examples:\n  norton train --arch resnet_20 --data fashion-mnist --epochs 30 --run-dir runs/base\n"
                              "  torchrun --nproc_per_node 2 -m norton.cli train --arch resnet_56 --data cifar10 "
                              "--data-dir ~/data --run-dir runs/r56 --device cpu")
    p.add_argument("--arch", "-a", required=True)
    p.add_argument("-r", "--rank", type=rank_type, default=0)
    p.add_argument("-cpr", "--compress-rate", default=None)
    add_data_args(p)
    add_train_args(p, epochs=400, lr=0.05, warmup=5)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a norton checkpoint", formatter_class=fmt,
                       epilog="examples:\n  norton finetune --ckpt pruned.pt --data cifar10 --data-dir ~/data --run-dir runs/ft")
    p.add_argument("--ckpt", required=True)
    add_data_args(p)
    add_train_args(p, epochs=400, lr=0.05, warmup=5)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="top-1/top-5 and loss of a checkpoint on a test set", formatter_class=fmt,
                       epilog="examples:\n  norton evaluate --ckpt runs/ft/model.pt --data cifar10 --data-dir ~/data\n"
                              "  norton evaluate --ckpt 'vgg_16_bn_[0.6]*6+[0.8]*7_1_90.32.pt' --data cifar10 --data-dir ~/data --json")
    p.add_argument("--ckpt", required=True, help="norton checkpoint, or a research-code file")
    p.add_argument("--arch", "-a", default=None, help="research-code files: architecture (default: from the file name)")
    p.add_argument("-r", "--rank", type=rank_type, default=None, help="research-code files: rank")
    p.add_argument("-cpr", "--compress-rate", default=None, help="research-code files: compress rate")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--data", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compress", help="decompose + prune + fine-tune in one resumable run", formatter_class=fmt,
                       epilog="examples:\n  norton compress --ckpt runs/base/model.pt -r 4 --amount 0.5 --data fashion-mnist "
                              "--epochs 10 --run-dir runs/c1\n"
                              '  norton compress --ckpt base.pt -r 1 -cpr "[0.]+[0.18]*29" --data cifar10 --data-dir ~/data --run-dir runs/r56')
    p.add_argument("--ckpt", required=True, help="the trained baseline (norton checkpoint)")
    p.add_argument("-r", "--rank", type=positive_rank, required=True)
    p.add_argument("-cpr", "--compress-rate", default=None)
    p.add_argument("--layer-rate", action="append", default=[], metavar="NAME=RATE")
    p.add_argument("--amount", type=fraction, default=None)
    p.add_argument("--target-macs", type=fraction, default=None)
    p.add_argument("--criterion", default="pabs")
    p.add_argument("--no-recalibrate", action="store_true", help="skip BatchNorm recalibration after decompose and prune")
    p.add_argument("--recalibration-images", type=int, default=512)
    add_data_args(p)
    add_train_args(p, epochs=400, lr=0.05, warmup=5)
    p.set_defaults(func=cmd_compress)


# -- speed: benchmark and export ---------------------------------------------------------------
def _model_and_baseline(args: argparse.Namespace):
    """(compressed model, uncompressed baseline, example input) for benchmark/export."""
    from norton.architecture import build_base
    from norton.checkpoint import load_model
    from norton.models import create_model

    if args.ckpt:
        model, ckpt = load_model(args.ckpt)
        base = ckpt["architecture"].get("base")
        baseline = build_base(base) if base else None
    elif args.arch:
        model = create_model(args.arch, rank=args.rank, compress_rate=args.compress_rate)
        baseline = create_model(args.arch)
    else:
        raise NortonError("give --ckpt or --arch (with -r/-cpr)")
    channels, height, width = model.default_input_size
    if args.input_size:
        height = width = args.input_size
    torch.manual_seed(0)
    example = torch.randn(args.batch_size, channels, height, width)
    return model.eval(), (baseline.eval() if baseline is not None else None), example


def cmd_benchmark(args: argparse.Namespace) -> int:
    import statistics
    import tempfile

    from norton.benchmark import compare_latency
    from norton.deploy import deploy
    from norton.train import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, baseline, example = _model_and_baseline(args)
    from norton.models.detection import is_detector

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
        from norton.export import export_onnx, onnx_latency_ms

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
    from norton.benchmark import compare_latency
    from norton.deploy import tune_plans

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
    from norton.deploy import deploy
    from norton.export import export_onnx

    model, _, example = _model_and_baseline(args)
    deployed, report = deploy(model, example)
    result = export_onnx(deployed, example, args.onnx)
    print(f"exported {result.path}: onnx checker passed; ONNX Runtime vs PyTorch max |difference| {result.max_abs_diff:.2e}; "
          f"{report.folded_batchnorms} BatchNorms folded, {sum(c == 'conv' for c in report.layers.values())} of "
          f"{len(report.layers)} CPDBlocks as dense convs")
    return 0


def register_speed(sub, rank_type) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    for name, func, help_, example in (
        ("benchmark", cmd_benchmark, "latency and throughput of a compressed model against its uncompressed baseline",
         "norton benchmark --ckpt runs/c1/final.pt --batch-size 128\n"
         '  norton benchmark --arch vgg_16_bn -r 1 -cpr "[0.6]*6+[0.8]*7" --onnx --json'),
        ("export", cmd_export, "export the deployed model to ONNX (checked with onnx and ONNX Runtime)",
         "norton export --ckpt runs/c1/final.pt --onnx model.onnx"),
    ):
        p = sub.add_parser(name, help=help_, formatter_class=fmt, epilog="examples:\n  " + example)
        p.add_argument("--ckpt", default=None, help="norton checkpoint")
        p.add_argument("--arch", "-a", default=None, help="or a zoo architecture (random weights)")
        p.add_argument("-r", "--rank", type=rank_type, default=0)
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
        p.set_defaults(func=func)
