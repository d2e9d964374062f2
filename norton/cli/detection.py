"""``norton detect-train / detect-eval / detect``: detectors on COCO-format data."""
from __future__ import annotations

import argparse
import inspect
import json
import os

import torch
from torchvision.io import ImageReadMode, decode_image, write_png

from norton.checkpoints import atomic_write_text
from norton.cli.common import add_command, key_value, model_from_args, rank
from norton.detection import (
    DETECTORS,
    CocoData,
    DetectTrainConfig,
    draw_detections,
    evaluate_detector,
    is_detector,
    stats_table,
    train_detector,
)
from norton.errors import NortonError
from norton.models import create_model
from norton.training import init_distributed, resolve_device


def _coco_paths(args: argparse.Namespace, split: str, task: str) -> tuple[str, str]:
    """Explicit --{split}-images/--{split}-ann, else the COCO-2017 layout under --data."""
    images, ann = getattr(args, f"{split}_images", None), getattr(args, f"{split}_ann", None)
    if images and ann:
        return images, ann
    if not args.data:
        raise NortonError(f"give --data (COCO-2017 layout) or both --{split}-images and --{split}-ann")
    prefix = "person_keypoints" if task == "keypoints" else "instances"
    return (images or os.path.join(args.data, f"{split}2017"),
            ann or os.path.join(args.data, "annotations", f"{prefix}_{split}2017.json"))


def _number(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def _detector_options(items: list[str], arch: str) -> dict:


    accepted = set()
    for cls in DETECTORS[arch].cls.__mro__:
        if "__init__" in vars(cls):
            accepted |= set(inspect.signature(cls.__init__).parameters) - {"self", "backbone", "num_classes", "kwargs"}
    options = dict(key_value(item, _number, "--detector-option") for item in items)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise NortonError(f"--detector-option {unknown[0]!r} is not a keyword of torchvision's {DETECTORS[arch].cls.__name__}; "
                          f"accepted: {', '.join(sorted(accepted))}")
    return options


def _detector(args: argparse.Namespace, data):

    kwargs = {**_detector_options(args.detector_option, args.arch),"rank": args.rank, "compress_rate": args.compress_rate, "num_classes": len(data.class_names),
              "backbone_ckpt": args.backbone_ckpt, "trainable_backbone_layers": args.trainable_backbone_layers,
              "min_size": args.min_size, "max_size": args.max_size}
    if data.task == "keypoints":
        kwargs["num_keypoints"] = len(data.keypoint_names)
    return create_model(args.arch, **kwargs)


def cmd_detect_train(args: argparse.Namespace) -> int:
    task = DETECTORS[args.arch].task
    device = resolve_device(args.device)
    ddp = init_distributed(device)
    train = CocoData(*_coco_paths(args, "train", task), task, train=True)
    val = None if args.no_eval else CocoData(*_coco_paths(args, "val", task), task, train=False)
    torch.manual_seed(args.seed)
    model = _detector(args, train)
    config = DetectTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_steps=args.lr_steps,
                               warmup_iters=args.warmup_iters, seed=args.seed, checkpoint_every=args.checkpoint_every,
                               max_iters=args.max_iters)
    if ddp.main:
        print(f"{args.arch}: {len(train)} training images, {len(train.class_names) - 1} classes; "
              f"{config.epochs} epochs, lr steps at {config.milestones()}, global batch {config.batch_size * ddp.world_size}")
    done = train_detector(model, train, config, args.run_dir, device=device, resume=args.resume, overwrite=args.overwrite,
                          ddp=ddp, extra={"min_size": args.min_size, "max_size": args.max_size})
    if val is not None:
        stats = evaluate_detector(model, val, device=device, ddp=ddp, batch_size=args.batch_size)
        if ddp.main:
            atomic_write_text(os.path.join(args.run_dir, "eval.json"), json.dumps(stats, indent=1))
            print(f"after {done['iteration']} iterations, COCO evaluation on {len(val)} images (%):")
            print(stats_table(stats))
    if ddp.main:
        print(f"written: {os.path.join(args.run_dir, 'final.pt')}")
    return 0


def _load_detector(args: argparse.Namespace):
    loaded = model_from_args(args)
    if loaded.checkpoint is None:
        raise NortonError(f"{args.ckpt!r} is not a norton checkpoint; give a detector checkpoint written by detect-train")
    if not is_detector(loaded.model):
        raise NortonError(f"checkpoint {args.ckpt!r} holds a {loaded.arch}, not a detector ({', '.join(DETECTORS)})")
    return loaded.model, loaded.checkpoint


def cmd_detect_eval(args: argparse.Namespace) -> int:

    device = resolve_device(args.device)
    ddp = init_distributed(device)
    model, ckpt = _load_detector(args)
    task = DETECTORS[ckpt["architecture"]["base"]["arch"]].task
    data = CocoData(*_coco_paths(args, "val", task), task, train=False)
    stats = evaluate_detector(model, data, device=device, ddp=ddp, batch_size=args.batch_size)
    if ddp.main:
        if args.json:
            print(json.dumps(stats))
        else:
            print(f"COCO evaluation of {args.ckpt} on {len(data)} images (%):")
            print(stats_table(stats))
    return 0


