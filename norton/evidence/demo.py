"""`make demo`: NORTON end to end on real data (Fashion-MNIST, or a user's image folder), measured in the run.

Trains a ResNet-20 baseline, compresses it at two levels (decompose → prune →
fine-tune), and writes a Markdown table and an accuracy-vs-MACs plot to the run
directory.  The default budget fits in about 15 minutes on 2 CPU cores: a
subset of the training images and few epochs (printed with the results);
``--full`` uses all 60,000 images and the published schedule (400 + 400 epochs),
for users with time or a GPU.  Every stage is resumable (``--resume``).  On
another dataset (``data``: any ``norton train`` reads, an image folder too) the
budget is fitted to it as ``norton compare``'s are (``scale_budget``: every
training image when there are fewer, epochs scaled to about the same number of
steps).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace

import torch

from norton.checkpoints import load_checkpoint, load_model
from norton.core import machine_record, provenance, provenance_text
from norton.deployment import compare_latency, deploy
from norton.evidence.compare import DATA_NAMES, CompareBudget, comparison_splits
from norton.evidence.plotting import accuracy_vs_macs_axes, pyplot, save
from norton.models import create_model
from norton.training import (
    CompressConfig,
    TrainConfig,
    compress,
    evaluate,
    dataset_shape,
    fit,
    load_best,
)


@dataclass
class DemoBudget:
    train_images: int | None
    val_images: int
    baseline: TrainConfig
    finetune: TrainConfig
    levels: tuple  # (name, rank, amount)


SMALL = DemoBudget(
    train_images=15_000, val_images=2_000,
    baseline=TrainConfig(epochs=6, batch_size=128, lr=0.1, warmup_epochs=1),
    finetune=TrainConfig(epochs=4, batch_size=128, lr=0.02, warmup_epochs=0),
    levels=(("NORTON rank 4, prune 40%", 4, 0.4), ("NORTON rank 2, prune 60%", 2, 0.6)),
)
FULL = DemoBudget(
    train_images=None, val_images=5_000,
    baseline=TrainConfig(epochs=400, batch_size=256, lr=0.05, warmup_epochs=5),
    finetune=TrainConfig(epochs=400, batch_size=256, lr=0.05, warmup_epochs=5),
    levels=SMALL.levels,
)


def run_demo(out_dir: str = "runs/demo", *, full: bool = False, resume: bool = False, data_dir: str | None = None,
             device: torch.device | None = None, budget: DemoBudget | None = None, data: str = "fashion-mnist",
             folder_options: dict | None = None, command: str | None = None) -> str:
    budget = budget or (FULL if full else SMALL)
    device = device or torch.device("cpu")
    started = time.perf_counter()
    sized = CompareBudget(train_images=budget.train_images, val_images=budget.val_images, test_images=None,
                          baseline=budget.baseline, finetune=budget.finetune)
    sized, _, train, val, test = comparison_splits(data, data_dir, sized, "full" if full else "demo", folder_options)
    budget = replace(budget, baseline=sized.baseline, finetune=sized.finetune)
    os.makedirs(out_dir, exist_ok=True)
    classes, channels = dataset_shape(train)
    size = "×".join(map(str, test.input_size))
    data_text = f"image folder {test.source['root']}" if data == "folder" else DATA_NAMES.get(data, data)
    print(f"{data_text}: {len(train)} training, {len(val)} validation (held out from training), {len(test)} test "
          f"images; ResNet-20, {size} input; baseline {budget.baseline.epochs} epochs, fine-tuning "
          f"{budget.finetune.epochs} epochs per level; {torch.get_num_threads()} CPU threads")

    # the baseline
    base_dir = os.path.join(out_dir, "baseline")
    torch.manual_seed(budget.baseline.seed)
    model = create_model("resnet_20", in_channels=channels, num_classes=classes)
    last = os.path.join(base_dir, "last.pt")
    if not (resume and os.path.exists(last) and load_checkpoint(last)["train_state"].get("finished")):
        fit(model, train, val, budget.baseline, base_dir, device=device, resume=resume and os.path.exists(last),
            overwrite=not resume, extra={"stage": "baseline"})
    load_best(model, base_dir)
    model.to(device)
    baseline_test = evaluate(model, test, device=device)

    # the compression levels
    summaries = {}
    for name, rank, amount in budget.levels:
        level_dir = os.path.join(out_dir, f"rank{rank}_amount{amount}")
        config = CompressConfig(rank=rank, amount=amount, criterion="pabs", finetune=budget.finetune)
        source, _ = load_model(os.path.join(base_dir, "best.pt"))
        summaries[name] = compress(source, train, val, test, config, level_dir, device=device,
                                   resume=resume, overwrite=not resume)

    # latency, side by side: every model deployed the same way (BatchNorm folded, its fastest layout and forms)
    example = torch.randn(128, *test.input_size, device=device)
    models = {"baseline": model}
    for name, rank, amount in budget.levels:
        models[name] = load_model(os.path.join(out_dir, f"rank{rank}_amount{amount}", "final.pt"))[0].to(device)
    latency = compare_latency({name: deploy(m, example)[0] for name, m in models.items()}, example)

    record = {"data": data_text, **provenance(command), "machine": machine_record(device),
              "minutes": (time.perf_counter() - started) / 60, "threads": torch.get_num_threads(),
              "baseline": baseline_test, "levels": summaries,
              "latency_ms": {k: v.median_ms for k, v in latency.items()}, "latency": "deployed",
              "budget": {"train_images": len(train), "val_images": len(val), "test_images": len(test),
                         "baseline": asdict(budget.baseline), "finetune": asdict(budget.finetune)}}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    text = demo_markdown(record)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    _plot(baseline_test, summaries, os.path.join(out_dir, "accuracy_vs_macs.png"), data_text)
    print("\n" + text)
    print(f"written: {out_dir}/results.md, results.json, accuracy_vs_macs.png")
    return _table(baseline_test, summaries, record["latency_ms"])


def demo_markdown(record: dict) -> str:
    """``results.md``: what the demo measured, rendered from its ``results.json`` alone."""
    b = record["budget"]
    machine = record.get("machine") or {}
    made = provenance_text(record, machine.get("cpu"))
    header = (f"NORTON on {record['data']} (ResNet-20), measured by `{record.get('command') or 'norton demo'}` in "
              f"{record['minutes']:.1f} min on {record['threads']} CPU threads ({made}).\n"
              f"Training subset: {b['train_images']} images (+{b['val_images']} validation), baseline "
              f"{b['baseline']['epochs']} epochs, fine-tuning {b['finetune']['epochs']} epochs; accuracy on the "
              f"{b['test_images']} test images; latency = median of 15 forward passes of a batch of 128, every "
              "model deployed (`norton.deploy`), the speed-up against the deployed baseline.\n")
    return header + "\n" + _table(record["baseline"], record["levels"], record["latency_ms"]) + "\n"


def _table(baseline, summaries, latency_ms: dict[str, float]) -> str:
    base = next(iter(summaries.values()))["baseline"]
    rows = [
        "| model | after decomposition | + BN recalibration | after pruning | + BN recalibration | after fine-tuning | MACs | params | CPU latency, deployed (batch 128) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| baseline ResNet-20 | — | — | — | — | {baseline['top1']:.2f} % | {base['macs'] / 1e6:.2f}M | {base['params'] / 1e3:.1f}K "
        f"| {latency_ms['baseline']:.1f} ms |",
    ]
    for name, s in summaries.items():
        d, p, f = s["decomposed"], s["pruned"], s["final"]
        speed = latency_ms["baseline"] / latency_ms[name]
        rows.append(
            f"| {name} | {d['top1']:.2f} % | {d['recalibrated']['top1']:.2f} % | {p['top1']:.2f} % | "
            f"{p['recalibrated']['top1']:.2f} % | {f['top1']:.2f} % | {f['macs'] / 1e6:.2f}M ({100 * (1 - f['macs'] / base['macs']):.1f}% ↓) "
            f"| {f['params'] / 1e3:.1f}K ({100 * (1 - f['params'] / base['params']):.1f}% ↓) | {latency_ms[name]:.1f} ms ({speed:.2f}×) |"
        )
    return "\n".join(rows)


def _plot(baseline, summaries, path: str, data_text: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    base = next(iter(summaries.values()))["baseline"]
    ax.scatter([base["macs"] / 1e6], [baseline["top1"]], marker="*", s=160, color="black", label="baseline", zorder=3)
    for marker, (name, s) in zip(["o", "s", "^", "D"], summaries.items()):
        points = [(s["decomposed"]["macs"], s["decomposed"]["recalibrated"]["top1"]),
                  (s["pruned"]["macs"], s["pruned"]["recalibrated"]["top1"]),
                  (s["final"]["macs"], s["final"]["top1"])]
        line = ax.plot([p[0] / 1e6 for p in points], [p[1] for p in points], marker=marker, linestyle=":", label=name)[0]
        ax.annotate("fine-tuned", (points[-1][0] / 1e6, points[-1][1]), textcoords="offset points", xytext=(6, -10),
                    fontsize=8, color=line.get_color())
    accuracy_vs_macs_axes(ax, f"NORTON on {data_text}, ResNet-20\n(each level: decomposed → pruned → fine-tuned; "
                              "BN recalibrated)", legend="lower right", fontsize=9)
    save(fig, path)
