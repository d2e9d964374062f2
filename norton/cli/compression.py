"""``norton decompose / prune / compress``: NORTON's stages, one at a time or in one run."""
from __future__ import annotations

import argparse

import torch

from norton.checkpoints import save_checkpoint
from norton.cli.common import (
    add_command,
    add_data_args,
    add_train_args,
    check_out,
    device_and_processes,
    fraction,
    human,
    key_value,
    layer_rates,
    load_splits,
    model_from_args,
    positive_rank,
    rank,
    reduction,
    train_config,
)
from norton.compression import decompose, prune
from norton.core import complexity
from norton.training import CompressConfig, compress, evaluate, load_dataset


def cmd_decompose(args: argparse.Namespace) -> int:
    check_out(args)
    model = model_from_args(args, rank=0, compress_rate=args.compress_rate).model
    before = complexity(model)
    layer_ranks = dict(key_value(item, int, "--layer-rank") for item in args.layer_rank)
    report = decompose(model, args.rank, layer_ranks=layer_ranks, skip=args.skip,
                       init=args.init, n_iter_max=args.n_iter_max, seed=args.seed)
    after = complexity(model)
    print(report.table())
    print(f"MACs {human(before.macs)} -> {human(after.macs)} ({reduction(after.macs, before.macs):.2f}% ↓); "
          f"params {human(before.params)} -> {human(after.params)} ({reduction(after.params, before.params):.2f}% ↓)")
    save_checkpoint(args.out, model, metrics={"macs": after.macs, "params": after.params, "mean_nmse": report.mean_nmse},
                    extra={"stage": "decompose", "rank": args.rank})
    print(f"saved {args.out}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    check_out(args)
    model = model_from_args(args, rank=args.rank, compress_rate=None).model
    rates = layer_rates(args)
    test = load_dataset(args.data, args.data_dir, "test") if args.data else None
    before = evaluate(model, test, device=torch.device("cpu")) if test is not None else None
    report = prune(model, rates or args.compress_rate, amount=args.amount, target_macs=args.target_macs,
                   example_inputs=torch.zeros(1, *model.default_input_size), criterion=args.criterion,
                   seed=args.seed, progress=True)
    print(report.table())
    if test is not None:
        after = evaluate(model, test, device=torch.device("cpu"))
        print(f"test top-1 before pruning {before['top1']:.2f}%, right after pruning (no fine-tuning) {after['top1']:.2f}%")
    save_checkpoint(args.out, model, metrics={"macs": report.macs_after, "params": report.params_after},
                    extra={"stage": "prune", "criterion": args.criterion, "kept": {g.root: g.kept for g in report.groups}})
    print(f"saved {args.out}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    device, ddp = device_and_processes(args)
    model = model_from_args(args).model
    rates = layer_rates(args)
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


def register(sub) -> None:
    p = add_command(sub, "decompose", cmd_decompose, "replace every k×k conv by a CPDBlock and save the model",
                    "norton decompose --arch resnet_56 --ckpt baseline.pt -r 1 --out decomposed.pt\n"
                    "  norton decompose --ckpt baseline.pt -r 4 --layer-rank conv1=0 --out decomposed.pt")
    p.add_argument("--arch", "-a", default=None, help="zoo architecture of the dense model (not needed for a norton checkpoint)")
    p.add_argument("-r", "--rank", type=positive_rank, required=True, help="CP rank of every decomposed conv")
    p.add_argument("-cpr", "--compress-rate", default=None, help="widths of the dense model, if it is a pruned zoo model")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--ckpt", default=None, help="the dense model: norton checkpoint or state dict (default: random weights)")
    p.add_argument("--layer-rank", action="append", default=[], metavar="NAME=R", help="per-layer rank (0 keeps it dense)")
    p.add_argument("--skip", action="append", default=[], metavar="NAME", help="leave this conv dense")
    p.add_argument("--init", choices=("svd", "random"), default="svd")
    p.add_argument("--n-iter-max", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="where to write the decomposed checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = add_command(sub, "prune", cmd_prune, "remove redundant filters (NORTON criteria) and save the model",
                    'norton prune --arch resnet_56 -r 1 -cpr "[0.]+[0.18]*29" --ckpt decomposed.pt --criterion pabs --out pruned.pt\n'
                    "  norton prune --ckpt decomposed.pt --target-macs 0.6 --out pruned.pt\n"
                    "  norton prune --ckpt decomposed.pt --layer-rate layer1.0.conv1=0.5 --criterion vbd --out pruned.pt")
    p.add_argument("--arch", "-a", default=None, help="zoo architecture (not needed for a norton checkpoint)")
    p.add_argument("-r", "--rank", type=rank, default=0, help="rank of the loaded zoo model (state-dict files)")
    p.add_argument("-cpr", "--compress-rate", default=None, help="zoo compress rate to prune to")
    p.add_argument("--layer-rate", action="append", default=[], metavar="NAME=RATE", help="prune this layer at RATE")
    p.add_argument("--amount", type=fraction, default=None, help="one rate for every prunable layer")
    p.add_argument("--target-macs", type=fraction, default=None, help="fraction of MACs to remove")
    p.add_argument("--criterion", default="pabs", help="pabs (default), vbd, csa, l2, random; l1, fpgm (torch-pruning importances, plain convs)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--ckpt", default=None, help="the model to prune: norton checkpoint or state dict")
    p.add_argument("--data", default=None, help="print test accuracy before and right after pruning on this dataset")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="where to write the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = add_command(sub, "compress", cmd_compress, "decompose + prune + fine-tune in one resumable run",
                    "norton compress --ckpt runs/base/model.pt -r 4 --amount 0.5 --data fashion-mnist "
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
    add_train_args(p)
