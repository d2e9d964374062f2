"""What the commands share: the parser class, argument types and groups, and the
one helper that turns ``--ckpt`` / ``--arch`` / ``-r`` / ``-cpr`` into a model."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from norton.checkpoints import (
    load_research_checkpoint,
    load_state_dict_strict,
    model_from_checkpoint,
    read_checkpoint,
    state_dict_of,
)
from norton.compression import build_base
from norton.errors import NortonError
from norton.models import create_model
from norton.training import (
    BAD_IMAGE_CHOICES,
    DATASETS,
    Distributed,
    TrainConfig,
    init_distributed,
    limit,
    load_dataset,
    resolve_device,
    folder_splits,
    split_validation,
)

FORMATTER = argparse.RawDescriptionHelpFormatter


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_command(sub, name: str, func, help_: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand with its help line, its examples under --help, and its function."""
    p = sub.add_parser(name, help=help_, formatter_class=FORMATTER, epilog="examples:\n  " + examples)
    p.set_defaults(func=func)
    return p


# -- argument types -----------------------------------------------------------------------------
def rank(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"rank must be an integer >= 0, got {text!r}")
    return value


def positive_rank(text: str) -> int:
    value = rank(text)
    if value == 0:
        raise argparse.ArgumentTypeError("rank must be >= 1 to decompose, got 0")
    return value


def rank_list(text: str) -> tuple[int, ...]:
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


def _number(accept, message: str):
    """An argparse type: a float that ``accept`` admits, else ``message``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{message}, got {text!r}")
        return value

    return parse


fraction = _number(lambda v: 0.0 <= v < 1.0, "must be a number in [0, 1)")
macs_target = _number(lambda v: 0.0 < v < 1.0, "MACs target must be the fraction of MACs to remove, in (0, 1)")
speedup = _number(lambda v: 1.0 < v < float("inf"), "speed-up must be a number > 1 (2 = twice as fast)")


def input_size(text: str) -> tuple[int, ...]:
    try:
        parts = tuple(int(p) for p in text.lower().replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if not parts or len(parts) > 3 or any(p < 1 for p in parts):
        raise argparse.ArgumentTypeError(f"input size must be H, HxW or CxHxW of positive ints, got {text!r}")
    return parts


def key_value(item: str, cast, flag: str):
    """``NAME=VALUE`` -> (name, cast(value)), or an error naming the flag."""
    name, sep, value = item.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, cast(value)
    except ValueError:
        raise NortonError(f"{flag} takes NAME=VALUE with a {cast.__name__} value, got {item!r}") from None


def layer_rates(args: argparse.Namespace) -> dict[str, float] | None:
    """``--layer-rate NAME=RATE`` flags as a dict; they exclude ``-cpr``."""
    rates = dict(key_value(item, float, "--layer-rate") for item in args.layer_rate) or None
    if rates and args.compress_rate:
        raise NortonError("give either -cpr or --layer-rate, not both")
    return rates


# -- printing ---------------------------------------------------------------------------------------
def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def reduction(value: int, baseline: int) -> float:
    return 100.0 * (1.0 - value / baseline) if baseline else 0.0


# -- models from arguments -------------------------------------------------------------------------
def add_arch_args(p: argparse.ArgumentParser, *, rank_type=rank, rank_required: bool = False,
                  arch_required: bool = True) -> None:
    p.add_argument("--arch", "-a", required=arch_required, default=None, help="zoo architecture (see `norton models`)")
    p.add_argument("-r", "--rank", type=rank_type, default=0, required=rank_required, help="CP rank (0 = plain convs)")
    p.add_argument("-cpr", "--compress-rate", default=None,
                   help='per-layer compress rates, e.g. "[0.]+[0.1]*2+[0.4]*5" or "0.1,0.2" (default: none)')
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's)")


@dataclass
class LoadedModel:
    model: nn.Module
    checkpoint: dict[str, Any] | None = None  # the norton checkpoint the model was rebuilt from

    @property
    def arch(self) -> str | None:
        if self.checkpoint is None:
            return (getattr(self.model, "norton_spec", None) or {}).get("arch")
        return (self.checkpoint["architecture"].get("base") or {}).get("arch")

    def baseline(self) -> nn.Module | None:
        """The uncompressed model this one was made from (random weights), if it is a zoo model."""
        spec = (self.checkpoint["architecture"].get("base") if self.checkpoint else
                getattr(self.model, "norton_spec", None))
        return build_base(spec) if spec else None


def model_from_args(args: argparse.Namespace, *, rank: int | None = 0, compress_rate=None,
                    research: bool = False) -> LoadedModel:
    """The model a command works on.

    ``--ckpt`` holding a norton checkpoint: the model it describes (``--arch``, if
    given, must agree).  Another file: a research-code checkpoint when
    ``research`` (architecture from ``--arch/-r/-cpr`` or the file name), else a
    state dict for ``--arch`` at ``rank`` and ``compress_rate``.  No ``--ckpt``:
    ``--arch`` with random weights.
    """
    path = getattr(args, "ckpt", None)
    arch = getattr(args, "arch", None)
    num_classes = getattr(args, "num_classes", None)
    if path:
        kind, obj = read_checkpoint(path)
        if kind == "norton":
            loaded = LoadedModel(model_from_checkpoint(obj, f"checkpoint {path!r}"), obj)
            if arch and loaded.arch and arch != loaded.arch:
                raise NortonError(f"checkpoint {path!r} holds a {loaded.arch}, not a {arch}")
            return loaded
        if research:
            model, _ = load_research_checkpoint(path, arch=arch, rank=rank, compress_rate=compress_rate,
                                                num_classes=num_classes)
            return LoadedModel(model)
    if not arch:
        raise NortonError("give --arch (and -r/-cpr) or --ckpt with a norton checkpoint")
    model = create_model(arch, rank=rank, compress_rate=compress_rate, num_classes=num_classes)
    if path:
        source = f"checkpoint {path!r}"
        load_state_dict_strict(model, state_dict_of(obj, source), source)
    return LoadedModel(model)


def check_out(args: argparse.Namespace) -> None:
    """``--out`` is a new file (or ``--overwrite``) and never the input checkpoint."""
    if args.ckpt and os.path.abspath(args.out) == os.path.abspath(args.ckpt):
        raise NortonError("--out must differ from --ckpt: the input model file is never modified")
    if os.path.exists(args.out) and not args.overwrite:
        raise NortonError(f"{args.out!r} exists; pass --overwrite to replace it")


# -- data and training ---------------------------------------------------------------------------
def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help=f"dataset: {', '.join(DATASETS)}")
    g.add_argument("--data-dir", default=None, help="dataset folder (fashion-mnist defaults to /usr/share/datasets/fashion-mnist)")
    g.add_argument("--subset", type=int, default=None, help="use only this many training images (fixed shuffle)")
    g.add_argument("--val-size", type=int, default=None, help="held-out validation images from the training set (default 10%%, at most 5000)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    add_folder_args(g)


def add_folder_args(g) -> None:
    """``--data folder``'s settings; a command reading the same folder again takes the same values."""
    g.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="--data folder: the side images are resized and centre-cropped to (default: their median "
                        "shorter side, at most 224)")
    g.add_argument("--on-bad-image", choices=BAD_IMAGE_CHOICES, default=None,
                   help="--data folder: an unreadable image stops the run (error, default) or is left out (skip); "
                        "commands given a checkpoint default to what it was trained with, as for --image-size")
    g.add_argument("--no-augment", action="store_true", help="--data folder: train without random crops and flips")


