"""The parts the from-scratch families (engine/models.py: cnn, engine/resnet.py: resnet) are built
from: the layer registries and the weight initialisation. No Optuna here.

Registries (plain dicts; keys match catdog_hpo.config's choices, checked at import):
ACTIVATIONS, POOLS, PADDINGS, INITS, HEADS.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from catdog_hpo import config
from catdog_hpo.config import ModelConfig

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=True),
    "prelu": nn.PReLU,  # one learned negative slope per layer, starting at 0.25
    "tanh": nn.Tanh,
}
config.check_registry("activations", ACTIVATIONS, config.ACTIVATIONS)

# (name, negative slope) torch.nn.init's gain uses for each activation: GELU and SiLU behave like
# ReLU for the gain; PReLU like a leaky ReLU at its initial slope.
_GAINS: dict[str, tuple[str, float]] = {
    "relu": ("relu", 0.0),
    "leaky_relu": ("leaky_relu", 0.01),
    "gelu": ("relu", 0.0),
    "silu": ("relu", 0.0),
    "prelu": ("leaky_relu", 0.25),
    "tanh": ("tanh", 0.0),
}
config.check_registry("activation init gains", _GAINS, config.ACTIVATIONS)

POOLS: dict[str, Callable[[], nn.Module]] = {
    "max": lambda: nn.MaxPool2d(2),  # 2x2, stride 2: halves H and W (rounding down)
    "avg": lambda: nn.AvgPool2d(2),
}
config.check_registry("pools", POOLS, config.POOLS)

# Padding name -> zeros added on each side (px) for a kernel size.
PADDINGS: dict[str, Callable[[int], int]] = {
    "same": lambda kernel: kernel // 2,  # odd kernels at stride 1 keep the side
    "valid": lambda kernel: 0,  # each conv trims kernel - 1 px
}
config.check_registry("paddings", PADDINGS, config.PADDINGS)


def conv_side(side: int, kernel: int, stride: int, pad: int) -> int:
    """Output side (px) of a convolution, as torch computes it; < 1 when the map vanishes."""
    return (side + 2 * pad - kernel) // stride + 1


# --------------------------------------------------------------------------- initialisation


def _keep(m: nn.Module, nonlinearity: str, slope: float) -> None:
    """PyTorch's default: what the layer's reset_parameters drew (uniform, fan-in scaled)."""


def _kaiming_normal(m: nn.Module, nonlinearity: str, slope: float) -> None:
    nn.init.kaiming_normal_(m.weight, a=slope, mode="fan_in", nonlinearity=nonlinearity)
    _zero_bias(m)


def _kaiming_uniform(m: nn.Module, nonlinearity: str, slope: float) -> None:
    nn.init.kaiming_uniform_(m.weight, a=slope, mode="fan_in", nonlinearity=nonlinearity)
    _zero_bias(m)


def _xavier_normal(m: nn.Module, nonlinearity: str, slope: float) -> None:
    nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain(nonlinearity, slope))
    _zero_bias(m)


def _xavier_uniform(m: nn.Module, nonlinearity: str, slope: float) -> None:
    nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain(nonlinearity, slope))
    _zero_bias(m)


def _zero_bias(m: nn.Module) -> None:
    if m.bias is not None:
        nn.init.zeros_(m.bias)


# Init name -> what it does to one conv or hidden linear layer (weight and bias).
INITS: dict[str, Callable[[nn.Module, str, float], None]] = {
    "kaiming_normal": _kaiming_normal,
    "kaiming_uniform": _kaiming_uniform,
    "xavier_normal": _xavier_normal,
    "xavier_uniform": _xavier_uniform,
    "pytorch": _keep,
}
config.check_registry("inits", INITS, config.INITS)


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """``cfg.init`` on every conv and hidden linear, with the gain of ``cfg.activation``. BatchNorm
    stays at identity (PyTorch's default) and the classifier keeps PyTorch's default, so the
    initial logits are small."""
    if next(model.parameters()).is_meta:
        return  # model_cost's shape-only copy: init on meta tensors would import torch._dynamo (~2 s)
    nonlinearity, slope = _GAINS[cfg.activation]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in model.modules():
        if isinstance(m, nn.Conv2d) or (isinstance(m, nn.Linear) and m is not linears[-1]):
            INITS[cfg.init](m, nonlinearity, slope)


# --------------------------------------------------------------------------- heads


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
