"""``norton compare`` on a user's image folder: how long a budget takes on 2 cores.

    .venv/bin/python benchmarks/folder_compare.py                         # 2,000 64×64 images, --budget medium
    .venv/bin/python benchmarks/folder_compare.py --images 500 --budget small --out runs/folder_small
    .venv/bin/python benchmarks/folder_compare.py --record    # the own-data guide's table (a finished run: not run again)

Writes ``--images`` real images to ``<out>/images/<class>/`` — Fashion-MNIST's first training images
(Debian's dataset-fashion-mnist), the same number from each class, resized to ``--size`` pixels and saved as
grayscale PNGs — the layout a user's class folders have (no train/val/test subfolders: compare splits it), then
runs ``norton compare --data folder --data-dir <out>/images --budget B --out <out>/compare --resume`` and
prints the minutes it took (also recorded in its results.json).  Resumable: the folder is written once, and
an interrupted comparison goes on where it stopped.  ``--record`` records where the minutes went (the
baseline's training epochs, building the compressed models — planning included —, fine-tuning and evaluating
them, and the rest: reading the folder, timing every deployed model, the figures) for the own-data guide.
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

from record import write_table

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
    parser.add_argument("--record", action="store_true", help="record the own-data guide's table (docs/results/tables)")
    args = parser.parse_args()
    out = Path(args.out)
    write_folder(out / "images", args.images, args.size)
    command = [str(Path(sys.executable).with_name("norton")), "compare", "--data", "folder",
               "--data-dir", str(out / "images"), "--budget", args.budget, "--out", str(out / "compare"), "--resume"]
    started = time.perf_counter()
    results = out / "compare" / "results.json"
    if not (args.record and results.exists()):  # a finished run is recorded as it ran: a resume would time it again
        subprocess.run(command, check=True)
    with open(results) as f:
        recorded = json.load(f)
    print(json.dumps({"images": args.images, "size": args.size, "budget": args.budget,
                      "this_call_minutes": round((time.perf_counter() - started) / 60, 1),
                      "recorded_minutes": round(recorded["minutes"], 1), "setup": recorded["setup"]}))
    if args.record:
        record_minutes(recorded, out / "compare", args)


def record_minutes(results: dict, compare_dir: Path, args: argparse.Namespace) -> None:
    """The comparison's minutes by stage, from its results and the baseline's metrics."""
    baseline = 0.0
    metrics = compare_dir / "baseline" / "metrics.jsonl"
    if metrics.exists():  # absent when --baseline gave a trained one
        baseline = sum(json.loads(line)["seconds"] for line in metrics.read_text().splitlines() if line.strip())
    build = sum(run["build_seconds"] for run in results["runs"])
    run = sum(run["run_seconds"] for run in results["runs"])
    total = 60 * results["minutes"]
    rows = [["training the baseline (its epochs)", f"{baseline / 60:.1f}"],
            [f"building the {len(results['runs'])} compressed models (planning included)", f"{build / 60:.1f}"],
            ["fine-tuning and evaluating them", f"{run / 60:.1f}"],
            ["the rest (reading the folder, timing every deployed model, figures)",
             f"{(total - baseline - build - run) / 60:.1f}"],
            ["**total**", f"**{total / 60:.1f}**"]]
    write_table("folder_compare", ["stage", "minutes"], rows,
                command=f".venv/bin/python benchmarks/folder_compare.py --images {args.images} --size {args.size} "
                        f"--budget {args.budget}",
                note=f"`norton compare --budget {args.budget}` on {results['setup'].replace(str(Path.cwd()) + '/', '')}. "
                     f"The run started from commit "
                     f"{results['commit']} on {results['started']}.")


if __name__ == "__main__":
    main()
