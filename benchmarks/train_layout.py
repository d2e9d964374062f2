"""Training epochs with ``TrainConfig(channels_last=True)`` against contiguous ones.

    .venv/bin/python benchmarks/train_layout.py [--rounds 5] [--images 1280]
    .venv/bin/python benchmarks/train_layout.py --gray64 [--record]

For VGG-16-BN rank 8 and ResNet-56 rank 4 as ``create_model`` builds them and
their dense counterparts (batch 128, 32×32 CIFAR-shaped images; the pixel
values do not change the time): rounds of one ``fit`` epoch in each layout, the
order alternated every round; per model, the median of the per-round ratios
contiguous / channels-last of the epoch's training seconds (above 1: the
channels-last epoch was faster), with the fastest and slowest round.
``--gray64``: ResNet-20 on one-channel 64×64 images instead (a grayscale image
folder's), dense, L1-pruned to 85 % and 60 % fewer MACs, and CP at rank 4 — the
kinds of model a comparison fine-tunes, where the faster layout is not the same
for all (``channels_last="auto"`` chooses per run).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings

import torch
from torch import nn

from record import Table

from norton.compression import prune
from norton.models import create_model
from norton.training import TrainConfig, fit
from norton.training.data import ArrayDataset

CASES = (("vgg_16_bn", 8), ("vgg_16_bn", 0), ("resnet_56", 4), ("resnet_56", 0))


GRAY64_CASES = (("resnet_20", 0.0, 0), ("resnet_20", 0.85, 0), ("resnet_20", 0.60, 0), ("resnet_20", 0.0, 4))


def gray_model(arch: str, pruned: float, rank: int) -> nn.Module:
    """``arch`` for one-channel 64×64 images: CP-decomposed at ``rank`` (0: dense), L1-pruned to ``pruned``
    fewer MACs (0: not pruned)."""
    torch.manual_seed(0)
    model = create_model(arch, rank=rank, in_channels=1)
    if pruned:
        prune(model, target_macs=pruned, criterion="l1", example_inputs=torch.zeros(1, 1, 64, 64))
    return model


def epoch_seconds(arch: str, pruned: float, rank: int, data: ArrayDataset, channels_last: bool) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = gray_model(arch, pruned, rank) if data.images.shape[1] == 1 else create_model(arch, rank=rank)
    config = TrainConfig(epochs=1, batch_size=128, lr=0.01, warmup_epochs=0, channels_last=channels_last)
    with tempfile.TemporaryDirectory() as run_dir:
        result = fit(model, data, data.subset(torch.arange(128)), config, run_dir, device=torch.device("cpu"),
                     progress=False)
    return result.history[0]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="epochs in each layout, alternated")
    parser.add_argument("--images", type=int, default=1280, help="training images per epoch")
    parser.add_argument("--gray64", action="store_true",
                        help="ResNet-20 on one-channel 64×64 images: dense, L1-pruned (85 %%, 60 %% fewer MACs), CP rank 4")
    parser.add_argument("--record", action="store_true", help="record the deploy guide's table (docs/results/tables)")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    shape, mean, std = ((1, 64, 64), (0.5,), (0.25,)) if args.gray64 else ((3, 32, 32), (0.5,) * 3, (0.25,) * 3)
    data = ArrayDataset(torch.randint(0, 256, (args.images, *shape), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (args.images,), generator=g), mean, std)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds of one epoch "
          f"of {args.images} images in each layout\n")
    table = Table(["model", "contiguous epoch (median)", "contiguous / channels-last (median, min–max)"])
    for arch, pruned, rank in GRAY64_CASES if args.gray64 else [(arch, 0.0, rank) for arch, rank in CASES]:
        times = {False: [], True: []}
        for i in range(args.rounds + 1):  # the first round warms up
            for channels_last in ((False, True) if i % 2 else (True, False)):
                seconds = epoch_seconds(arch, pruned, rank, data, channels_last)
                if i:
                    times[channels_last].append(seconds)
        ratios = sorted(a / b for a, b in zip(times[False], times[True]))
        name = (f"{arch} L1-pruned to {pruned:.0%} fewer MACs" if pruned else f"{arch} rank {rank}" if rank
                else f"{arch} dense")
        table.add([name, f"{statistics.median(times[False]):.1f} s", f"**{statistics.median(ratios):.3f}×** "
                   f"({ratios[0]:.3f}–{ratios[-1]:.3f})"])
    if args.record:
        what = "one-channel 64×64" if args.gray64 else "CIFAR-shaped"
        table.record("train_layout_gray64" if args.gray64 else "train_layout",
                     note=f"{args.rounds} rounds of one `fit` epoch of {args.images} {what} images at batch 128 in "
                     "each layout, the order alternated (a first round warms up).")

if __name__ == "__main__":
    main()
