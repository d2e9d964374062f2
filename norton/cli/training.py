"""``norton train / finetune / evaluate``: classification training and test accuracy."""
from __future__ import annotations

import argparse
import json
import os

import torch

from norton.checkpoints import save_checkpoint
from norton.cli.common import (
    add_command,
    add_data_args,
    add_folder_args,
    add_train_args,
    device_and_processes,
    folder_options,
    load_splits,
    model_from_args,
    rank,
    train_config,
)
from norton.core import complexity
from norton.errors import NortonError
from norton.models import create_model
from norton.training import (
    dataset_shape,
    evaluate,
    fit,
    input_size_of,
    load_best,
    load_dataset,
    read_images,
    resolve_device,
)


def cmd_train(args: argparse.Namespace) -> int:
    device, ddp = device_and_processes(args)
    train, val, test = load_splits(args)
    classes, channels = dataset_shape(train)
    torch.manual_seed(args.seed)  # the initial weights follow the seed too
    model = create_model(args.arch, rank=args.rank, compress_rate=args.compress_rate,
                         num_classes=classes, in_channels=channels)
    _fit_and_save(args, model, (train, val, test), device, ddp, stage="train", teacher=_teacher(args))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    device, ddp = device_and_processes(args)
    loaded = model_from_args(args)
    train, val, test = load_splits(args, loaded.checkpoint)
    _fit_and_save(args, loaded.model, (train, val, test), device, ddp, stage="finetune", teacher=_teacher(args))
    return 0


def _teacher(args: argparse.Namespace):
    """The model of ``--teacher`` (a norton checkpoint), for ``--distill``."""
    if not args.teacher:
        return None
    return model_from_args(argparse.Namespace(ckpt=args.teacher)).model


def _fit_and_save(args: argparse.Namespace, model, splits, device, ddp, *, stage: str, teacher=None) -> None:
    """Train, keep the best validation epoch, evaluate on the test set, write model.pt."""
    train, val, test = splits
    extra = {"stage": stage, "data": args.data, **({"data_source": train.source} if getattr(train, "source", None) else {})}
    result = fit(model, train, val, train_config(args), args.run_dir, device=device, resume=args.resume,
                 overwrite=args.overwrite, extra=extra, ddp=ddp, teacher=teacher)
    load_best(model, args.run_dir)
    metrics = evaluate(model, test, device=device, ddp=ddp)
    if ddp.main:
        path = os.path.join(args.run_dir, "model.pt")
        cx = complexity(model, list(input_size_of(train)))
        save_checkpoint(path, model, metrics={"test": metrics, "val_top1": result.best_val["top1"],
                                              "best_epoch": result.best_epoch, "macs": cx.macs, "params": cx.params},
                        input_size=list(input_size_of(train)), extra=extra)
        print(f"best epoch {result.best_epoch}: val top-1 {result.best_val['top1']:.2f}%; "
              f"test top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% -> {path}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    loaded = model_from_args(args, rank=args.rank, compress_rate=args.compress_rate, research=True)
    model = loaded.model.to(device)
    test = load_dataset(args.data, args.data_dir, "test", **folder_options(args, loaded.checkpoint))
    metrics = evaluate(model, test, device=device)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  ({metrics['images']} images)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise NortonError(f"--top must be at least 1, got {args.top}")
    device = resolve_device(args.device)
    loaded = model_from_args(args)
    source = ((loaded.checkpoint or {}).get("extra") or {}).get("data_source") or {}
    images = read_images(args.images, source).to(device)
    model = loaded.model.to(device).eval()
    with torch.no_grad():
        probabilities = model(images).softmax(1).cpu()
    top = min(args.top, probabilities.shape[1])
    values, indices = probabilities.topk(top, dim=1)
    classes = source["classes"]
    rows = [{"image": path, "predictions": [{"class": classes[i], "probability": round(float(p), 6)}
                                            for p, i in zip(v.tolist(), idx.tolist())]}
            for path, v, idx in zip(args.images, values, indices)]
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(f"{row['image']}: " + ", ".join(f"{p['class']} {100 * p['probability']:.1f}%" for p in row["predictions"]))
    return 0


def register(sub) -> None:
    p = add_command(sub, "train", cmd_train, "train a zoo model (the baseline)",
                    "norton train --arch resnet_20 --data fashion-mnist --epochs 30 --run-dir runs/base\n"
                    "  torchrun --nproc_per_node 2 -m norton.cli train --arch resnet_56 --data cifar10 "
                    "--data-dir ~/data --run-dir runs/r56 --device cpu")
    p.add_argument("--arch", "-a", required=True)
    p.add_argument("-r", "--rank", type=rank, default=0)
    p.add_argument("-cpr", "--compress-rate", default=None)
    p.add_argument("--teacher", default=None, help="norton checkpoint of a teacher model, for --distill")
    add_data_args(p)
    add_train_args(p)

    p = add_command(sub, "finetune", cmd_finetune, "fine-tune a norton checkpoint",
                    "norton finetune --ckpt pruned.pt --data cifar10 --data-dir ~/data --run-dir runs/ft")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--teacher", default=None, help="norton checkpoint of the uncompressed model, for --distill")
    add_data_args(p)
    add_train_args(p)

    p = add_command(sub, "predict", cmd_predict,
                    "classify image files with a checkpoint trained on an image folder (no data flags: the size, "
                    "normalisation and class names come from the checkpoint)",
                    "norton predict --ckpt runs/small/final.pt photo.jpg scan.png\n"
                    "  norton predict --ckpt runs/base/model.pt images/cat/*.png --top 3 --json")
    p.add_argument("--ckpt", required=True, help="norton checkpoint of a model trained with --data folder")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--top", type=int, default=1, help="the most probable classes to print per image (default 1)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")

    p = add_command(sub, "evaluate", cmd_evaluate, "top-1/top-5 and loss of a checkpoint on a test set",
                    "norton evaluate --ckpt runs/ft/model.pt --data cifar10 --data-dir ~/data\n"
                    "  norton evaluate --ckpt 'vgg_16_bn_[0.6]*6+[0.8]*7_1_90.32.pt' --data cifar10 --data-dir ~/data --json")
    p.add_argument("--ckpt", required=True, help="norton checkpoint, or a research-code file")
    p.add_argument("--arch", "-a", default=None, help="research-code files: architecture (default: from the file name)")
    p.add_argument("-r", "--rank", type=rank, default=None, help="research-code files: rank")
    p.add_argument("-cpr", "--compress-rate", default=None, help="research-code files: compress rate")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--data", required=True)
    add_folder_args(p)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
