"""`norton report`: the paper's analyses, measured on our data.

From a trained baseline (a norton checkpoint, e.g. the one ``norton compare``
trained) it runs — or, with ``--resume``, reuses — one ``compress`` run per
configuration and writes into its directory:

- ``rank_sweep.md/png``: ranks 1…8 without pruning — per-layer and mean NMSE,
  MACs and params reduction, accuracy after decomposition (before and after BN
  recalibration) and after fine-tuning;
- ``grid.md/png``: rank × pruning at about equal MACs (the "3N / 4S / 6M / 8H"
  study: the first rank unpruned, the others pruned with pabs to its MACs);
- ``pareto.png``: accuracy vs MACs of every compressed model of these runs
  (and of a ``norton compare`` run), the Pareto front marked;
- ``gradcam.png``: Grad-CAM maps of the same test images for the baseline and
  models at several compression rates, with their agreement with the baseline.

``report.md`` gathers the tables and figures; ``report.json`` every number.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from norton.checkpoints import atomic_write_text, load_model
from norton.core import complexity, machine_record, provenance
from norton.errors import NortonError
from norton.evidence.compare import (
    BUDGETS,
    DATA_NAMES,
    CompareBudget,
    Context,
    comparison_splits,
    cp_reduction,
    decomposable_layers,
)
from norton.evidence.plotting import accuracy_vs_macs_axes, pyplot, save
from norton.training import (
    CompressConfig,
    compress,
    evaluate,
    input_size_of,
)
from norton.training.data import normalize

FASHION_CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


@dataclass
class ReportPlan:
    ranks: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    grid: tuple[int, ...] = (3, 4, 6, 8)  # the first unpruned; the others pruned to its MACs
    gradcam_images: int = 6
    gradcam_ranks: tuple[int, ...] = (1, 2, 4)  # rank-sweep models shown next to the baseline (+ the grid's last)

    def validate(self) -> None:
        for name, values in (("ranks", self.ranks), ("grid", self.grid)):
            if not values or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in values):
                raise NortonError(f"report {name} must be ranks >= 1, got {list(values)}")
        if len(self.grid) < 2:
            raise NortonError(f"the grid needs at least two ranks (one unpruned, one pruned), got {list(self.grid)}")
        if not 1 <= self.gradcam_images <= 10:
            raise NortonError(f"gradcam_images must be in 1..10, got {self.gradcam_images}")


def _grid_names(grid: tuple[int, ...]) -> list[str]:
    letters = "NSMH" if len(grid) == 4 else None
    return [f"{r}{letters[i]}" if letters else (f"{r}N" if i == 0 else f"{r}P") for i, r in enumerate(grid)]


def run_report(out_dir: str, *, baseline_ckpt: str | None = None, compare_dir: str | None = None,
               budget: CompareBudget | str = "small", plan: ReportPlan | None = None, resume: bool = False,
               data: str | None = None, data_dir: str | None = None, folder_options: dict | None = None,
               device: torch.device | None = None, progress: bool = True, command: str | None = None) -> dict:
    """The paper's analyses of a trained baseline (``baseline_ckpt``, or the baseline of the comparison
    ``compare_dir``) on ``data`` — by default the comparison's data read as the comparison read it (its
    image folder with the same size, bad-image policy and augmentation), else Fashion-MNIST — split as
    ``norton compare`` splits it under ``budget``."""
    plan = plan or ReportPlan()
    plan.validate()
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise NortonError(f"unknown budget {budget!r}; valid: {', '.join(BUDGETS)}")
        budget_name, budget = budget, BUDGETS[budget]
    else:
        budget_name = "custom"
    if baseline_ckpt is None:
        if compare_dir is None:
            raise NortonError("give --baseline (a norton checkpoint of the trained model) or --compare (a norton compare run)")
        baseline_ckpt = os.path.join(compare_dir, "baseline", "best.pt")
    if not os.path.isfile(baseline_ckpt):
        raise NortonError(f"baseline checkpoint {baseline_ckpt!r} does not exist")
    if compare_dir is not None and not os.path.isfile(os.path.join(compare_dir, "results.json")):
        raise NortonError(f"{compare_dir!r} holds no finished comparison (results.json); run norton compare first")
    if os.path.exists(os.path.join(out_dir, "report.json")) and not resume:
        raise NortonError(f"{out_dir!r} already holds a report; pass --resume to rebuild it from its runs")
    if data is None:
        data, data_dir, folder_options = _compared_data(compare_dir, data_dir, folder_options)
    device = device or torch.device("cpu")
    budget, _, train, val, test = comparison_splits(data, data_dir, budget, budget_name, folder_options)
    os.makedirs(out_dir, exist_ok=True)
    size = tuple(input_size_of(test))
    baseline, checkpoint = load_model(baseline_ckpt)
    arch = ((checkpoint.get("architecture") or {}).get("base") or {}).get("arch")
    baseline.to(device).eval()
    base = {**asdict(complexity(baseline, list(size))), "top1": evaluate(baseline, test, device=device)["top1"]}
    names_of_classes = list(getattr(test, "classes", None) or (FASHION_CLASSES if data == "fashion-mnist" else ()))

    def run(name: str, config: CompressConfig) -> dict:
        run_dir = os.path.join(out_dir, name)
        return compress(copy.deepcopy(baseline), train, val, test, config, run_dir, device=device,
                        resume=os.path.exists(run_dir), progress=progress)

    # the paper's analyses: its pipeline, without the least-squares recovery norton adds by default
    common = dict(criterion="pabs", recalibration_images=budget.recalibration_images, finetune=budget.finetune,
                  recover=False)
    sweep = {r: run(f"rank{r}", CompressConfig(rank=r, amount=0.0, **common)) for r in plan.ranks}

    names = _grid_names(plan.grid)
    layers = decomposable_layers(baseline)
    ctx = Context(base_macs=base["macs"], example=torch.zeros(1, *size), budget=budget, input_size=size)
    target = cp_reduction(baseline.cpu(), dict.fromkeys(layers, plan.grid[0]), ctx)
    grid = {names[0]: sweep.get(plan.grid[0]) or run(f"rank{plan.grid[0]}", CompressConfig(rank=plan.grid[0], amount=0.0, **common))}
    for name, rank in zip(names[1:], plan.grid[1:]):
        decomposed = cp_reduction(baseline.cpu(), dict.fromkeys(layers, rank), ctx)
        keep = (1 - target) / (1 - decomposed)
        if keep >= 1:
            raise NortonError(f"grid rank {rank} alone removes more MACs than rank {plan.grid[0]}; list the grid ranks in increasing order")
        grid[name] = run(f"grid_{name}", CompressConfig(rank=rank, target_macs=1 - keep, **common))
    baseline.to(device)

    report = {"baseline": base, "target_macs_reduction": target, "rank_sweep": {str(r): s for r, s in sweep.items()},
              **provenance(command), "machine": machine_record(device),
              "grid": grid, "budget": {"train_images": len(train), "val_images": len(val), "test_images": len(test),
                                       "finetune_epochs": budget.finetune.epochs}}
    points = _points(report, compare_dir)
    report["pareto"] = points
    cams = _gradcam(out_dir, baseline, test, plan, sweep, grid, names, device, size, names_of_classes)
    report["gradcam_agreement"] = cams
    report["title"] = (f"NORTON analyses on {_data_text(data, test)} "
                       f"({'ResNet-20' if arch == 'resnet_20' else arch or 'the baseline'})")
    report["budget"]["recalibration_images"] = budget.recalibration_images
    _plot_rank_sweep(report, os.path.join(out_dir, "rank_sweep.png"))
    _plot_grid(report, os.path.join(out_dir, "grid.png"))
    _plot_pareto(points, base, os.path.join(out_dir, "pareto.png"))
    text = report_markdown(report)
    atomic_write_text(os.path.join(out_dir, "report.md"), text)
    atomic_write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1))
    print(text)
    print(f"written: {out_dir}/report.md, report.json, rank_sweep.png, grid.png, pareto.png, gradcam.png")
    return report


def report_markdown(report: dict) -> str:
    """report.md, rendered from report.json alone (``docs/generate.py`` renders the site's copy with it)."""
    base, budget = report["baseline"], report["budget"]
    header = (f"# {report['title']}\n\n"
              f"Measured by `{report.get('command') or 'norton report'}`"
              + (f" ({report['date']}, commit {report['commit']})" if report.get("date") else "")
              + f": {budget['train_images']} training images (+{budget['val_images']} validation), "
              f"{budget['test_images']} test images, {budget['finetune_epochs']} fine-tuning epoch(s) per model, BN "
              f"recalibration on {budget['recalibration_images']} images. Baseline: {base['top1']:.2f} %, "
              f"{base['macs'] / 1e6:.2f}M MACs, {base['params'] / 1e3:.1f}K params.\n")
    sections = [header, rank_sweep_table(report), grid_table(report), pareto_section(report["pareto"]),
                gradcam_section(report["gradcam_agreement"])]
    return "\n".join(sections)


def _compared_data(compare_dir: str | None, data_dir: str | None, folder_options: dict | None):
    """(data, data_dir, folder options) of the comparison in ``compare_dir`` (Fashion-MNIST without one):
    the same images, read the same way; a ``data_dir`` given wins."""
    record_path = os.path.join(compare_dir, "compare.json") if compare_dir else None
    if not record_path or not os.path.isfile(record_path):
        return "fashion-mnist", data_dir, folder_options
    with open(record_path) as f:
        record = json.load(f)
    folder = (record.get("settings") or {}).get("folder")
    if record.get("data") != "folder" or not folder:
        return record.get("data", "fashion-mnist"), data_dir, folder_options
    options = folder_options or {"input_size": folder["image_size"], "on_bad_image": folder["on_bad_image"],
                                 "augment": folder["augment"]}
    return "folder", data_dir or folder["root"], options


def _data_text(data: str, test) -> str:
    if data == "folder":
        return f"the image folder {test.source['root']}"
    return DATA_NAMES.get(data, data)


def _down(value: float, reference: float) -> str:
    return f"{100 * (1 - value / reference):.1f} %"


# -- rank sweep -------------------------------------------------------------------------------
def rank_sweep_table(report: dict) -> str:
    base = report["baseline"]
    lines = ["## Rank sweep (decomposition only)\n",
             "| rank | mean NMSE | MACs ↓ | params ↓ | decomposed | + BN recalibration | after fine-tuning |",
             "|---|---|---|---|---|---|---|"]
    for rank, s in report["rank_sweep"].items():
        d, f = s["decomposed"], s["final"]
        lines.append(f"| {rank} | {d['mean_nmse']:.4f} | {_down(f['macs'], base['macs'])} | {_down(f['params'], base['params'])} "
                     f"| {d['top1']:.2f} % | {d['recalibrated']['top1']:.2f} % | {f['top1']:.2f} % |")
    layers = list(next(iter(report["rank_sweep"].values()))["decomposed"]["layer_nmse"])
    lines += ["", "Per-layer NMSE:", "", "| layer | " + " | ".join(f"r{r}" for r in report["rank_sweep"]) + " |",
              "|---|" + "---|" * len(report["rank_sweep"])]
    for layer in layers:
        lines.append(f"| {layer} | " + " | ".join(f"{s['decomposed']['layer_nmse'][layer]:.3f}"
                                                  for s in report["rank_sweep"].values()) + " |")
    return "\n".join(lines) + "\n\n![rank sweep](rank_sweep.png)\n"


def _plot_rank_sweep(report: dict, path: str) -> None:
    plt = pyplot()
    sweep = report["rank_sweep"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    layers = list(next(iter(sweep.values()))["decomposed"]["layer_nmse"])
    for rank, s in sweep.items():
        left.plot(range(len(layers)), [max(s["decomposed"]["layer_nmse"][n], 1.1e-3) for n in layers], marker=".",
              label=f"rank {rank}")
    left.set_xticks(range(len(layers)), [n.replace("layer", "L").replace(".conv", ".c") for n in layers], rotation=90, fontsize=7)
    left.set_yscale("log")
    left.set_ylim(bottom=1e-3)  # a 1-channel stem is exact from rank 3 (NMSE ~1e-15): drawn on the edge
    left.set_xlabel("layer")
    left.set_ylabel("NMSE of the CP approximation")
    left.set_title("per-layer decomposition error", fontsize=10)
    left.legend(fontsize=7, ncol=2)
    left.grid(alpha=0.3)
    ranks = [int(r) for r in sweep]
    for key, label, style in (("decomposed", "decomposed", ":"), ("recalibrated", "+ BN recalibration", "--"),
                              ("final", "after fine-tuning", "-")):
        values = [s["decomposed"]["recalibrated"]["top1"] if key == "recalibrated" else s[key]["top1"] for s in sweep.values()]
        right.plot(ranks, values, marker="o", linestyle=style, label=label)
    right.axhline(report["baseline"]["top1"], color="black", linewidth=1, label="baseline")
    right.set_xlabel("CP rank of every filter")
    right.set_ylabel("test top-1 accuracy (%)")
    twin = right.twinx()
    twin.bar(ranks, [100 * (1 - s["final"]["macs"] / report["baseline"]["macs"]) for s in sweep.values()],
             alpha=0.15, color="gray")
    twin.set_ylabel("MACs removed (%, gray bars)")
    right.set_zorder(twin.get_zorder() + 1)
    right.patch.set_visible(False)
    right.set_title("accuracy without pruning", fontsize=10)
    right.legend(fontsize=8, loc="lower right")
    right.grid(alpha=0.3)
    save(fig, path)


# -- rank × pruning grid ----------------------------------------------------------------------
def grid_table(report: dict) -> str:
    base = report["baseline"]
    lines = [f"## Rank × pruning at about equal MACs ({100 * report['target_macs_reduction']:.1f} % fewer than the baseline)\n",
             "| configuration | pruned filters | MACs ↓ | params ↓ | pruned + BN recalibration | after fine-tuning |",
             "|---|---|---|---|---|---|"]
    for name, s in report["grid"].items():
        kept = s["pruned"].get("kept", {})
        total = sum(t for _, t in kept.values()) or 1
        pruned = 1 - sum(w for w, _ in kept.values()) / total
        f = s["final"]
        lines.append(f"| {name} (rank {s['config']['rank']}) | {100 * pruned:.0f} % | {_down(f['macs'], base['macs'])} "
                     f"| {_down(f['params'], base['params'])} | {s['pruned']['recalibrated']['top1']:.2f} % | {f['top1']:.2f} % |")
    return "\n".join(lines) + "\n\n![grid](grid.png)\n"


def _plot_grid(report: dict, path: str) -> None:
    plt = pyplot()
    base = report["baseline"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    names = list(report["grid"])
    finals = [report["grid"][n]["final"]["top1"] for n in names]
    params = [100 * (1 - report["grid"][n]["final"]["params"] / base["params"]) for n in names]
    macs = [100 * (1 - report["grid"][n]["final"]["macs"] / base["macs"]) for n in names]
    bars = ax.bar(names, finals, color="tab:blue", alpha=0.8)
    for bar, p, m, f in zip(bars, params, macs, finals):
        ax.annotate(f"{f:.2f} %\nMACs ↓ {m:.1f} %\nparams ↓ {p:.0f} %", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7.5, xytext=(0, 3), textcoords="offset points")
    ax.axhline(base["top1"], color="black", linewidth=1, linestyle="--", label=f"baseline {base['top1']:.2f} %")
    low = min(finals + [base["top1"]])
    ax.set_ylim(max(0, low - 5), min(100, max(finals + [base["top1"]]) + 3.5))
    ax.set_xlabel("rank + pruning level (N none, S small, M medium, H high)")
    ax.set_ylabel("test top-1 after fine-tuning (%)")
    ax.set_title(f"about equal MACs (target: {100 * report['target_macs_reduction']:.1f} % fewer, the first rank unpruned)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    save(fig, path)


# -- Pareto -----------------------------------------------------------------------------------
def _points(report: dict, compare_dir: str | None) -> list[dict]:
    points = [{"label": f"rank {r}", "source": "rank sweep", "macs": s["final"]["macs"], "top1": s["final"]["top1"]}
              for r, s in report["rank_sweep"].items()]
    points += [{"label": name, "source": "rank × pruning", "macs": s["final"]["macs"], "top1": s["final"]["top1"]}
               for name, s in report["grid"].items()]
    if compare_dir:
        with open(os.path.join(compare_dir, "results.json")) as f:
            runs = json.load(f)["runs"]
        groups: dict[tuple, list] = {}
        for r in runs:
            groups.setdefault((r["label"], r["target"]), []).append(r)
        points += [{"label": f"{label} @{target:.0%}", "source": "compare",
                    "macs": rs[0]["macs"], "top1": statistics.fmean(r["top1"] for r in rs)}
                   for (label, target), rs in groups.items()]
    for p in points:
        p["pareto"] = not any(q["macs"] <= p["macs"] and q["top1"] >= p["top1"] and (q["macs"], q["top1"]) != (p["macs"], p["top1"])
                              for q in points)
    return points


def pareto_section(points: list[dict]) -> str:
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["macs"])
    lines = ["## Accuracy vs MACs: the Pareto front\n",
             f"{len(points)} compressed models; on the front (no other model has fewer MACs and higher accuracy):", "",
             "| model | from | MACs | top-1 |", "|---|---|---|---|"]
    lines += [f"| {p['label']} | {p['source']} | {p['macs'] / 1e6:.2f}M | {p['top1']:.2f} % |" for p in front]
    return "\n".join(lines) + "\n\n![pareto](pareto.png)\n"


def _plot_pareto(points: list[dict], base: dict, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=120)
    for marker, source in zip("os^", dict.fromkeys(p["source"] for p in points)):
        mine = [p for p in points if p["source"] == source]
        ax.scatter([p["macs"] / 1e6 for p in mine], [p["top1"] for p in mine], marker=marker, s=36, alpha=0.8, label=source)
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["macs"])
    ax.step([p["macs"] / 1e6 for p in front], [p["top1"] for p in front], where="post", color="black", linewidth=1.2,
            label="Pareto front")
    for i, p in enumerate(front):  # labels alternate below / above the front
        ax.annotate(p["label"], (p["macs"] / 1e6, p["top1"]), fontsize=7, xytext=(6, -12 if i % 2 == 0 else 8),
                    textcoords="offset points")
    floor = min(p["top1"] for p in front) - 6
    below = [p for p in points if p["top1"] < floor]
    if below:  # far-off models would squash the front: listed instead
        ax.set_ylim(bottom=floor)
        ax.text(0.01, 0.02, "below the axis: " + ", ".join(f"{p['label']} {p['top1']:.1f} %" for p in below),
                transform=ax.transAxes, fontsize=7)
    ax.scatter([base["macs"] / 1e6], [base["top1"]], marker="*", s=140, color="black", label="baseline")
    accuracy_vs_macs_axes(ax, "every compressed model of the runs", legend="best", fontsize=10)
    save(fig, path)


# -- Grad-CAM ---------------------------------------------------------------------------------
def _last_stage_block(model: nn.Module) -> nn.Module:
    blocks = [m for n, m in model.named_modules() if n.startswith("layer") and n.count(".") == 1]
    if not blocks:
        raise NortonError("Grad-CAM needs a zoo ResNet (blocks named layerN.k)")
    return blocks[-1]


def _gradcam(out_dir, baseline, test, plan, sweep, grid, grid_names, device, size, class_names) -> dict:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    labels = test.labels
    chosen = []
    for cls in range(int(labels.max()) + 1):  # one image of each class, in class order
        where = (labels == cls).nonzero().flatten()
        if len(where):
            chosen.append(int(where[0]))
        if len(chosen) == plan.gradcam_images:
            break
    images = normalize(test.take(chosen), test.mean, test.std).to(device)
    targets = [ClassifierOutputTarget(int(labels[i])) for i in chosen]
    columns = [("baseline", baseline)]
    for r in plan.gradcam_ranks:
        if r in sweep:
            columns.append((f"rank {r}", load_model(os.path.join(out_dir, f"rank{r}", "final.pt"))[0]))
    last = grid_names[-1]
    columns.append((f"{last} (pruned)", load_model(os.path.join(out_dir, f"grid_{last}", "final.pt"))[0]))
    cams, macs = {}, {}
    for name, model in columns:
        model.to(device).eval()
        with GradCAM(model=model, target_layers=[_last_stage_block(model)]) as cam:
            cams[name] = cam(input_tensor=images, targets=targets)
        macs[name] = complexity(model, list(size)).macs
    agreement = {name: float(np.mean([np.corrcoef(cams["baseline"][i].ravel(), cams[name][i].ravel())[0, 1]
                                      for i in range(len(chosen))])) for name in cams if name != "baseline"}
    _plot_gradcam(images.cpu(), [int(labels[i]) for i in chosen], cams, macs, agreement, os.path.join(out_dir, "gradcam.png"),
                  class_names)
    return {"images": chosen, "target_layer": "last block of the last stage", "correlation_with_baseline": agreement,
            "macs": macs}


def _plot_gradcam(images, labels, cams, macs, agreement, path, class_names) -> None:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    plt = pyplot()
    names = list(cams)
    rows, cols = len(labels), len(names) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.75 * rows + 0.6), dpi=120, squeeze=False)
    base_macs = macs["baseline"]
    for i in range(rows):
        picture = images[i].permute(1, 2, 0).numpy()  # H, W, channels
        picture = (picture - picture.min()) / max(picture.max() - picture.min(), 1e-8)
        rgb = (picture if picture.shape[2] == 3 else np.repeat(picture[..., :1], 3, axis=2)).astype(np.float32)
        axes[i, 0].imshow(rgb)
        axes[i, 0].set_ylabel(class_names[labels[i]] if labels[i] < len(class_names) else str(labels[i]), fontsize=8)
        for j, name in enumerate(names, start=1):
            axes[i, j].imshow(show_cam_on_image(rgb, cams[name][i], use_rgb=True))
    for j, name in enumerate(["input", *names]):
        if j == 0:
            title = "input"
        elif name == "baseline":
            title = "baseline"
        else:
            title = f"{name}\nMACs ↓{100 * (1 - macs[name] / base_macs):.0f} %, r={agreement[name]:.2f}"
        axes[0, j].set_title(title, fontsize=7.5)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Grad-CAM of the true class (last residual block); r = correlation with the baseline's map", fontsize=8.5)
    save(fig, path)


def gradcam_section(cams: dict) -> str:
    lines = ["## Feature preservation (Grad-CAM)\n",
             f"Test images {cams['images']}, target layer: {cams['target_layer']}. Mean correlation of each model's map "
             "with the baseline's:", "", "| model | MACs | correlation |", "|---|---|---|"]
    lines += [f"| {name} | {cams['macs'][name] / 1e6:.2f}M | {value:.3f} |" for name, value in cams["correlation_with_baseline"].items()]
    return "\n".join(lines) + "\n\n![gradcam](gradcam.png)\n"

