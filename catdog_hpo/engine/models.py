"""ModelConfig -> nn.Module: a VGG-like CNN family and ResNet-18, shape-checked before training.

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
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from catdog_hpo.config import ModelConfig
from catdog_hpo.errors import ConfigError, UserError

RESNET_MIN_SIZE = 32  # px: below this ResNet-18's five stride-2 stages leave nothing to pool
RESNET_FEATURES = 512  # channels out of ResNet-18's last stage


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
# Name torch.nn.init's gain uses for each activation (GELU/SiLU behave like ReLU for the gain).
_INIT_NONLINEARITY = {"relu": "relu", "leaky_relu": "leaky_relu", "gelu": "relu", "silu": "relu"}
_LEAKY_SLOPE = 0.01

POOLS: dict[str, Callable[[], nn.Module]] = {
    "max": lambda: nn.MaxPool2d(2),  # 2x2, stride 2: halves H and W (rounding down)
    "avg": lambda: nn.AvgPool2d(2),
}


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
        for flag in ("pretrained", "freeze_backbone"):
            if getattr(cfg, flag):
                raise ConfigError(f"model.{flag}: applies to family resnet18 only, not cnn")
        if cfg.weights_file:
            raise ConfigError(f"model.weights_file {cfg.weights_file!r}: applies to family resnet18 only, not cnn")
        _cnn_side(cfg, image_size)
    elif cfg.family == "resnet18":
        if image_size < RESNET_MIN_SIZE:
            raise ConfigError(
                f"image_size: {image_size} px is too small for resnet18 (needs >= {RESNET_MIN_SIZE})"
            )
        if cfg.freeze_backbone and not (cfg.pretrained or cfg.weights_file):
            raise ConfigError(
                "model.freeze_backbone: a frozen backbone needs trained weights "
                "(set model.pretrained or model.weights_file)"
            )


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


def _resnet_head(cfg: ModelConfig, num_classes: int) -> nn.Module:
    if cfg.fc_hidden > 0:
        return nn.Sequential(
            nn.Linear(RESNET_FEATURES, cfg.fc_hidden), nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout), nn.Linear(cfg.fc_hidden, num_classes),
        )
    return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(RESNET_FEATURES, num_classes))


def build_resnet18(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's ResNet-18 with a new head; weights are loaded by build_model, not here."""
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    model.fc = _resnet_head(cfg, num_classes)
    return model


FAMILIES: dict[str, Callable[[ModelConfig, int, int], nn.Module]] = {
    "cnn": build_cnn,
    "resnet18": build_resnet18,
}


# --------------------------------------------------------------------------- ResNet weights


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet ResNet-18 weights through torchvision's weights API (downloads once, then cached)."""
    from torchvision.models import ResNet18_Weights

    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, hash mismatch, disk errors: all mean "no weights"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"model.pretrained: could not get the ImageNet ResNet-18 weights ({first}); "
            "download resnet18-f37072fd.pth elsewhere and set model.weights_file to it"
        ) from None


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"model.weights_file {str(path)!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"model.weights_file {str(path)!r}: not a PyTorch state dict ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.weights_file {str(path)!r}: not a state dict of tensors")
    return state


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every backbone tensor of ``state`` (its ``fc.*`` classifier is dropped: we have our own)."""
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = {k for k in model.state_dict() if not k.startswith("fc.")}
    missing = sorted(expected - set(backbone))
    unexpected = sorted(set(backbone) - expected)
    if missing or unexpected:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise UserError(f"{source}: not a ResNet-18 state dict ({what})")
    try:
        model.load_state_dict(backbone, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()[-1].strip()
        raise UserError(f"{source}: does not fit ResNet-18 ({first})") from None


def _freeze_backbone(model: nn.Module) -> None:
    """Only the head (``fc``) trains. BatchNorm running statistics still adapt in train mode."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))


# --------------------------------------------------------------------------- public


def _check_all(cfg: ModelConfig, num_classes: int, image_size: int) -> None:
    check_model(cfg, image_size)
    if num_classes < 2:
        raise ConfigError(f"num_classes: {num_classes}; a classifier needs at least 2 classes")


def build_model(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """The model ``cfg`` describes for ``num_classes`` classes and square ``image_size`` px inputs."""
    _check_all(cfg, num_classes, image_size)
    model = FAMILIES[cfg.family](cfg, num_classes, image_size)
    if cfg.family == "resnet18":
        if cfg.weights_file:  # a local file replaces the download
            path = Path(cfg.weights_file).expanduser()
            _load_backbone(model, _file_state_dict(path), f"model.weights_file {str(path)!r}")
        elif cfg.pretrained:
            _load_backbone(model, _imagenet_state_dict(), "ImageNet ResNet-18 weights")
        if cfg.freeze_backbone:
            _freeze_backbone(model)
    return model


def model_cost(cfg: ModelConfig, num_classes: int, image_size: int) -> ModelCost:
    """Parameters and forward FLOPs per image, from a forward pass on the meta device (no memory,
    no arithmetic, a few ms). Checks the model first (ConfigError)."""
    _check_all(cfg, num_classes, image_size)
    with torch.device("meta"):
        model = FAMILIES[cfg.family](cfg, num_classes, image_size)
        x = torch.empty(1, 3, image_size, image_size)
    flops = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal flops
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            flops += 2 * out[0].numel() * k  # out[0]: C_out x H' x W' multiply-adds of k each
        elif isinstance(module, nn.Linear):
            flops += 2 * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(params=int(params), flops=int(flops))
