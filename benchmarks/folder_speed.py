"""Is training on an image folder decode-bound?  A folder's images are decoded once into uint8 tensors;
this measures what that costs and whether an epoch on them runs as fast as on the same tensors in memory.

    .venv/bin/python benchmarks/folder_speed.py                    # 10,000 96×96 RGB JPEGs, ResNet-20
    .venv/bin/python benchmarks/folder_speed.py --images 2000 --size 64 --steps 10

Writes a folder of ``--images`` RGB JPEGs (10 class folders, seeded) to a temporary directory, reads it
with ``folder_splits`` (the one-off decode, timed), then times ``--steps`` ResNet-20 training steps
(batch 128, SGD, the folder's augmentation) drawing batches from the folder's training split and from a
copy of the same tensors built in memory, in alternating rounds on one model; prints images/s of each
and their ratio (the target: the folder at ≥ 80 % of the in-memory throughput).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from norton import create_model
from norton.training import epoch_batches, folder_splits
from norton.training.arrays import ArrayDataset


def write_folder(root: Path, images: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        label = i % 10
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        pixels[:, label * size // 10:(label + 1) * size // 10] += 150  # a band per class
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def steps_per_second(model, optimizer, data, steps: int, epoch: int) -> float:
    batches = epoch_batches(data, 128, seed=0, epoch=epoch, shuffle=True)
    started = time.perf_counter()
    for _ in range(steps):
        images, labels = next(batches)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * 128 / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=8, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="record the own-data guide's table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        started = time.perf_counter()
        write_folder(root, args.images, args.size)
        written = time.perf_counter() - started
        started = time.perf_counter()
        train, _, _ = folder_splits(str(root))
        decoded = time.perf_counter() - started
    memory = ArrayDataset(train.images.clone(), train.labels.clone(), train.mean, train.std, train.crop_padding,
                          train.flip)
    torch.manual_seed(0)
    model = create_model("resnet_20", num_classes=10).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps_per_second(model, optimizer, memory, 2, 0)  # warm-up
    rates = {"folder": [], "memory": []}
    for r in range(args.rounds):
        for name, data in (("folder", train), ("memory", memory)) if r % 2 == 0 else (("memory", memory), ("folder", train)):
            rates[name].append(steps_per_second(model, optimizer, data, args.steps, r + 1))
    folder, memory_rate = statistics.median(rates["folder"]), statistics.median(rates["memory"])
    print(json.dumps({"images": args.images, "size": args.size, "written_s": round(written, 1),
                      "decode_s": round(decoded, 1), "decode_images_per_s": round(args.images / decoded),
                      "train_images": len(train), "folder_img_s": round(folder, 1), "memory_img_s": round(memory_rate, 1),
                      "ratio": round(folder / memory_rate, 3), "threads": torch.get_num_threads()}))
    if args.record:
        from record import write_table

        write_table("folder_speed", ["images", "decoding once", "training on the folder's tensors",
                                     "on the same tensors built in memory", "folder / memory"],
                    [[f"{args.images:,} {args.size}×{args.size} RGB JPEGs", f"{decoded:.1f} s "
                      f"({args.images / decoded:,.0f} images/s)", f"{folder:.1f} images/s", f"{memory_rate:.1f} images/s",
                      f"**{folder / memory_rate:.2f}**"]],
                    note=f"ResNet-20, batch 128, {args.rounds} alternating rounds of {args.steps} training steps "
                         f"(medians), {torch.get_num_threads()} threads.")


if __name__ == "__main__":
    main()
