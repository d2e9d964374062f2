"""``norton decompose / prune / compress``: NORTON's stages, one at a time or in one run."""
from __future__ import annotations

import argparse
import json
import os

import torch

from norton.checkpoints import atomic_write_text, read_checkpoint, save_checkpoint
from norton.cli.common import (
    add_command,
    add_data_args,
    add_folder_args,
    add_train_args,
    check_out,
    device_and_processes,
    folder_options,
    fraction,
    human,
    key_value,
    layer_rates,
    load_splits,
    macs_target,
    model_from_args,
    positive_rank,
    rank,
    rank_list,
    reduction,
    speedup,
    train_config,
)
from norton.compression import PLANNER_CRITERION, Plan, decompose, measure_round_to, plan, prune
from norton.compression.planning import (  # for the help texts and checks
    FORMS,
    KEEP_STEPS,
    RANK_OPTIONS,
    SCREEN_IMAGES,
    SCREEN_MIN_IMAGES,
    TRIAL_STEPS,
)
from norton.core import complexity
from norton.errors import NortonError
from norton.training import (
    DATASETS,
    CompressConfig,
    calibration_batches,
    compress,
    evaluate,
    input_size_of,
    load_dataset,
    resolve_device,
)


def cmd_decompose(args: argparse.Namespace) -> int:
    check_out(args)
    device = resolve_device(args.device)
    model = model_from_args(args, rank=0, compress_rate=args.compress_rate).model
    before = complexity(model)
    model.to(device)  # layers of one shape are decomposed together, on the model's device
    layer_ranks = dict(key_value(item, int, "--layer-rank") for item in args.layer_rank)
    report = decompose(model, args.rank, layer_ranks=layer_ranks, skip=args.skip, only_cheaper=args.only_cheaper,
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
    device = resolve_device(args.device)
    loaded = model_from_args(args, rank=args.rank, compress_rate=None)
    model = loaded.model.to(device)
    rates = layer_rates(args)
    test = load_dataset(args.data, args.data_dir, "test", **folder_options(args, loaded.checkpoint)) if args.data else None
    before = evaluate(model, test, device=device) if test is not None else None
    round_to = measure_round_to(device) if args.round_to == "auto" else args.round_to
    size = tuple(input_size_of(test)) if test is not None else tuple(model.default_input_size)  # MACs at the data's size
    report = prune(model, rates or args.compress_rate, amount=args.amount, target_macs=args.target_macs,
                   example_inputs=torch.zeros(1, *size, device=device), criterion=args.criterion,
                   global_ranking=args.global_ranking, round_to=round_to, seed=args.seed, progress=True)
    print(report.table())
    if test is not None:
        after = evaluate(model, test, device=device)
        print(f"test top-1 before pruning {before['top1']:.2f}%, right after pruning (no fine-tuning) {after['top1']:.2f}%")
    save_checkpoint(args.out, model, metrics={"macs": report.macs_after, "params": report.params_after},
                    input_size=list(size), extra={"stage": "prune", "criterion": args.criterion, "kept": {g.root: g.kept for g in report.groups}})
    print(f"saved {args.out}")
    return 0


def read_plan(path: str) -> dict:
    """A plan from ``norton plan --out`` (JSON) or from a checkpoint made with one."""
    if not os.path.exists(path):
        raise NortonError(f"plan file {path!r} does not exist")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise NortonError(f"cannot read plan {path!r}: {err}") from None
    else:
        kind, obj = read_checkpoint(path)
        data = obj.get("extra", {}).get("plan") if kind == "norton" else None
        if data is None:
            raise NortonError(f"{path!r} holds no plan (a checkpoint written by a planned norton compress has one)")
    Plan.from_dict(data)  # a malformed plan is named now
    return data


def cmd_plan(args: argparse.Namespace) -> int:
    if args.out:
        check_out(args)
    device = resolve_device(args.device)
    loaded = model_from_args(args)
    model = loaded.model.to(device)
    train = load_dataset(args.data, args.data_dir, "train", **folder_options(args, loaded.checkpoint))
    batches = calibration_batches(train, args.calibration_images, seed=args.seed)
    result = plan(model, [b.to(device) for b in batches], target_macs=args.target_macs,
                  target_speedup=args.target_speedup, criterion=args.criterion, allocation=args.allocation,
                  seed=args.seed, progress=True, round_to=args.round_to, **search_options(args))
    print(result.table())
    if args.out:
        atomic_write_text(args.out, json.dumps(result.to_dict(), indent=1))
        print(f"saved {args.out}; apply it with: norton compress --ckpt {args.ckpt or 'MODEL'} --plan {args.out} ...")
    return 0


def add_global_ranking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--global", dest="global_ranking", action="store_true",
                   help="with --amount/--target-macs: one ranking of all filters across layers (l2, l1, fpgm, random) "
                        "instead of the same rate in every layer")


