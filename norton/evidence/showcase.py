"""`make demo` showcase: what NORTON's configs cost, and how fast decomposition is.

Everything printed is measured in this run.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from norton.compression import decompose
from norton.core import complexity
from norton.models import create_model

SHOWCASE = [
    ("vgg_16_bn", 1, "[0.6]*6+[0.8]*7"),
    ("vgg_16_bn", 8, "[0.21]*7+[0.75]*5"),
    ("resnet_56", 1, "[0.]+[0.18]*29"),
    ("resnet_56", 1, "[0.]+[0.4]*2+[0.5]*9+[0.6]*9+[0.7]*9"),
    ("resnet_110", 2, "[0.]+[0.2]*2+[0.3]*18+[0.35]*36"),
    ("densenet_40", 8, "[0.]+[0.08]*6+[0.09]*6+[0.08]*26"),
    ("resnet_50", 1, "[0.]+[0.1]*2+[0.4]*5+[0.75]*12"),
]


def complexity_table() -> str:
    rows = ["| arch | rank | compress rate | MACs | MACs ↓ | params | params ↓ |", "|---|---|---|---|---|---|---|"]
    for arch, rank, rate in SHOWCASE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the short VGG list is padded on purpose
            model = create_model(arch, rank=rank, compress_rate=rate)
        base = complexity(create_model(arch))
        got = complexity(model)
        rows.append(
            f"| {arch} | {rank} | `{rate}` | {got.macs / 1e6:.2f}M | {100 * (1 - got.macs / base.macs):.2f}% "
            f"| {got.params / 1e6:.3f}M | {100 * (1 - got.params / base.params):.2f}% |"
        )
    return "\n".join(rows)


def decomposition_speed() -> str:
    """Decompose every 3×3 conv of VGG-16-BN and ResNet-50 (random weights) at rank 8."""
    rows = ["| model | conv layers | filters | rank | mean NMSE | seconds |", "|---|---|---|---|---|---|"]
    torch.manual_seed(0)
    for arch in ("vgg_16_bn", "resnet_50"):
        model = create_model(arch)
        start = time.perf_counter()
        report = decompose(model, 8, progress=True)
        seconds = time.perf_counter() - start
        filters = sum(layer.shape[0] for layer in report.layers)
        rows.append(f"| {arch} | {len(report.layers)} | {filters} | 8 | {report.mean_nmse:.4f} | {seconds:.1f} |")
    return "\n".join(rows)


def run_showcase(out_dir: str | Path = "runs/demo") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print("== Complexity of published NORTON configs (MACs per image, paper's factored convention) ==")
    table1 = complexity_table()
    print(table1)
    print("\n== Filter decomposition of whole networks (random weights, CPU) ==")
    table2 = decomposition_speed()
    print(table2)
    (out / "showcase.md").write_text(table1 + "\n\n" + table2 + "\n")
    (out / "torch.json").write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}))
    print(f"\nwritten: {out / 'showcase.md'}")
