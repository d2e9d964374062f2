"""The whole method in one run: decompose → prune → fine-tune, every stage kept.

``compress`` writes ``decomposed.pt``, ``pruned.pt``, ``finetune/`` (the
training run) and ``final.pt`` into its run directory, plus ``summary.json``
with the accuracy after every stage (before and after BatchNorm
recalibration), MACs and params.  With ``resume=True`` finished stages are
loaded from their checkpoints instead of being redone.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from norton.checkpoints import atomic_write_text, load_model, save_checkpoint
from norton.compression import PLANNER_CRITERION, Plan, calibration_batch_size, check_round_to, decompose, prune, recover
from norton.compression import plan as plan_compression
from norton.core import complexity
from norton.errors import NortonError
from norton.training.classification import (
    TrainConfig,
    evaluate,
    fit,
    load_best,
    recalibrate_bn,
)
from norton.training.data import ArrayDataset, first_images, input_size_of
from norton.training.distributed import Distributed
from norton.training.candidates import select_plan


@dataclass
class CompressConfig:
    """``rank`` given: decompose every conv at that rank, then prune by
    ``compress_rate`` / ``amount`` / ``target_macs`` (of the decomposed model).
    ``rank`` None: the budget planner chooses ranks and filter counts for
    ``target_macs`` (of the dense model) or ``target_speedup``, or ``plan`` (a
    saved plan's dict) is applied as it is."""

    rank: int | None = None
    compress_rate: Any = None  # zoo list/string or {layer: rate}
    amount: float | None = None
    target_macs: float | None = None
    criterion: str | None = None  # pabs with a rank, PLANNER_CRITERION (fpgm) with the planner
    target_speedup: float | None = None
    plan: dict | None = None
    calibration_images: int = 512
    plan_options: dict = field(default_factory=dict)  # other norton.plan arguments: ranks, keep_steps, latency_batch
    global_ranking: bool = False  # with a rank: one filter ranking across layers (amount / target_macs)
    round_to: int | None = None  # with a rank: every pruned group keeps a multiple of this many filters
    # after pruning, refit the layers that lost input channels to the unpruned model's outputs on
    # ``calibration_images`` training images (least squares, ``norton.recover``); the planner then
    # measures its pruning options with the refit too (a plan made so is always applied with it)
    recover: bool = True  # on by default: the medium comparison's ablation (docs/guides/comparison.md, the defaults' studies)
    # prune in this many steps toward the final widths, fine-tuning epochs / steps after each
    iterative_steps: int = 1
    # planner, MACs target: fine-tune each whole candidate plan this many epochs and keep the one of best
    # validation top-1 (norton.select_plan); 0 keeps the planner's candidate of least damage
    selection_epochs: int = 0
    recalibrate: bool = True
    recalibration_images: int = 512
    finetune: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0


def _measure(model: nn.Module, test: ArrayDataset, device: torch.device, ddp: Distributed) -> dict[str, Any]:
    acc = evaluate(model, test, device=device, ddp=ddp)
    cx = complexity(model, list(input_size_of(test)))
    return {"top1": acc["top1"], "top5": acc["top5"], "loss": acc["loss"], "macs": cx.macs, "params": cx.params}


def _recalibrated(model, train, config: CompressConfig, test, device, ddp) -> dict[str, Any] | None:
    if not config.recalibrate:
        return None
    recalibrate_bn(model, train, device=device, num_images=config.recalibration_images, seed=config.seed)
    return evaluate(model, test, device=device, ddp=ddp)


def compress(
    model: nn.Module,
    train: ArrayDataset,
    val: ArrayDataset,
    test: ArrayDataset,
    config: CompressConfig,
    run_dir: str,
    *,
    device: torch.device,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    ddp: Distributed | None = None,
) -> dict[str, Any]:
    """Compress a trained ``model`` with NORTON; returns (and writes) the summary."""
    ddp = ddp or Distributed()
    planned = config.rank is None
    _check_config(config)
    teacher = copy.deepcopy(model) if config.finetune.distill > 0 else None  # the uncompressed model teaches
    summary_path = os.path.join(run_dir, "summary.json")
    stage_files = {s: os.path.join(run_dir, f"{s}.pt") for s in ("decomposed", "pruned", "final")}
    existing = [p for p in stage_files.values() if os.path.exists(p)]
    if existing and not (resume or overwrite):
        raise NortonError(f"run directory {run_dir!r} already holds a compress run; pass --resume to continue it or --overwrite")
    plan_path = os.path.join(run_dir, "plan.json")
    model.to(device)
    fresh_plan = planned and not (resume and os.path.exists(plan_path))
    if fresh_plan and ddp.main:  # one process plans (timings differ between processes), before anything is written
        plan = _make_plan(model, train, val, config, device, progress, os.path.join(run_dir, "selection"))
    if overwrite and ddp.main:
        for p in [*existing, summary_path, plan_path]:
            if os.path.exists(p):
                os.remove(p)
    if ddp.main:
        os.makedirs(run_dir, exist_ok=True)
    ddp.barrier()
    summary: dict[str, Any] = {"config": _jsonable(asdict(config))}
    if resume and os.path.exists(summary_path):
        with open(summary_path) as f:
            summary.update({k: v for k, v in json.load(f).items() if k != "config"})
    input_size = list(input_size_of(test))
    example = torch.zeros(2, *input_size, device=device)
    if "baseline" not in summary:
        summary["baseline"] = _measure(model, test, device, ddp)
    if fresh_plan and ddp.main:
        atomic_write_text(plan_path, json.dumps(plan.to_dict(), indent=1))
        print(plan.table())
    ddp.barrier()
    if planned:
        with open(plan_path) as f:
            plan = Plan.from_dict(json.load(f))
        summary["plan"] = {"target": plan.target, "value": plan.value, "ranks": plan.ranks, "keep": plan.keep,
                           "macs_reduction": plan.macs_reduction, "damage": plan.damage, "allocation": plan.allocation,
                           "seconds": plan.seconds, "round_to": plan.round_to}
    stage_extra = {"plan": plan.to_dict()} if planned else {}
    if getattr(train, "source", None):  # how an image folder was read: commands reading it again take it from here
        stage_extra["data_source"] = train.source

    # ① decompose
    if resume and os.path.exists(stage_files["decomposed"]):
        model, _ = load_model(stage_files["decomposed"])
        model.to(device)
    else:
        if planned:
            report = plan.decompose(model, progress=progress and ddp.main)
        else:
            report = decompose(model, config.rank, progress=progress and ddp.main, seed=config.seed)
        after = _measure(model, test, device, ddp)
        after["mean_nmse"] = report.mean_nmse
        after["layer_nmse"] = {layer.name: layer.nmse for layer in report.layers}
        after["recalibrated"] = _recalibrated(model, train, config, test, device, ddp)
        summary["decomposed"] = after
        if ddp.main:
            save_checkpoint(stage_files["decomposed"], model, metrics=after, input_size=input_size, extra={"stage": "decomposed", **stage_extra})
            _write(summary_path, summary)

    # ② prune (with iterative_steps > 1: steps toward the final widths, each fine-tuned, then the last)
    finetune = config.finetune
    chosen = plan if planned else None
    if config.iterative_steps > 1 and not (resume and os.path.exists(stage_files["pruned"])):
        model, finetune = _iterative_steps(model, chosen, train, val, test, config, run_dir,
                                           example, summary, summary_path, input_size, stage_extra, device=device,
                                           resume=resume, progress=progress, ddp=ddp, teacher=teacher)
    elif config.iterative_steps > 1:
        finetune = replace(config.finetune, epochs=_step_epochs(config)[-1])
    if resume and os.path.exists(stage_files["pruned"]):
        model, _ = load_model(stage_files["pruned"])
        model.to(device)
    else:
        last_step = summary["steps"][0]["final_keep"] if config.iterative_steps > 1 else None  # the one-shot widths
        report, recovery = _prune_once(model, config, chosen, train, example, device, progress and ddp.main,
                                       keep=last_step, refit=_refits(config, chosen))
        after = _measure(model, test, device, ddp)
        if recovery is not None:
            after["recovery"] = {"layers": len(recovery.layers), "seconds": recovery.seconds,
                                 "error_before": {r.name: r.error_before for r in recovery.layers},
                                 "error_after": {r.name: r.error_after for r in recovery.layers}}
        after["recalibrated"] = _recalibrated(model, train, config, test, device, ddp)
        after["kept"] = {g.root: [g.width, g.total] for g in report.groups}
        summary["pruned"] = after
        if ddp.main:
            save_checkpoint(stage_files["pruned"], model, metrics=after, input_size=input_size,
                            extra={"stage": "pruned", "criterion": report.groups[0].criterion if report.groups else "", **stage_extra})
            _write(summary_path, summary)
    ddp.barrier()

    # ③ fine-tune (a resumable training run of its own)
    if resume and os.path.exists(stage_files["final"]):
        model, _ = load_model(stage_files["final"])
        model.to(device)
    else:
        finetune_dir = os.path.join(run_dir, "finetune")
        resuming = resume and os.path.exists(os.path.join(finetune_dir, "last.pt"))
        result = fit(model, train, val, finetune, finetune_dir, device=device, resume=resuming,
                     overwrite=not resuming, progress=progress, extra={"stage": "finetune"}, ddp=ddp, teacher=teacher)
        load_best(model, finetune_dir)
        final = _measure(model, test, device, ddp)
        final["best_epoch"] = result.best_epoch
        final["val_top1"] = result.best_val["top1"]
        summary["final"] = final
        if ddp.main:
            save_checkpoint(stage_files["final"], model, metrics=final, input_size=input_size, extra={"stage": "final", **stage_extra})
            _write(summary_path, summary)
    ddp.barrier()
    return summary


def _criterion(config: CompressConfig, plan: Plan | None) -> str:
    return plan.criterion if plan is not None else (config.criterion or ("l2" if config.rank is None else "pabs"))


def _refits(config: CompressConfig, plan: Plan | None) -> bool:
    """Whether pruning is followed by the least-squares refit: asked for, or the plan was measured with it."""
    return config.recover or (plan is not None and plan.recover)


def _prune_once(model, config: CompressConfig, plan: Plan | None, train, example, device, progress: bool,
                keep: dict[str, int] | None = None, *, refit: bool):
    """One pruning: by the plan, by explicit ``keep`` counts, or by the config's
    rate / amount / MACs target; then, with ``refit``, the least-squares refit of
    the layers it cut.  Returns (prune report, recovery report or None)."""
    reference = copy.deepcopy(model) if refit else None
    if keep is not None:
        report = prune(model, keep=keep, example_inputs=example, criterion=_criterion(config, plan), seed=config.seed)
    elif plan is not None:
        report = plan.prune(model, example)
    else:
        report = prune(model, config.compress_rate, amount=config.amount, target_macs=config.target_macs,
                       example_inputs=example, criterion=config.criterion or "pabs", seed=config.seed,
                       global_ranking=config.global_ranking, round_to=config.round_to)
    if reference is None or not report.groups:
        return report, None
    batches = [b.to(device) for b in calibration_batches(train, config.calibration_images, seed=config.seed)]
    return report, recover(model, reference, batches, report, seed=config.seed, progress=progress)


def _step_epochs(config: CompressConfig) -> list[int]:
    """Fine-tuning epochs after each pruning step: the same share for every step,
    the last one takes what the division leaves."""
    k, total = config.iterative_steps, config.finetune.epochs
    return [total // k] * (k - 1) + [total - (k - 1) * (total // k)]


def _iterative_steps(model, plan, train, val, test, config: CompressConfig, run_dir: str, example, summary: dict,
                     summary_path: str, input_size, stage_extra: dict, *, device, resume: bool, progress: bool,
                     ddp: Distributed, teacher):
    """Steps 1 … k−1 of an iterative pruning (Torch-Pruning's ``iterative_steps``):
    the final widths are found by pruning a copy once, then every group moves
    toward them in equal steps — prune (the criterion chooses again on the
    fine-tuned weights), recover, recalibrate, fine-tune a share of the epochs.
    Each step's fine-tuned model is kept (``step<i>.pt``) so a resumed run goes on
    from the last finished step.  Returns the model and the last step's training config."""
    epochs = _step_epochs(config)
    if "steps" not in summary:
        trial = copy.deepcopy(model)
        report, _ = _prune_once(trial, config, plan, train, example, device, False, refit=False)  # widths only
        del trial
        summary["steps"] = [{"final_keep": {g.root: g.width for g in report.groups},
                             "totals": {g.root: g.total for g in report.groups}}]
    final, totals = summary["steps"][0]["final_keep"], summary["steps"][0]["totals"]
    step_config = replace(config.finetune, warmup_epochs=0)
    for step in range(1, config.iterative_steps):
        path = os.path.join(run_dir, f"step{step}.pt")
        if resume and os.path.exists(path):
            model, _ = load_model(path)
            model.to(device)
            continue
        keep = {root: totals[root] - round((totals[root] - final[root]) * step / config.iterative_steps)
                for root in final}
        _, recovery = _prune_once(model, config, plan, train, example, device, progress and ddp.main,
                                  keep={r: k for r, k in keep.items() if k < totals[r]}, refit=_refits(config, plan))
        recalibrated = _recalibrated(model, train, config, test, device, ddp)
        step_dir = os.path.join(run_dir, f"finetune_step{step}")
        fit(model, train, val, replace(step_config, epochs=epochs[step - 1]), step_dir, device=device,
            resume=resume and os.path.exists(os.path.join(step_dir, "last.pt")), overwrite=not resume,
            progress=progress, extra={"stage": f"finetune step {step}"}, ddp=ddp, teacher=teacher)
        load_best(model, step_dir)
        record = {"step": step, "keep": keep, "epochs": epochs[step - 1],
                  "recalibrated_top1": recalibrated["top1"] if recalibrated else None,
                  "recovered_layers": len(recovery.layers) if recovery else 0, **_measure(model, test, device, ddp)}
        summary["steps"] = [s for s in summary["steps"] if s.get("step") != step] + [record]
        if ddp.main:
            save_checkpoint(path, model, metrics=record, input_size=input_size, extra={"stage": f"step{step}", **stage_extra})
            _write(summary_path, summary)
        ddp.barrier()
    return model, replace(config.finetune, epochs=epochs[-1])


def _check_config(config: CompressConfig) -> None:
    k = config.iterative_steps
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise NortonError(f"iterative_steps must be an integer >= 1, got {k!r}")
    if k > config.finetune.epochs:
        raise NortonError(f"iterative_steps {k} needs at least {k} fine-tuning epochs (one after each step), "
                          f"got {config.finetune.epochs}")
    e = config.selection_epochs
    if isinstance(e, bool) or not isinstance(e, int) or e < 0:
        raise NortonError(f"selection_epochs must be an integer >= 0, got {e!r}")
    if e and (config.rank is not None or config.target_macs is None):
        raise NortonError("selection_epochs chooses among the planner's candidate plans for a MACs target: "
                          "give target_macs without a rank (or set selection_epochs to 0)")
    if config.rank is not None:
        if config.target_speedup is not None or config.plan is not None:
            raise NortonError("a rank and a planner target (target_speedup or plan) exclude each other: "
                              "drop the rank to let the planner choose ranks")
        if config.global_ranking and config.amount is None and config.target_macs is None:
            raise NortonError("global_ranking needs amount or target_macs (it decides the per-layer rates itself)")
        check_round_to(config.round_to)
        return
    if config.round_to is not None:
        raise NortonError("round_to in the config applies to pruning at one rank; the planner takes it in plan_options")
    targets = [x is not None for x in (config.target_macs, config.target_speedup, config.plan)]
    if sum(targets) != 1 or config.compress_rate is not None or config.amount is not None or config.global_ranking:
        raise NortonError("without a rank give exactly one of target_macs, target_speedup or plan "
                          "(compress_rate, amount and global_ranking need a rank)")


def calibration_batches(data: ArrayDataset, num_images: int, *, batch_size: int | None = None, seed: int = 0
                        ) -> list[torch.Tensor]:
    """``num_images`` training images (no augmentation), in batches for the planner
    (by default ``calibration_batch_size``: 256 images a batch, two batches for
    256–512 images, so that the planner screens on the first)."""
    if num_images < 1:
        raise NortonError(f"calibration images must be at least 1, got {num_images}")
    batch_size = batch_size or calibration_batch_size(num_images)
    return list(first_images(data.without_augmentation(), num_images, batch_size, seed=seed, epoch=20_000))


def _make_plan(model, train, val, config: CompressConfig, device, progress: bool, selection_dir: str) -> Plan:
    if config.plan is not None:
        return Plan.from_dict(config.plan)
    batches = [b.to(device) for b in calibration_batches(train, config.calibration_images, seed=config.seed)]
    made = plan_compression(model, batches, target_macs=config.target_macs, target_speedup=config.target_speedup,
                            criterion=config.criterion or PLANNER_CRITERION, seed=config.seed, progress=progress,
                            recover=config.recover,
                            **config.plan_options)
    if not (config.selection_epochs and made.alternatives):
        return made
    input_size = list(input_size_of(val))
    return select_plan(model, made, train, val, epochs=config.selection_epochs, finetune=config.finetune,
                       run_dir=selection_dir, calibration=batches, example=torch.zeros(1, *input_size, device=device),
                       device=device, recalibration_images=config.recalibration_images, seed=config.seed,
                       progress=progress)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _write(path: str, summary: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(_jsonable(summary), indent=1))
