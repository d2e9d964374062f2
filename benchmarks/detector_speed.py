"""Faster R-CNN R50-FPN with a NORTON backbone: MACs, and speed deployed against the dense detector deployed.

    .venv/bin/python benchmarks/detector_speed.py            # rank 1 at batch 1 and 8, rank 4 at batch 1
    .venv/bin/python benchmarks/detector_speed.py --record   # and record the detection guide's table

For each backbone config: ``norton complexity`` (MACs of backbone + FPN at
800×800, of the whole model with the RoIs its box head saw, parameters) and
``norton benchmark --json`` (the whole detector and its backbone + FPN,
deployed with ``norton.deploy_detector``, timed side by side with the
uncompressed detector deployed the same way).  Random weights: the RPN passes
its full 1,000 proposals to the box head, the most the heads can cost.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json

from record import Table

from norton.cli import main as norton

CONFIGS = (  # (rank, compress rate, batches)
    (1, "[0.]+[0.1]*2+[0.4]*5+[0.75]*12", "1,8"),
    (4, "[0.]+[0.1]*3+[0.3]*16", "1"),
)
ARCH = "fasterrcnn_resnet50_fpn"


def json_of(*args: str) -> dict:
    """One norton command's ``--json`` record."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = norton([*args, "--json"])
    if code:
        raise SystemExit(f"norton {' '.join(args)} exited with {code}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--record", action="store_true", help="record the detection guide's table")
    args = parser.parse_args()
    table = Table(["backbone", "MACs backbone + FPN", "MACs whole model (1,000 RoIs)", "params", "batch",
                   "whole detector: images/s, dense → compressed", "backbone + FPN speed-up"])
    for rank, rate, batches in CONFIGS:
        size = json_of("complexity", "--arch", ARCH, "-r", str(rank), "-cpr", rate)
        speed = json_of("benchmark", "--arch", ARCH, "-r", str(rank), "-cpr", rate, "--batch-size", batches,
                        "--repeats", str(args.repeats))
        cut = lambda a, b: f"{a / 1e9:.2f}G ({100 * (1 - a / b):.1f}% ↓)"  # noqa: E731
        for batch, rows in speed["results"].items():
            dense, compressed = rows["dense (deployed)"], rows["compressed (deployed)"]
            backbone = speed["backbone"][batch]["compressed backbone + FPN"]
            table.add([f"rank {rank} `{rate}`", cut(size["macs"], size["baseline_macs"]),
                       cut(size["whole_model_macs"], size["baseline_whole_model_macs"]),
                       f"{size['params'] / 1e6:.2f}M ({100 * (1 - size['params'] / size['baseline_params']):.1f}% ↓)",
                       batch, f"{dense['images_per_s']:.2f} → {compressed['images_per_s']:.2f} "
                              f"(**{compressed['speedup_vs_dense_deployed']:.2f}×**)",
                       f"{backbone['speedup_vs_dense_deployed']:.2f}×"])
    if args.record:
        table.record("detector_speed", note=f"800×800 images, random weights, CPU float32, median of {args.repeats} "
                     "interleaved runs; every speed-up against the uncompressed detector (or its backbone + FPN) "
                     "deployed the same way. The uncompressed detector: backbone + FPN "
                     f"{size['baseline_macs'] / 1e9:.2f}G MACs, whole model "
                     f"{size['baseline_whole_model_macs'] / 1e9:.2f}G, {size['baseline_params'] / 1e6:.2f}M params.")


if __name__ == "__main__":
    main()
