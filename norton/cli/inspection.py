"""``norton models / complexity / decompose-report``: look at a model without changing it."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from norton.checkpoints import load_state_dict_file, load_state_dict_strict
from norton.cli.common import (
    add_arch_args,
    add_command,
    human,
    input_size,
    positive_rank,
    reduction,
)
from norton.compression import decompose
from norton.core import complexity
from norton.detection import detector_complexity, is_detector
from norton.errors import NortonError
from norton.models import create_model, list_models
from norton.training import resolve_device


def cmd_models(args: argparse.Namespace) -> int:
    print("\n".join(list_models()))
    return 0


def cmd_complexity(args: argparse.Namespace) -> int:
    model = create_model(args.arch, rank=args.rank, compress_rate=args.compress_rate, num_classes=args.num_classes)
    baseline = create_model(args.arch, rank=0, num_classes=args.num_classes)
    if is_detector(model):
        return _detector_complexity(args, model, baseline)
    size = args.input_size
    try:
        result, base = complexity(model, size), complexity(baseline, size)
    except RuntimeError as err:
        raise NortonError(f"--input-size {'x'.join(map(str, size or ()))} does not fit {args.arch} "
                          f"({str(err).splitlines()[0][:160]}); give H, HxW or CxHxW it accepts") from None
    record = {
        "arch": args.arch,
        "rank": args.rank,
        "compress_rate": args.compress_rate,
        "input_size": list(size) if size else list(model.default_input_size),
        "macs": result.macs,
        "params": result.params,
        "baseline_macs": base.macs,
        "baseline_params": base.params,
        "macs_reduction_pct": round(reduction(result.macs, base.macs), 4),
        "params_reduction_pct": round(reduction(result.params, base.params), 4),
    }
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"{args.arch}  rank {args.rank}  compress rate {args.compress_rate or 'none'}  input {record['input_size']}")
    print(f"MACs:   {human(result.macs)} ({record['macs_reduction_pct']:.2f}% ↓)   baseline {human(base.macs)}")
    print(f"Params: {human(result.params)} ({record['params_reduction_pct']:.2f}% ↓)   baseline {human(base.params)}")
    return 0


def _detector_complexity(args: argparse.Namespace, model, baseline) -> int:
    if args.input_size and len(args.input_size) != 1:
        raise NortonError("detectors take one --input-size (the image side, default 800)")
    size = args.input_size[0] if args.input_size else 800
    got, base = detector_complexity(model, size), detector_complexity(baseline, size)
    record = {"arch": args.arch, "rank": args.rank, "compress_rate": args.compress_rate, "input_size": got["input"],
              "macs": got["backbone_fpn_macs"], "params": got["params"],
              "baseline_macs": base["backbone_fpn_macs"], "baseline_params": base["params"],
              "whole_model_macs": got["whole_model_macs"], "baseline_whole_model_macs": base["whole_model_macs"],
              "box_rois": got["box_rois"],
              "convention": "macs = backbone + FPN on one image; whole_model_macs adds RPN and heads for box_rois RoIs"}
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"{args.arch}  rank {args.rank}  compress rate {args.compress_rate or 'none'}  image {got['input']}")
    print(f"MACs, backbone + FPN: {human(got['backbone_fpn_macs'])} ({reduction(got['backbone_fpn_macs'], base['backbone_fpn_macs']):.2f}% ↓)"
          f"   baseline {human(base['backbone_fpn_macs'])}")
    print(f"MACs, whole model ({got['box_rois']} RoIs in the box head): {human(got['whole_model_macs'])} "
          f"({reduction(got['whole_model_macs'], base['whole_model_macs']):.2f}% ↓)   baseline {human(base['whole_model_macs'])}")
    print(f"Params: {human(got['params'])} ({reduction(got['params'], base['params']):.2f}% ↓)   baseline {human(base['params'])}")
    return 0


def cmd_decompose_report(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model = create_model(args.arch, rank=0, compress_rate=args.compress_rate, num_classes=args.num_classes)
    if args.ckpt:
        load_state_dict_strict(model, load_state_dict_file(args.ckpt), f"checkpoint {args.ckpt!r}")
    else:
        torch.manual_seed(args.seed)
        print(f"no --ckpt: decomposing randomly initialised weights (seed {args.seed})", file=sys.stderr)
    report = decompose(model.to(device), args.rank, init=args.init, n_iter_max=args.n_iter_max, seed=args.seed,
                       progress=not args.json)
    if args.json:
        print(json.dumps({"mean_nmse": report.mean_nmse, "seconds": report.seconds,
                          "layers": [vars(layer) for layer in report.layers]}))
    else:
        print(report.table())
    return 0


def register(sub) -> None:
    add_command(sub, "models", cmd_models, "list the zoo architectures",
                "norton models\n  norton complexity --arch $(norton models | head -1)")

    p = add_command(sub, "complexity", cmd_complexity, "MACs and params of a zoo model vs its uncompressed baseline",
                    'norton complexity --arch vgg_16_bn -r 1 -cpr "[0.6]*6+[0.8]*7"\n'
                    "  norton complexity --arch resnet_50 -r 1 -cpr \"[0.]+[0.1]*2+[0.4]*5+[0.75]*12\" --json")
    add_arch_args(p)
    p.add_argument("--input-size", type=input_size, default=None, help="H, HxW or CxHxW (default: the model's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = add_command(sub, "decompose-report", cmd_decompose_report, "per-layer NMSE of decomposing a model at a given rank",
                    "norton decompose-report --arch resnet_56 -r 4\n"
                    "  norton decompose-report --arch vgg_16_bn -r 8 --ckpt baseline.pt")
    add_arch_args(p, rank_type=positive_rank, rank_required=True)
    p.add_argument("--ckpt", default=None, help="state dict of the dense model (default: random weights)")
    p.add_argument("--init", choices=("svd", "random"), default="svd", help="CP-ALS initialisation")
    p.add_argument("--n-iter-max", type=int, default=300, help="ALS sweeps at most (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="decompose on cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
