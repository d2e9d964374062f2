"""``norton detect-train / detect-eval / detect``, ``norton compare`` and ``norton report``."""
from __future__ import annotations

import argparse
import json
import os

from norton.errors import NortonError

DETECTOR_NAMES = ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn")


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
    import inspect

    from norton.cli_pipeline import key_value
    from norton.models.detection import DETECTORS

    accepted = set()
    for cls in DETECTORS[arch].__mro__:
        if "__init__" in vars(cls):
            accepted |= set(inspect.signature(cls.__init__).parameters) - {"self", "backbone", "num_classes", "kwargs"}
    options = dict(key_value(item, _number, "--detector-option") for item in items)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise NortonError(f"--detector-option {unknown[0]!r} is not a keyword of torchvision's {DETECTORS[arch].__name__}; "
                          f"accepted: {', '.join(sorted(accepted))}")
    return options


def _detector(args: argparse.Namespace, data):
    from norton.models import create_model

    kwargs = {**_detector_options(args.detector_option, args.arch),"rank": args.rank, "compress_rate": args.compress_rate, "num_classes": len(data.class_names),
              "backbone_ckpt": args.backbone_ckpt, "trainable_backbone_layers": args.trainable_backbone_layers,
              "min_size": args.min_size, "max_size": args.max_size}
    if data.task == "keypoints":
        kwargs["num_keypoints"] = len(data.keypoint_names)
    return create_model(args.arch, **kwargs)


def cmd_detect_train(args: argparse.Namespace) -> int:
    import torch

    from norton.detect import TASKS, CocoData, DetectTrainConfig, stats_table, train_detector
    from norton.train import init_distributed, resolve_device

    task = TASKS[args.arch]
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
        from norton.detect import evaluate_detector

        stats = evaluate_detector(model, val, device=device, ddp=ddp, batch_size=args.batch_size)
        if ddp.main:
            from norton.checkpoint import atomic_write_text

            atomic_write_text(os.path.join(args.run_dir, "eval.json"), json.dumps(stats, indent=1))
            print(f"after {done['iteration']} iterations, COCO evaluation on {len(val)} images (%):")
            print(stats_table(stats))
    if ddp.main:
        print(f"written: {os.path.join(args.run_dir, 'final.pt')}")
    return 0


def _load_detector(path: str):
    from norton.checkpoint import load_model
    from norton.models.detection import is_detector

    model, ckpt = load_model(path)
    if not is_detector(model):
        arch = (ckpt["architecture"].get("base") or {}).get("arch")
        raise NortonError(f"checkpoint {path!r} holds a {arch}, not a detector ({', '.join(DETECTOR_NAMES)})")
    return model, ckpt


def cmd_detect_eval(args: argparse.Namespace) -> int:
    from norton.detect import TASKS, CocoData, evaluate_detector, stats_table
    from norton.train import init_distributed, resolve_device

    device = resolve_device(args.device)
    ddp = init_distributed(device)
    model, ckpt = _load_detector(args.ckpt)
    task = TASKS[ckpt["architecture"]["base"]["arch"]]
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
    import torch
    from torchvision.io import ImageReadMode, decode_image, write_png

    from norton.detect import draw_detections
    from norton.train import resolve_device

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
    model, ckpt = _load_detector(args.ckpt)
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


def cmd_compare(args: argparse.Namespace) -> int:
    from norton.compare import run_compare
    from norton.train import resolve_device

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    run_compare(args.out, budget=args.budget, methods=methods, resume=args.resume, data_dir=args.data_dir,
                device=resolve_device(args.device))
    return 0


def _ranks(text: str) -> tuple[int, ...]:
    """``1-8`` or ``3,4,6,8``."""
    try:
        if "-" in text:
            low, high = (int(v) for v in text.split("-"))
            values = tuple(range(low, high + 1))
        else:
            values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ranks like 1-8 or 3,4,6,8, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"ranks must be >= 1, got {text!r}")
    return values


def cmd_report(args: argparse.Namespace) -> int:
    from norton.report import ReportPlan, run_report
    from norton.train import resolve_device

    plan = ReportPlan(ranks=args.ranks, grid=args.grid, gradcam_images=args.gradcam_images)
    plan.gradcam_ranks = tuple(r for r in (1, 2, 4) if r in plan.ranks) or plan.ranks[:1]
    run_report(args.out, baseline_ckpt=args.baseline, compare_dir=args.compare, budget=args.budget, plan=plan,
               resume=args.resume, data_dir=args.data_dir, device=resolve_device(args.device))
    return 0


