"""An exponential moving average of a model's weights (``train.ema``). No Optuna here.

The average lives on the training device beside the weights and is updated after every optimizer
step by one foreach lerp (a few kernel launches, no host sync: the decay is a Python float, a
kernel argument). On CUDA it runs after each replay of the captured step (engine/graphstep.py),
outside the graph, so the graph stays the plain step. Validation runs on the averaged weights
(``applied``), and the state a fit keeps and ships is the averaged one (``state_dict``).

What is averaged: every floating-point tensor of the model's state dict, weights and batch-norm
running statistics alike (as torch.optim.swa_utils' ``use_buffers=True``); integer buffers
(BatchNorm's step count) are the model's own. Early steps are warmed up as TensorFlow's
``num_updates`` does: step n uses min(decay, (1 + n) / (WARMUP + n)), so the random initial
weights fade within the first tens of steps instead of weighing on a short run's average.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

WARMUP = 10  # steps: the n-th update's decay is at most (1 + n) / (WARMUP + n)


class WeightEMA:
    """The running average of ``model``'s float state; ``update`` after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        assert 0.0 < decay < 1.0, f"EMA decay {decay} outside (0, 1)"
        self.model, self.decay = model, decay
        state = model.state_dict(keep_vars=True)
        self.names = [k for k, v in state.items() if v.is_floating_point()]
        # detached views of the model's own tensors: the optimizer's in-place steps show through
        self.live = [state[k].detach() for k in self.names]
        self.avg = [t.clone() for t in self.live]
        self.steps = 0  # updates so far (on the host: the warm-up's decay needs no device read)

    @torch.no_grad()
    def update(self) -> None:
        """avg = d * avg + (1 - d) * weights, with the warmed-up decay d of this step."""
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (WARMUP + self.steps))
        torch._foreach_lerp_(self.avg, self.live, 1.0 - decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its own ones after it
        (copied in place: the captured graph's and torch.compile's tensors stay the same)."""
        with torch.no_grad():
            raw = [t.clone() for t in self.live]
            torch._foreach_copy_(self.live, self.avg)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.live, raw)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Put the averaged weights into the model for good (a finished fit's final model)."""
        torch._foreach_copy_(self.live, self.avg)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged tensors in place of its float ones."""
        out = dict(self.model.state_dict())
        out.update({k: v.detach() for k, v in zip(self.names, self.avg)})
        return out

    def checkpoint(self) -> dict[str, Any]:
        """What engine.resume saves: the averaged state and the step count (the warm-up's place)."""
        return {"state": self.state_dict(), "steps": self.steps}

    @torch.no_grad()
    def load(self, saved: dict[str, Any]) -> None:
        torch._foreach_copy_(self.avg, [saved["state"][k].to(a.device) for k, a in zip(self.names, self.avg)])
        self.steps = int(saved["steps"])


def averaged(ema: WeightEMA | None) -> contextlib.AbstractContextManager:
    """``ema.applied()``, or a block that changes nothing when there is no average."""
    return ema.applied() if ema is not None else contextlib.nullcontext()
