"""Mixing augmentations on the device: mixup and cutmix over a chunk of augmented images.

``augment.mix`` picks one: "mixup" blends each image with a partner, "cutmix" pastes a box of
the partner into it. The targets become soft class probabilities (B x C float32) weighted by
the same share, which ``nn.CrossEntropyLoss`` takes as they are (label smoothing applies to
them too). With a mix on, every chunk's targets are soft, so the static step (engine/graphstep.py,
maybe a captured CUDA graph) sees one target shape and dtype for the whole trial. "none"
returns its inputs untouched: training is then bit for bit what it was without this module.

Partners: the chunk is a random draw of the training set in random order (the epoch's
``randperm``), so pairing image i with image i-1 (the first with the last) is a random pairing
that needs no further draw, no gathered copy, and never pairs an image with itself (except in a
chunk of one).

Every draw comes from the loop's device generator (``gen``), which engine/resume.py saves: a
resumed fit draws the same shares and boxes, and the same seed gives the same history. The
Beta(alpha, alpha) shares are a ratio of Gamma draws, because ``torch.distributions.Beta``
takes no generator (it would draw from the global stream). No Optuna here.

The head-only transfer path (engine/heads.py) trains on cached backbone features, not images:
it does not mix (the cached features of a mixed image would have to be extracted anew).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from catdog_hpo import config
from catdog_hpo.config import AugmentConfig


def beta(alpha: float, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """n draws of Beta(alpha, alpha) from ``gen`` (on ``device``): G1 / (G1 + G2) with G ~
    Gamma(alpha, 1). torch's Gamma sampler clamps its draws to the smallest normal float, so the
    ratio is never 0 / 0, even for alpha near 0 (where most draws underflow)."""
    g = torch._standard_gamma(torch.full((2, n), alpha, device=device), generator=gen)
    return g[0] / (g[0] + g[1])


def _with_partner(t: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """Each row of ``t`` moved ``share`` of the way to its partner (the row before it; the first
    row's is the last): ``lerp(row, partner, share)``, ``share`` broadcast per row. Written
    straight from the two slices, with no copy of the partners: a lerp by 0 or 1 is exactly the
    row or its partner."""
    out = torch.empty_like(t)
    torch.lerp(t[1:], t[:-1], share[1:], out=out[1:])
    torch.lerp(t[:1], t[-1:], share[:1], out=out[:1])
    return out


def _soft(y: torch.Tensor, classes: int) -> torch.Tensor:
    """int64 labels (B) -> one-hot probabilities (B x C, float32)."""
    return F.one_hot(y, classes).to(torch.float32)


def _none(x: torch.Tensor, y: torch.Tensor, classes: int, alpha: float,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return x, y


def _mixup(x: torch.Tensor, y: torch.Tensor, classes: int, alpha: float,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """lam * image + (1 - lam) * partner, lam ~ Beta(alpha, alpha) per image; targets alike."""
    n = x.shape[0]
    theirs = 1.0 - beta(alpha, n, gen, x.device)  # the partner's share
    return _with_partner(x, theirs.view(n, 1, 1, 1)), _with_partner(_soft(y, classes), theirs.view(n, 1))


def _cutmix(x: torch.Tensor, y: torch.Tensor, classes: int, alpha: float,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A box of the partner pasted into each image: sides sqrt(1 - lam) of the image's, lam ~
    Beta(alpha, alpha), centred anywhere in the image and clipped at its edges; the target
    weighs the image by the share of its own pixels kept (the clipping included)."""
    n, _, h, w = x.shape
    dev = x.device
    side = torch.sqrt(1.0 - beta(alpha, n, gen, dev)).view(n, 1)  # fraction of each side
    cy = torch.rand(n, 1, generator=gen, device=dev) * h  # px, the box's centre
    cx = torch.rand(n, 1, generator=gen, device=dev) * w
    rows = torch.arange(h, device=dev, dtype=torch.float32) + 0.5  # px, pixel centres
    cols = torch.arange(w, device=dev, dtype=torch.float32) + 0.5
    in_rows = ((rows - cy).abs() < side * (h / 2)).to(torch.float32)  # n x h: 1 = inside the box
    in_cols = ((cols - cx).abs() < side * (w / 2)).to(torch.float32)  # n x w
    box = in_rows[:, :, None] * in_cols[:, None, :]  # n x h x w: 1 = the partner's pixel
    theirs = in_rows.mean(1) * in_cols.mean(1)  # the partner's share of the pixels (the box's area)
    return _with_partner(x, box.view(n, 1, h, w)), _with_partner(_soft(y, classes), theirs.view(n, 1))


MixFn = Callable[[torch.Tensor, torch.Tensor, int, float, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
MIXES: dict[str, MixFn] = {"none": _none, "mixup": _mixup, "cutmix": _cutmix}
config.check_registry("mixes", MIXES, config.MIXES)


def mix_batch(x: torch.Tensor, y: torch.Tensor, classes: int, cfg: AugmentConfig,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, targets) of a chunk, mixed as ``cfg.mix`` says: float B x 3 x H x W images and
    int64 labels in; the same images and labels with "none", else mixed images and B x C float32
    class probabilities. ``gen`` must live on ``x.device``."""
    assert cfg.mix in MIXES and cfg.mix_alpha > 0, (cfg.mix, cfg.mix_alpha)
    assert x.shape[0] == y.shape[0] and y.dtype == torch.int64, (tuple(x.shape), tuple(y.shape), y.dtype)
    return MIXES[cfg.mix](x, y, classes, cfg.mix_alpha, gen)
