"""The one training engine behind classification and detection training.

A ``TrainingRun`` owns what every training loop needs besides its batches:

- the run directory: a finished or unfinished run is never overwritten unless
  asked (``overwrite``), and ``resume`` continues the run that is there;
- the learning-rate schedule: before every optimizer step the lr of each
  parameter group is ``base lr × lr_at(iteration, epoch)``;
- the optimizer step, stopped with a clear message when the loss is not finite
  (the last good checkpoint stays untouched);
- ``last.pt``: model, optimizer, position (iteration, epoch, ...), the run's
  settings and the RNG state, written atomically; resuming restores all of it,
  so a run killed at any point ends bit-identical to an uninterrupted one on CPU;
- ``metrics.jsonl``: one JSON line per record, cut back to the checkpoint's
  position on resume.

Under ``torchrun`` only rank 0 writes.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from norton.checkpoints import atomic_write_text, load_checkpoint, save_checkpoint
from norton.core import tune_allocator
from norton.errors import NortonError
from norton.training.distributed import Distributed

LrFactor = Callable[[int, int], float]  # (iteration, epoch) -> multiplier of the base lr


class TrainingRun:
    """A resumable training run in ``run_dir`` (see the module docstring).

    ``settings`` are the run's configuration as plain data: a run resumes only
    with the settings it was started with (a setting added by a later version
    counts as unchanged when it has its ``defaults`` value).  ``outputs`` are the files a fresh
    run removes when ``overwrite`` is given.  Starting a run sets the process's allocator up
    for training (``norton.tune_allocator``; ``NORTON_ALLOCATOR=default`` leaves it).
    """

    def __init__(self, run_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer, lr_at: LrFactor, *,
                 settings: dict[str, Any], resume: bool = False, overwrite: bool = False, ddp: Distributed | None = None,
                 outputs: tuple[str, ...] = ("last.pt", "metrics.jsonl"), kind: str = "run",
                 defaults: dict[str, Any] | None = None) -> None:
        self.run_dir, self.model, self.optimizer, self.lr_at = run_dir, model, optimizer, lr_at
        self.settings, self.kind, self.defaults = settings, kind, defaults or {}
        self.ddp = ddp or Distributed()
        tune_allocator()
        self.last = os.path.join(run_dir, "last.pt")
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.iteration = 0
        self.state: dict[str, Any] = {}  # the train_state of the checkpoint resumed from
        if self._prepare(resume, overwrite, outputs):
            self._restore()

    # -- run directory ---------------------------------------------------------------------
    def _prepare(self, resume: bool, overwrite: bool, outputs: tuple[str, ...]) -> bool:
        """True when there is a run to resume."""
        if resume and overwrite:
            raise NortonError("give --resume or --overwrite, not both")
        if os.path.exists(self.last):
            if resume:
                return True
            if not overwrite:
                finished = False
                try:
                    finished = bool(load_checkpoint(self.last)["train_state"].get("finished"))
                except NortonError:
                    pass
                state = f"a finished {self.kind}" if finished else f"an unfinished {self.kind}"
                raise NortonError(f"run directory {self.run_dir!r} already holds {state}; "
                                  "pass --resume to continue it or --overwrite to start again")
            if self.ddp.main:
                for name in outputs:
                    path = os.path.join(self.run_dir, name)
                    if os.path.exists(path):
                        os.remove(path)
        elif resume:
            raise NortonError(f"nothing to resume: {self.last!r} does not exist")
        self.ddp.barrier()
        if self.ddp.main:
            os.makedirs(self.run_dir, exist_ok=True)
        self.ddp.barrier()
        return False

    def _restore(self) -> None:
        ckpt = load_checkpoint(self.last)
        state = ckpt["train_state"]
        started = {**self.defaults, **(state.get("config") or {})}
        if {k: started.get(k) for k in self.settings} != self.settings:
            raise NortonError(f"cannot resume {self.run_dir!r} with different settings: "
                              f"it was started with {state.get('config')}")
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        # checkpoints of norton 0.1.0 kept the step count in a LambdaLR state
        self.iteration = state["iteration"] if "iteration" in state else state["scheduler"]["last_epoch"]
        self.state = state

    # -- stepping ------------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss: Tensor, *, loss_value: float, epoch: int, where: str) -> None:
        """One optimizer step on ``loss`` at the scheduled learning rate.

        ``loss_value`` is the loss as reported (summed over processes); a
        non-finite value stops the run before the weights change.
        """
        if not math.isfinite(loss_value):
            raise NortonError(f"the loss became {loss_value} at {where}; training stopped, the last good checkpoint "
                              f"in {self.run_dir!r} is untouched (try a lower learning rate)")
        factor = self.lr_at(self.iteration, epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.iteration += 1

    # -- files ------------------------------------------------------------------------------------
    def save(self, *, finished: bool, position: dict[str, Any], metrics: dict[str, Any] | None = None,
             extra: dict[str, Any] | None = None) -> None:
        """Write ``last.pt`` (rank 0 only) with everything a resume needs."""
        if not self.ddp.main:
            return
        state = {"optimizer": self.optimizer.state_dict(), "iteration": self.iteration, **position,
                 "config": self.settings, "torch_rng": torch.get_rng_state(), "finished": finished}
        save_checkpoint(self.last, self.model, metrics=metrics, train_state=state, extra=extra)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl (rank 0 only)."""
        if self.ddp.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def logged(self, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """The records of metrics.jsonl that ``keep`` accepts; the file is cut back to
        them (records written after the checkpoint that is resumed are dropped)."""
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            rows = [row for row in (json.loads(line) for line in f if line.strip()) if keep(row)]
        self.ddp.barrier()
        if self.ddp.main:
            atomic_write_text(self.metrics_path, "".join(json.dumps(row) + "\n" for row in rows))
        self.ddp.barrier()
        return rows
