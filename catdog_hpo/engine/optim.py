"""The optimizer and lr-scheduler registries: config names -> torch objects. No Optuna here.

Below both training loops (``engine.train.fit`` and the head-only ``engine.heads.fit_head``),
so each builds its optimizer and schedule from the one table. The names are declared in
``config.py`` (a config is validated without torch); ``check_registry`` ties the two at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from catdog_hpo import config
from catdog_hpo.config import OptimConfig

PLATEAU_PATIENCE = 2  # epochs without a val-loss improvement before ReduceLROnPlateau cuts the lr


# --------------------------------------------------------------------------- optimizers


def _sgd(params: list[nn.Parameter], o: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay, fused=fused or None)


def _adam(params: list[nn.Parameter], o: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, fused=fused or None)


def _adamw(params: list[nn.Parameter], o: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=fused or None)


def _rmsprop(params: list[nn.Parameter], o: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


# fused (Runtime.fused, the CUDA default): one kernel per step for all parameters.
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], OptimConfig, bool], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
    "rmsprop": _rmsprop,
}
config.check_registry("optimizers", OPTIMIZERS, config.OPTIMIZERS)


# --------------------------------------------------------------------------- schedulers


@dataclass
class Schedule:
    scheduler: Any  # a torch lr scheduler, or None
    every: str  # "step": after each optimizer step; "epoch": after each epoch; "val": each epoch, given the val loss

    def after_step(self) -> None:
        if self.every == "step":
            self.scheduler.step()

    def after_epoch(self, val_loss: float) -> None:
        if self.every == "epoch" and self.scheduler is not None:
            self.scheduler.step()
        elif self.every == "val":
            self.scheduler.step(val_loss)


def _no_schedule(opt: torch.optim.Optimizer, o: OptimConfig, epochs: int, steps: int) -> Schedule:
    return Schedule(None, "epoch")


def _step_schedule(opt: torch.optim.Optimizer, o: OptimConfig, epochs: int, steps: int) -> Schedule:
    return Schedule(torch.optim.lr_scheduler.StepLR(opt, step_size=o.step_size, gamma=o.gamma), "epoch")


def _cosine_schedule(opt: torch.optim.Optimizer, o: OptimConfig, epochs: int, steps: int) -> Schedule:
    # stepped per optimizer step: a smooth curve from lr to 0 over the whole run
    return Schedule(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps), "step")


def _onecycle_schedule(opt: torch.optim.Optimizer, o: OptimConfig, epochs: int, steps: int) -> Schedule:
    # lr peaks at optim.lr; momentum is left as configured (no momentum cycling)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=epochs * steps,
                                                cycle_momentum=False)
    return Schedule(sched, "step")


def _plateau_schedule(opt: torch.optim.Optimizer, o: OptimConfig, epochs: int, steps: int) -> Schedule:
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=o.gamma,
                                                       patience=PLATEAU_PATIENCE)
    return Schedule(sched, "val")


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, OptimConfig, int, int], Schedule]] = {
    "none": _no_schedule,
    "step": _step_schedule,
    "cosine": _cosine_schedule,
    "onecycle": _onecycle_schedule,
    "plateau": _plateau_schedule,
}
config.check_registry("schedulers", SCHEDULERS, config.SCHEDULERS)
