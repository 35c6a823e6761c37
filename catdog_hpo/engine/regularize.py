"""Loss penalties a config asks for (``optim.l1``), wrapped around the training criterion, so the
eager step and the captured step (engine/graphstep.py) both add them with no change of their
own. No Optuna here."""

from __future__ import annotations

import torch
from torch import nn


class L1Penalised(nn.Module):
    """``criterion(logits, y) + l1 * sum |w|`` over the conv and linear weights (the parameters of
    2+ dimensions): biases, norm affines and PReLU slopes are not what L1 should make sparse."""

    def __init__(self, criterion: nn.Module, params: list[nn.Parameter], l1: float) -> None:
        super().__init__()
        self.criterion = criterion
        self.weights = [p for p in params if p.dim() > 1]  # a plain list: not the criterion's own parameters
        self.l1 = l1

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        penalty = torch.stack([w.abs().sum() for w in self.weights]).sum()
        return self.criterion(logits, target) + self.l1 * penalty


def with_l1(criterion: nn.Module, params: list[nn.Parameter], l1: float) -> nn.Module:
    """``criterion`` itself at ``l1`` 0 (what ran before, bit for bit), else wrapped in the penalty
    over the trainable ``params``."""
    if l1 == 0 or not any(p.dim() > 1 for p in params):
        return criterion
    return L1Penalised(criterion, params, l1)
