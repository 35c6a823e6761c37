"""Test-time augmentation (``augment.tta``): the logits of an image and of its horizontal mirror,
averaged. One function, so validation, retrain's scores, predict and the exported files (wrapped
in ``FlipAverage``) compute the same thing. Logits, not probabilities, are averaged (as airbench
does): the output stays a logit, so every consumer's softmax and argmax work unchanged. No Optuna here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from catdog_hpo.config import TrialConfig


def flip_average(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean of ``forward`` on ``x`` (N x C x H x W) and on ``x`` mirrored left-right (dim 3)."""
    return 0.5 * (forward(x) + forward(torch.flip(x, dims=(3,))))


def forwards_per_image(cfg: TrialConfig) -> int:
    """Forwards of the network per image in the model as shipped (and in validation): 2 with flip
    averaging (the image and its mirror), else 1. The one home of this factor: the cost model's
    validation passes, the inference cost objectives, ``run --max-flops`` and the model card read it."""
    return 2 if cfg.augment.tta else 1


def inference_flops(cfg: TrialConfig, flops: int) -> int:
    """FLOPs per image of the model as shipped: ``flops`` (one forward of the network,
    engine.models.model_cost) times its forwards per image. The flip and the mean (a few
    element-wise ops per pixel and logit) are not counted, as no BN or activation is."""
    return flops * forwards_per_image(cfg)


def forwards_note(cfg: TrialConfig, one_forward: str) -> str:
    """" (2 forwards of ONE_FORWARD: augment.tta)" when the model as shipped runs the network more
    than once, else "": what a figure of the shipped model's FLOPs says of how it is made up."""
    forwards = forwards_per_image(cfg)
    return f" ({forwards} forwards of {one_forward}: augment.tta)" if forwards > 1 else ""


def describe_flops(cfg: TrialConfig, flops: int) -> str:
    """FLOPs per image of the model as shipped, for a log line: "2.5 MFLOPs/image", with the
    forwards named when TTA runs the network more than once."""
    shipped = inference_flops(cfg, flops) / 1e6  # FLOPs -> MFLOPs
    return f"{shipped:,.1f} MFLOPs/image" + forwards_note(cfg, f"{flops / 1e6:,.1f}")


def tta_forward(forward: Callable[[torch.Tensor], torch.Tensor], tta: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward`` flip-averaged when ``tta``, else ``forward`` itself."""
    return (lambda x: flip_average(forward, x)) if tta else forward


class FlipAverage(nn.Module):
    """``model`` with flip averaging inside: what the exported files hold when ``augment.tta`` is
    on (two forwards per image). Its state dict keys carry a ``model.`` prefix: save the inner model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flip_average(self.model, x)


def with_tta(model: nn.Module, tta: bool) -> nn.Module:
    """``model`` wrapped in ``FlipAverage`` when ``tta``, else ``model`` itself."""
    return FlipAverage(model) if tta else model