def register_detect(sub, rank_type) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("detect-train", help="train Faster/Mask/Keypoint R-CNN on a NORTON ResNet-50 (COCO format)",
                       formatter_class=fmt, epilog=(
                           "examples:\n  norton detect-train --arch fasterrcnn_resnet50_fpn --data /data/coco "
                           "--backbone-ckpt resnet50_norton.pt --run-dir runs/frcnn\n"
                           "  torchrun --nproc_per_node 8 -m norton detect-train --arch maskrcnn_resnet50_fpn "
                           "-r 4 -cpr '[0.]+[0.1]*3+[0.3]*16' --data /data/coco --run-dir runs/mrcnn\n"
                           "  norton detect-train ... --resume   # continue from the last checkpoint"))
    p.add_argument("--arch", "-a", required=True, choices=DETECTOR_NAMES)
    p.add_argument("-r", "--rank", type=rank_type, default=0, help="CP rank of the ResNet-50 body (0: dense)")
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
    p.set_defaults(func=cmd_detect_train)

    p = sub.add_parser("detect-eval", help="COCO AP/AR (pycocotools) of a detector checkpoint", formatter_class=fmt,
                       epilog="examples:\n  norton detect-eval --ckpt runs/frcnn/final.pt --data /data/coco\n"
                              "  norton detect-eval --ckpt final.pt --val-images imgs/ --val-ann instances.json --json")
    p.add_argument("--ckpt", required=True)
    _coco_args(p, splits=("val",))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_detect_eval)

    p = sub.add_parser("detect", help="draw a detector's boxes, masks and keypoints on an image", formatter_class=fmt,
                       epilog="examples:\n  norton detect --ckpt runs/mrcnn/final.pt street.jpg -o street_detections.png\n"
                              "  norton detect --ckpt final.pt photo.png -o out.png --score-threshold 0.3")
    p.add_argument("image")
    p.add_argument("--ckpt", required=True, help="a detector checkpoint written by detect-train")
    p.add_argument("-o", "--output", required=True, help="the PNG to write")
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("compare", help="NORTON vs pruning and decomposition baselines on Fashion-MNIST, side by side",
                       formatter_class=fmt, epilog=(
                           "examples:\n  norton compare                   # --budget small: about 30 min on 2 CPU cores\n"
                           "  norton compare --resume          # continue an interrupted comparison\n"
                           "  norton compare --budget full --device cuda --out runs/compare_full\n"
                           "  norton compare --methods norton,l1,fpgm"))
    p.add_argument("--budget", choices=("small", "full"), default="small")
    p.add_argument("--methods", default=None, help="comma-separated subset of: norton, norton-random, norton-l2, "
                                                   "cp-only, l1, fpgm, tltorch-cp, tltorch-tucker2")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="rank sweep, rank × pruning grid, Pareto curve and Grad-CAM figures (Markdown + PNG)",
                       formatter_class=fmt, epilog=(
                           "examples:\n  norton report --compare runs/compare            # baseline + methods of a comparison\n"
                           "  norton report --baseline best.pt --ranks 1-4 --grid 2,3,4 --out runs/report_small\n"
                           "  norton report --compare runs/compare --resume   # reuse finished runs, redraw"))
    p.add_argument("--compare", default=None, help="a norton compare run: its baseline and models join the report")
    p.add_argument("--baseline", default=None, help="norton checkpoint of the trained ResNet-20 (default: the comparison's)")
    p.add_argument("--budget", choices=("small", "full"), default="small", help="data subset and fine-tuning schedule")
    p.add_argument("--ranks", type=_ranks, default=tuple(range(1, 9)), help="rank sweep (default 1-8)")
    p.add_argument("--grid", type=_ranks, default=(3, 4, 6, 8), help="first unpruned, the rest pruned to its MACs")
    p.add_argument("--gradcam-images", type=int, default=6)
    p.add_argument("--out", default="runs/report")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_report)


def _coco_args(p: argparse.ArgumentParser, splits: tuple[str, ...]) -> None:
    g = p.add_argument_group("COCO-format data")
    g.add_argument("--data", default=None, help="COCO-2017 root: {train,val}2017/ and annotations/*_{train,val}2017.json")
    for split in splits:
        g.add_argument(f"--{split}-images", default=None, help=f"{split} image folder (overrides --data)")
        g.add_argument(f"--{split}-ann", default=None, help=f"{split} annotation json (overrides --data)")