def cmd_compress(args: argparse.Namespace) -> int:
    device, ddp = device_and_processes(args)
    planned = args.rank is None
    if planned and args.target_macs is None and args.target_speedup is None and args.plan is None:
        raise NortonError("give -r RANK, or let the planner choose ranks and filters: --target-macs F, "
                          "--target-speedup S or --plan FILE")
    if not planned and (args.target_speedup is not None or args.plan is not None):
        raise NortonError("--target-speedup and --plan let the planner choose ranks: drop -r")
    if not planned and search_options(args):
        raise NortonError("--ranks, --keep-steps, --forms, --trial-steps, --screening, --probe-workers, --latency-batch "
                          "and --latency-dtype steer the planner: drop -r, or drop them")
    if planned and (args.compress_rate or args.layer_rate or args.amount is not None or args.global_ranking):
        raise NortonError("-cpr, --layer-rate, --amount and --global prune a model decomposed at one rank: give -r RANK")
    saved_plan = read_plan(args.plan) if args.plan else None
    loaded = model_from_args(args)
    model = loaded.model
    rates = layer_rates(args)
    train, val, test = load_splits(args, loaded.checkpoint)
    round_to = args.round_to
    if not planned and round_to == "auto":
        round_to = measure_round_to(device)
    config = CompressConfig(rank=args.rank, compress_rate=rates or args.compress_rate, amount=args.amount,
                            target_macs=args.target_macs, criterion=args.criterion, recalibrate=not args.no_recalibrate,
                            recalibration_images=args.recalibration_images, finetune=train_config(args), seed=args.seed,
                            target_speedup=args.target_speedup, plan=saved_plan,
                            calibration_images=args.calibration_images, global_ranking=args.global_ranking,
                            plan_options={**search_options(args), **({"round_to": round_to} if planned and round_to else {})},
                            round_to=None if planned else round_to,
                            iterative_steps=args.iterative_steps, selection_epochs=args.select_epochs,
                            **({} if args.recover is None else {"recover": args.recover}))
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
    planned = summary.get("plan") or {}
    if planned.get("seconds") is not None:
        rows.append(f"planned in {planned['seconds']:.1f} s ({planned['allocation']})")
    return "\n".join(rows)


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-macs", type=macs_target, help="fraction of the MACs to remove, e.g. 0.6")
    target.add_argument("--target-speedup", type=speedup, help="latency target, e.g. 2 (timed on this machine)")
    p.add_argument("--criterion", default=PLANNER_CRITERION,
                   help=f"filter selection on dense weights: {PLANNER_CRITERION} (default), l2, l1, fpgm, random")
    p.add_argument("--calibration-images", type=int, default=512, help="training images that measure each option's damage")
    _add_search_args(p)
    add_round_to(p)


def round_to_arg(text: str) -> int | str:
    """``--round-to``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"round-to must be a positive integer (e.g. 8) or auto, got {text!r}")
    return value


def add_round_to(p: argparse.ArgumentParser) -> None:
    p.add_argument("--round-to", type=round_to_arg, default=None, metavar="N|auto",
                   help="every pruned layer keeps a multiple of N filters (8 suits bfloat16 tensor cores); auto "
                        "measures the multiple the --device runs fastest (default: any count)")


def _add_search_args(p: argparse.ArgumentParser) -> None:
    """The planner's search space and timing batch (norton plan, norton compress)."""
    p.add_argument("--latency-batch", type=int, default=None, help="planner: batch the layers are timed on (--target-speedup; default 32)")
    p.add_argument("--latency-dtype", default=None, metavar="DTYPE",
                   help="planner: number format the speed-up is timed in on --device: float32 (default), bf16, fp16 "
                        "(GPU) — deploy the result in the same one")
    p.add_argument("--ranks", type=rank_list, default=None,
                   help=f"planner: CP ranks a layer may take, e.g. 1-4 or 1,2,4 (default {','.join(map(str, RANK_OPTIONS))})")
    p.add_argument("--keep-steps", type=int, default=None,
                   help=f"planner: a group's filter counts measured at 1/K … K/K (default K={KEEP_STEPS})")
    p.add_argument("--forms", type=form_list, default=None,
                   help="planner: factored forms a layer may take besides dense, comma-separated: cp (the published "
                        "method), tucker2 (default: cp,tucker2)")
    p.add_argument("--trial-steps", type=int, default=None,
                   help=f"planner: distillation steps each whole candidate plan gets before it is measured "
                        f"(0 = measured as built; default {TRIAL_STEPS})")
    p.add_argument("--screening", action=argparse.BooleanOptionalAction, default=None,
                   help=f"planner: measure every option on the first {SCREEN_IMAGES} calibration images (on half of "
                        f"them from {2 * SCREEN_MIN_IMAGES} to {2 * SCREEN_IMAGES}) and the options the allocation "
                        f"chooses on all of them (default: on, from {2 * SCREEN_MIN_IMAGES} calibration images); "
                        "--no-screening measures every option on every image")
    p.add_argument("--probe-workers", type=int, default=None, metavar="N",
                   help="planner: options measured side by side on N threads, each with its share of torch's threads "
                        "(default: on a CPU one per torch thread while their activations fit 4 GiB and each "
                        "a thread's 64 MiB heap, on a GPU 1)")


