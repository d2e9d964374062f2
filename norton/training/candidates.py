"""Choosing among the planner's candidate plans by what fine-tuning makes of them.

The planner ranks whole candidate plans by the damage they do before any
training; a plan that starts closer to the uncompressed model can end further
from it after fine-tuning (benchmarks/candidates.py measured it: on ResNet-20 /
Fashion-MNIST the candidate of least damage was not the most accurate after
fine-tuning, at 60 % nor at 85 % fewer MACs).  ``select_plan`` applies every
candidate (decompose, prune, least-squares refit if the plan was made with it,
BN recalibration), fine-tunes it briefly with the run's own recipe and keeps
the one with the best top-1 on the **validation** split — never the test set.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import replace

import torch
from torch import nn

from norton.checkpoints import atomic_write_text
from norton.compression import Plan, recover
from norton.errors import NortonError
from norton.training.classification import TrainConfig, fit, recalibrate_bn
from norton.training.data import ArrayDataset


def apply_plan(model: nn.Module, plan: Plan, example: torch.Tensor, calibration: list[torch.Tensor],
               seed: int) -> nn.Module:
    """``plan`` applied to ``model`` in place — decompose, prune, and the
    least-squares refit on ``calibration`` when the plan was made with it."""
    plan.decompose(model)
    reference = copy.deepcopy(model) if plan.recover else None
    report = plan.prune(model, example)
    if reference is not None and report.groups:
        recover(model, reference, calibration, report, seed=seed)
    return model


def select_plan(model: nn.Module, plan: Plan, train: ArrayDataset, val: ArrayDataset, *, epochs: int,
                finetune: TrainConfig, run_dir: str, calibration: list[torch.Tensor], example: torch.Tensor,
                device: torch.device, recalibration_images: int = 512, seed: int = 0,
                progress: bool = False) -> Plan:
    """The candidate of ``plan.alternatives`` whose best validation top-1 after
    ``epochs`` epochs of ``finetune`` is highest (a tie keeps the planner's own
    choice), with every candidate's score in ``Plan.selection``.  Each
    candidate's run is kept under ``run_dir/<i>``, so an interrupted selection
    resumes.  ``model`` (the uncompressed one) is not changed."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise NortonError(f"selection epochs must be a positive integer, got {epochs!r}")
    if not plan.alternatives:
        raise NortonError("this plan has no candidate plans to select from (plan a MACs target with allocation 'best')")
    scores: dict[str, float] = {}
    for i, name in enumerate(plan.alternatives):
        cell = os.path.join(run_dir, str(i))
        done = os.path.join(cell, "selection.json")
        if os.path.exists(done):
            with open(done) as f:
                scores[name] = json.load(f)["val_top1"]
            continue
        trial = apply_plan(copy.deepcopy(model).cpu(), plan.alternative(name), example, calibration, seed).to(device)
        recalibrate_bn(trial, train, device=device, num_images=recalibration_images, seed=seed)
        result = fit(trial, train, val, replace(finetune, epochs=epochs, seed=seed), cell, device=device,
                     overwrite=True, progress=progress, extra={"stage": f"plan selection: {name}"})
        scores[name] = float(result.best_val["top1"])
        os.makedirs(cell, exist_ok=True)
        atomic_write_text(done, json.dumps({"candidate": name, "val_top1": scores[name]}))
    own = plan.allocation.split(" (")[0]  # the planner's own pick, by damage
    best = max(scores, key=lambda n: (scores[n], n == own))
    chosen = plan.alternative(best)
    chosen.allocation = f"{best} (best validation top-1 of {len(scores)} after {epochs} epoch(s))"
    chosen.selection = scores
    return chosen
