"""Every torchvision classification model through norton, as a new user would try it.

Two modes per model (random weights, one 1×3×S×S input, the classifier left
whole, 50 % of the filters of every prunable group, l2 selection):

- ``decompose+prune``: CP rank 8 on the layers where the factored form is
  cheaper (``only_cheaper``), then pruning;
- ``prune``: pruning only;

then ``norton.deploy`` (outputs checked against the compressed model) and ONNX
export (checker + ONNX Runtime against PyTorch).  The pruned model is also
compared with the model before pruning with the removed channels zeroed
(``zeroed_equivalent``), to the same tolerance — except where a cut group
passes through a LayerNorm or GroupNorm, which normalises across the channels
that went (then the pruned model is another function and the column says so).  Each (model, mode) runs in its
own subprocess with a time limit; its row is kept in ``--cache`` as soon as it
ends, so an interrupted run continues where it stopped (``--resume``).  The
record is the site's source: ``docs/generate.py`` renders ``docs/results/zoo.md``
(``zoo_timm.md``) from it; ``--out`` also writes the table to a file of your own.

    .venv/bin/python benchmarks/zoo.py [--models resnet18 mobilenet_v2 ...] [--size 224] [--timeout 900]
    .venv/bin/python benchmarks/zoo.py --resume --refresh-undated --timeout 180   # re-measure rows without a date
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODES = ("decompose+prune", "prune")
TOLERANCE = 1e-4  # deploy and ONNX outputs must match the compressed model to this fraction of its largest output


# a dozen timm CNNs of different families (timm is a test dependency; `--timm`)
TIMM_MODELS = ["resnet50d", "seresnext26d_32x4d", "efficientnet_b0", "mobilenetv3_large_100", "regnety_016",
               "ghostnet_100", "mixnet_s", "rexnet_100", "cspresnet50", "dla34", "convnext_nano", "repvgg_a2",
               "res2net50_26w_4s", "densenet121", "dpn68b"]


def build(name: str):
    """A classifier with random weights: ``timm/<name>`` from timm, else torchvision's."""
    if name.startswith("timm/"):
        import timm

        return timm.create_model(name[len("timm/"):], pretrained=False)
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def run_one(name: str, mode: str, size: int) -> dict:
    """One (model, mode), in this process; returns its row."""
    import copy
    import tempfile

    import torch

    from norton import NortonError, count_macs, decompose, deploy, prune
    from norton.core import count_params
    from norton.compression.pruning import zeroed_equivalent
    from norton.deployment import export_onnx

    torch.manual_seed(0)
    started = time.perf_counter()
    model = build(name).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        before_shape = tuple(model(x).shape)
    row = {"model": name, "mode": mode, "macs_before": count_macs(model, x), "params_before": count_params(model)}
    head = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    if mode == "decompose+prune":
        report = decompose(model, 8, only_cheaper=True, progress=False)
        row["decomposed"] = len(report.layers)
    reference = copy.deepcopy(model)
    pruning = prune(model, amount=0.5, example_inputs=x, criterion="l2", ignored_layers=[head])
    row["groups_left_whole"] = len(pruning.skipped)
    with torch.no_grad():
        after = model(x)
        try:
            zeroed = zeroed_equivalent(reference, pruning, x)(x)
            row["zeroed_max_abs_diff"] = float((after - zeroed).abs().max()) if after.shape == zeroed.shape else None
        except NortonError as why:  # a cut stream through a LayerNorm: the pruned model is another function
            row["zeroed_max_abs_diff"] = str(why)
    del reference
    scale = float(after.abs().max()) or 1.0  # random weights give outputs of any scale: errors are relative to it
    row.update(macs_after=count_macs(model, x), params_after=count_params(model),
               shape_kept=tuple(after.shape) == before_shape, output_scale=scale)
    _, deployment = deploy(model, x, repeats=1)
    row["deploy_max_abs_error"] = deployment.max_abs_error
    with tempfile.TemporaryDirectory() as folder:
        row["onnx_max_abs_diff"] = export_onnx(model, x, os.path.join(folder, "model.onnx")).max_abs_diff
    row["seconds"] = time.perf_counter() - started
    faithful = row["zeroed_max_abs_diff"]  # a number where an equivalent exists: then it must hold too
    errors = [row["deploy_max_abs_error"], row["onnx_max_abs_diff"], *([faithful] if not isinstance(faithful, str) else [])]
    row["ok"] = row["shape_kept"] and None not in errors and max(errors) <= TOLERANCE * scale
    return row