def form_list(text: str) -> tuple[str, ...]:
    """``cp``, ``tucker2`` or ``cp,tucker2``."""
    forms = tuple(f.strip() for f in text.split(","))
    if not forms or any(f not in FORMS for f in forms):
        raise argparse.ArgumentTypeError(f"forms must be a comma-separated subset of {','.join(FORMS)}, got {text!r}")
    return forms


def search_options(args: argparse.Namespace) -> dict:
    """The planner arguments given on the command line."""
    given = {"ranks": args.ranks, "keep_steps": args.keep_steps, "latency_batch": args.latency_batch,
             "forms": args.forms, "trial_steps": args.trial_steps, "latency_dtype": args.latency_dtype,
             "screening": args.screening, "workers": args.probe_workers}
    return {k: v for k, v in given.items() if v is not None}


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
    p.add_argument("--only-cheaper", action="store_true", help="leave dense every conv the rank would make costlier")
    p.add_argument("--init", choices=("svd", "random"), default="svd")
    p.add_argument("--n-iter-max", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="decompose on cpu, cuda or cuda:N (default: cuda if available)")
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
    add_global_ranking(p)
    add_round_to(p)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--ckpt", default=None, help="the model to prune: norton checkpoint or state dict")
    p.add_argument("--data", default=None, help="print test accuracy before and right after pruning on this dataset")
    add_folder_args(p)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None,
                   help="score filters (and evaluate) on cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--out", required=True, help="where to write the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = add_command(sub, "plan", cmd_plan, "choose per-layer ranks and filter counts for a MACs or speed-up target",
                    "norton plan --ckpt runs/base/model.pt --data fashion-mnist --target-macs 0.6 --out plan.json\n"
                    "  norton plan --ckpt base.pt --data cifar10 --data-dir ~/data --target-speedup 2")
    p.add_argument("--ckpt", default=None, help="the trained model (norton checkpoint or state dict with --arch)")
    p.add_argument("--arch", "-a", default=None, help="zoo architecture (not needed for a norton checkpoint)")
    p.add_argument("--num-classes", type=int, default=None)
    _add_plan_args(p)
    p.add_argument("--allocation", choices=("best", "greedy", "lagrangian"), default="best",
                   help="how the options are combined (best: both, the smaller predicted damage)")
    p.add_argument("--data", required=True, choices=DATASETS, help="calibration images come from its training split")
    add_folder_args(p)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the plan (JSON) here")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = add_command(sub, "compress", cmd_compress, "decompose + prune + fine-tune in one resumable run",
                    "norton compress --ckpt runs/base/model.pt --target-macs 0.6 --data fashion-mnist "
                    "--epochs 10 --run-dir runs/auto60\n"
                    "  norton compress --ckpt runs/base/model.pt -r 4 --amount 0.5 --data fashion-mnist "
                    "--epochs 10 --run-dir runs/c1\n"
                    '  norton compress --ckpt base.pt -r 1 -cpr "[0.]+[0.18]*29" --data cifar10 --data-dir ~/data --run-dir runs/r56')
    p.add_argument("--ckpt", required=True, help="the trained baseline (norton checkpoint)")
    p.add_argument("-r", "--rank", type=positive_rank, default=None,
                   help="one CP rank for every conv; without it the planner chooses per layer (--target-macs/--target-speedup/--plan)")
    p.add_argument("-cpr", "--compress-rate", default=None)
    p.add_argument("--layer-rate", action="append", default=[], metavar="NAME=RATE")
    p.add_argument("--amount", type=fraction, default=None)
    p.add_argument("--target-macs", type=macs_target, default=None,
                   help="fraction of MACs to remove: of the dense model (planner), or of the rank-r model (with -r)")
    p.add_argument("--target-speedup", type=speedup, default=None, help="planner: latency target (measured here)")
    p.add_argument("--plan", default=None, help="apply a saved plan (norton plan --out, or a planned checkpoint)")
    p.add_argument("--calibration-images", type=int, default=512,
                   help="training images the planner measures damage on and --recover refits on")
    p.add_argument("--recover", action=argparse.BooleanOptionalAction, default=None,
                   help="after pruning, refit the layers that lost input channels to the unpruned model's outputs "
                        "(least squares on the calibration images; norton.recover)")
    p.add_argument("--iterative-steps", type=int, default=1, metavar="K",
                   help="prune in K steps toward the final widths, fine-tuning --epochs/K epochs after each")
    p.add_argument("--select-epochs", type=int, default=0, metavar="E",
                   help="planner, --target-macs: fine-tune every candidate plan E epochs and keep the one of best "
                        "validation top-1 (0: the candidate of least damage)")
    _add_search_args(p)
    add_round_to(p)
    p.add_argument("--criterion", default=None, help=f"filter selection: pabs (with -r) or {PLANNER_CRITERION} (planner) by default")
    add_global_ranking(p)
    p.add_argument("--no-recalibrate", action="store_true", help="skip BatchNorm recalibration after decompose and prune")
    p.add_argument("--recalibration-images", type=int, default=512)
    add_data_args(p)
    add_train_args(p)
