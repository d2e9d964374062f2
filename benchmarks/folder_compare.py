"""``norton compare`` on a user's image folder: how long a budget takes on 2 cores.

    .venv/bin/python benchmarks/folder_compare.py                         # 2,000 64×64 images, --budget medium
    .venv/bin/python benchmarks/folder_compare.py --images 500 --budget small --out runs/folder_small

Writes ``--images`` real images to ``<out>/images/<class>/`` — Fashion-MNIST's first training images
(Debian's dataset-fashion-mnist), the same number from each class, resized to ``--size`` pixels and saved as
grayscale PNGs — the layout a user's class folders have (no train/val/test subfolders: compare splits it), then
runs ``norton compare --data folder --data-dir <out>/images --budget B --out <out>/compare --resume`` and
prints the minutes it took (also recorded in its results.json).  Resumable: the folder is written once, and
an interrupted comparison goes on where it stopped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch.nn.functional as F
from PIL import Image

from norton.training import load_dataset


def write_folder(root: Path, images: int, size: int) -> None:
    if root.exists() and sum(1 for _ in root.rglob("*.png")) == images:
        return
    data = load_dataset("fashion-mnist", None, "train")
    per_class = images // 10
    taken = {label: 0 for label in range(10)}
    for i in range(len(data)):
        label = int(data.labels[i])
        if taken[label] >= per_class:
            if all(n >= per_class for n in taken.values()):
                break
            continue
        pixels = data.images[i:i + 1].float()
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[0, 0].round().clamp(0, 255).byte().numpy()).save(folder / f"{i}.png")
        taken[label] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--budget", default="medium", choices=("small", "medium"))
    parser.add_argument("--out", default="runs/folder_compare")
    args = parser.parse_args()
    out = Path(args.out)
    write_folder(out / "images", args.images, args.size)
    command = [str(Path(sys.executable).with_name("norton")), "compare", "--data", "folder",
               "--data-dir", str(out / "images"), "--budget", args.budget, "--out", str(out / "compare"), "--resume"]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    with open(out / "compare" / "results.json") as f:
        recorded = json.load(f)
    print(json.dumps({"images": args.images, "size": args.size, "budget": args.budget,
                      "this_call_minutes": round((time.perf_counter() - started) / 60, 1),
                      "recorded_minutes": round(recorded["minutes"], 1), "setup": recorded["setup"]}))


if __name__ == "__main__":
    main()