def cmd_detect(args: argparse.Namespace) -> int:


    if not os.path.isfile(args.image):
        raise NortonError(f"image {args.image!r} does not exist")
    if not args.output.lower().endswith(".png"):
        raise NortonError(f"--output must be a .png file, got {args.output!r}")
    if not 0 <= args.score_threshold <= 1:
        raise NortonError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    try:
        image = decode_image(args.image, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise NortonError(f"cannot read image {args.image!r}: {err}") from None
    model, ckpt = _load_detector(args)
    extra = ckpt.get("extra") or {}
    skeleton = [tuple(e) for e in extra.get("skeleton") or []]
    canvas, detections = draw_detections(model, image, class_names=extra.get("categories"), skeleton=skeleton,
                                         score_threshold=args.score_threshold, device=resolve_device(args.device))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_png(canvas.to(torch.uint8), args.output)
    print(f"{len(detections)} detection(s) with score >= {args.score_threshold}:")
    for d in detections:
        print(f"  {d['label']:<24} box {d['box']}")
    print(f"written: {args.output}")
    return 0


def register(sub) -> None:
    p = add_command(sub, "detect-train", cmd_detect_train,
                    "train Faster/Mask/Keypoint R-CNN on a NORTON ResNet-50 (COCO format)",
                    "norton detect-train --arch fasterrcnn_resnet50_fpn --data /data/coco "
                    "--backbone-ckpt resnet50_norton.pt --run-dir runs/frcnn\n"
                    "  torchrun --nproc_per_node 8 -m norton detect-train --arch maskrcnn_resnet50_fpn "
                    "-r 4 -cpr '[0.]+[0.1]*3+[0.3]*16' --data /data/coco --run-dir runs/mrcnn\n"
                    "  norton detect-train ... --resume   # continue from the last checkpoint")
    p.add_argument("--arch", "-a", required=True, choices=list(DETECTORS))
    p.add_argument("-r", "--rank", type=rank, default=0, help="CP rank of the ResNet-50 body (0: dense)")
    p.add_argument("-cpr", "--compress-rate", default=None, help="resnet_50 compress rate (20 entries)")
    p.add_argument("--backbone-ckpt", default=None, help="norton resnet_50 checkpoint or torchvision ResNet-50 state dict")
    p.add_argument("--trainable-backbone-layers", type=int, default=3)
    _coco_args(p, splits=("train", "val"))
    g = p.add_argument_group("training (defaults: torchvision's detection recipe)")
    g.add_argument("--epochs", type=int, default=26)
    g.add_argument("--batch-size", type=int, default=2, help="images per process")
    g.add_argument("--lr", type=float, default=0.02, help="for 16 images per step; scaled with the global batch")
    g.add_argument("--lr-steps", type=int, nargs="+", default=[16, 22], help="lr × 0.1 at these epochs (of 26; scaled)")
    g.add_argument("--warmup-iters", type=int, default=1000)
    g.add_argument("--min-size", type=int, default=800, help="shorter image side fed to the network")
    g.add_argument("--max-size", type=int, default=1333, help="longer side at most")
    g.add_argument("--detector-option", action="append", default=[], metavar="NAME=VALUE",
                   help="a keyword of torchvision's detector class, e.g. box_detections_per_img=50")
    g.add_argument("--checkpoint-every", type=int, default=500, help="iterations between checkpoints")
    g.add_argument("--max-iters", type=int, default=None, help="stop after this many iterations")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-eval", action="store_true", help="skip the COCO evaluation on the val split")
    g.add_argument("--run-dir", required=True)
    g.add_argument("--resume", action="store_true")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")

    p = add_command(sub, "detect-eval", cmd_detect_eval, "COCO AP/AR (pycocotools) of a detector checkpoint",
                    "norton detect-eval --ckpt runs/frcnn/final.pt --data /data/coco\n"
                    "  norton detect-eval --ckpt final.pt --val-images imgs/ --val-ann instances.json --json")
    p.add_argument("--ckpt", required=True)
    _coco_args(p, splits=("val",))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = add_command(sub, "detect", cmd_detect, "draw a detector's boxes, masks and keypoints on an image",
                    "norton detect --ckpt runs/mrcnn/final.pt street.jpg -o street_detections.png\n"
                    "  norton detect --ckpt final.pt photo.png -o out.png --score-threshold 0.3")
    p.add_argument("image")
    p.add_argument("--ckpt", required=True, help="a detector checkpoint written by detect-train")
    p.add_argument("-o", "--output", required=True, help="the PNG to write")
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument("--device", default=None)


def _coco_args(p: argparse.ArgumentParser, splits: tuple[str, ...]) -> None:
    g = p.add_argument_group("COCO-format data")
    g.add_argument("--data", default=None, help="COCO-2017 root: {train,val}2017/ and annotations/*_{train,val}2017.json")
    for split in splits:
        g.add_argument(f"--{split}-images", default=None, help=f"{split} image folder (overrides --data)")
        g.add_argument(f"--{split}-ann", default=None, help=f"{split} annotation json (overrides --data)")