def run_isolated(name: str, mode: str, size: int, timeout: float) -> dict:
    """``run_one`` in a subprocess with a time limit; a failure becomes a row with its error."""
    started = time.perf_counter()
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--mode", mode, "--size", str(size)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "mode": mode, "ok": False, "seconds": timeout, "error": f"no result within {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    error = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return {"model": name, "mode": mode, "ok": False, "seconds": time.perf_counter() - started,
            "error": (error[-1] if error else f"exit status {done.returncode}")[:300]}


def _relative(diff, scale: float) -> str:
    if isinstance(diff, str):
        if diff.startswith("no zeroed"):  # "... passes through a LayerNorm2d, which normalises across them"
            return f"n/a ({diff.split('passes through a ')[-1].split(',')[0]})"
        return diff
    return "shape differs" if diff is None else f"{diff / scale:.1e}"


def table(rows: list[dict]) -> str:
    out = ["| model | mode | ok | MACs before → after | MACs ↓ | params ↓ | groups left whole | deploy error | ONNX error "
           "| vs zeroed original | s | error |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "macs_after" in r:
            cut = 1 - r["macs_after"] / r["macs_before"]
            params = 1 - r["params_after"] / r["params_before"]
            scale = r.get("output_scale", 1.0)  # relative to the largest output (rows of older runs: absolute)
            out.append(f"| {r['model']} | {r['mode']} | {'✓' if r['ok'] else '✗'} | {r['macs_before'] / 1e6:.1f}M → "
                       f"{r['macs_after'] / 1e6:.1f}M | {cut:.1%} | {params:.1%} | {r['groups_left_whole']} | "
                       f"{r['deploy_max_abs_error'] / scale:.1e} | {r['onnx_max_abs_diff'] / scale:.1e} | "
                       f"{_relative(r.get('zeroed_max_abs_diff', 'not run'), scale)} | {r['seconds']:.0f} | |")
        else:
            error = r.get("error", "").replace("|", "\\|")
            out.append(f"| {r['model']} | {r['mode']} | ✗ | | | | | | | | {r['seconds']:.0f} | {error} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="torchvision model names (default: every classifier)")
    parser.add_argument("--timm", action="store_true", help="the timm models of TIMM_MODELS instead (rows named timm/<name>; "
                        "default record docs/zoo_timm.json)")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--cache", default=None, help="rows kept here as they finish (committed: a run continues across "
                        "sessions; default docs/zoo.json)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --cache")
    parser.add_argument("--refresh-undated", action="store_true",
                        help="with --resume: measure again the rows recorded before rows kept their date and commit")
    parser.add_argument("--out", default=None, help="also write the summary and table here (the site's page, "
                        "docs/results/zoo*.md, is rendered from the record by docs/generate.py)")
    parser.add_argument("--report", action="store_true", help="only write --out from the rows in --cache")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.mode, args.size)))
        return

    import torchvision

    from norton.checkpoints import atomic_write_text
    from norton.core.devices import machine_record, provenance

    stem = "docs/zoo_timm" if args.timm else "docs/zoo"
    args.cache = args.cache or f"{stem}.json"
    if args.timm:
        names = [f"timm/{n}" for n in (args.models or TIMM_MODELS)]
    else:
        names = args.models or torchvision.models.list_models(module=torchvision.models)
    rows = {}
    if (args.resume or args.report) and os.path.exists(args.cache):
        with open(args.cache) as f:
            rows = {(r["model"], r["mode"]): r for r in json.load(f)}
    os.makedirs(os.path.dirname(os.path.abspath(args.cache)), exist_ok=True)
    for name in names:
        for mode in args.modes:
            kept = rows.get((name, mode))
            if args.report or (kept and not (args.refresh_undated and not kept.get("date"))):
                continue
            rows[(name, mode)] = row = run_isolated(name, mode, args.size, args.timeout)
            made = provenance()  # each row when and from which code it was measured: a run spans sessions
            row.update(date=made["date"], commit=made["commit"], cpu=machine_record()["cpu"])
            print(f"{name:<24} {mode:<16} {'ok' if row['ok'] else 'FAILED':<7} {row['seconds']:6.0f} s "
                  f"{row.get('error', '')}", flush=True)
            atomic_write_text(args.cache, json.dumps(list(rows.values()), indent=1))
    ordered = [rows[(n, m)] for n in names for m in args.modes if (n, m) in rows]
    missing = [n for n in names if not any((n, m) in rows for m in args.modes)]
    print(summary(ordered, args.size, args.timm)
          + (f" Not run yet (continue with `--resume`): {', '.join(missing)}." if missing else ""))
    if args.out:
        atomic_write_text(args.out, f"{summary(ordered, args.size, args.timm)}\n\n{table(ordered)}\n")
        print(f"written: {args.out}")
    print(f"recorded in {args.cache}; the site's page is rendered from it by docs/generate.py")


def summary(rows: list[dict], size: int, timm: bool) -> str:
    """What the recorded rows say, in one paragraph (the page's text above the table)."""
    passed = sum(r["ok"] for r in rows)
    deep = sum(r["ok"] and r["macs_after"] <= 0.6 * r["macs_before"] for r in rows)
    exact = sum(r["ok"] and isinstance(r.get("zeroed_max_abs_diff"), float) for r in rows)
    return (f"`.venv/bin/python benchmarks/zoo.py --size {size}{' --timm' if timm else ''}` "
            f"(random weights, 1×3×{size}×{size}, classifier left whole, 50 % of every prunable group, "
            f"l2 selection; decompose+prune = CP rank 8 where cheaper, then pruning): {passed} of {len(rows)} "
            f"(model, mode) pairs keep the output's shape, deploy and export exactly and compute what the model "
            f"before pruning computes with the removed channels zeroed (errors relative to the largest output, at "
            f"most {TOLERANCE:g}; \"n/a\" where a cut group passes through a LayerNorm or GroupNorm: no such copy "
            f"exists); {exact} pairs checked that way; {deep} of the ok pairs lose at least 40 % of their MACs.")


if __name__ == "__main__":
    main()
