"""``norton`` command line.  Parses arguments and calls the library; nothing more.

Every error a user can cause ends with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence

import torch

from norton.cli_pipeline import key_value, register, register_speed
from norton.cli_detect import register_detect
from norton.complexity import complexity
from norton.errors import NortonError


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _rank(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"rank must be an integer >= 0, got {text!r}")
    return value


def _positive_rank(text: str) -> int:
    value = _rank(text)
    if value == 0:
        raise argparse.ArgumentTypeError("rank must be >= 1 to decompose, got 0")
    return value


def _input_size(text: str) -> tuple[int, ...]:
    try:
        parts = tuple(int(p) for p in text.lower().replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if not parts or len(parts) > 3 or any(p < 1 for p in parts):
        raise argparse.ArgumentTypeError(f"input size must be H, HxW or CxHxW of positive ints, got {text!r}")
    return parts


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _reduction(value: int, baseline: int) -> float:
    return 100.0 * (1.0 - value / baseline) if baseline else 0.0


def _arch_args(parser: argparse.ArgumentParser, rank_type=_rank, rank_required: bool = False) -> None:
    parser.add_argument("--arch", "-a", required=True, help="zoo architecture (see `norton models`)")
    parser.add_argument("-r", "--rank", type=rank_type, default=0, required=rank_required, help="CP rank (0 = plain convs)")
    parser.add_argument(
        "-cpr", "--compress-rate", default=None,
        help='per-layer compress rates, e.g. "[0.]+[0.1]*2+[0.4]*5" or "0.1,0.2" (default: none)',
    )
    parser.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's)")


# -- commands -------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from norton.models import list_models

    print("\n".join(list_models()))
    return 0


def cmd_complexity(args: argparse.Namespace) -> int:
    from norton.models import create_model

    model = create_model(args.arch, rank=args.rank, compress_rate=args.compress_rate, num_classes=args.num_classes)
    baseline = create_model(args.arch, rank=0, num_classes=args.num_classes)
    from norton.models.detection import is_detector

    if is_detector(model):
        return _detector_complexity(args, model, baseline)
    size = args.input_size
    result, base = complexity(model, size), complexity(baseline, size)
    record = {
        "arch": args.arch,
        "rank": args.rank,
        "compress_rate": args.compress_rate,
        "input_size": list(size) if size else list(model.default_input_size),
        "macs": result.macs,
        "params": result.params,
        "baseline_macs": base.macs,
        "baseline_params": base.params,
        "macs_reduction_pct": round(_reduction(result.macs, base.macs), 4),
        "params_reduction_pct": round(_reduction(result.params, base.params), 4),
    }
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"{args.arch}  rank {args.rank}  compress rate {args.compress_rate or 'none'}  input {record['input_size']}")
    print(f"MACs:   {_human(result.macs)} ({record['macs_reduction_pct']:.2f}% ↓)   baseline {_human(base.macs)}")
    print(f"Params: {_human(result.params)} ({record['params_reduction_pct']:.2f}% ↓)   baseline {_human(base.params)}")
    return 0


def _detector_complexity(args: argparse.Namespace, model, baseline) -> int:
    from norton.models.detection import detector_complexity

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
    print(f"MACs, backbone + FPN: {_human(got['backbone_fpn_macs'])} ({_reduction(got['backbone_fpn_macs'], base['backbone_fpn_macs']):.2f}% ↓)"
          f"   baseline {_human(base['backbone_fpn_macs'])}")
    print(f"MACs, whole model ({got['box_rois']} RoIs in the box head): {_human(got['whole_model_macs'])} "
          f"({_reduction(got['whole_model_macs'], base['whole_model_macs']):.2f}% ↓)   baseline {_human(base['whole_model_macs'])}")
    print(f"Params: {_human(got['params'])} ({_reduction(got['params'], base['params']):.2f}% ↓)   baseline {_human(base['params'])}")
    return 0


def cmd_decompose_report(args: argparse.Namespace) -> int:
    from norton.checkpoint import load_state_dict_file, load_state_dict_strict
    from norton.decompose import decompose
    from norton.models import create_model

    model = create_model(args.arch, rank=0, compress_rate=args.compress_rate, num_classes=args.num_classes)
    if args.ckpt:
        load_state_dict_strict(model, load_state_dict_file(args.ckpt), f"checkpoint {args.ckpt!r}")
    else:
        torch.manual_seed(args.seed)
        print(f"no --ckpt: decomposing randomly initialised weights (seed {args.seed})", file=sys.stderr)
    report = decompose(model, args.rank, init=args.init, n_iter_max=args.n_iter_max, seed=args.seed, progress=not args.json)
    if args.json:
        print(json.dumps({"mean_nmse": report.mean_nmse, "seconds": report.seconds,
                          "layers": [vars(layer) for layer in report.layers]}))
    else:
        print(report.table())
    return 0


def _load_model(args: argparse.Namespace, *, rank: int, compress_rate):
    """The model a command works on: a norton checkpoint (self-describing), or
    ``--arch`` (+ rank and compress rate) with an optional state-dict file."""
    from norton.checkpoint import FORMAT, _safe_load, load_model, load_state_dict_file, load_state_dict_strict
    from norton.models import create_model

    if args.ckpt:
        obj = _safe_load(args.ckpt)
        if isinstance(obj, dict) and obj.get("format") == FORMAT:
            model, ckpt = load_model(args.ckpt)
            base = (ckpt["architecture"].get("base") or {}).get("arch")
            if args.arch and base and args.arch != base:
                raise NortonError(f"checkpoint {args.ckpt!r} holds a {base}, not a {args.arch}")
            return model
    if not args.arch:
        raise NortonError("give --arch (and -r/-cpr) or --ckpt with a norton checkpoint")
    model = create_model(args.arch, rank=rank, compress_rate=compress_rate, num_classes=args.num_classes)
    if args.ckpt:
        load_state_dict_strict(model, load_state_dict_file(args.ckpt), f"checkpoint {args.ckpt!r}")
    return model


def _check_out(args: argparse.Namespace) -> None:
    import os

    if args.ckpt and os.path.abspath(args.out) == os.path.abspath(args.ckpt):
        raise NortonError("--out must differ from --ckpt: the input model file is never modified")
    if os.path.exists(args.out) and not args.overwrite:
        raise NortonError(f"{args.out!r} exists; pass --overwrite to replace it")


def _example_input(model) -> torch.Tensor:
    return torch.zeros(1, *model.default_input_size)


def cmd_decompose(args: argparse.Namespace) -> int:
    from norton.checkpoint import save_checkpoint
    from norton.complexity import complexity
    from norton.decompose import decompose

    _check_out(args)
    model = _load_model(args, rank=0, compress_rate=args.compress_rate)
    before = complexity(model)
    layer_ranks = dict(key_value(item, int, "--layer-rank") for item in args.layer_rank)
    report = decompose(model, args.rank, layer_ranks=layer_ranks, skip=args.skip,
                       init=args.init, n_iter_max=args.n_iter_max, seed=args.seed)
    after = complexity(model)
    print(report.table())
    print(f"MACs {_human(before.macs)} -> {_human(after.macs)} ({_reduction(after.macs, before.macs):.2f}% ↓); "
          f"params {_human(before.params)} -> {_human(after.params)} ({_reduction(after.params, before.params):.2f}% ↓)")
    save_checkpoint(args.out, model, metrics={"macs": after.macs, "params": after.params, "mean_nmse": report.mean_nmse},
                    extra={"stage": "decompose", "rank": args.rank})
    print(f"saved {args.out}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from norton.checkpoint import save_checkpoint
    from norton.prune import prune
    from norton.train import evaluate

    _check_out(args)
    model = _load_model(args, rank=args.rank, compress_rate=None)
    rates = dict(key_value(item, float, "--layer-rate") for item in args.layer_rate) or None
    if rates and args.compress_rate:
        raise NortonError("give either -cpr or --layer-rate, not both")
    test = _test_data(args)
    before = evaluate(model, test, device=torch.device("cpu")) if test is not None else None
    report = prune(model, rates or args.compress_rate, amount=args.amount, target_macs=args.target_macs,
                   example_inputs=_example_input(model), criterion=args.criterion, seed=args.seed, progress=True)
    print(report.table())
    if test is not None:
        after = evaluate(model, test, device=torch.device("cpu"))
        print(f"test top-1 before pruning {before['top1']:.2f}%, right after pruning (no fine-tuning) {after['top1']:.2f}%")
    save_checkpoint(args.out, model, metrics={"macs": report.macs_after, "params": report.params_after},
                    extra={"stage": "prune", "criterion": args.criterion, "kept": {g.root: g.kept for g in report.groups}})
    print(f"saved {args.out}")
    return 0


def _test_data(args: argparse.Namespace):
    if not getattr(args, "data", None):
        return None
    from norton.data import load_dataset

    return load_dataset(args.data, args.data_dir, "test")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    if args.showcase:
        from norton.showcase import run_showcase

        run_showcase()
        return 0
    from norton.demo import run_demo
    from norton.train import resolve_device

    run_demo(args.out_dir, full=args.full, resume=args.resume, data_dir=args.data_dir, device=resolve_device(args.device))
    return 0


# -- parser -----------------------------------------------------------------------
EXAMPLES = {
    "decompose": "norton decompose --arch resnet_56 --ckpt baseline.pt -r 1 --out decomposed.pt\n"
                 "  norton decompose --ckpt baseline.pt -r 4 --layer-rank conv1=0 --out decomposed.pt",
    "prune": 'norton prune --arch resnet_56 -r 1 -cpr "[0.]+[0.18]*29" --ckpt decomposed.pt --criterion pabs --out pruned.pt\n'
             "  norton prune --ckpt decomposed.pt --target-macs 0.6 --out pruned.pt\n"
             "  norton prune --ckpt decomposed.pt --layer-rate layer1.0.conv1=0.5 --criterion vbd --out pruned.pt",
    "complexity": 'norton complexity --arch vgg_16_bn -r 1 -cpr "[0.6]*6+[0.8]*7"\n'
                  "  norton complexity --arch resnet_50 -r 1 -cpr \"[0.]+[0.1]*2+[0.4]*5+[0.75]*12\" --json",
    "decompose-report": "norton decompose-report --arch resnet_56 -r 4\n"
                        "  norton decompose-report --arch vgg_16_bn -r 8 --ckpt baseline.pt",
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="norton", description="Compress CNNs with NORTON (CP decomposition + pruning).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="list the zoo architectures", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  norton models\n  norton complexity --arch $(norton models | head -1)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("complexity", help="MACs and params of a zoo model vs its uncompressed baseline",
                       epilog="examples:\n  " + EXAMPLES["complexity"], formatter_class=argparse.RawDescriptionHelpFormatter)
    _arch_args(p)
    p.add_argument("--input-size", type=_input_size, default=None, help="H, HxW or CxHxW (default: the model's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_complexity)

    p = sub.add_parser("decompose-report", help="per-layer NMSE of decomposing a model at a given rank",
                       epilog="examples:\n  " + EXAMPLES["decompose-report"], formatter_class=argparse.RawDescriptionHelpFormatter)
    _arch_args(p, rank_type=_positive_rank, rank_required=True)
    p.add_argument("--ckpt", default=None, help="state dict of the dense model (default: random weights)")
    p.add_argument("--init", choices=("svd", "random"), default="svd", help="CP-ALS initialisation")
    p.add_argument("--n-iter-max", type=int, default=300, help="ALS sweeps at most (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_decompose_report)

    p = sub.add_parser("decompose", help="replace every k×k conv by a CPDBlock and save the model",
                       epilog="examples:\n  " + EXAMPLES["decompose"], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", "-a", default=None, help="zoo architecture of the dense model (not needed for a norton checkpoint)")
    p.add_argument("-r", "--rank", type=_positive_rank, required=True, help="CP rank of every decomposed conv")
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
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser("prune", help="remove redundant filters (NORTON criteria) and save the model",
                       epilog="examples:\n  " + EXAMPLES["prune"], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", "-a", default=None, help="zoo architecture (not needed for a norton checkpoint)")
    p.add_argument("-r", "--rank", type=_rank, default=0, help="rank of the loaded zoo model (state-dict files)")
    p.add_argument("-cpr", "--compress-rate", default=None, help="zoo compress rate to prune to")
    p.add_argument("--layer-rate", action="append", default=[], metavar="NAME=RATE", help="prune this layer at RATE")
    p.add_argument("--amount", type=_fraction, default=None, help="one rate for every prunable layer")
    p.add_argument("--target-macs", type=_fraction, default=None, help="fraction of MACs to remove")
    p.add_argument("--criterion", default="pabs", help="pabs (default), vbd, csa, l2, random; l1, fpgm (torch-pruning importances, plain convs)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--ckpt", default=None, help="the model to prune: norton checkpoint or state dict")
    p.add_argument("--data", default=None, help="print test accuracy before and right after pruning on this dataset")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="where to write the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_prune)

    register(sub, _Parser, _rank, _positive_rank, _fraction)
    register_speed(sub, _rank)
    register_detect(sub, _rank)

    p = sub.add_parser("demo", help="NORTON end to end on Fashion-MNIST: baseline, two compression levels, table and plot",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  norton demo                      # ~15 min on 2 CPU cores\n"
                              "  norton demo --resume             # continue an interrupted run\n"
                              "  norton demo --full --device cuda # all 60k images, published schedules")
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--full", action="store_true", help="all 60k images and the published 400-epoch schedules")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--showcase", action="store_true", help="instead: complexity of the paper's configs and decomposition speed")
    p.set_defaults(func=cmd_demo)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"norton: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _one_line_warning
            return args.func(args)
    except NortonError as err:
        print(f"norton {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"norton {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
