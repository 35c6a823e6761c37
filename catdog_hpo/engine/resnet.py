"""The small ResNet family ("resnet"), trained from scratch: He et al. 2016's basic blocks sized
for small photos. No Optuna here.

A 3x3 stem conv (stride 1) to the first stage's width, then ``cfg.stages``: each ``blocks``
residual basic blocks of ``channels``, the first strided by ``stride`` (2 halves the side) with a
1x1 projection shortcut where the shape changes; batch norm (``cfg.batch_norm``) after every
conv; the head of ``cfg.head`` (``gap`` in the built-in space). No max-pool after the stem: at
32-64 px it would throw away half the picture before the first block.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from catdog_hpo.config import ModelConfig
from catdog_hpo.engine.layers import ACTIVATIONS, HEADS, conv_side, init_weights


def _conv_bn(cfg: ModelConfig, in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    """A 'same'-padded conv [-> BatchNorm]; bias only without BN (BN's shift replaces it)."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=not cfg.batch_norm)
    return nn.Sequential(conv, nn.BatchNorm2d(out_ch)) if cfg.batch_norm else nn.Sequential(conv)


class BasicBlock(nn.Module):
    """act(conv3x3 -> BN -> act -> conv3x3 -> BN  +  shortcut(x))."""

    def __init__(self, cfg: ModelConfig, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            _conv_bn(cfg, in_ch, out_ch, 3, stride), ACTIVATIONS[cfg.activation](), _conv_bn(cfg, out_ch, out_ch, 3, 1)
        )
        # A 1x1 projection where the shape changes (stride or width); the identity otherwise (None:
        # no module, so the cost model counts no layer for it).
        self.shortcut = _conv_bn(cfg, in_ch, out_ch, 1, stride) if stride != 1 or in_ch != out_ch else None
        self.act = ACTIVATIONS[cfg.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.branch(x) + skip)


def resnet_side(cfg: ModelConfig, image_size: int) -> int:
    """Feature-map side (px) after all stages: each stride-s 3x3 conv (padding 1) gives
    ceil(side / s), so the map never vanishes."""
    side = image_size
    for stage in cfg.stages:
        side = conv_side(side, 3, stage.stride, 1)
    return side


def build_resnet(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """The stem, the stages, the head; initialised by ``cfg.init``."""
    width = cfg.stages[0].channels
    layers: list[nn.Module] = [_conv_bn(cfg, 3, width, 3, 1), ACTIVATIONS[cfg.activation]()]
    for stage in cfg.stages:
        for i in range(stage.blocks):
            layers.append(BasicBlock(cfg, width, stage.channels, stage.stride if i == 0 else 1))
            width = stage.channels
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(*layers),
        head=HEADS[cfg.head](cfg, width, resnet_side(cfg, image_size), num_classes),
    ))
    init_weights(model, cfg)
    return model