def folder_options(args: argparse.Namespace, checkpoint: dict | None = None) -> dict:
    """The image-folder settings (only ``--data folder`` reads them): those given on the command line,
    else those the checkpoint's model was trained with (so evaluate, plan and compress read the folder
    as train did without repeating them), else the defaults."""
    if getattr(args, "data", None) != "folder":
        return {}
    stored = ((checkpoint or {}).get("extra") or {}).get("data_source") or {}
    size = getattr(args, "image_size", None) or stored.get("image_size")
    bad = getattr(args, "on_bad_image", None) or stored.get("on_bad_image") or "error"
    augment = False if getattr(args, "no_augment", False) else stored.get("augment", True)
    return {"input_size": size, "on_bad_image": bad, "augment": augment}


def add_train_args(p: argparse.ArgumentParser, *, epochs: int = 400, lr: float = 0.05, warmup: int = 5) -> None:
    g = p.add_argument_group("training (defaults: the published CIFAR recipe)")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--warmup-epochs", type=int, default=warmup)
    g.add_argument("--label-smoothing", type=float, default=0.0, help="0.1 for ImageNet")
    g.add_argument("--distill", type=float, default=0.0, metavar="W",
                   help="knowledge distillation: loss (1-W)·CE + W·T²·KL(teacher ‖ student) (default 0: off)")
    g.add_argument("--temperature", type=float, default=4.0, help="distillation temperature T (default 4)")
    g.add_argument("--channels-last", nargs="?", const=True, default=False, choices=("auto",), metavar="auto",
                   help="train in the channels-last memory format (the same results up to float rounding); "
                        "'--channels-last auto': in whichever layout the run's first steps trained faster on the "
                        "device (on a CPU thin pruned models train ~2x faster in the standard layout at 64x64, "
                        "dense ones faster channels-last); a run resumes only in the layout it started in")
    g.add_argument("--patience", type=int, default=0, metavar="P",
                   help="stop once validation top-1 has not improved for P epochs (default 0: train every epoch)")
    g.add_argument("--precise-bn", type=int, default=0, metavar="N",
                   help="before each validation, re-estimate BatchNorm statistics on N training images with the "
                        "epoch's weights (default 0: the running averages); steadies the validation curve of short "
                        "epochs at a high learning rate")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--run-dir", required=True, help="where checkpoints and metrics.jsonl go")
    g.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    g.add_argument("--overwrite", action="store_true", help="discard a previous run in --run-dir")


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                       weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                       label_smoothing=args.label_smoothing, seed=args.seed, distill=args.distill,
                       temperature=args.temperature, channels_last=args.channels_last, patience=args.patience,
                       precise_bn=args.precise_bn)


def load_splits(args: argparse.Namespace, checkpoint: dict | None = None):
    """(train, validation, test) of ``--data``; the validation split is held out of train (an image
    folder brings its own: its val/ folder, or a stratified share of the images)."""
    if args.data == "folder":
        train, val, test = folder_splits(args.data_dir, **folder_options(args, checkpoint))
        train = limit(train, args.subset, args.seed)
        if val is not None and args.val_size is None:
            return train, val, test
        val_size = args.val_size if args.val_size is not None else max(1, len(train) // 10)
        train, val = split_validation(train, val_size, args.seed)
        return train, val, test
    train = limit(load_dataset(args.data, args.data_dir, "train"), args.subset, args.seed)
    test = load_dataset(args.data, args.data_dir, "test")
    val_size = args.val_size if args.val_size is not None else min(5000, max(1, len(train) // 10))
    train, val = split_validation(train, val_size, args.seed)
    return train, val, test


def device_and_processes(args: argparse.Namespace) -> tuple[torch.device, Distributed]:
    device = resolve_device(args.device)
    return device, init_distributed(device)
